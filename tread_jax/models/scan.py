"""The Mamba-1 selective scan (Gu & Dao, 2023) in two interchangeable implementations.

For every channel d and state index n, with a per-token step size delta_t:

    h_t = exp(delta_t[d] A[d, n]) h_{t-1} + delta_t[d] B_t[n] u_t[d],    h_{-1} = 0
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]

The recurrence is linear in h, so the pairs (a_t, b_t) = (exp(delta_t A), delta_t B_t u_t)
compose associatively: (a1, b1) then (a2, b2) is (a1 a2, a2 b1 + b2). ``associative`` runs
that composition as a parallel prefix (``jax.lax.associative_scan``: O(log L) depth, the
whole ``[B, L, D, N]`` state materialised); ``sequential`` is the plain ``lax.scan``
recurrence (O(L) depth, one ``[B, D, N]`` state), kept as the reference. The state and all
arithmetic are float32 whatever the input dtype; the output comes back in ``u``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("associative", "sequential")


def _combine(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]):
    """Composes two affine maps h -> a h + b, ``left`` applied first."""
    a_left, b_left = left
    a_right, b_right = right
    return a_left * a_right, a_right * b_left + b_right


def _states_associative(u, delta, A, B):
    decay = jnp.exp(delta[..., None] * A)  # [B, L, D, N]
    drive = (delta * u)[..., None] * B[:, :, None, :]
    _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
    return states


def _outputs_sequential(u, delta, A, B, C):
    def step(h, inputs):
        u_t, delta_t, B_t, C_t = inputs
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    time_major = [jnp.swapaxes(v, 0, 1) for v in (u, delta, B, C)]
    _, ys = jax.lax.scan(step, h0, time_major)
    return jnp.swapaxes(ys, 0, 1)


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    method: str = "associative",
) -> jax.Array:
    """Selective scan along axis 1.

    Args:
      u: inputs ``[batch, L, D]``.
      delta: positive step sizes ``[batch, L, D]`` (softplus already applied).
      A: state matrix diagonal ``[D, N]`` (negative for a stable, decaying state).
      B, C: input and output projections ``[batch, L, N]``.
      D: skip weights ``[D]``.
      method: "associative" (parallel prefix) or "sequential" (``lax.scan`` reference).
    Returns:
      ``y`` of shape ``[batch, L, D]`` in ``u``'s dtype.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selective scan method {method!r}; expected one of {METHODS}")
    out_dtype = u.dtype
    u, delta, A, B, C, D = (jnp.asarray(v, jnp.float32) for v in (u, delta, A, B, C, D))
    if method == "associative":
        y = jnp.einsum("bldn,bln->bld", _states_associative(u, delta, A, B), C)
    else:
        y = _outputs_sequential(u, delta, A, B, C)
    return (y + D * u).astype(out_dtype)
