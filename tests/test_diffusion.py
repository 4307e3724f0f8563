"""Objectives, samplers, guidance and the version-1 route loss, checked against analytic answers.

The networks here are closed-form ideal denoisers / velocity fields of Gaussian data and of a
Gaussian mixture, written as raw networks F by inverting the preconditioning with the formulas of
Karras et al. 2022 (written out independently of tread_jax.diffusion). Data are [B, 2, 2, 1].
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

from tread_jax import diffusion
from tread_jax.diffusion import EDM, Flow, Guidance
from tread_jax.models.layers import patchify

SHAPE = (2, 2, 1)
DIM = 4
SIGMA_DATA = 0.5


class Mixture:
    """Gaussian mixture sum_k w_k N(m_k, S_k) in DIM dimensions with closed-form ideal networks.

    Class label k < K conditions on component k; label K (the null class) means the full mixture.
    Every covariance met below is diagonal in the eigenbasis S_k = V_k diag(lam_k) V_k^T, so the
    networks are elementwise there (cheap for thousands of samples over many sampler steps).
    """

    def __init__(self, weights, means, covs):
        self.w = jnp.asarray(weights, jnp.float32)
        self.m = jnp.asarray(means, jnp.float32)
        self.s = jnp.asarray(covs, jnp.float32)
        lam, vecs = np.linalg.eigh(np.asarray(covs, np.float64))
        self.lam, self.v = jnp.asarray(lam, jnp.float32), jnp.asarray(vecs, jnp.float32)
        self.k = len(weights)

    def _posterior_mean(self, x, labels, mu, var, gain, offset):
        """sum_k r_k (offset_k + V_k diag(gain / var) V_k^T (x - mu_k)), x ~ N(mu_k, V_k diag(var) V_k^T)."""
        u = jnp.einsum("kdj,bkd->bkj", self.v, x[:, None, :] - mu)  # [B, K, D] in the eigenbasis
        onehot = jax.nn.one_hot(labels, self.k, dtype=bool) | (labels == self.k)[:, None]
        log_w = jnp.where(onehot, jnp.log(self.w), -1e30)
        logp = log_w - 0.5 * jnp.sum(u**2 / var + jnp.log(var), -1)
        r = jax.nn.softmax(logp, axis=-1)
        per_comp = offset + jnp.einsum("kdj,bkj->bkd", self.v, gain * u / var)
        return jnp.sum(r[..., None] * per_comp, axis=1)

    def denoiser(self, x, sigma, labels):
        """E[x0 | x0 + sigma n = x] = sum_k r_k (m_k + S_k (S_k + sigma^2)^-1 (x - m_k)); sigma f32[B]."""
        var = self.lam[None] + (sigma**2)[:, None, None]
        return self._posterior_mean(x, labels, self.m[None], var, self.lam[None], self.m[None])

    def velocity(self, z, t, labels):
        """E[eps - x0 | (1 - t) x0 + t eps = z] = sum_k r_k (-m_k + (t - (1 - t) S_k) C_k^-1 (z - (1 - t) m_k)),
        C_k = (1 - t)^2 S_k + t^2."""
        a, t = (1 - t)[:, None, None], t[:, None, None]
        var = a**2 * self.lam[None] + t**2
        return self._posterior_mean(z, labels, a * self.m[None], var, t - a * self.lam[None], -self.m[None])

    def edm_net(self, x_in, noise_labels, labels):
        """Raw EDM network F with D = c_skip x + c_out F(c_in x, ln(sigma)/4) equal to the ideal D."""
        sigma = jnp.exp(4.0 * noise_labels)
        norm = jnp.sqrt(sigma**2 + SIGMA_DATA**2)
        x = x_in.reshape(-1, DIM) * norm[:, None]
        c_skip = SIGMA_DATA**2 / norm**2
        c_out = sigma * SIGMA_DATA / norm
        out = (self.denoiser(x, sigma, labels) - c_skip[:, None] * x) / c_out[:, None]
        return out.reshape(x_in.shape)

    def flow_net(self, z, noise_labels, labels):
        return self.velocity(z.reshape(-1, DIM), noise_labels, labels).reshape(z.shape)

    def moments(self):
        """Mean and covariance of the whole mixture."""
        mean = jnp.sum(self.w[:, None] * self.m, 0)
        dm = self.m - mean
        cov = jnp.sum(self.w[:, None, None] * (self.s + dm[:, :, None] * dm[:, None, :]), 0)
        return np.asarray(mean), np.asarray(cov)


def _spd(seed, scale):
    a = np.random.default_rng(seed).normal(size=(DIM, DIM))
    return scale * (a @ a.T / DIM + 0.3 * np.eye(DIM))


GAUSS = Mixture([1.0], [[0.5, -0.3, 0.2, 0.0]], [_spd(0, 0.4)])
MIX = Mixture([0.3, 0.7], [[1.0, 1.0, -0.5, 0.0], [-1.0, -0.5, 0.5, 0.5]], [_spd(1, 0.15), _spd(2, 0.1)])


def _sqrtm(a):
    vals, vecs = np.linalg.eigh(np.asarray(a, np.float64))
    return (vecs * np.sqrt(vals)) @ vecs.T


def _noise(seed, batch):
    return jax.random.normal(jax.random.key(seed), (batch, *SHAPE))


def _labels(batch, value=0):
    return jnp.full((batch,), value, jnp.int32)


def _flat(x):
    return np.asarray(x, np.float64).reshape(x.shape[0], -1)


def _check_moments(samples, mixture, n_se=5.0):
    """Sample mean and covariance against the analytic ones, within n_se standard errors."""
    x = _flat(samples)
    mean, cov = mixture.moments()
    n = x.shape[0]
    se_mean = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), n_se * se_mean)
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)  # Gaussian approximation
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), n_se * se_cov + 0.01)


# --- config and construction ---------------------------------------------------------------


def test_default_config_and_create_objective():
    edm = diffusion.create_objective(diffusion.default_config("edm"))
    assert edm == EDM(sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0, num_steps=40)
    cfg = diffusion.default_config("flow")
    cfg.sampler, cfg.num_steps = "heun", 8
    flow = diffusion.create_objective(cfg)
    assert flow == Flow(logit_mean=0.0, logit_std=1.0, sampler="heun", num_steps=8)
    partial = diffusion.create_objective(ml_collections.ConfigDict({"name": "edm", "num_steps": 18}))
    assert partial.num_steps == 18 and partial.sigma_max == 80.0


@pytest.mark.parametrize(
    "config, match",
    [
        ({"name": "ddim"}, "unknown objective"),
        ({"num_steps": 3}, "unknown objective"),
        ({"name": "edm", "sigma_dat": 0.5}, "unknown edm objective settings"),
        ({"name": "edm", "sigma_min": 90.0}, "sigma_max"),
        ({"name": "edm", "num_steps": 1}, "num_steps"),
        ({"name": "flow", "sampler": "rk4"}, "sampler"),
        ({"name": "flow", "logit_std": 0.0}, "logit_std"),
    ],
)
def test_bad_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        diffusion.create_objective(ml_collections.ConfigDict(config))


def test_bad_sample_inputs_raise():
    with pytest.raises(ValueError, match="class_labels"):
        EDM().sample(GAUSS.edm_net, _noise(0, 4), _labels(3))
    with pytest.raises(ValueError, match="num_steps"):
        Flow().sample(GAUSS.flow_net, _noise(0, 4), _labels(4), num_steps=0)
    with pytest.raises(ValueError, match="null_class"):
        Guidance(scale=2.0)
    with pytest.raises(ValueError, match="not both"):
        Guidance(scale=2.0, null_class=1, weak_net=GAUSS.flow_net)
    with pytest.raises(ValueError, match="interval"):
        Guidance(scale=2.0, null_class=1, interval=(3.0, 1.0))


# --- losses ----------------------------------------------------------------------------------


def _recording_net(record, x_clean, offset, objective):
    """A raw net whose output is the exact target plus ``offset``; it records what it was given."""

    def net(x_in, noise_labels, labels):
        record["noise_labels"], record["x_in"] = noise_labels, x_in
        if objective == "edm":
            sigma = jnp.exp(4 * noise_labels)[:, None, None, None]
            norm = jnp.sqrt(sigma**2 + SIGMA_DATA**2)
            noisy = x_in * norm
            return (x_clean + offset - SIGMA_DATA**2 / norm**2 * noisy) / (sigma * SIGMA_DATA / norm)
        t = noise_labels[:, None, None, None]
        eps = (x_in - (1 - t) * x_clean) / t
        return eps - x_clean + offset

    return net


def test_edm_loss_weighting_and_noise_distribution():
    batch, offset = 20000, 0.1
    x = _noise(1, batch) * 0.5 + 0.2
    record = {}
    loss = EDM().loss(_recording_net(record, x, offset, "edm"), x, _labels(batch), jax.random.key(2))
    assert loss.shape == x.shape and loss.dtype == jnp.float32
    sigma = jnp.exp(4 * record["noise_labels"])
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    # D - x = offset exactly, so each element of the loss is weight(sigma) * offset^2.
    np.testing.assert_allclose(loss, np.broadcast_to(weight[:, None, None, None] * offset**2, x.shape), rtol=2e-3)
    log_sigma = np.log(np.asarray(sigma))
    assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
    # The network input is c_in (x + sigma n) with n standard normal.
    n = (record["x_in"] * np.sqrt(sigma**2 + 0.25)[:, None, None, None] - x) / sigma[:, None, None, None]
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1) < 0.02


def test_edm_stratified_noise_levels_take_one_draw_per_slice():
    batch = 64
    x = _noise(1, batch)
    record = {}
    EDM(stratified=True).loss(_recording_net(record, x, 0.0, "edm"), x, _labels(batch), jax.random.key(3))
    # Map ln(sigma) back to its probability: each of the B equal slices holds exactly one draw.
    z = (4 * np.asarray(record["noise_labels"], np.float64) + 1.2) / 1.2
    slices = np.floor(scipy.stats.norm.cdf(z) * batch).astype(int)
    assert sorted(slices) == list(range(batch))
    assert not np.array_equal(slices, np.sort(slices))  # in random order across the batch


def test_flow_loss_target_and_time_distribution():
    batch, offset = 20000, 0.1
    x = _noise(3, batch) * 0.5 - 0.1
    record = {}
    loss = Flow().loss(_recording_net(record, x, offset, "flow"), x, _labels(batch), jax.random.key(4))
    assert loss.shape == x.shape and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np.full(x.shape, offset**2), rtol=2e-2)
    t = np.asarray(record["noise_labels"])
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.05 and abs(logit.std() - 1.0) < 0.05
    eps = (record["x_in"] - (1 - t[:, None, None, None]) * x) / t[:, None, None, None]
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02


@pytest.mark.parametrize("objective", [EDM(), Flow()], ids=["edm", "flow"])
def test_ideal_network_has_lower_loss_than_perturbed(objective):
    batch = 4096
    key = jax.random.key(5)
    x = (GAUSS.m + jax.random.normal(key, (batch, DIM)) @ jnp.asarray(_sqrtm(GAUSS.s[0]), jnp.float32)).reshape(
        batch, *SHAPE
    )
    ideal = GAUSS.edm_net if isinstance(objective, EDM) else GAUSS.flow_net
    labels = _labels(batch)
    # Same key: the same noise levels and noise for every network, so the comparison is paired.
    mean_loss = jax.jit(
        lambda d: jnp.mean(objective.loss(lambda x_in, n, y: ideal(x_in, n, y) + d, x, labels, jax.random.key(6)))
    )
    losses = {delta: float(mean_loss(delta)) for delta in (0.0, 0.05, -0.05)}
    assert losses[0.0] < losses[0.05] and losses[0.0] < losses[-0.05]


# --- samplers --------------------------------------------------------------------------------


def test_edm_heun_matches_exact_ode_map_on_gaussian():
    """For N(m, S) the probability-flow ODE maps x(sigma_max) to m + S^1/2 (S + sigma_max^2)^-1/2 (x - m).

    Heun-40 lands close to that map, and doubling the steps cuts the error about 4x (second order).
    """
    noise = _noise(7, 256)
    edm = EDM()
    s = np.asarray(GAUSS.s[0], np.float64)
    m = np.asarray(GAUSS.m[0], np.float64)
    transfer = _sqrtm(s) @ np.linalg.inv(_sqrtm(s + 80.0**2 * np.eye(DIM)))
    exact = m + (_flat(noise) * 80.0 - m) @ transfer.T
    errors = {}
    for steps in (40, 80):
        x0 = jax.jit(lambda n, k=steps: edm.sample(GAUSS.edm_net, n, _labels(256), num_steps=k))(noise)
        errors[steps] = np.abs(_flat(x0) - exact).max()
    assert errors[40] < 0.04 and 3.0 < errors[40] / errors[80] < 5.0, errors


def test_flow_samplers_match_exact_ode_map_on_gaussian():
    """For N(m, S) the flow ODE maps eps at t=1 to m + S^1/2 eps.

    Euler converges at first order (halving the step halves the error), Heun at second order.
    """
    noise = _noise(8, 256)
    exact = np.asarray(GAUSS.m[0]) + _flat(noise) @ _sqrtm(GAUSS.s[0]).T
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (16, 32):
            flow = Flow(sampler=sampler, num_steps=steps)
            x0 = jax.jit(lambda n, f=flow: f.sample(GAUSS.flow_net, n, _labels(256)))(noise)
            errors[sampler, steps] = np.abs(_flat(x0) - exact).max()
    assert errors["euler", 32] < 0.15 and 1.7 < errors["euler", 16] / errors["euler", 32] < 2.3, errors
    assert errors["heun", 32] < 2e-3 and 3.0 < errors["heun", 16] / errors["heun", 32] < 5.0, errors


@pytest.mark.parametrize(
    "objective",
    [EDM(), Flow(sampler="euler", num_steps=100), Flow(sampler="heun", num_steps=20)],
    ids=["edm-heun40", "flow-euler100", "flow-heun20"],
)
@pytest.mark.parametrize("mixture", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_sample_moments_match_data(objective, mixture):
    batch = 4096
    net = mixture.edm_net if isinstance(objective, EDM) else mixture.flow_net
    labels = _labels(batch, mixture.k)  # the null class: the full mixture
    x0 = jax.jit(lambda n: objective.sample(net, n, labels))(_noise(9, batch))
    assert x0.shape == (batch, *SHAPE) and x0.dtype == jnp.float32
    _check_moments(x0, mixture)


# --- guidance --------------------------------------------------------------------------------


def _counting(net, calls):
    """Wrap a raw net so each evaluation (also inside jit and loops) records its batch size."""

    def counted(x, n, y):
        jax.debug.callback(lambda b=x.shape[0]: calls.append(b))
        return net(x, n, y)

    return counted


@pytest.mark.parametrize(
    "objective, evaluations",
    [(EDM(num_steps=40), 79), (Flow(sampler="euler", num_steps=12), 12), (Flow(sampler="heun", num_steps=12), 24)],
    ids=["edm", "flow-euler", "flow-heun"],
)
def test_evaluation_counts_and_scale_one_is_conditional(objective, evaluations):
    batch = 8
    net = MIX.edm_net if isinstance(objective, EDM) else MIX.flow_net
    noise, labels = _noise(10, batch), _labels(batch, 1)
    sample = lambda g, calls: jax.jit(lambda n: objective.sample(_counting(net, calls), n, labels, guidance=g))(noise)
    plain_calls, one_calls, cfg_calls = [], [], []
    plain = sample(None, plain_calls)
    jax.effects_barrier()
    assert plain_calls == [batch] * evaluations
    one = sample(Guidance(scale=1.0, null_class=MIX.k), one_calls)
    jax.effects_barrier()
    np.testing.assert_array_equal(one, plain)  # exactly: only the conditional pass runs
    assert one_calls == [batch] * evaluations
    sample(Guidance(scale=2.0, null_class=MIX.k), cfg_calls)
    jax.effects_barrier()
    assert cfg_calls == [2 * batch] * evaluations  # one doubled-batch call per evaluation


def test_guidance_formula_on_one_evaluation():
    def net(x, n, y):
        return x * 0 + (y.astype(jnp.float32) + 1.0)[:, None, None, None] * n[:, None, None, None]

    x, n, y = _noise(11, 4), jnp.linspace(0.1, 0.4, 4), jnp.array([0, 1, 2, 1], jnp.int32)
    null = 5
    cfg = diffusion.guided_net(net, Guidance(scale=3.0, null_class=null))(jnp.float32(0.5))(x, n, y)
    cond, uncond = net(x, n, y), net(x, n, jnp.full_like(y, null))
    np.testing.assert_allclose(cfg, uncond + 3.0 * (cond - uncond), rtol=1e-6)
    weak = lambda x, n, y: 0.5 * net(x, n, y) - 1.0
    sparse = diffusion.guided_net(net, Guidance(scale=3.0, weak_net=weak))(jnp.float32(0.5))(x, n, y)
    np.testing.assert_allclose(sparse, weak(x, n, y) + 3.0 * (cond - weak(x, n, y)), rtol=1e-6)


def test_cfg_moves_samples_toward_class():
    """Larger scales raise the mixture's posterior probability of the requested class."""
    batch = 512
    edm = EDM(num_steps=16)
    noise, labels = _noise(12, batch), _labels(batch, 0)

    def class_prob(x):
        x = jnp.asarray(x).reshape(-1, DIM)
        logp = jnp.stack(
            [jnp.log(MIX.w[k]) + jax.scipy.stats.multivariate_normal.logpdf(x, MIX.m[k], MIX.s[k]) for k in range(2)],
            -1,
        )
        return float(jnp.mean(jax.nn.softmax(logp, -1)[:, 0]))

    probs = {}
    for scale in (0.0, 1.0, 3.0):
        guidance = Guidance(scale=scale, null_class=MIX.k)
        probs[scale] = class_prob(jax.jit(lambda n, g=guidance: edm.sample(MIX.edm_net, n, labels, guidance=g))(noise))
    # Unguided (s=0) samples the mixture, where class 0 has weight 0.3; s=1 samples class 0.
    assert abs(probs[0.0] - 0.3) < 0.06 and probs[1.0] > 0.9 and probs[3.0] > probs[1.0], probs


