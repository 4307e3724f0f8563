"""DDPM as DiT trains it (Peebles & Xie 2023, after improved DDPM, Nichol & Dhariwal 2021).

Linear betas over 1000 steps; the network sees x_t and the integer step t (as float, what DiT's
t_embedder receives) and outputs 2C channels: epsilon, then v with log variance
``frac log(beta_t) + (1 - frac) log(posterior variance)``, frac = (v + 1) / 2 ("learned_range").
Loss: MSE on epsilon plus the variational bound with the mean's gradient stopped (hybrid loss).
Samplers: ancestral DDPM or DDIM (eta 0) on DiT's respaced steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tread_jax.diffusion.guidance import Guidance, RawNet, check_sample_inputs, guided_net

SAMPLERS = ("ddpm", "ddim")


def space_timesteps(num_timesteps: int, count: int) -> np.ndarray:
    """The ``count`` kept steps of ``num_timesteps``, evenly strided and rounded.

    DiT's ``space_timesteps(T, str(count))``; it equals diffusers' ``timestep_spacing="linspace"``
    (no half-way ties occur, so Python's and numpy's rounding agree).
    """
    if count == num_timesteps:
        return np.arange(num_timesteps)
    stride = (num_timesteps - 1) / (count - 1)
    return np.array(sorted({round(i * stride) for i in range(count)}))


def schedule(betas_full: np.ndarray, timesteps: np.ndarray) -> dict[str, jax.Array]:
    """The reference diffusion's tables (f32) over the kept ``timesteps`` (sorted, ascending).

    Computed in float64 and then cast, as the reference does; respacing recomputes each kept
    step's beta from alphas_cumprod so the kept steps have the original marginals.
    """
    full_cumprod = np.cumprod(1.0 - betas_full)
    kept = full_cumprod[timesteps]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    cumprod_prev = np.append(1.0, cumprod[:-1])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    tables = {
        "timesteps": timesteps.astype(np.float64),
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "posterior_variance": posterior_variance,
        # The posterior variance is 0 at t=0; the reference clips its log with the t=1 value.
        "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        "log_betas": np.log(betas),
        "posterior_mean_coef1": betas * np.sqrt(cumprod_prev) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * np.sqrt(alphas) / (1.0 - cumprod),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}


def _per_sample(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] shaped to broadcast over [B,H,W,C]; index scalar or i32[B]."""
    values = table[index]
    return values[:, None, None, None] if values.ndim == 1 else values


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Log-likelihood (nats) of x in [-1, 1] under a Gaussian discretized into 256 bins, per element.

    The reference's tanh approximation of the normal CDF, kept so the decoder term matches it.
    """

    def cdf(z: jax.Array) -> jax.Array:
        return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))

    inv_std = jnp.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log = lambda p: jnp.log(jnp.maximum(p, 1e-12))
    return jnp.where(x < -0.999, log(cdf_plus), jnp.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min)))


@dataclasses.dataclass(frozen=True)
class DDPM:
    """DiT's objective with its published defaults: 1000 linear-beta steps, 250 sampling steps."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddpm"
    num_steps: int = 250  # DiT's sample.py: space_timesteps(1000, "250")
    # Epsilon channels classifier-free guidance acts on, from the first; 0 = all of them (the
    # standard form, diffusers' DiTPipeline). DiT's own sampler guides the first 3 of its 4 latent
    # channels (models.py forward_with_cfg), which is how its published FIDs were measured.
    guided_channels: int = 0

    def __post_init__(self):
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"ddpm num_timesteps must be an integer >= 2, got {self.num_timesteps!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"ddpm needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"ddpm sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.num_steps, int) or not 2 <= self.num_steps <= self.num_timesteps:
            raise ValueError(f"ddpm num_steps must be an integer in [2, {self.num_timesteps}], got {self.num_steps!r}")
        if not isinstance(self.guided_channels, int) or self.guided_channels < 0:
            raise ValueError(f"ddpm guided_channels must be an integer >= 0 (0 = all), got {self.guided_channels!r}")

    def schedule(self, num_steps: int | None = None) -> dict[str, jax.Array]:
        """Tables over all steps (None) or over ``num_steps`` respaced ones."""
        betas = np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)
        count = self.num_timesteps if num_steps is None else num_steps
        return schedule(betas, space_timesteps(self.num_timesteps, count))

    @staticmethod
    def predict(
        tables: dict[str, jax.Array], out: jax.Array, x: jax.Array, index: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(eps, x0, log variance) from the raw 2C-channel output at table row ``index``."""
        eps, v = jnp.split(out, 2, axis=-1)
        cumprod = _per_sample(tables["alphas_cumprod"], index)
        x0 = (x - jnp.sqrt(1.0 - cumprod) * eps) / jnp.sqrt(cumprod)
        frac = (v + 1.0) / 2.0
        log_var = frac * _per_sample(tables["log_betas"], index) + (1.0 - frac) * _per_sample(
            tables["posterior_log_variance_clipped"], index
        )
        return eps, x0, log_var

    @staticmethod
    def posterior_mean(tables: dict[str, jax.Array], x0: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
        """Mean of q(x_{t-1} | x_t, x0) at table row ``index``."""
        return _per_sample(tables["posterior_mean_coef1"], index) * x0 + _per_sample(
            tables["posterior_mean_coef2"], index
        ) * x

    @classmethod
    def ddpm_step(
        cls, tables: dict[str, jax.Array], out: jax.Array, x: jax.Array, index: jax.Array, noise: jax.Array
    ) -> jax.Array:
        """One ancestral step from row ``index`` (scalar) to the previous kept step; no noise at row 0."""
        _, x0, log_var = cls.predict(tables, out, x, index)
        mean = cls.posterior_mean(tables, x0, x, index)
        return mean + jnp.where(index > 0, jnp.exp(0.5 * log_var), 0.0) * noise

    @classmethod
    def ddim_step(cls, tables: dict[str, jax.Array], out: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
        """One deterministic DDIM (eta 0) step; the variance channels are unused."""
        eps, x0, _ = cls.predict(tables, out, x, index)
        prev = tables["alphas_cumprod_prev"][index]
        return jnp.sqrt(prev) * x0 + jnp.sqrt(1.0 - prev) * eps

    def output_channels(self, data_channels: int) -> int:
        """Epsilon, then the variance interpolation value v, per data channel."""
        return 2 * data_channels

    def loss_at(
        self, net: RawNet, x: jax.Array, class_labels: jax.Array, t: jax.Array, noise: jax.Array
    ) -> jax.Array:
        """Per-element loss f32[B,H,W,C] at steps t i32[B] and noise ``noise``.

        MSE on eps plus the VB term (KL in bits; the decoder NLL at t=0) scaled by T/1000. The
        reference averages each sample's KL over its elements (mean_flat); the per-element KL is
        returned instead, so ``.mean()`` over elements gives the same scalar.
        """
        tables = self.schedule()
        cumprod = _per_sample(tables["alphas_cumprod"], t)
        x_t = jnp.sqrt(cumprod) * x + jnp.sqrt(1.0 - cumprod) * noise
        out = net(x_t, t.astype(jnp.float32), class_labels).astype(jnp.float32)
        eps, v = jnp.split(out, 2, axis=-1)
        # The VB term trains only the variance: the mean's gradient comes from the MSE alone.
        _, x0_pred, log_var = self.predict(tables, jnp.concatenate([jax.lax.stop_gradient(eps), v], -1), x_t, t)
        model_mean = self.posterior_mean(tables, x0_pred, x_t, t)
        true_mean = self.posterior_mean(tables, x, x_t, t)
        true_log_var = _per_sample(tables["posterior_log_variance_clipped"], t)
        kl = normal_kl(true_mean, true_log_var, model_mean, log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x, model_mean, 0.5 * log_var)
        vb = jnp.where(t[:, None, None, None] == 0, decoder_nll, kl) / np.log(2.0)
        return (noise - eps) ** 2 + vb * (self.num_timesteps / 1000.0)

    def loss(self, net: RawNet, x: jax.Array, class_labels: jax.Array, key: jax.Array) -> jax.Array:
        """Per-element loss f32[B,H,W,C] at uniform integer t (DiT's UniformSampler); see loss_at."""
        x = x.astype(jnp.float32)
        t_key, noise_key = jax.random.split(key)
        t = jax.random.randint(t_key, x.shape[:1], 0, self.num_timesteps)
        return self.loss_at(net, x, class_labels, t, jax.random.normal(noise_key, x.shape))

    def network_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations per sample of ``sample``: one per respaced step."""
        return self.num_steps if num_steps is None else num_steps

    def sample(
        self,
        net: RawNet,
        noise: jax.Array,
        class_labels: jax.Array,
        *,
        num_steps: int | None = None,
        guidance: Guidance | None = None,
        keys: jax.Array | None = None,
    ) -> jax.Array:
        """x0 from x_T = noise over ``num_steps`` respaced steps; N network evaluations.

        Guidance acts on epsilon: all C channels, or the first ``guided_channels`` (DiT's own code
        guides only the first 3 "for exact reproducibility", its comment calls all channels the
        standard approach); the other channels, variance included, come from the conditional
        pass. Its interval is in step units t in [0, T-1].
        The ancestral noise has no key argument to come from, so each sample's stream is keyed by
        its own starting noise (its first two values' bits): reproducible, independent across
        samples, and elementwise over the batch so a batch-sharded input stays sharded.
        """
        num_steps = self.num_steps if num_steps is None else num_steps
        check_sample_inputs(noise, class_labels, num_steps, minimum=2)
        channels = noise.shape[-1]
        if self.guided_channels > channels:
            raise ValueError(f"ddpm guided_channels {self.guided_channels} exceeds the data's {channels} channels")
        # Evaluation e = step (sparse guidance's token draws).
        at = guided_net(net, guidance, guided_channels=self.guided_channels or channels, keys=keys)
        tables = self.schedule(num_steps)
        x = noise.astype(jnp.float32)
        bits = jax.lax.bitcast_convert_type(x.reshape(x.shape[0], -1)[:, :2], jnp.int32)
        keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), b[0]), b[1]))(bits)

        def step(i: int, x: jax.Array) -> jax.Array:
            index = num_steps - 1 - i
            t = tables["timesteps"][index]
            out = at(t, i)(x, jnp.broadcast_to(t, x.shape[:1]), class_labels)
            if self.sampler == "ddim":
                return self.ddim_step(tables, out, x, index)
            step_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:]))(keys)
            return self.ddpm_step(tables, out, x, index, step_noise)

        return jax.lax.fori_loop(0, num_steps, step, x)
