"""Sparse Guidance (Krause et al., arXiv 2601.01608) and SPRINT's path-drop guidance in the sampler family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trainer_testlib as tl
from model_testlib import randomize
from tread_jax import data, diffusion, routing, sharding
from tread_jax.diffusion import EDM, Flow, Guidance
from tread_jax.model_builder import ModelBuilder
from tread_jax.models import create_model
from tread_jax.routing import Route
from tread_jax.sampler import Sampler, create_guidance

ROUTES = (Route(1, 2, 0.5),)
GRID = (4, 4)


def tiny(sprint_span=None):
    return randomize(create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=4, hidden_size=32,
                                  num_heads=2, sprint_span=sprint_span, rngs=nnx.Rngs(0)))


def inputs(batch=3):
    x = jax.random.normal(jax.random.key(5), (batch, 8, 8, 1))
    return x, jnp.linspace(-1.0, 1.0, batch), jnp.arange(batch) % 10


def sparse(weak, strong, scale=3.0, **kwargs):
    return Guidance(scale=scale, sparsity=(weak, strong), routes=ROUTES, token_grid=GRID, **kwargs)


def branch(model, ratio, keys, evaluation, x, t, y):
    """One branch written out: the model routed at ``ratio`` with the tokens of ``fold_in(keys[b], e)``."""
    eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, evaluation))(keys)
    plan = routing.draw_plan_per_sample(eval_keys, (Route(1, 2, ratio),), num_tokens=16)
    return model(x, t, y, route_plan=plan)


KEYS = jax.random.split(jax.random.key(9), 3)


def test_equal_sparsities_give_the_conditional_pass():
    model = tiny()
    x, t, y = inputs()
    dense = diffusion.guided_net(model, sparse(0.0, 0.0), keys=KEYS)(jnp.float32(1.0), 4)(x, t, y)
    np.testing.assert_allclose(dense, model(x, t, y), rtol=1e-6, atol=1e-6)
    routed = diffusion.guided_net(model, sparse(0.5, 0.5), keys=KEYS)(jnp.float32(1.0), 4)(x, t, y)
    np.testing.assert_allclose(routed, branch(model, 0.5, KEYS, 4, x, t, y), rtol=1e-5, atol=1e-5)
    assert not np.allclose(routed, dense, atol=1e-3)  # the routed conditional pass, not the dense one


def test_guided_output_is_the_formula_and_scale_one_is_the_strong_branch():
    model = tiny()
    x, t, y = inputs()
    weak, strong = branch(model, 0.75, KEYS, 7, x, t, y), branch(model, 0.25, KEYS, 7, x, t, y)
    guided = diffusion.guided_net(model, sparse(0.75, 0.25), keys=KEYS)(jnp.float32(1.0), 7)(x, t, y)
    np.testing.assert_allclose(guided, weak + 3.0 * (strong - weak), rtol=1e-4, atol=1e-5)
    one = diffusion.guided_net(model, sparse(0.75, 0.25, scale=1.0), keys=KEYS)(jnp.float32(1.0), 7)(x, t, y)
    np.testing.assert_allclose(one, strong, rtol=1e-5, atol=1e-5)
    # Another evaluation draws other tokens.
    other = diffusion.guided_net(model, sparse(0.75, 0.25), keys=KEYS)(jnp.float32(1.0), 8)(x, t, y)
    assert not np.allclose(other, guided, atol=1e-3)


def test_both_branches_receive_the_true_labels():
    seen = []

    def spy(x, t, y, route_plan=None):
        seen.append((np.asarray(y), route_plan))
        return jnp.zeros_like(x) + y[:, None, None, None].astype(jnp.float32)

    x, t, y = inputs()
    out = diffusion.guided_net(spy, sparse(0.75, 0.25), keys=KEYS)(jnp.float32(1.0), 0)(x, t, y)
    assert len(seen) == 2
    for labels, plan in seen:
        np.testing.assert_array_equal(labels, y)
    assert sorted(plan.kept[0].shape[1] for _, plan in seen) == [4, 12]  # weak 0.75, strong 0.25 of 16
    # Conditional branches give back y for any scale; a null-class branch (10) would not.
    np.testing.assert_allclose(out[:, 0, 0, 0], y)
    # And on the real model: changing the labels changes both branches.
    model = tiny()
    g = diffusion.guided_net(model, sparse(0.75, 0.75), keys=KEYS)(jnp.float32(1.0), 0)
    assert not np.allclose(g(x, t, y), g(x, t, (y + 1) % 10), atol=1e-3)


def test_interval_uses_the_strong_branch_outside():
    model = tiny()
    x, t, y = inputs()
    at = diffusion.guided_net(model, sparse(0.75, 0.25, interval=(0.5, 2.0)), keys=KEYS)
    np.testing.assert_allclose(at(jnp.float32(5.0), 3)(x, t, y), branch(model, 0.25, KEYS, 3, x, t, y),
                               rtol=1e-5, atol=1e-5)
    inside = diffusion.guided_net(model, sparse(0.75, 0.25), keys=KEYS)(jnp.float32(1.0), 3)(x, t, y)
    np.testing.assert_allclose(at(jnp.float32(1.0), 3)(x, t, y), inside, rtol=1e-5, atol=1e-5)


def test_samples_do_not_depend_on_the_batch():
    model = tiny()
    noise = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    labels = jnp.arange(4) % 10
    keys = jax.random.split(jax.random.key(3), 4)
    for objective in (EDM(num_steps=3), Flow(num_steps=2, sampler="heun")):
        run = lambda n, y, k: objective.sample(model, n, y, guidance=sparse(0.75, 0.25), keys=k)
        four = run(noise, labels, keys)
        two = run(noise[2:], labels[2:], keys[2:])
        np.testing.assert_allclose(four[2:], two, rtol=0, atol=1e-5)


def test_sampler_sparse_guidance_is_batch_independent(tmp_path):
    config = tl.tiny_config(str(tmp_path))
    builder = ModelBuilder(config, data.DatasetInfo("digits", (8, 8, 1), 10, 0, 0))
    leaves, treedef = jax.tree.flatten(builder.init_params())
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)
    shardings = sharding.state_shardings(jax.eval_shape(lambda: params), mesh, config.fsdp_min_size)
    sampler = Sampler(config, builder, mesh, shardings, num_steps=3, guidance_scale=2.0, guidance_method="sparse",
                      guidance_sparsity=(0.5, 0.0), name="sparse_test")
    labels = np.arange(4) % 10
    four = sampler.sample(params, labels, seed=5, batch_size=4)
    two = sampler.sample(params, labels, seed=5, batch_size=2)
    # Float32 sums of another batch size differ in the last bits (guidance amplifies them);
    # other token draws would move pixels by about 0.1.
    np.testing.assert_allclose(four, two, rtol=0, atol=1e-4)
    cfg = Sampler(config, builder, mesh, shardings, num_steps=3, guidance_scale=2.0, name="cfg_test")
    assert np.abs(cfg.sample(params, labels, seed=5) - four).max() > 1e-3


def test_path_drop_guidance_is_cond_against_null_class_with_the_middle_skipped():
    model = tiny(sprint_span=(1, 2))
    x, t, y = inputs()
    g = Guidance(scale=2.5, null_class=10, path_drop=True, token_grid=GRID)
    out = diffusion.guided_net(model, g)(jnp.float32(1.0), 0)(x, t, y)
    weak = model(x, t, jnp.full_like(y, 10), route_plan=routing.path_drop_plan(16))
    cond = model(x, t, y)
    np.testing.assert_allclose(out, weak + 2.5 * (cond - weak), rtol=1e-4, atol=1e-5)


def test_guidance_configuration_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="0 <= strong <= weak < 1"):
        sparse(0.25, 0.5)
    with pytest.raises(ValueError, match="cannot route the fraction 0.9"):
        Guidance(scale=2.0, sparsity=(0.9, 0.0), routes=(Route(1, 2, 0.75, group=2),), token_grid=GRID)
    with pytest.raises(ValueError, match="needs one key per sample"):
        diffusion.guided_net(tiny(), sparse(0.5, 0.0))
    with pytest.raises(ValueError, match="needs null_class"):
        Guidance(scale=2.0, path_drop=True, token_grid=GRID)
    config = tl.tiny_config(str(tmp_path))
    builder = ModelBuilder(config, data.DatasetInfo("digits", (8, 8, 1), 10, 0, 0))
    with pytest.raises(ValueError, match="needs a SPRINT model"):
        create_guidance(config, builder, "path_drop", 2.0, None, (0.5, 0.0))
    with pytest.raises(ValueError, match="unknown guidance method"):
        create_guidance(config, builder, "autoguidance", 2.0, None, (0.5, 0.0))
    config.routes = ()
    guidance = create_guidance(config, builder, "sparse", 2.0, None, (0.5, 0.0))
    assert guidance.routes == (routing.default_route(2),) and guidance.token_grid == (4, 4)


def test_sparse_guidance_on_a_sprint_model_routes_its_span():
    model = tiny(sprint_span=(1, 2))
    x, t, y = inputs()
    g = Guidance(scale=2.0, sparsity=(0.75, 0.0), routes=(Route(1, 2, 0.75, group=2, rejoin="sprint", path_drop=0.1),),
                 token_grid=GRID)
    assert g.routes_at(0.75)[0].path_drop == 0.0  # path drops are for training only
    out = diffusion.guided_net(model, g, keys=KEYS)(jnp.float32(1.0), 0)(x, t, y)
    eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(KEYS)
    weak_plan = routing.draw_plan_per_sample(eval_keys, g.routes_at(0.75), num_tokens=16)
    weak = model(x, t, y, route_plan=weak_plan)
    np.testing.assert_allclose(out, weak + 2.0 * (model(x, t, y) - weak), rtol=1e-4, atol=1e-5)