@pytest.mark.parametrize("objective", [EDM(num_steps=12), Flow(sampler="heun", num_steps=10)], ids=["edm", "flow"])
def test_guidance_interval(objective):
    batch = 8
    is_edm = isinstance(objective, EDM)
    net = MIX.edm_net if is_edm else MIX.flow_net
    noise, labels = _noise(14, batch), _labels(batch, 1)
    sample = lambda g, calls=None: jax.jit(
        lambda n: objective.sample(_counting(net, calls) if calls is not None else net, n, labels, guidance=g)
    )(noise)
    full = sample(Guidance(scale=2.5, null_class=MIX.k))
    cond = sample(None)
    everywhere = (0.0, 1e3)
    nowhere = (2e2, 3e2)
    # Same arithmetic; only XLA's fusion differs between programs with and without lax.cond.
    np.testing.assert_allclose(sample(Guidance(scale=2.5, null_class=MIX.k, interval=everywhere)), full, atol=1e-6)
    np.testing.assert_allclose(sample(Guidance(scale=2.5, null_class=MIX.k, interval=nowhere)), cond, atol=1e-6)
    # A middle interval: the doubled (guided) pass runs exactly at the levels inside it.
    if is_edm:
        # Heun steps evaluate at sigma_i and sigma_{i+1}; the last (Euler) step at sigma_min alone.
        levels = np.repeat(objective.time_steps(12)[:-1], 2)[1:]
        lo, hi = 0.5, 10.0
    else:
        ts = np.linspace(1.0, 0.0, 11)
        levels = np.stack([ts[:-1], ts[1:]], 1).ravel()
        lo, hi = 0.25, 0.65
    calls = []
    mid = sample(Guidance(scale=2.5, null_class=MIX.k, interval=(lo, hi)), calls)
    jax.effects_barrier()
    inside = (levels >= lo) & (levels <= hi)
    assert 0 < inside.sum() < len(levels)
    assert sorted(calls) == sorted(np.where(inside, 2 * batch, batch).tolist())
    assert not np.allclose(mid, full) and not np.allclose(mid, cond)


