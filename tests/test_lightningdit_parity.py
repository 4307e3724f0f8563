"""Our modern block (``DiT(block="modern")``) vs LightningDiT's published PyTorch model, CPU float32.

The torch classes below transcribe github.com/hustvl/LightningDiT (Yao et al. 2025):
``models/lightningdit.py`` (Attention, TimestepEmbedder, LabelEmbedder, LightningDiTBlock,
FinalLayer, LightningDiT.forward, get_2d_sincos_pos_embed), ``models/pos_embed.py`` (EVA-02's
VisionRotaryEmbeddingFast, broadcat, rotate_half), ``models/rmsnorm.py`` (RMSNorm) and
``models/swiglu_ffn.py`` (SwiGLUFFN), with ``torch.compile`` and dropout left out and timm's
PatchEmbed written as its stride-p Conv2d. Every parameter gets random values (zero-initialised
gates and outputs would hide mistakes), is copied into our model, and both run on a 4x4 token
grid (so rows and columns are not interchangeable), densely and routed.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tread_jax import routing
from tread_jax.models import create_model

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

INPUT, PATCH, CHANNELS, HIDDEN, HEADS, DEPTH, CLASSES = 8, 2, 4, 64, 2, 3, 10


# ----- transcription of hustvl/LightningDiT ---------------------------------------------------
def broadcat(tensors, dim=-1):  # models/pos_embed.py
    shape_len = len(tensors[0].shape)
    dim = (dim + shape_len) if dim < 0 else dim
    dims = list(zip(*map(lambda t: list(t.shape), tensors)))
    expandable_dims = [(i, val) for i, val in enumerate(dims) if i != dim]
    max_dims = list(map(lambda t: (t[0], max(t[1])), expandable_dims))
    expanded_dims = list(map(lambda t: (t[0], (t[1],) * len(tensors)), max_dims))
    expanded_dims.insert(dim, (dim, dims[dim]))
    expandable_shapes = list(zip(*map(lambda t: t[1], expanded_dims)))
    tensors = list(map(lambda t: t[0].expand(*t[1]), zip(tensors, expandable_shapes)))
    return torch.cat(tensors, dim=dim)


def rotate_half(x):  # models/pos_embed.py, einops written as view/flatten
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):  # models/pos_embed.py, freqs_for='lang'
    def __init__(self, dim, pt_seq_len=16, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1. / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
        if ft_seq_len is None:
            ft_seq_len = pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum('..., f -> ... f', t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # einops repeat '... n -> ... (n r)', r=2
        freqs = broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t):
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class RMSNorm(nn.Module):  # models/rmsnorm.py
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        output = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return output * self.weight


class SwiGLUFFN(nn.Module):  # models/swiglu_ffn.py
    def __init__(self, in_features, hidden_features, bias=True):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def modulate(x, shift, scale):
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, qk_norm, use_rmsnorm):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        norm_layer = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t, max_period=10000):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LightningDiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=True,
                 use_rmsnorm=True, wo_shift=False):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape([2, 1, grid_size, grid_size])

    def one_d(d, pos):
        omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class LightningDiT(nn.Module):  # use_swiglu, use_rope, use_rmsnorm on; learn_sigma off
    def __init__(self, use_qknorm):
        super().__init__()
        self.x_embedder = nn.Conv2d(CHANNELS, HIDDEN, kernel_size=PATCH, stride=PATCH)  # timm PatchEmbed
        self.t_embedder = TimestepEmbedder(HIDDEN)
        self.y_embedder = nn.Embedding(CLASSES + 1, HIDDEN)  # LabelEmbedder's table (null class last)
        grid = INPUT // PATCH
        self.register_buffer("pos_embed", torch.from_numpy(get_2d_sincos_pos_embed(HIDDEN, grid)).float()[None])
        self.feat_rope = VisionRotaryEmbeddingFast(dim=HIDDEN // HEADS // 2, pt_seq_len=grid)
        self.blocks = nn.ModuleList([LightningDiTBlock(HIDDEN, HEADS, use_qknorm=use_qknorm) for _ in range(DEPTH)])
        self.final_layer = FinalLayer(HIDDEN, PATCH, CHANNELS)

    def embed(self, x, t, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        return x, self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x):
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, PATCH, PATCH, CHANNELS)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], CHANNELS, h * PATCH, w * PATCH)

    def forward(self, x, t, y):
        x, c = self.embed(x, t, y)
        for block in self.blocks:
            x = block(x, c, self.feat_rope)
        return self.unpatchify(self.final_layer(x, c))


# ----- weights: theirs -> ours -----------------------------------------------------------------
def _lin(sd, name):
    return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _our_params(sd: dict, qk_norm: bool) -> dict:
    conv = sd["x_embedder.weight"]  # [D, C, p, p] -> [(p q c), D], our patch layout
    params = {
        "patch_embed": {"proj": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, HIDDEN), "bias": sd["x_embedder.bias"]}},
        "t_embedder": {"fc1": _lin(sd, "t_embedder.mlp.0"), "fc2": _lin(sd, "t_embedder.mlp.2")},
        "y_embedder": {"table": {"embedding": sd["y_embedder.weight"]}},
        "final_layer": {"norm_scale": sd["final_layer.norm_final.weight"], "ada": _lin(sd, "final_layer.adaLN_modulation.1"),
                        "proj": _lin(sd, "final_layer.linear")},
        "blocks": {},
    }
    for i in range(DEPTH):
        b = f"blocks.{i}"
        gate_up = _lin(sd, f"{b}.mlp.w12")
        half = gate_up["bias"].shape[0] // 2
        block = {
            "ada": _lin(sd, f"{b}.adaLN_modulation.1"), "norm1": sd[f"{b}.norm1.weight"], "norm2": sd[f"{b}.norm2.weight"],
            "qkv": _lin(sd, f"{b}.attn.qkv"), "attn_out": _lin(sd, f"{b}.attn.proj"),
            "gate": {"kernel": gate_up["kernel"][:, :half], "bias": gate_up["bias"][:half]},
            "up": {"kernel": gate_up["kernel"][:, half:], "bias": gate_up["bias"][half:]},
            "down": _lin(sd, f"{b}.mlp.w3"),
        }
        if qk_norm:
            block.update(q_norm=sd[f"{b}.attn.q_norm.weight"], k_norm=sd[f"{b}.attn.k_norm.weight"])
        params["blocks"][i] = block
    return params


def _pair(qk_norm: bool, seed: int = 0):
    torch.manual_seed(seed)
    theirs = LightningDiT(use_qknorm=qk_norm)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # norm scales around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))
    ours = create_model("LightningDiT-S/2", input_size=INPUT, in_channels=CHANNELS, num_classes=CLASSES,
                        depth=DEPTH, hidden_size=HIDDEN, num_heads=HEADS, qk_norm=qk_norm, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in theirs.named_parameters()}
    state = nnx.state(ours, nnx.Param)
    want = _our_params(sd, qk_norm)
    # Every parameter of ours is set, each with its shape (replace_by_pure_dict checks the keys).
    assert jax.tree.map(np.shape, want) == jax.tree.map(np.shape, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, want))
    nnx.update(ours, state)
    return theirs, ours


def _inputs(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, INPUT, INPUT, CHANNELS)).astype(np.float32)
    t = rng.uniform(0, 1, 3).astype(np.float32)
    y = np.array([0, 4, CLASSES])  # the null class too
    return x, t, y


def _max_rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_dense_forward_matches_lightningdit(qk_norm):
    theirs, ours = _pair(qk_norm)
    x, t, y = _inputs()
    with torch.no_grad():
        want = theirs(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    want = want.permute(0, 2, 3, 1).numpy()
    got = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    assert _max_rel(got, want) <= 1e-5


def test_routed_forward_matches_lightningdit_on_each_samples_kept_tokens():
    """Route blocks 1..1 at ratio 0.5: per sample, LightningDiT's block runs on the kept tokens with
    its RoPE table rows at their original positions; the tokens then rejoin the sequence."""
    theirs, ours = _pair(qk_norm=False, seed=5)
    x, t, y = _inputs(6)
    plan = routing.draw_plan(jax.random.key(7), [routing.Route(1, 1, 0.5)], batch_size=3, num_tokens=16)
    got = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), route_plan=plan))
    rope = theirs.feat_rope
    with torch.no_grad():
        tokens, c = theirs.embed(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
        tokens = theirs.blocks[0](tokens, c, rope)
        for b in range(3):
            kept = torch.from_numpy(np.array(plan.kept[0][b]))

            def kept_rope(q, kept=kept):
                return q * rope.freqs_cos[kept] + rotate_half(q) * rope.freqs_sin[kept]
            tokens[b, kept] = theirs.blocks[1](tokens[b:b + 1, kept], c[b:b + 1], kept_rope)[0]
        tokens = theirs.blocks[2](tokens, c, rope)
        want = theirs.unpatchify(theirs.final_layer(tokens, c)).permute(0, 2, 3, 1).numpy()
    assert _max_rel(got, want) <= 1e-5
    dense = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    assert np.abs(got - dense).max() > 1e-3  # routing did act
