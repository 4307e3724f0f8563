"""A Mamba-style state-space diffusion backbone with order-preserving TREAD routing.

Blocks are DiT's with the attention replaced by a bidirectional Mamba-1 selective SSM mixer
(Gu & Dao, 2023) and, by default, no MLP (a Mamba block stands in for both halves of a
transformer block, so the depth doubles). Conditioning is adaLN-Zero as in DiT, and the patch
embedding, 2-D sin-cos position embedding and final layer are DiT's (``layers``).

Scan paths. An SSM sees a 1-D sequence, so each block scans the image grid along a path:
``scan_paths`` is cycled over the blocks (default row-major, column-major, and both reversed,
in the spirit of DiM and ZigMa), and every mixer is bidirectional, so after two blocks every
token has seen every other. Tokens stay in row-major order between blocks; a block permutes
its mixer input into its path order and permutes the output back.

Routing. The SSM draws its route plans with ``keep_order=True``, so the blocks of a route get
the kept tokens in ascending row-major position. For a block whose path is not row-major that
order is wrong, so the block re-sorts the kept tokens by their rank along its own path: the scan
sees the kept subset exactly in the order in which the path visits them, as if the routed tokens
had been deleted from the path (each stretch tells its blocks those positions). Permuting the
full sequence into path order before the gather would not work: the blocks of one route have
different paths, but share one gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tread_jax import routing
from tread_jax.models.backbone import Backbone
from tread_jax.models.layers import dense, layer_norm, modulate, zeros
from tread_jax.models.scan import METHODS, selective_scan

SCAN_PATHS = ("row", "col", "row_rev", "col_rev")


# ----------------------------------------------------------------------------- scan paths


def path_ranks(path: str, grid_h: int, grid_w: int) -> np.ndarray:
    """Position along ``path`` of every token of a row-major ``grid_h x grid_w`` grid: int ``[N]``."""
    if path not in SCAN_PATHS:
        raise ValueError(f"unknown scan path {path!r}; expected one of {SCAN_PATHS}")
    rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)
    rank = cols * grid_h + rows if path.startswith("col") else rows * grid_w + cols
    return grid_h * grid_w - 1 - rank if path.endswith("_rev") else rank


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[b, order[b]]`` for a per-sample permutation whose inverse is ``inverse``."""
    return routing.gather_tokens(x, order)


def _permute_forward(x, order, inverse):
    return _permute(x, order, inverse), (order, inverse)


def _permute_backward(residuals, g):
    # The cotangent of a permutation is the inverse permutation, again a gather: autodiff of
    # the gather would scatter-add instead, which XLA:CPU runs one index at a time.
    order, inverse = residuals
    return routing.gather_tokens(g, inverse), None, None


_permute.defvjp(_permute_forward, _permute_backward)