def test_sparse_guidance():
    batch = 64
    flow = Flow(sampler="euler", num_steps=16)
    noise, labels = _noise(15, batch), _labels(batch, 0)
    strong = flow.sample(MIX.flow_net, noise, labels)
    # weak == strong: weak + s (strong - weak) is the strong output, whatever s.
    same = flow.sample(MIX.flow_net, noise, labels, guidance=Guidance(scale=4.0, weak_net=MIX.flow_net))
    np.testing.assert_allclose(same, strong, atol=1e-6)
    # A weaker branch (here the unconditional mixture) pushes samples further from it.
    uncond = lambda x, n, y: MIX.flow_net(x, n, jnp.full_like(y, MIX.k))
    guided = flow.sample(MIX.flow_net, noise, labels, guidance=Guidance(scale=3.0, null_class=MIX.k))
    sparse = flow.sample(MIX.flow_net, noise, labels, guidance=Guidance(scale=3.0, weak_net=uncond))
    np.testing.assert_allclose(sparse, guided, atol=1e-4)  # same combination as CFG with these branches
    assert not np.allclose(sparse, strong, atol=1e-2)


def test_sampler_with_batch_sharded_over_8_devices():
    """Under jit with the batch sharded over 8 devices the result matches one device and stays sharded."""
    code = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_diffusion import MIX, EDM, Guidance, _noise, _labels
        assert jax.device_count() == 8
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        edm = EDM(num_steps=3)
        g = Guidance(scale=2.0, null_class=MIX.k, interval=(0.1, 5.0))
        noise, labels = _noise(16, 64), _labels(64, 0)
        run = jax.jit(lambda n, y: edm.sample(MIX.edm_net, n, y, guidance=g))
        ref = np.asarray(run(noise, labels))
        with jax.set_mesh(mesh):
            spec = jax.sharding.NamedSharding(mesh, jax.P("data"))
            out = run(jax.device_put(noise, spec), jax.device_put(labels, spec))
            assert out.sharding.spec[0] == "data", out.sharding
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# --- label dropout and the version-1 route loss ----------------------------------------------


