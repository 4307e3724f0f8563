"""DDPM objective (DiT's): schedule, sampler steps and loss against diffusers and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # before diffusers (tests/conftest.py)
from diffusers import DDIMScheduler, DDPMScheduler

from tread_jax import diffusion
from tread_jax.diffusion import DDPM, Guidance

SHAPE = (2, 4, 4, 3)  # B, H, W, C


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


def _ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,  # DiT samples with clip_denoised=False
        timestep_spacing="linspace",  # equals DiT's space_timesteps(1000, "250")
    )


def test_schedule_matches_diffusers():
    ours = DDPM().schedule()
    ref = _ddpm_scheduler()
    np.testing.assert_allclose(ours["betas"], ref.betas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours["alphas_cumprod"], ref.alphas_cumprod.numpy(), rtol=1e-4)
    # t=0 differs by design: the reference clips the zero variance's log with the t=1 value.
    # diffusers recomputes beta_t as 1 - a_t / a_{t-1} in float32 (cancellation at small t, ~4e-4
    # relative); ours is float64 then cast, hence rtol 1e-3.
    variance = np.array([ref._get_variance(t, variance_type="fixed_small").item() for t in range(1, 1000)])
    np.testing.assert_allclose(ours["posterior_variance"][1:], variance, rtol=1e-3)
    np.testing.assert_allclose(ours["posterior_log_variance_clipped"][1:], np.log(variance), atol=1e-3)


def test_respacing_is_diffusers_linspace():
    ref = _ddpm_scheduler()
    ref.set_timesteps(250)
    np.testing.assert_array_equal(DDPM().schedule(250)["timesteps"], ref.timesteps.numpy()[::-1])


@pytest.mark.parametrize("num_steps", [1000, 250])
@pytest.mark.parametrize("index", [0, 1, 37, 249])
def test_ancestral_step_matches_diffusers(num_steps, index):
    tables = DDPM().schedule(num_steps)
    t = int(tables["timesteps"][index])
    rng = np.random.default_rng(index)
    out = rng.normal(size=SHAPE[:3] + (2 * SHAPE[3],)).astype(np.float32)
    out[..., 3:] = np.tanh(out[..., 3:])  # v in [-1, 1], as the variance interpolation expects
    x = rng.normal(size=SHAPE).astype(np.float32)
    ref = _ddpm_scheduler()
    ref.set_timesteps(num_steps)
    expected = ref.step(_nchw(out), t, _nchw(x), generator=torch.Generator().manual_seed(index)).prev_sample
    # diffusers draws the step noise from the generator; the same seed gives the same draw here.
    noise = _nhwc(torch.randn(_nchw(x).shape, generator=torch.Generator().manual_seed(index)))
    ours = DDPM.ddpm_step(tables, jnp.asarray(out), jnp.asarray(x), jnp.int32(index), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(ours), _nhwc(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_ddim_step_matches_diffusers(t):
    # diffusers' DDIM steps back a fixed t - T // N, which is DiT's respacing only when N divides T
    # evenly from 0 up ("leading"); at N = T both are every step.
    tables = DDPM().schedule(1000)
    rng = np.random.default_rng(t)
    out = rng.normal(size=SHAPE[:3] + (2 * SHAPE[3],)).astype(np.float32)
    x = rng.normal(size=SHAPE).astype(np.float32)
    ref = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    ref.set_timesteps(1000)
    expected = ref.step(_nchw(out[..., :3]), t, _nchw(x), eta=0.0).prev_sample
    ours = DDPM.ddim_step(tables, jnp.asarray(out), jnp.asarray(x), jnp.int32(t))
    np.testing.assert_allclose(np.asarray(ours), _nhwc(expected), rtol=1e-4, atol=1e-4)


def _oracle(noise: jax.Array, v: float):
    """A net that outputs the true epsilon and the constant variance value v."""
    return lambda x_t, t, y: jnp.concatenate([noise, jnp.full_like(noise, v)], axis=-1)


def test_loss_vanishes_for_true_eps_and_posterior_variance():
    x = jax.random.uniform(jax.random.key(0), (4,) + SHAPE[1:], minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), x.shape)
    t = jnp.array([1, 10, 500, 999])
    y = jnp.zeros(4, jnp.int32)
    # v = -1 selects the posterior variance: MSE 0 and KL(true posterior || model) 0.
    loss = DDPM().loss_at(_oracle(noise, -1.0), x, y, t, noise)
    assert loss.shape == x.shape
    np.testing.assert_allclose(np.asarray(loss), 0.0, atol=1e-4)
    # v = +1 (variance beta_t) is a wrong variance at t=1, so the KL term is positive there.
    assert float(DDPM().loss_at(_oracle(noise, 1.0), x, y, t, noise)[0].mean()) > 1e-2


def test_loss_at_t0_is_decoder_nll():
    x = jax.random.uniform(jax.random.key(0), SHAPE, minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    loss = DDPM().loss_at(_oracle(noise, -1.0), x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), noise)
    # True eps: the model mean is x itself, so the NLL is -log2 P(|N(0, s^2)| < 1/255) with s^2 the
    # clipped posterior variance (t=1's); the reference's tanh CDF is within 1e-3 of the exact one.
    s = float(np.sqrt(DDPM().schedule()["posterior_variance"][1]))
    expected = -np.log2(math.erf(1.0 / 255.0 / s / np.sqrt(2.0)))
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-2)


def test_loss_vb_gradient_reaches_only_variance():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    t = jnp.array([3, 700])
    y = jnp.zeros(2, jnp.int32)

    def total(eps):
        net = lambda x_t, tt, yy: jnp.concatenate([eps, jnp.zeros_like(eps)], -1)
        return DDPM().loss_at(net, x, y, t, noise).sum()

    # The gradient through epsilon is the MSE's alone: the VB term's (large here, the variance
    # being wrong) is stopped.
    eps = noise + 0.3
    np.testing.assert_allclose(jax.grad(total)(eps), 2.0 * (eps - noise), rtol=1e-5, atol=1e-6)


def test_guidance_guides_eps_only():
    def net(x, n, y):
        scale = 1.0 + y[:, None, None, None].astype(jnp.float32)
        return jnp.concatenate([x * scale, x * scale + 10.0], -1)

    x = jnp.ones(SHAPE)
    at = diffusion.guided_net(net, Guidance(scale=3.0, null_class=1), guided_channels=3)
    out = at(jnp.float32(0))(x, jnp.zeros(2), jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(out[..., :3], 2.0 + 3.0 * (1.0 - 2.0))  # uncond + s (cond - uncond)
    np.testing.assert_allclose(out[..., 3:], 11.0)  # the conditional pass's variance channels


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_runs_and_is_reproducible(sampler):
    objective = DDPM(sampler=sampler, num_steps=5)
    net = lambda x, t, y: jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1)
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    y = jnp.zeros(2, jnp.int32)
    sample = jax.jit(lambda n: objective.sample(net, n, y, guidance=Guidance(scale=2.0, null_class=1)))
    a, b = sample(noise), sample(noise)
    assert a.shape == SHAPE and bool(jnp.isfinite(a).all())
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_recovers_point_mass(sampler):
    # Data = the constant c: the exact eps at (x_t, t) is (x_t - sqrt(a_t) c) / sqrt(1 - a_t), so
    # both samplers end at c, provided the net is given the original step t of each respaced step.
    c = 0.7
    cumprod = DDPM().schedule()["alphas_cumprod"]

    def net(x, t, y):
        a = cumprod[t.astype(jnp.int32)][:, None, None, None]
        return jnp.concatenate([(x - jnp.sqrt(a) * c) / jnp.sqrt(1.0 - a), -jnp.ones_like(x)], -1)

    noise = jax.random.normal(jax.random.key(0), SHAPE)
    out = DDPM(sampler=sampler, num_steps=10).sample(net, noise, jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), c, atol=1e-3)


def test_config_round_trip():
    config = diffusion.default_config("ddpm")
    assert config.num_timesteps == 1000 and config.num_steps == 250 and config.sampler == "ddpm"
    config.sampler = "ddim"
    assert diffusion.create_objective(config) == DDPM(sampler="ddim")
    with pytest.raises(ValueError):
        DDPM(sampler="euler")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_channels_is_dits_forward_with_cfg(sampler):
    # DiT's models.py forward_with_cfg, written out: eps[:, :3] guided, the rest conditional.
    def net(x, t, y):
        scale = 1.0 + y[:, None, None, None].astype(jnp.float32)
        return jnp.concatenate([jnp.tanh(x * scale), 0.5 * jnp.tanh(x - scale)], -1)

    def forward_with_cfg(x, t, y):
        cond, uncond = net(x, t, y), net(x, t, jnp.full_like(y, 2))
        eps = uncond[..., :3] + 1.5 * (cond[..., :3] - uncond[..., :3])
        return jnp.concatenate([eps, cond[..., 3:]], -1)

    noise = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    y = jnp.array([0, 1])
    guidance = Guidance(scale=1.5, null_class=2)
    ours = DDPM(sampler=sampler, num_steps=5, guided_channels=3).sample(net, noise, y, guidance=guidance)
    reference = DDPM(sampler=sampler, num_steps=5).sample(forward_with_cfg, noise, y)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6)
    all_channels = DDPM(sampler=sampler, num_steps=5).sample(net, noise, y, guidance=guidance)
    assert float(jnp.abs(all_channels - ours)[..., 3].max()) > 1e-3  # the 4th channel differs
    with pytest.raises(ValueError, match="guided_channels 5 exceeds"):
        DDPM(guided_channels=5).sample(net, noise, y, guidance=guidance)
    with pytest.raises(ValueError, match="guided_channels must be an integer >= 0"):
        DDPM(guided_channels=-1)
