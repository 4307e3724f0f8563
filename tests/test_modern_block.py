"""The modern DiT block (RMSNorm, QK-norm, 2-D RoPE, SwiGLU): formulas, RoPE's relative-position
property, a routed forward vs a per-sample reference with original coordinates, scan/remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trainer_testlib as tl
from tread_jax import routing, train
from tread_jax.models import create_model, model_spec
from tread_jax.models.dit import ModernDiTBlock
from tread_jax.models.layers import apply_rope, rms_norm, rope_angles_2d, sincos_pos_embed_2d, unpatchify

HIDDEN, HEADS = 32, 2
HEAD_DIM = HIDDEN // HEADS


def _randomise(module: nnx.Module, seed: int) -> None:
    """Every parameter random (zero-initialised gates and outputs would hide mistakes)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0) for k, x in zip(keys, leaves)]
    nnx.update(module, jax.tree.unflatten(treedef, new))


def _rope_reference(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """RoPE written as complex rotations: pair j of ``x[n, h]`` is ``x[2j] + i x[2j + 1]``, turned
    by ``row * w_j`` for the first d/4 pairs and ``col * w_(j - d/4)`` for the others."""
    d = x.shape[-1]
    w = theta ** (-np.arange(d // 4) / (d // 4))
    angle = np.concatenate([rows[:, None] * w, cols[:, None] * w], axis=1)  # [N, d/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)[:, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_rms_norm_formula():
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(g)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rms_norm(jnp.asarray(x)), want / g, rtol=1e-5, atol=1e-6)


def test_rope_is_the_complex_rotation_and_only_sees_relative_positions():
    rng = np.random.default_rng(2)
    rows, cols = rng.integers(0, 16, 10), rng.integers(0, 16, 10)
    q = rng.standard_normal((1, 10, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((1, 10, HEADS, HEAD_DIM)).astype(np.float32)
    angles = rope_angles_2d(rows, cols, HEAD_DIM)
    assert isinstance(angles, np.ndarray)  # static positions stay static under jit
    np.testing.assert_allclose(apply_rope(jnp.asarray(q), angles)[0], _rope_reference(q[0], rows, cols),
                               rtol=1e-5, atol=1e-5)

    def logits(dr: int, dc: int) -> np.ndarray:
        a = rope_angles_2d(rows + dr, cols + dc, HEAD_DIM)
        return np.einsum("bqhd,bkhd->bhqk", apply_rope(jnp.asarray(q), a), apply_rope(jnp.asarray(k), a))
    base = logits(0, 0)
    for shift in [(3, 0), (0, 5), (-7, 11)]:
        np.testing.assert_allclose(logits(*shift), base, rtol=1e-4, atol=1e-4)
    assert np.abs(logits(0, 0) - np.einsum("bqhd,bkhd->bhqk", q, k)).max() > 1e-2  # it does rotate
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles_2d(rows, cols, 6)


def test_block_attention_and_swiglu_match_their_formulas():
    block = ModernDiTBlock(HIDDEN, HEADS, 4.0, attention_impl=None, rngs=nnx.Rngs(0))
    _randomise(block, 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, HIDDEN)).astype(np.float32)
    rows, cols = rng.integers(0, 4, 6), rng.integers(0, 4, 6)
    p = {name: np.asarray(v, np.float64) for name, v in nnx.to_flat_state(nnx.state(block, nnx.Param))
         for name in ["/".join(map(str, name))]}

    # SwiGLU: down(silu(gate x) * up x), int(2/3 * 4 * D) hidden units.
    assert p["gate/kernel"].shape == (HIDDEN, int(2 * 4 * HIDDEN / 3))
    g = x @ p["gate/kernel"] + p["gate/bias"]
    want_mlp = (g / (1 + np.exp(-g)) * (x @ p["up/kernel"] + p["up/bias"])) @ p["down/kernel"] + p["down/bias"]
    np.testing.assert_allclose(block.mlp(jnp.asarray(x)), want_mlp, rtol=1e-4, atol=1e-4)

    # Attention: QK-norm (RMSNorm per head, learned scale), then RoPE, then softmax(q k / sqrt d) v.
    qkv = (x @ p["qkv/kernel"] + p["qkv/bias"]).reshape(2, 6, 3, HEADS, HEAD_DIM)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + 1e-6) * p["q_norm"]
    k = k / np.sqrt((k ** 2).mean(-1, keepdims=True) + 1e-6) * p["k_norm"]
    q = np.stack([_rope_reference(s, rows, cols) for s in q])
    k = np.stack([_rope_reference(s, rows, cols) for s in k])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 6, HIDDEN)
    want_attn = out @ p["attn_out/kernel"] + p["attn_out/bias"]
    got = block.attention(jnp.asarray(x), rope_angles_2d(rows, cols, HEAD_DIM))
    np.testing.assert_allclose(got, want_attn, rtol=1e-4, atol=1e-4)


def _tiny_model(**kw) -> nnx.Module:
    model = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=5, depth=4, hidden_size=HIDDEN,
                         num_heads=HEADS, block="modern", rngs=nnx.Rngs(0), **kw)
    _randomise(model, 4)
    return model