def test_drop_labels():
    labels = jax.random.randint(jax.random.key(17), (100_000,), 0, 10)
    dropped = diffusion.drop_labels(jax.random.key(18), labels, 0.1, 10)
    is_null = np.asarray(dropped == 10)
    assert abs(is_null.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / labels.size)
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
    assert dropped.dtype == labels.dtype
    np.testing.assert_array_equal(diffusion.drop_labels(jax.random.key(0), labels, 0.0, 10), labels)
    assert bool(jnp.all(diffusion.drop_labels(jax.random.key(0), labels, 1.0, 10) == 10))
    with pytest.raises(ValueError, match="probability"):
        diffusion.drop_labels(jax.random.key(0), labels, 1.5, 10)


def test_token_loss_matches_loop_and_model_patchify():
    loss = jax.random.uniform(jax.random.key(19), (3, 8, 12, 4))
    p = 4
    tokens = np.asarray(diffusion.token_loss(loss, p))
    ref = np.zeros((3, (8 // p) * (12 // p)))
    arr = np.asarray(loss)
    for b in range(3):
        for i in range(8 // p):
            for j in range(12 // p):
                ref[b, i * (12 // p) + j] = arr[b, i * p : (i + 1) * p, j * p : (j + 1) * p, :].mean()
    np.testing.assert_allclose(tokens, ref, rtol=1e-6)
    np.testing.assert_allclose(tokens, np.asarray(patchify(loss, p)).mean(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="patch_size"):
        diffusion.token_loss(loss, 5)


def test_routed_loss_matches_loop():
    batch, n = 4, 16
    per_token = jax.random.uniform(jax.random.key(20), (batch, n))
    rng = np.random.default_rng(0)
    kept = tuple(jnp.asarray(np.stack([rng.permutation(n)[:k] for _ in range(batch)]), jnp.int32) for k in (8, 12, 16))
    arr = np.asarray(per_token, np.float64)

    def reference(routes, coef):
        kept_means, routed_means = [], []
        for idx in routes:
            idx = np.asarray(idx)
            kept_vals, routed_vals = [], []
            for b in range(batch):
                for t in range(n):
                    (kept_vals if t in idx[b] else routed_vals).append(arr[b, t])
            kept_means.append(np.mean(kept_vals))
            routed_means.append(np.mean(routed_vals) if routed_vals else 0.0)
        return np.mean(kept_means) + coef * np.mean(routed_means)

    for routes in (kept[:1], kept[:2], kept):
        for coef in (0.0, 0.1, 1.0):
            got = float(diffusion.routed_loss(per_token, routes, coef))
            np.testing.assert_allclose(got, reference(routes, coef), rtol=1e-5)
    jitted = jax.jit(lambda l, r: diffusion.routed_loss(l, r, 0.5))(per_token, kept)
    np.testing.assert_allclose(float(jitted), reference(kept, 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(diffusion.routed_loss(per_token, ())), arr.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="kept indices"):
        diffusion.routed_loss(per_token, (jnp.zeros((batch + 1, 4), jnp.int32),))


@pytest.mark.parametrize("name, settings", [("edm", {}), ("flow", {"sampler": "euler"}), ("flow", {"sampler": "heun"}),
                                            ("ddpm", {})])
def test_network_evaluations_count_the_samplers_calls(name, settings):
    # Without jit the samplers' fori_loops run as Python loops, so every network call is counted.
    config = diffusion.default_config(name)
    config.update(settings)
    objective = diffusion.create_objective(config)
    calls = []

    def net(x, noise_labels, class_labels):
        calls.append(noise_labels)
        return jnp.zeros((*x.shape[:-1], objective.output_channels(x.shape[-1])))

    for num_steps in (3, 5):
        calls.clear()
        with jax.disable_jit():
            objective.sample(net, _noise(0, 2), _labels(2), num_steps=num_steps)
        assert len(calls) == objective.network_evaluations(num_steps)
    assert objective.network_evaluations() == objective.network_evaluations(objective.num_steps)
