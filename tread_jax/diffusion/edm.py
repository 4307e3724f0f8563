"""EDM (Karras et al. 2022): preconditioning, log-normal noise levels, weighted loss, Heun sampler."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tread_jax.diffusion.guidance import Guidance, RawNet, check_sample_inputs, guided_net


@dataclasses.dataclass(frozen=True)
class EDM:
    """The EDM objective with the published defaults (docs/method.md, "Objectives and samplers")."""

    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_steps: int = 40
    # Stratified noise levels: one draw from each of the batch's B equal-probability slices of
    # the log-normal (in random order), which lowers the variance of the batch loss.
    stratified: bool = False

    def __post_init__(self):
        for name in ("sigma_data", "P_std", "sigma_min", "rho"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EDM {name} must be > 0, got {getattr(self, name)}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"EDM sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"EDM num_steps must be an integer >= 2, got {self.num_steps!r}")

    def denoise(self, net: RawNet, x: jax.Array, sigma: jax.Array | float, class_labels: jax.Array) -> jax.Array:
        """D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, y); sigma scalar or f32[B]."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        c_noise = jnp.log(sigma) / 4.0
        per_sample = lambda c: c[:, None, None, None]
        out = net(per_sample(c_in) * x, c_noise, class_labels).astype(jnp.float32)
        return per_sample(c_skip) * x + per_sample(c_out) * out

    def output_channels(self, data_channels: int) -> int:
        """The network predicts one value per data channel."""
        return data_channels

    def loss(self, net: RawNet, x: jax.Array, class_labels: jax.Array, key: jax.Array) -> jax.Array:
        """Per-element weighted loss f32[B,H,W,C]: lambda(sigma) (D(x + sigma n, sigma) - x)^2."""
        x = x.astype(jnp.float32)
        sigma_key, noise_key = jax.random.split(key)
        sigma = jnp.exp(self._standard_normal(sigma_key, x.shape[0]) * self.P_std + self.P_mean)
        noisy = x + jax.random.normal(noise_key, x.shape) * sigma[:, None, None, None]
        denoised = self.denoise(net, noisy, sigma, class_labels)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return weight[:, None, None, None] * (denoised - x) ** 2

    def _standard_normal(self, key: jax.Array, batch_size: int) -> jax.Array:
        """f32[B] N(0, 1) draws, independent or (``stratified``) one per probability slice."""
        if not self.stratified:
            return jax.random.normal(key, (batch_size,))
        slot_key, offset_key = jax.random.split(key)
        u = (jax.random.permutation(slot_key, batch_size) + jax.random.uniform(offset_key, (batch_size,))) / batch_size
        return jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))

    def time_steps(self, num_steps: int) -> np.ndarray:
        """Karras noise levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0: f64[N+1]."""
        i = np.arange(num_steps, dtype=np.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        steps = (hi + i / (num_steps - 1) * (lo - hi)) ** self.rho
        return np.append(steps, 0.0)

    def network_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations per sample of ``sample`` (Heun with a final Euler step: 2N - 1)."""
        return 2 * (self.num_steps if num_steps is None else num_steps) - 1

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
        """Deterministic Heun (EDM Algorithm 1 without churn): N steps, 2N - 1 network evaluations.

        ``noise`` is standard normal; the start x = sigma_max * noise is taken here. Every step is
        Heun except the last, from sigma_min to 0, which is Euler (and reduces to D(x, sigma_min)).
        One fori_loop, so the whole sampler jits as one program; all ops are elementwise over the
        batch and the noise level is a scalar, so a batch-sharded input stays sharded. ``keys``:
        one per sample, for guidance that draws tokens (evaluation e = 2 step + stage).
        """
        num_steps = self.num_steps if num_steps is None else num_steps
        check_sample_inputs(noise, class_labels, num_steps, minimum=2)
        at = guided_net(net, guidance, keys=keys)
        sigmas = jnp.asarray(self.time_steps(num_steps), jnp.float32)

        def slope(x: jax.Array, sigma: jax.Array, evaluation: jax.Array) -> jax.Array:
            return (x - self.denoise(at(sigma, evaluation), x, sigma, class_labels)) / sigma

        def heun_step(i: int, x: jax.Array) -> jax.Array:
            cur, nxt = sigmas[i], sigmas[i + 1]
            d_cur = slope(x, cur, 2 * i)
            x_euler = x + (nxt - cur) * d_cur
            return x + (nxt - cur) * 0.5 * (d_cur + slope(x_euler, nxt, 2 * i + 1))

        x = noise.astype(jnp.float32) * self.sigma_max
        x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
        last = sigmas[num_steps - 1]
        return self.denoise(at(last, 2 * (num_steps - 1)), x, last, class_labels)
