"""The routing transform: selection, gather/scatter, and its semantics inside a model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testlib import randomize
from tread_jax import routing
from tread_jax.models import create_model
from tread_jax.routing import Route

DEPTH = 6


def affine_block(i, x):
    """A block whose effect on every token is distinct, elementwise and easy to replay."""
    return x * (1.0 + 0.1 * (i + 1)) + (i + 1)


def run_affine(x, plan, depth=DEPTH):
    """A backbone's forward over affine blocks: the plain loop over the plan's stretches."""
    for stretch in routing.stretches(plan, depth, x.dtype):
        h = stretch.gather(x)
        for i in stretch.blocks:
            h = affine_block(i, h)
        x = stretch.scatter(x, h)
    return x


@pytest.mark.parametrize("num_tokens,ratio", [(16, 0.5), (17, 0.5), (16, 0.25), (10, 0.75), (7, 0.9)])
def test_kept_count_and_distinct_per_sample(num_tokens, ratio):
    idx = routing.select_tokens(jax.random.key(0), 32, num_tokens, ratio)
    assert idx.shape == (32, num_tokens - math.floor(num_tokens * ratio))
    idx = np.asarray(idx)
    for row in idx:  # a subset: no token twice
        assert len(set(row.tolist())) == len(row)
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1  # each sample draws its own subset


def test_keep_order_sorts_the_same_subset():
    key = jax.random.key(3)
    unordered = np.asarray(routing.select_tokens(key, 4, 64, 0.5))
    ordered = np.asarray(routing.select_tokens(key, 4, 64, 0.5, keep_order=True))
    np.testing.assert_array_equal(np.sort(unordered, axis=1), ordered)


def test_selection_is_uniform():
    # Every token is kept with probability K / N.
    idx = np.asarray(routing.select_tokens(jax.random.key(1), 4000, 16, 0.5))
    freq = np.bincount(idx.ravel(), minlength=16) / 4000
    np.testing.assert_allclose(freq, 0.5, atol=0.04)


def test_routed_tokens_skip_the_span_and_kept_tokens_run_it():
    x = jax.random.normal(jax.random.key(0), (5, 16, 3))
    route = Route(1, 3, 0.5)
    key = jax.random.key(7)
    plan = routing.draw_plan(key, (route,), batch_size=5, num_tokens=16)
    out = run_affine(x, plan)
    (idx,) = plan.kept
    kept = np.zeros((5, 16), bool)
    kept[np.arange(5)[:, None], np.asarray(idx)] = True

    def run(h, blocks):
        for i in blocks:
            h = affine_block(i, h)
        return h

    dense = run(x, range(DEPTH))
    skipped = run(x, [0, 4, 5])  # routed tokens bypass blocks 1..3 and re-enter as they left block 0
    np.testing.assert_allclose(out, np.where(kept[..., None], dense, skipped), rtol=1e-6)


def test_vectorised_transform_matches_per_sample_loop():
    x = jax.random.normal(jax.random.key(2), (4, 12, 5))
    routes = (Route(0, 1, 0.5), Route(3, 4, 0.25))
    key = jax.random.key(11)
    plan = routing.draw_plan(key, routes, batch_size=4, num_tokens=12)
    out = run_affine(x, plan)
    indices = [np.asarray(i) for i in plan.kept]
    expected = np.array(x)
    for b in range(4):
        h = expected[b]
        i = 0
        while i < DEPTH:
            r = next((k for k, r in enumerate(routes) if r.start == i), None)
            if r is None:
                h = np.asarray(affine_block(i, h))
                i += 1
                continue
            sub = h[indices[r][b]]
            for j in range(routes[r].start, routes[r].end + 1):
                sub = np.asarray(affine_block(j, sub))
            h = h.copy()
            h[indices[r][b]] = sub
            i = routes[r].end + 1
        expected[b] = h
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("keep_order", [False, True])
def test_stretches_tell_blocks_the_positions_of_the_tokens_they_see(keep_order):
    routes = (Route(1, 2, 0.5), Route(4, 5, 0.25), Route(6, 6, 0.0))
    batch, num_tokens, depth, key = 3, 20, 7, jax.random.key(5)
    plan = routing.draw_plan(key, routes, batch_size=batch, num_tokens=num_tokens, keep_order=keep_order)
    # The ratio-0 route drops no token: it is left out of the plan and runs densely.
    assert plan.routes == routes[:2] and len(plan.kept) == 2
    stretches = routing.stretches(plan, depth, jnp.float32)
    assert [s.blocks for s in stretches] == [range(0, 1), range(1, 3), range(3, 4), range(4, 6), range(6, 7)]
    # Each token carries its own original position as its value.
    tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.float32)[None, :, None], (batch, num_tokens, 1))
    expected = [None, plan.kept[0], None, plan.kept[1], None]
    for stretch, kept in zip(stretches, expected):
        values = np.asarray(stretch.gather(tokens)[..., 0]).astype(int)
        if kept is None:
            assert stretch.kept is None
            np.testing.assert_array_equal(values, np.broadcast_to(np.arange(num_tokens), (batch, num_tokens)))
        else:
            np.testing.assert_array_equal(stretch.kept, kept)
            np.testing.assert_array_equal(values, kept)
            if keep_order:
                assert np.all(np.diff(np.asarray(kept), axis=1) > 0)


def test_plan_draws_each_active_route_from_its_own_fold_of_the_key():
    # The draw of every training step depends on this: route i of the active routes (those that
    # drop a token) uses fold_in(key, i), an argsort of uniform noise; inactive ones take no fold.
    key = jax.random.key(9)
    routes = (Route(0, 0, 0.0), Route(1, 2, 0.5), Route(3, 3, 0.05), Route(4, 5, 0.25))
    plan = routing.draw_plan(key, routes, batch_size=4, num_tokens=16)
    assert plan.routes == (Route(1, 2, 0.5), Route(4, 5, 0.25))
    for i, (route, kept) in enumerate(zip(plan.routes, plan.kept)):
        noise = jax.random.uniform(jax.random.fold_in(key, i), (4, 16))
        np.testing.assert_array_equal(kept, jnp.argsort(noise, axis=-1)[:, : routing.num_kept(16, route.ratio)])


def test_plan_passes_through_jit():
    routes = (Route(1, 2, 0.5),)
    draw = jax.jit(lambda key: routing.draw_plan(key, routes, batch_size=2, num_tokens=8, keep_order=True))
    plan = draw(jax.random.key(0))
    assert isinstance(plan, routing.RoutePlan) and plan.routes == routes and plan.keep_order
    x = jax.random.normal(jax.random.key(1), (2, 8, 3))
    np.testing.assert_allclose(jax.jit(run_affine)(x, plan), run_affine(x, plan), rtol=1e-6)


def test_block_after_each_route_rejoins_in_float32():
    # Adjacent routes: block 3 ends nothing but starts the second route right after the first.
    routes = (Route(1, 2, 0.5), Route(3, 4, 0.5), Route(6, 7, 0.5))
    plan = routing.draw_plan(jax.random.key(0), routes, batch_size=2, num_tokens=8)
    bf, f = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    got = [(s.blocks, s.kept is None, s.dtype) for s in routing.stretches(plan, 9, jnp.bfloat16)]
    assert got == [
        (range(0, 1), True, bf), (range(1, 3), False, bf), (range(3, 4), False, f), (range(4, 5), False, bf),
        (range(5, 6), True, f), (range(6, 8), False, bf), (range(8, 9), True, f),
    ]
    # The published switch off, or float32 compute: one stretch per route and between routes.
    for dtype, rejoin in ((jnp.bfloat16, False), (jnp.float32, True)):
        stretches = routing.stretches(plan, 9, dtype, float32_rejoin=rejoin)
        blocks = [range(0, 1), range(1, 3), range(3, 5), range(5, 6), range(6, 8), range(8, 9)]
        assert [s.blocks for s in stretches] == blocks
        assert {s.dtype for s in stretches} == {jnp.dtype(dtype)}


def test_dense_plan_is_one_stretch():
    assert [s.blocks for s in routing.stretches(None, DEPTH, jnp.bfloat16)] == [range(DEPTH)]
    empty = routing.draw_plan(jax.random.key(0), (Route(1, 3, 0.0),), batch_size=2, num_tokens=8)
    assert empty.kept == ()
    assert [s.blocks for s in routing.stretches(empty, DEPTH, jnp.bfloat16)] == [range(DEPTH)]


def test_default_route_is_the_published_placement():
    assert routing.default_route(12) == Route(2, 8, 0.5)
    assert routing.default_route(28, 0.25) == Route(2, 24, 0.25)


@pytest.mark.parametrize(
    "routes,message",
    [
        ((Route(-1, 2),), "0 <= start"),
        ((Route(3, 2),), "0 <= start <= end"),
        ((Route(2, 6),), "end < depth"),
        ((Route(1, 2, 1.0),), "ratio"),
        ((Route(1, 2, -0.1),), "ratio"),
        ((Route(1, 3), Route(3, 4)), "overlap"),
        ((Route(3, 4), Route(0, 1)), "not sorted"),
    ],
)
def test_invalid_routes_raise(routes, message):
    with pytest.raises(ValueError, match=message):
        routing.validate_routes(routes, DEPTH)


def test_parse_routes_accepts_config_forms():
    expected = (Route(2, 8, 0.5), Route(9, 10, 0.25))
    assert routing.parse_routes([dict(start=2, end=8), dict(start=9, end=10, ratio=0.25)]) == expected
    assert routing.parse_routes([(2, 8), (9, 10, 0.25)]) == expected
    assert routing.parse_routes(None) == ()


def test_plan_that_does_not_fit_the_model_is_an_error():
    model = tiny_dit()
    x, t, y = model_inputs()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="end < depth"):
        model(x, t, y, route_plan=routing.draw_plan(key, (Route(1, DEPTH),), batch_size=3, num_tokens=16))
    with pytest.raises(ValueError, match="drawn for 64 tokens, the model sees 16"):
        model(x, t, y, route_plan=routing.draw_plan(key, (Route(1, 2),), batch_size=3, num_tokens=64))
    ssm = create_model("SSM-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=16,
                       d_state=4, rngs=nnx.Rngs(0))
    assert ssm.keep_order and not model.keep_order and ssm.num_tokens(8, 8) == 16
    with pytest.raises(ValueError, match="keep_order=True"):
        ssm(x, t, y, route_plan=routing.draw_plan(key, (Route(0, 0),), batch_size=3, num_tokens=16))


def tiny_dit(**kwargs):
    return create_model(
        "DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=DEPTH, hidden_size=32,
        num_heads=2, rngs=nnx.Rngs(0), **kwargs,
    )


def plan(routes, key=0, batch=3):
    return routing.draw_plan(jax.random.key(key), routes, batch_size=batch, num_tokens=16)


def model_inputs(batch=3):
    x = jax.random.normal(jax.random.key(5), (batch, 8, 8, 1))
    return x, jnp.linspace(-1.0, 1.0, batch), jnp.arange(batch) % 11


def test_ratio_zero_is_exactly_dense():
    model = randomize(tiny_dit())
    x, t, y = model_inputs()
    dense = model(x, t, y)
    routed = model(x, t, y, route_plan=plan((Route(1, 3, 0.0),)))
    np.testing.assert_array_equal(dense, routed)


def test_routing_changes_the_forward_and_depends_on_the_key():
    model = randomize(tiny_dit())
    x, t, y = model_inputs()
    routes = (Route(1, 3, 0.5),)
    a = model(x, t, y, route_plan=plan(routes))
    b = model(x, t, y, route_plan=plan(routes, key=1))
    assert not np.allclose(a, model(x, t, y))
    assert not np.allclose(a, b)


def test_gradients_reach_every_parameter_when_routed():
    model = randomize(tiny_dit())
    x, t, y = model_inputs()
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        out = nnx.merge(graphdef, p)(x, t, y, route_plan=plan((Route(1, 3, 0.5),)))
        return jnp.mean(jnp.square(out - x))

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        if "y_embedder" not in jax.tree_util.keystr(path):  # unused label rows get no gradient
            assert np.any(g != 0), path


def test_block_after_route_runs_in_float32_under_bfloat16():
    model = randomize(tiny_dit(compute_dtype=jnp.bfloat16))
    x, t, y = model_inputs()
    route = Route(1, 3, 0.5)
    jaxpr = str(jax.make_jaxpr(lambda: model(x, t, y, route_plan=plan((route,))))())
    off = randomize(tiny_dit(compute_dtype=jnp.bfloat16, float32_after_route=False))
    jaxpr_off = str(jax.make_jaxpr(lambda: off(x, t, y, route_plan=plan((route,))))())
    # The block after the route multiplies float32 activations by its float32 weights.
    hidden = 32
    f32_matmul = f"f32[3,16,{hidden}] "
    assert jaxpr.count("dot_general") == jaxpr_off.count("dot_general")
    assert jaxpr.count(f32_matmul) > jaxpr_off.count(f32_matmul)


# Structured (SPRINT) selection: every g x g cell of the token grid keeps g*g*(1 - ratio) tokens.

def cell_of(idx, width, group):
    """Cell number of raster token indices on a grid of ``width`` columns."""
    return (idx // width // group) * (width // group) + (idx % width) // group


@pytest.mark.parametrize("grid,group,ratio,per_cell", [((4, 4), 2, 0.75, 1), ((8, 8), 4, 0.875, 2),
                                                      ((8, 8), 4, 0.625, 6), ((4, 6), 2, 0.5, 2)])
def test_structured_mask_keeps_the_stated_count_in_every_cell(grid, group, ratio, per_cell):
    idx = np.asarray(routing.select_group_tokens(jax.random.key(0), 64, grid, group, ratio))
    cells = (grid[0] // group) * (grid[1] // group)
    assert idx.shape == (64, cells * per_cell) and idx.shape[1] == routing.num_kept(grid[0] * grid[1], ratio)
    for row in idx:
        assert len(set(row.tolist())) == len(row)
        np.testing.assert_array_equal(np.bincount(cell_of(row, grid[1], group), minlength=cells), per_cell)


@pytest.mark.parametrize("grid,group,ratio", [((4, 4), 2, 0.75), ((8, 8), 4, 0.875)])
def test_structured_mask_keeps_every_position_equally_often(grid, group, ratio):
    # Each position is kept with probability p = 1 - ratio; with n draws its count is
    # Binomial(n, p). A 5-sigma band per position fails by chance with probability < 1e-5 in all.
    n = 4000
    idx = np.asarray(routing.select_group_tokens(jax.random.key(1), n, grid, group, ratio))
    counts = np.bincount(idx.ravel(), minlength=grid[0] * grid[1])
    p = 1.0 - ratio
    assert np.all(np.abs(counts - n * p) <= 5 * math.sqrt(n * p * (1 - p))), counts


def test_structured_mask_draws_each_sample_independently():
    # Cell 0 of a 4x4 grid, 2x2 groups keeping 1: two independent samples keep the same position
    # with probability 1/4 (1 if they shared the draw).
    n = 4000
    idx = np.asarray(routing.select_group_tokens(jax.random.key(2), 2 * n, (4, 4), 2, 0.75)).reshape(n, 2, 4)
    same = np.mean(idx[:, 0, 0] == idx[:, 1, 0])
    assert abs(same - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / n), same
    ordered = np.asarray(routing.select_group_tokens(jax.random.key(2), 8, (4, 4), 2, 0.75, keep_order=True))
    unordered = np.asarray(routing.select_group_tokens(jax.random.key(2), 8, (4, 4), 2, 0.75))
    np.testing.assert_array_equal(np.sort(unordered, axis=1), ordered)


def test_structured_route_in_a_plan_and_per_sample_keys():
    route = Route(1, 3, 0.75, group=2)
    plan_ = routing.draw_plan(jax.random.key(0), (route,), batch_size=5, num_tokens=16)
    assert plan_.kept[0].shape == (5, 4)
    keys = jax.random.split(jax.random.key(3), 4)
    four = routing.draw_plan_per_sample(keys, (route, Route(4, 4, 0.5)), num_tokens=16)
    two = routing.draw_plan_per_sample(keys[2:], (route, Route(4, 4, 0.5)), num_tokens=16)
    for a, b in zip(four.kept, two.kept):  # sample i's tokens depend on its own key alone
        np.testing.assert_array_equal(np.asarray(a)[2:], b)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: routing.select_group_tokens(jax.random.key(0), 2, (4, 6), 4, 0.75), "does not tile the 4x6"),
        (lambda: routing.validate_routes((Route(1, 2, 0.6, group=2),), DEPTH), "not a whole number"),
        (lambda: routing.validate_routes((Route(1, 2, 0.5, group=-1),), DEPTH), "group must be"),
        (lambda: routing.draw_plan(jax.random.key(0), (Route(1, 2, 0.75, group=2),), batch_size=1,
                                   num_tokens=12), "not a square grid"),
        (lambda: routing.validate_routes((Route(1, 2, rejoin="x"),), DEPTH), "rejoin must be"),
        (lambda: routing.validate_routes((Route(1, 2, path_drop=0.1),), DEPTH), "SPRINT routes only"),
        (lambda: routing.validate_routes((Route(0, 1, rejoin="sprint"), Route(3, 4, rejoin="sprint")), DEPTH),
         "at most one SPRINT"),
        (lambda: routing.parse_routes([dict(start=1, end=2, policy="group")]), "unknown route fields"),
    ],
)
def test_bad_structured_or_sprint_routes_raise_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_parse_routes_reads_selection_and_rejoin():
    spec = [dict(start=2, end=8, ratio=0.75, group=2, rejoin="sprint", path_drop=0.1)]
    assert routing.parse_routes(spec) == (Route(2, 8, 0.75, 2, "sprint", 0.1),)


def test_structured_route_trains_a_tread_model():
    model = randomize(tiny_dit())
    x, t, y = model_inputs()
    routed = model(x, t, y, route_plan=plan((Route(1, 3, 0.75, group=2),)))
    assert routed.shape == x.shape and np.all(np.isfinite(routed))
    assert not np.allclose(routed, model(x, t, y))