def test_routed_forward_equals_a_per_sample_reference_with_original_coordinates():
    """Route blocks 1..2: each sample's kept tokens run those blocks with RoPE at their original
    grid coordinates; the reference runs the model's pieces per sample, positions by hand, after
    adding the fixed sin-cos table (LightningDiT keeps it under RoPE)."""
    model = _tiny_model()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(3), jnp.float32)
    y = jnp.asarray([0, 3, 5])
    plan = routing.draw_plan(jax.random.key(6), [routing.Route(1, 2, 0.5)], batch_size=3, num_tokens=16)
    got = model(x, t, y, route_plan=plan)

    grid = 4
    everything = np.arange(16)
    for b in range(3):
        tokens = model.patch_embed(x[b:b + 1]) + sincos_pos_embed_2d(HIDDEN, 4, 4)
        c = model.t_embedder(t[b:b + 1]) + model.y_embedder(y[b:b + 1])
        angles = lambda pos: rope_angles_2d(pos // grid, pos % grid, HEAD_DIM)  # noqa: E731
        tokens = model.blocks[0](tokens, c, angles(everything))
        kept = np.asarray(plan.kept[0][b])
        h = tokens[:, kept]
        for i in (1, 2):
            h = model.blocks[i](h, c, angles(kept))
        tokens = tokens.at[:, kept].set(h)
        tokens = model.blocks[3](tokens, c, angles(everything))
        want = unpatchify(model.final_layer(tokens, c), 2, 8, 8)
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got - model(x, t, y, route_plan=None)).max()) > 1e-3  # routing did act


def test_bad_block_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="unknown block 'lightning'"):
        create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=5, block="lightning", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=5, hidden_size=36, num_heads=6,
                      block="modern", rngs=nnx.Rngs(0))


def test_gradients_through_scan_and_remat_equal_the_plain_path():
    plain = _tiny_model()
    fast = _tiny_model(scan_blocks=True, remat="dots")
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t, y = jnp.asarray([0.1, -0.4]), jnp.asarray([1, 2])
    plan = routing.draw_plan(jax.random.key(9), [routing.Route(1, 2, 0.5)], batch_size=2, num_tokens=16)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.sum(m(x, t, y, route_plan=plan) ** 2))(model)
    want, got = grads(plain), grads(fast)
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
        a, b = np.asarray(a), np.asarray(b)
        # 1e-4: the q_norm scale's gradient (a sum with cancellation) already differs by ~9e-5
        # between the plain path jitted and run eagerly; a wrong scan or remat is off by O(1).
        assert np.abs(b - a).max() <= 1e-4 * np.abs(a).max(), path


def test_lightningdit_names_build_the_modern_block_at_dits_sizes():
    cls, kwargs = model_spec("LightningDiT-XL/1")
    assert kwargs == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, block="modern", qk_norm=False)
    model = nnx.eval_shape(lambda: create_model("LightningDiT-B/2", input_size=32, in_channels=4,
                                                num_classes=1000, rngs=nnx.Rngs(0)))
    assert isinstance(model.blocks[0], ModernDiTBlock) and len(model.blocks) == 12
    assert model_spec("DiT-B/2")[1] == dict(depth=12, hidden_size=768, num_heads=12, patch_size=2)


def test_digits_variant_is_the_default_with_the_modern_block_and_trains(tmp_path):
    config, default = tl.load_config(variant="modern"), tl.load_config()
    assert dict(config.model.overrides) == dict(default.model.overrides, block="modern")
    config.model.overrides = dict(default.model.overrides)
    assert config.to_dict() == default.to_dict()  # nothing else differs
    config = tl.load_config(variant="modern")
    config.model.overrides = dict(config.model.overrides, depth=2, hidden_size=16, num_heads=2)
    config.routes = [dict(start=0, end=0, ratio=0.5)]
    config.data.data_dir = str(tmp_path / "data")
    config.global_batch_size, config.num_train_steps = 16, 3
    config.log_every, config.checkpoint_every = 1, 3
    config.sample.every = 0
    config.eval.report = ""
    train.train_and_evaluate(config, str(tmp_path / "work"))