@dataclasses.dataclass(frozen=True)
class ScanOrder:
    """How a block rearranges its tokens into the order in which its path visits them.

    First a column path transposes the grid (``grid``, the full row-major sequence) or permutes
    each sample's kept tokens (``order`` ``[B, K]`` and its ``inverse``, a route's ascending
    row-major subset); then a reversed path flips the sequence. Transposes and flips are
    layout operations that XLA fuses, where a gather with constant indices would not be.
    """

    reverse: bool = False
    grid: tuple[int, int] | None = None
    order: jax.Array | None = None
    inverse: jax.Array | None = None

    def to_path(self, x: jax.Array) -> jax.Array:
        """``[B, K, D]`` tokens (row-major) rearranged into path order."""
        if self.grid is not None:
            grid_h, grid_w = self.grid
            x = x.reshape(x.shape[0], grid_h, grid_w, -1).swapaxes(1, 2).reshape(x.shape)
        if self.order is not None:
            x = _permute(x, self.order, self.inverse)
        return jnp.flip(x, axis=1) if self.reverse else x

    def from_path(self, y: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_path`."""
        if self.reverse:
            y = jnp.flip(y, axis=1)
        if self.order is not None:
            y = _permute(y, self.inverse, self.order)
        if self.grid is not None:
            grid_h, grid_w = self.grid
            y = y.reshape(y.shape[0], grid_w, grid_h, -1).swapaxes(1, 2).reshape(y.shape)
        return y


def scan_order(path: str, grid_h: int, grid_w: int, positions: jax.Array | None = None) -> ScanOrder:
    """The rearrangement of a block's tokens into the order in which ``path`` visits them.

    ``positions``: ``None`` for the full row-major sequence, else the ``[B, K]`` ascending
    row-major grid positions of the kept tokens of a route (``keep_order=True``): a row path
    already visits them in that order, a column path needs a per-sample sort.
    """
    if path not in SCAN_PATHS:
        raise ValueError(f"unknown scan path {path!r}; expected one of {SCAN_PATHS}")
    reverse = path.endswith("_rev")
    if path.startswith("row"):
        return ScanOrder(reverse)
    if positions is None:
        return ScanOrder(reverse, grid=(grid_h, grid_w))
    column_rank = jnp.asarray(path_ranks("col", grid_h, grid_w))
    order = jnp.argsort(column_rank[positions], axis=-1).astype(jnp.int32)
    return ScanOrder(reverse, order=order, inverse=jnp.argsort(order, axis=-1).astype(jnp.int32))


# ----------------------------------------------------------------------------- the mixer


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``y_t = bias + sum_j kernel[j] * x_{t - (k-1) + j}`` per channel, zeros before the start.

    ``x: [B, L, D]``, ``kernel: [k, D]``, ``bias: [D]``; the same as PyTorch's depthwise
    ``Conv1d(padding=k-1)`` truncated to the first L outputs, as Mamba uses it.
    """
    k = kernel.shape[0]
    length = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    return bias + sum(padded[:, j : j + length] * kernel[j] for j in range(k))


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class SelectiveSSM(nnx.Module):
    """Bidirectional Mamba-1 mixer over ``[B, L, hidden]`` tokens in scan order.

    in_proj -> (u, z), each ``expand * hidden`` wide. Per direction (its own parameters):
    causal depthwise conv + SiLU on u, x_proj -> (delta_low, B, C), delta = softplus(dt_proj
    delta_low + dt_bias), selective scan with A = -exp(A_log) and skip D. The backward direction
    runs the same computation on the reversed sequence and its output is reversed back. The two
    directions are averaged, gated by SiLU(z) (one gate shared by both, as in Vision Mamba's
    bidirectional block), and projected back by out_proj. Direction parameters are stacked on a
    leading axis of size ``num_directions`` (index 0 forward, 1 backward) so both run as one scan.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bidirectional: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_method: str = "associative",
        rngs: nnx.Rngs,
    ):
        if scan_method not in METHODS:
            raise ValueError(f"unknown scan_method {scan_method!r}; expected one of {METHODS}")
        d_inner = expand * hidden_size
        dt_rank = dt_rank or math.ceil(hidden_size / 16)  # Mamba's dt_rank="auto"
        nd = 2 if bidirectional else 1
        self.num_directions = nd
        self.dt_rank = dt_rank
        self.d_state = d_state
        self.scan_method = scan_method
        self.in_proj = dense(hidden_size, 2 * d_inner, rngs=rngs)
        self.out_proj = dense(d_inner, hidden_size, rngs=rngs)
        # PyTorch's default Conv1d / Linear init (uniform +-1/sqrt(fan_in)), as Mamba leaves them.
        self.conv_kernel = nnx.Param(_uniform(d_conv**-0.5)(rngs.params(), (nd, d_conv, d_inner)))
        self.conv_bias = nnx.Param(_uniform(d_conv**-0.5)(rngs.params(), (nd, d_inner)))
        self.x_proj = nnx.Param(_uniform(d_inner**-0.5)(rngs.params(), (nd, d_inner, dt_rank + 2 * d_state)))
        # Mamba's dt init: dt_proj weight uniform +-dt_rank^-0.5, and a bias that makes
        # softplus(bias) log-uniform in [dt_min, dt_max] (inverse softplus of the draw).
        self.dt_proj = nnx.Param(_uniform(dt_rank**-0.5)(rngs.params(), (nd, dt_rank, d_inner)))
        log_dt = jax.random.uniform(rngs.params(), (nd, d_inner), minval=math.log(dt_min), maxval=math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
        # S4D-real: A[d, n] = -(n + 1), stored as log so that A stays negative under training.
        a = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (nd, d_inner, d_state))
        self.A_log = nnx.Param(jnp.log(a))
        self.D = nnx.Param(jnp.ones((nd, d_inner), jnp.float32))

    def _direction(self, u, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D):
        dtype = u.dtype
        u = jax.nn.silu(causal_depthwise_conv(u, conv_kernel.astype(dtype), conv_bias.astype(dtype)))
        delta_low, B, C = jnp.split(u @ x_proj.astype(dtype), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = jax.nn.softplus((delta_low @ dt_proj.astype(dtype)).astype(jnp.float32) + dt_bias)
        return selective_scan(u, delta, -jnp.exp(A_log), B, C, D, method=self.scan_method)

    def __call__(self, x: jax.Array) -> jax.Array:
        u, z = jnp.split(self.in_proj(x), 2, axis=-1)
        streams = jnp.stack([u, jnp.flip(u, axis=1)][: self.num_directions])
        params = (self.conv_kernel, self.conv_bias, self.x_proj, self.dt_proj, self.dt_bias, self.A_log, self.D)
        y = jax.vmap(self._direction)(streams, *(p[...] for p in params))
        y = y[0] if self.num_directions == 1 else (y[0] + jnp.flip(y[1], axis=1)) / 2
        return self.out_proj(y * jax.nn.silu(z))


# ----------------------------------------------------------------------------- the backbone


class SSMBlock(nnx.Module):
    """adaLN-Zero block: x + gate * mixer(modulate(LN(x))), optionally + gate' * MLP(...)."""

    def __init__(self, hidden_size: int, *, mlp_ratio: float, rngs: nnx.Rngs, **mixer_kwargs):
        self.num_mods = 6 if mlp_ratio else 3
        self.ada = dense(hidden_size, self.num_mods * hidden_size, kernel_init=zeros, rngs=rngs)
        self.mixer = SelectiveSSM(hidden_size, rngs=rngs, **mixer_kwargs)
        if mlp_ratio:
            self.fc1 = dense(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs)
            self.fc2 = dense(int(hidden_size * mlp_ratio), hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array, order: ScanOrder) -> jax.Array:
        mods = jnp.split(self.ada(jax.nn.silu(c)), self.num_mods, axis=-1)
        h = modulate(layer_norm(x), mods[0], mods[1])
        x = x + mods[2][:, None] * order.from_path(self.mixer(order.to_path(h)))
        if self.num_mods == 6:
            h = modulate(layer_norm(x), mods[3], mods[4])
            x = x + mods[5][:, None] * self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))
        return x


class SSM(Backbone):
    """Class-conditional SSM diffusion backbone over NHWC inputs; same call as ``DiT``.

    Block ``i`` scans along ``scan_paths[i % len(scan_paths)]``. Routing (when a ``route_plan``
    is given) keeps the kept tokens in their original order and each block scans them along its
    path (module docstring). Label ``num_classes`` is the null class.
    """

    keep_order = True  # a scan needs the kept tokens in their original order
    scannable = False  # blocks differ by scan path

    def __init__(
        self,
        *,
        hidden_size: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bidirectional: bool = True,
        scan_paths: Sequence[str] = SCAN_PATHS,
        mlp_ratio: float = 0.0,
        scan_method: str = "associative",
        rngs: nnx.Rngs,
        **trunk,
    ):
        """``trunk``: the :class:`Backbone` arguments (input_size, patch_size, depth, ...)."""
        scan_paths = tuple(scan_paths)
        if not scan_paths or any(p not in SCAN_PATHS for p in scan_paths):
            raise ValueError(f"scan_paths {scan_paths} must be a non-empty sequence drawn from {SCAN_PATHS}")
        super().__init__(hidden_size=hidden_size, rngs=rngs, **trunk)
        self.scan_paths = scan_paths
        mixer_kwargs = dict(
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            bidirectional=bidirectional,
            scan_method=scan_method,
        )
        self.blocks = nnx.List(
            [SSMBlock(hidden_size, mlp_ratio=mlp_ratio, rngs=rngs, **mixer_kwargs) for _ in range(self.depth)]
        )

    def block_args(self, i, positions, grid):
        return (scan_order(self.scan_paths[i % len(self.scan_paths)], *grid, positions),)
