"""The selective scan, the bidirectional SSM mixer, scan paths under routing, and the SSM backbone."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import trainer_testlib as tl
from tread_jax import routing, train
from tread_jax.diffusion import EDM
from tread_jax.models import create_model
from tread_jax.models.layers import sincos_pos_embed_2d, unpatchify
from tread_jax.models.scan import selective_scan
from tread_jax.models.ssm import (
    SSM,
    ScanOrder,
    SelectiveSSM,
    causal_depthwise_conv,
    path_ranks,
    scan_order,
)

TINY = dict(hidden_size=16, depth=4, d_state=4, patch_size=2, in_channels=1, out_channels=1, num_classes=3)


def scan_inputs(seed: int, length: int, batch: int = 2, channels: int = 4, state: int = 4):
    """Random scan inputs (numpy: nothing to compile) with step sizes around Mamba's range."""
    rng = np.random.default_rng(seed)

    def draw(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    u, delta = draw(batch, length, channels), np.log1p(np.exp(draw(batch, length, channels) - 2.0))  # softplus
    A = -np.exp(draw(channels, state))
    return u, delta, A, draw(batch, length, state), draw(batch, length, state), draw(channels)


def normal(seed: int, *shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def rngs(seed: int) -> nnx.Rngs:
    # The "rbg" generator compiles several times faster than threefry on CPU; the tests only
    # need some random initialisation, so they use it to stay fast.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def perturbed(model: nnx.Module, seed: int, scale: float = 0.1) -> nnx.Module:
    """The model with noise on every parameter, so zero-initialised gates and heads are live."""
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(np.float32), params)
    return nnx.merge(graphdef, noisy)


def draw(key: jax.Array, routes, batch: int = 2, num_tokens: int = 24) -> routing.RoutePlan:
    """The SSM's route plan (kept tokens in order) for the tiny model's 4 x 6 token grid."""
    return routing.draw_plan(key, routes, batch_size=batch, num_tokens=num_tokens, keep_order=True)


def pure_forward(model: nnx.Module):
    """A jitted ``(params, x, t, y, route_plan=None) -> out`` over the model's parameters."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def fwd(params, x, t, y, route_plan=None):
        return nnx.merge(graphdef, params)(x, t, y, route_plan=route_plan)

    return params, fwd


call = nnx.jit(lambda module, *args: module(*args))


# ----------------------------------------------------------------------------- scan


@pytest.mark.parametrize("length", [37, 4096])  # 37: odd, not a power of two
def test_associative_and_sequential_scans_agree_with_gradients(length):
    args = scan_inputs(length, length)
    cotangent = np.random.default_rng(1).normal(size=args[0].shape).astype(np.float32)

    @jax.jit
    def value_and_grads(args):
        outs = {}
        for method in ("associative", "sequential"):
            y, vjp = jax.vjp(lambda a: selective_scan(*a, method=method), args)
            outs[method] = (y, vjp(cotangent)[0])
        return outs

    outs = value_and_grads(args)
    (y_par, g_par), (y_seq, g_seq) = outs["associative"], outs["sequential"]
    assert float(jnp.abs(y_seq).max()) > 0.5  # a live recurrence, not a vanishing one
    np.testing.assert_allclose(y_par, y_seq, rtol=0, atol=1e-5)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D"), g_par, g_seq):
        # Gradients of A and D sum over all L tokens: compare relative to their magnitude.
        err = float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1.0))
        assert err < 1e-5, (name, err)


def test_scan_state_is_float32_for_bfloat16_inputs():
    low = [jnp.asarray(a, jnp.bfloat16) for a in scan_inputs(0, 64)]
    y_low = selective_scan(*low, method="sequential")
    y_ref = selective_scan(*(a.astype(jnp.float32) for a in low), method="sequential")
    assert y_low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y_low, y_ref.astype(jnp.bfloat16))


def test_scan_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown selective scan method"):
        selective_scan(*scan_inputs(0, 4), method="cumsum")


def test_causal_conv_matches_torch_depthwise_conv1d():
    x = np.random.default_rng(0).normal(size=(2, 11, 5)).astype(np.float32)
    kernel = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    bias = np.random.default_rng(2).normal(size=(5,)).astype(np.float32)
    ref = torch.nn.functional.conv1d(
        torch.from_numpy(x).transpose(1, 2),
        torch.from_numpy(kernel.T[:, None, :].copy()),
        torch.from_numpy(bias),
        padding=3,
        groups=5,
    )[..., :11].transpose(1, 2)
    np.testing.assert_allclose(causal_depthwise_conv(x, kernel, bias), ref.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- mixer


def test_bidirectional_mixer_reversal_swaps_directions():
    layer = SelectiveSSM(16, d_state=4, rngs=rngs(0))
    x = normal(1, 2, 13, 16)
    y = call(layer, x)
    graphdef, state = nnx.split(layer)
    per_direction = {"conv_kernel", "conv_bias", "x_proj", "dt_proj", "dt_bias", "A_log", "D"}
    swapped = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.flip(v, 0) if path[0].key in per_direction else v, state
    )
    mirrored = nnx.merge(graphdef, swapped)
    np.testing.assert_allclose(call(mirrored, jnp.flip(x, 1)), jnp.flip(y, 1), atol=1e-5)
    # Without the swap the directions differ, so plain reversal does not commute with the layer.
    assert float(jnp.abs(call(layer, jnp.flip(x, 1)) - jnp.flip(y, 1)).max()) > 1e-3


def test_unidirectional_mixer_is_causal():
    layer = SelectiveSSM(16, d_state=4, bidirectional=False, rngs=rngs(0))
    x = normal(1, 1, 10, 16)
    y, y_poked = call(layer, x), call(layer, x.at[:, 6].add(1.0))
    np.testing.assert_array_equal(y[:, :6], y_poked[:, :6])
    assert float(jnp.abs(y[:, 6:] - y_poked[:, 6:]).min()) > 0


def test_mixer_bfloat16_compute_stays_close_to_float32():
    layer = SelectiveSSM(16, d_state=4, rngs=rngs(0))
    x = normal(1, 2, 20, 16)
    y16 = call(layer, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), call(layer, x), atol=5e-2)


# ----------------------------------------------------------------------------- scan paths


def test_path_ranks_on_a_3x4_grid():
    # Row-major token t sits at (t // 4, t % 4).
    np.testing.assert_array_equal(np.argsort(path_ranks("row", 3, 4)), np.arange(12))
    np.testing.assert_array_equal(np.argsort(path_ranks("col", 3, 4)), [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
    np.testing.assert_array_equal(np.argsort(path_ranks("row_rev", 3, 4)), np.arange(12)[::-1])
    np.testing.assert_array_equal(np.argsort(path_ranks("col_rev", 3, 4)), [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0])
    with pytest.raises(ValueError, match="unknown scan path"):
        path_ranks("zigzag", 3, 4)


@pytest.mark.parametrize("path", ["row", "col", "row_rev", "col_rev"])
def test_kept_tokens_reach_the_scan_in_ascending_path_position(path):
    grid_h, grid_w, batch = 4, 6, 3
    positions = routing.select_tokens(jax.random.key(0), batch, grid_h * grid_w, 0.5, keep_order=True)
    # Tokens that carry their own grid position, as the gather hands them to a block.
    tokens = positions[..., None].astype(jnp.float32)
    seen = np.asarray(scan_order(path, grid_h, grid_w, positions).to_path(tokens)[..., 0]).astype(int)
    rank = {"row": lambda r, c: r * grid_w + c, "col": lambda r, c: c * grid_h + r}[path.removesuffix("_rev")]
    for b in range(batch):
        expected = sorted(positions[b].tolist(), key=lambda p: rank(*divmod(p, grid_w)), reverse=path.endswith("_rev"))
        assert seen[b].tolist() == expected


@pytest.mark.parametrize("path", ["row", "col", "row_rev", "col_rev"])
@pytest.mark.parametrize("routed", [False, True])
def test_scan_order_is_the_path_permutation_and_its_gradient(path, routed):
    grid_h, grid_w, batch = 4, 6, 3
    positions = routing.select_tokens(jax.random.key(1), batch, grid_h * grid_w, 0.5, keep_order=True)
    if not routed:
        positions = jnp.broadcast_to(jnp.arange(grid_h * grid_w), (batch, grid_h * grid_w))
    # Reference: gather by the ascending path rank of each token, autodiff through it.
    expected_order = jnp.argsort(jnp.asarray(path_ranks(path, grid_h, grid_w))[positions], axis=-1)
    order = scan_order(path, grid_h, grid_w, positions if routed else None)
    x = normal(5, batch, positions.shape[1], 3)
    weights = normal(6, batch, positions.shape[1], 3)  # a loss that tells every position apart
    np.testing.assert_array_equal(order.to_path(x), routing.gather_tokens(x, expected_order))
    np.testing.assert_array_equal(order.from_path(order.to_path(x)), x)
    for fn, reference in (
        (order.to_path, lambda v: routing.gather_tokens(v, expected_order)),
        (order.from_path, lambda v: routing.gather_tokens(v, jnp.argsort(expected_order, axis=-1))),
    ):
        grad = jax.grad(lambda v: (fn(v) * weights).sum())(x)
        np.testing.assert_array_equal(grad, jax.grad(lambda v: (reference(v) * weights).sum())(x))


# ----------------------------------------------------------------------------- backbone


@pytest.fixture(scope="module")
def tiny_model():
    model = SSM(input_size=8, rngs=rngs(0), **TINY)
    model = perturbed(model, 1)
    x = normal(2, 2, 8, 12, 1)  # a 4 x 6 token grid: rows != columns
    t = jnp.array([0.3, -0.5])
    y = jnp.array([1, 3])  # 3 is the null class
    return model, (x, t, y)


def test_routing_with_ratio_zero_is_exactly_dense(tiny_model):
    model, (x, t, y) = tiny_model
    params, fwd = pure_forward(model)
    dense = fwd(params, x, t, y)
    assert float(jnp.abs(dense).max()) > 1e-3
    routed = fwd(params, x, t, y, draw(jax.random.key(3), (routing.Route(1, 2, 0.0),)))
    np.testing.assert_array_equal(routed, dense)


def test_routed_forward_matches_a_hand_built_reference(tiny_model):
    model, (x, t, y) = tiny_model
    route, key = routing.Route(1, 3, 0.5), jax.random.key(4)  # blocks 1..3 scan col, row_rev, col_rev
    params, fwd = pure_forward(model)
    plan = draw(key, (route,))
    out = fwd(params, x, t, y, plan)

    # Reference: each sample on its own, the kept tokens sorted by hand along each block's path,
    # and each block run on that sequence as if it were the whole (already path-ordered) input.
    grid_h, grid_w = 4, 6
    kept = np.asarray(plan.kept[0])
    sort_keys = {
        "row": lambda p: p,
        "col": lambda p: (p % grid_w, p // grid_w),
        "row_rev": lambda p: -p,
        "col_rev": lambda p: (-(p % grid_w), -(p // grid_w)),
    }

    def members(b: int, i: int) -> list[int]:
        return kept[b].tolist() if route.start <= i <= route.end else list(range(grid_h * grid_w))

    paths = [model.scan_paths[i % len(model.scan_paths)] for i in range(model.depth)]
    sequences = [[np.array(sorted(members(b, i), key=sort_keys[p])) for i, p in enumerate(paths)] for b in range(2)]

    @nnx.jit
    def reference(model, x, t, y):
        tokens = model.patch_embed(x) + sincos_pos_embed_2d(TINY["hidden_size"], grid_h, grid_w)
        c = model.t_embedder(t) + model.y_embedder(y)
        rows = []
        for b in range(2):
            h = tokens[b]
            for i, seq in enumerate(sequences[b]):
                h = h.at[seq].set(model.blocks[i](h[seq][None], c[b : b + 1], ScanOrder())[0])
            rows.append(h)
        return unpatchify(model.final_layer(jnp.stack(rows), c), 2, *x.shape[1:3])

    np.testing.assert_allclose(out, reference(model, x, t, y), atol=1e-5)


@pytest.mark.parametrize("routes", [(), (routing.Route(1, 1, 0.5),)], ids=["dense", "routed"])
def test_tiny_ssm_overfits_one_batch(routes):
    model = SSM(input_size=8, rngs=rngs(0), **dict(TINY, depth=3))  # block 1 scans column-major
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(8, 8, 8, 1)), jnp.float32)
    labels = jnp.arange(8) % 3
    objective, tx = EDM(), optax.adam(3e-3)
    key = jax.random.key(7, impl="rbg")  # one fixed noise draw and route draw: the same batch every step

    def loss_fn(params):
        def net(xin, noise, cls):
            model = nnx.merge(graphdef, params)
            plan = draw(jax.random.fold_in(key, 1), routes, batch=8, num_tokens=16)
            return model(xin, noise, cls, route_plan=plan)

        return objective.loss(net, x, labels, key).mean()

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, (params, opt_state), length=100)[1]

    losses = np.asarray(train(params, tx.init(params)))
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.1 * losses[0], (losses[0], losses[-5:])


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_blocks_compute_the_same(tiny_model, remat):
    # Routed over blocks 1..2: static scan orders for the dense blocks, per-sample ones inside.
    model, (x, t, y) = tiny_model
    plan = draw(jax.random.key(3), (routing.Route(1, 2, 0.5),))
    graphdef, params = nnx.split(model, nnx.Param)
    remat_graphdef, _ = nnx.split(SSM(input_size=8, remat=remat, rngs=rngs(0), **TINY), nnx.Param)

    def value_and_grad(graphdef):
        def loss(params):
            out = nnx.merge(graphdef, params)(x, t, y, route_plan=plan)
            return jnp.mean(jnp.square(out)), out

        fn = jax.value_and_grad(loss, has_aux=True)
        return jax.jit(fn)(params), str(jax.make_jaxpr(fn)(params))

    ((_, reference), reference_grads), plain = value_and_grad(graphdef)
    ((_, out), grads), program = value_and_grad(remat_graphdef)
    assert " remat" not in plain and " remat" in program
    np.testing.assert_allclose(out, reference, atol=1e-5 * float(jnp.abs(reference).max()))
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()) + 1e-12)


def test_registry_sizes_and_parameter_count():
    def abstract(name: str) -> nnx.Module:
        return nnx.eval_shape(lambda: create_model(name, input_size=32, in_channels=4, num_classes=1000, rngs=rngs(0)))

    def millions(model: nnx.Module) -> float:
        return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6

    assert abs(millions(abstract("SSM-B/2")) - 111) < 0.03 * 111  # the paper's Mamba backbone
    small = abstract("SSM-S/4")
    assert (small.depth, small.patch_size, small.num_classes, small.hidden_size) == (24, 4, 1000, 384)
    assert 30 < millions(small) < 45


def test_bad_model_settings_are_rejected():
    with pytest.raises(ValueError, match="scan_paths"):
        SSM(input_size=8, scan_paths=("row", "spiral"), rngs=rngs(0), **TINY)
    with pytest.raises(ValueError, match="scan_method"):
        SSM(input_size=8, scan_method="fft", rngs=rngs(0), **TINY)


def test_digits_variant_trains_through_the_trainer(tmp_path):
    config = tl.load_config(variant="ssm")
    assert config.model.name == "SSM-S/2" and config.routes
    # The variant's backbone and route, shrunk to a few cheap steps.
    config.model.overrides = dict(config.model.overrides, depth=2, hidden_size=16, d_state=4)
    config.routes = [dict(start=0, end=0, ratio=0.5)]
    config.data.data_dir = str(tmp_path / "data")
    config.global_batch_size = 16
    config.num_train_steps = 3
    config.log_every = 1
    config.checkpoint_every = 3
    config.sample.every = 0
    config.eval.report = ""
    train.train_and_evaluate(config, str(tmp_path / "work"))
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
