"""Flow matching (SiT rows): linear interpolant, logit-normal t, velocity target, Euler/Heun ODE."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tread_jax.diffusion.guidance import Guidance, RawNet, check_sample_inputs, guided_net

SAMPLERS = ("euler", "heun")


@dataclasses.dataclass(frozen=True)
class Flow:
    """z_t = (1 - t) x + t eps, t=0 data and t=1 noise; the network predicts v = eps - x.

    The network's noise label is t itself (SiT feeds t in [0, 1] to DiT's timestep embedder
    unscaled); its range is close to EDM's ln(sigma)/4, so one embedder serves both objectives.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    sampler: str = "euler"
    num_steps: int = 250  # SiT's default number of sampling steps

    def __post_init__(self):
        if not self.logit_std > 0:
            raise ValueError(f"flow logit_std must be > 0, got {self.logit_std}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"flow sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"flow num_steps must be an integer >= 1, got {self.num_steps!r}")

    def velocity(self, net: RawNet, z: jax.Array, t: jax.Array | float, class_labels: jax.Array) -> jax.Array:
        """v(z, t) from the raw network; t scalar or f32[B]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        return net(z, t, class_labels).astype(jnp.float32)

    def output_channels(self, data_channels: int) -> int:
        """The network predicts one value per data channel."""
        return data_channels

    def loss(self, net: RawNet, x: jax.Array, class_labels: jax.Array, key: jax.Array) -> jax.Array:
        """Per-element loss f32[B,H,W,C]: (v(z_t, t) - (eps - x))^2, t = sigmoid(N(mean, std^2))."""
        x = x.astype(jnp.float32)
        t_key, noise_key = jax.random.split(key)
        t = jax.nn.sigmoid(jax.random.normal(t_key, x.shape[:1]) * self.logit_std + self.logit_mean)
        eps = jax.random.normal(noise_key, x.shape)
        t4 = t[:, None, None, None]
        z = (1.0 - t4) * x + t4 * eps
        return (self.velocity(net, z, t, class_labels) - (eps - x)) ** 2

    def network_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations per sample of ``sample``: N for Euler, 2N for Heun."""
        return (self.num_steps if num_steps is None else num_steps) * (1 if self.sampler == "euler" else 2)

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
        """Integrate dz/dt = v from t=1 (z = noise, no scaling) to t=0 on a uniform grid.

        Euler: N evaluations. Heun: 2N evaluations (every step corrected, including the last:
        v is finite at t=0, unlike EDM's slope at sigma=0). One fori_loop; see EDM.sample.
        ``keys``: one per sample, for guidance that draws tokens (evaluation e = 2 step + stage).
        """
        num_steps = self.num_steps if num_steps is None else num_steps
        check_sample_inputs(noise, class_labels, num_steps, minimum=1)
        at = guided_net(net, guidance, keys=keys)
        ts = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)

        def v(z: jax.Array, t: jax.Array, evaluation: jax.Array) -> jax.Array:
            return self.velocity(at(t, evaluation), z, t, class_labels)

        def step(i: int, z: jax.Array) -> jax.Array:
            cur, nxt = ts[i], ts[i + 1]
            v_cur = v(z, cur, 2 * i)
            z_euler = z + (nxt - cur) * v_cur
            if self.sampler == "euler":
                return z_euler
            return z + (nxt - cur) * 0.5 * (v_cur + v(z_euler, nxt, 2 * i + 1))

        return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))
