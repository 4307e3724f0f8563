"""DiT (Peebles & Xie, 2023) with TREAD routing over its blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tread_jax.models.backbone import Backbone
from tread_jax.models.layers import dense, layer_norm, modulate, zeros


def head_batched_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over ``[B, N, H, d]`` inputs as ``[B*H, N, d]`` batched matmuls.

    The same math as ``jax.nn.dot_product_attention``'s XLA path (4-D einsums), whose backward
    pass XLA:CPU runs markedly slower (benchmarks/README.md, "Attention formulations").
    """
    b, n, h, d = q.shape
    q, k, v = (t.transpose(0, 2, 1, 3).reshape(b * h, n, d) for t in (q, k, v))
    # Logits and softmax in float32 whatever the compute dtype, as dot_product_attention does
    # (with its explicit bfloat16 algorithm, so that the backward pass sees consistent types).
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    logits = jnp.matmul(q, k.transpose(0, 2, 1), precision=precision, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * d**-0.5, axis=-1).astype(v.dtype)
    return jnp.matmul(weights, v).reshape(b, h, n, d).transpose(0, 2, 1, 3)


class DiTBlock(nnx.Module):
    """Pre-norm transformer block conditioned by adaLN-Zero (scale, shift and gate per sample)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        attention_impl: str | None,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.ada = dense(hidden_size, 6 * hidden_size, kernel_init=zeros, rngs=rngs)
        self.qkv = dense(hidden_size, 3 * hidden_size, rngs=rngs)
        self.attn_out = dense(hidden_size, hidden_size, rngs=rngs)
        self.fc1 = dense(hidden_size, mlp_hidden, rngs=rngs)
        self.fc2 = dense(mlp_hidden, hidden_size, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        # Unstacked along its own axis rather than moved to the front: a leading axis costs a
        # transpose of the activations and of their gradient.
        q, k, v = jnp.unstack(self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads), axis=2)
        if self.attention_impl is None:
            out = head_batched_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.attn_out(out.reshape(b, n, d))

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attention(modulate(layer_norm(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class DiT(Backbone):
    """Class-conditional diffusion transformer (DiT) over NHWC inputs."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
        **trunk,
    ):
        """``trunk``: the :class:`Backbone` arguments (input_size, patch_size, depth, ...).

        ``attention_impl``: None for :func:`head_batched_attention`, or the ``implementation``
        of ``jax.nn.dot_product_attention`` to call instead ("xla", "cudnn").
        """
        super().__init__(hidden_size=hidden_size, rngs=rngs, **trunk)
        self.blocks = nnx.List(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, attention_impl=attention_impl, rngs=rngs)
                for _ in range(self.depth)
            ]
        )

    def block_args(self, i, positions, grid):
        del i, positions, grid  # attention is permutation-equivariant; positions live in the tokens
        return ()
