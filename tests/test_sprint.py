"""SPRINT (Park et al., arXiv 2510.21986) as a route: a DiT whose span rejoins by mask token + fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testlib import randomize
from tread_jax import routing
from tread_jax.models import create_model
from tread_jax.models.layers import sincos_pos_embed_2d, unpatchify
from tread_jax.routing import Route

DEPTH, HIDDEN, SPAN = 6, 32, (2, 3)
ROUTE = Route(*SPAN, 0.75, group=2, rejoin="sprint")


def tiny(sprint_span=SPAN, name="DiT-S/2", **kwargs):
    size = dict(num_heads=2) if name.startswith("DiT") else dict(d_state=4)
    return create_model(name, input_size=8, in_channels=1, num_classes=10, depth=DEPTH, hidden_size=HIDDEN,
                        sprint_span=sprint_span, rngs=nnx.Rngs(0), **size, **kwargs)


def inputs(batch=3):
    x = jax.random.normal(jax.random.key(5), (batch, 8, 8, 1))
    return x, jnp.linspace(-1.0, 1.0, batch), jnp.arange(batch) % 11


def reference(model, x, t, y, kept=None, dropped=None, skip=False):
    """SPRINT's forward written out one sample at a time, after the published ``SiT.forward``."""
    outs = []
    for b in range(x.shape[0]):
        tokens = model.patch_embed(x[b:b + 1]) + sincos_pos_embed_2d(HIDDEN, 4, 4)
        c = model.t_embedder(t[b:b + 1]) + model.y_embedder(y[b:b + 1])
        for i in range(SPAN[0]):
            tokens = model.blocks[i](tokens, c)
        shallow = tokens
        idx = np.arange(16) if kept is None else np.asarray(kept[b])
        h = tokens[:, idx]
        for i in range(SPAN[0], SPAN[1] + 1):
            h = model.blocks[i](h, c)
        mask = model.sprint_mask_token[...]
        middle = jnp.tile(mask, (1, 16, 1))
        if not skip and not (dropped is not None and dropped[b]):
            middle = middle.at[:, idx].set(h)
        tokens = model.sprint_fusion(jnp.concatenate([middle, shallow], axis=-1))
        for i in range(SPAN[1] + 1, DEPTH):
            tokens = model.blocks[i](tokens, c)
        outs.append(unpatchify(model.final_layer(tokens, c), 2, 8, 8))
    return jnp.concatenate(outs)


def test_sprint_forward_matches_a_per_sample_loop():
    model = randomize(tiny())
    x, t, y = inputs()
    plan = routing.draw_plan(jax.random.key(0), (ROUTE,), batch_size=3, num_tokens=16)
    np.testing.assert_allclose(model(x, t, y, route_plan=plan), reference(model, x, t, y, plan.kept[0]),
                               rtol=1e-5, atol=1e-5)
    # Path drops in training: a dropped sample's middle is all mask tokens.
    dropping = Route(*SPAN, 0.75, group=2, rejoin="sprint", path_drop=0.5)
    plans = (routing.draw_plan(jax.random.key(k), (dropping,), batch_size=3, num_tokens=16) for k in range(20))
    plan = next(p for p in plans if 0 < np.asarray(p.dropped[0]).sum() < 3)  # some samples dropped, not all
    dropped = np.asarray(plan.dropped[0])
    np.testing.assert_allclose(model(x, t, y, route_plan=plan), reference(model, x, t, y, plan.kept[0], dropped),
                               rtol=1e-5, atol=1e-5)


def test_mask_ratio_zero_runs_every_token_through_the_middle():
    # The fine-tune stage: ratio 0 routes nothing; the span sees all tokens and is still fused.
    model = randomize(tiny())
    x, t, y = inputs()
    dense = model(x, t, y)
    np.testing.assert_allclose(dense, reference(model, x, t, y), rtol=1e-5, atol=1e-5)
    finetune = routing.draw_plan(jax.random.key(0), (Route(*SPAN, 0.0, rejoin="sprint"),), batch_size=3,
                                 num_tokens=16)
    assert finetune.routes == ()
    np.testing.assert_array_equal(model(x, t, y, route_plan=finetune), dense)
    with_drops = routing.draw_plan(jax.random.key(0), (Route(*SPAN, 0.0, rejoin="sprint", path_drop=0.1),),
                                   batch_size=3, num_tokens=16)
    assert with_drops.kept[0].shape == (3, 16)
    assert np.all(np.isfinite(model(x, t, y, route_plan=with_drops)))


def test_path_drop_guidance_branch_skips_the_middle():
    model = randomize(tiny())
    x, t, y = inputs()
    skip = routing.path_drop_plan(16)
    weak = model(x, t, y, route_plan=skip)
    np.testing.assert_allclose(weak, reference(model, x, t, y, skip=True), rtol=1e-5, atol=1e-5)
    for i in range(SPAN[0], SPAN[1] + 1):  # the middle blocks do not matter to it
        model.blocks[i].fc2.kernel[...] = model.blocks[i].fc2.kernel[...] * 3.0
    np.testing.assert_array_equal(model(x, t, y, route_plan=skip), weak)
    jaxpr = str(jax.make_jaxpr(lambda: model(x, t, y, route_plan=skip))())
    dense_jaxpr = str(jax.make_jaxpr(lambda: model(x, t, y))())
    blocks_skipped = SPAN[1] - SPAN[0] + 1
    assert dense_jaxpr.count("dot_general") - jaxpr.count("dot_general") == blocks_skipped * 7  # 5 linears + 2 in attention


def test_fusion_parameters_are_the_only_ones_added_and_get_gradients():
    def count(model):
        return {jax.tree_util.keystr(p): v.size for p, v in
                jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}

    plain, sprint = count(tiny(sprint_span=None)), count(tiny())
    added = {k: v for k, v in sprint.items() if k not in plain}
    assert set(plain) <= set(sprint)
    assert added == {"['sprint_fusion']['kernel']": 2 * HIDDEN * HIDDEN, "['sprint_fusion']['bias']": HIDDEN,
                     "['sprint_mask_token']": HIDDEN}
    assert sum(sprint.values()) - sum(plain.values()) == 2 * HIDDEN * HIDDEN + 2 * HIDDEN

    model = randomize(tiny())
    x, t, y = inputs()
    graphdef, params = nnx.split(model, nnx.Param)
    plan = routing.draw_plan(jax.random.key(0), (ROUTE,), batch_size=3, num_tokens=16)
    grads = jax.grad(lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, y, route_plan=plan) - x)))(params)
    for leaf in (grads["sprint_fusion"]["kernel"], grads["sprint_fusion"]["bias"], grads["sprint_mask_token"]):
        assert np.all(np.isfinite(leaf[...])) and np.any(leaf[...] != 0)


def test_plans_that_do_not_fit_the_sprint_span_are_errors():
    model, plain = tiny(), tiny(sprint_span=None)
    x, t, y = inputs()
    draw = lambda routes: routing.draw_plan(jax.random.key(0), routes, batch_size=3, num_tokens=16)
    with pytest.raises(ValueError, match="SPRINT span is \\(2, 3\\)"):
        model(x, t, y, route_plan=draw((Route(1, 3, 0.75, rejoin="sprint"),)))
    with pytest.raises(ValueError, match="overlaps the model's SPRINT span"):
        model(x, t, y, route_plan=draw((Route(3, 4, 0.5),)))
    with pytest.raises(ValueError, match="needs a model with a SPRINT span"):
        plain(x, t, y, route_plan=routing.path_drop_plan(16))
    with pytest.raises(ValueError, match="SPRINT span is None"):
        plain(x, t, y, route_plan=draw((ROUTE,)))


def test_tread_route_and_sprint_span_in_one_model():
    model = randomize(tiny())
    x, t, y = inputs()
    plan = routing.draw_plan(jax.random.key(0), (Route(0, 1, 0.5), ROUTE), batch_size=3, num_tokens=16)
    out = model(x, t, y, route_plan=plan)
    assert np.all(np.isfinite(out)) and not np.allclose(out, model(x, t, y))


def test_sprint_span_on_the_ssm_backbone():
    model = randomize(tiny(name="SSM-S/2"))
    x, t, y = inputs()
    plan = routing.draw_plan(jax.random.key(0), (ROUTE,), batch_size=3, num_tokens=16, keep_order=True)
    assert np.all(np.diff(np.asarray(plan.kept[0]), axis=1) > 0)
    out = model(x, t, y, route_plan=plan)
    assert out.shape == x.shape and np.all(np.isfinite(out))


def test_analytic_flops_count_the_fusion_and_the_skipped_span():
    from tread_jax.models.flops import dit_forward_macs

    model, plain = tiny(), tiny(sprint_span=None)
    x, t, y = inputs(batch=1)

    def xla_macs(m, plan=None):
        graphdef, params = nnx.split(m, nnx.Param)
        run = lambda p: nnx.merge(graphdef, p)(x, t, y, route_plan=plan)
        return jax.jit(run).lower(params).cost_analysis()["flops"] / 2

    # The fusion adds N x 2D x D MACs (XLA also counts its bias: N x D adds).
    fusion = 16 * 2 * HIDDEN * HIDDEN
    assert dit_forward_macs(model, 8, 8) - dit_forward_macs(plain, 8, 8) == fusion
    assert xla_macs(model) - xla_macs(plain) == pytest.approx(fusion, rel=0.02)
    # Skipping the span removes its blocks' matmuls (XLA also drops their elementwise work).
    skipped = dit_forward_macs(model, 8, 8) - dit_forward_macs(model, 8, 8, skip_fused=True)
    assert skipped > 0
    assert xla_macs(model) - xla_macs(model, routing.path_drop_plan(16)) == pytest.approx(skipped, rel=0.1)
    with pytest.raises(ValueError, match="needs a model with a SPRINT span"):
        dit_forward_macs(plain, 8, 8, skip_fused=True)


def test_sprint_run_through_the_trainer_with_path_drop_grids(tmp_path):
    """The normal trainer: a SPRINT route (structured, path drops) trains, saves, and draws its
    grids with path-drop guidance; the fusion parameters move."""
    import trainer_testlib as tl
    from tread_jax import train

    config = tl.tiny_config(str(tmp_path / "tfds"), **{
        "routes": [dict(start=0, end=0, ratio=0.75, group=2, rejoin="sprint", path_drop=0.5)],
        "sample.every": 8, "sample.per_class": 1, "sample.num_steps": 2, "sample.guidance": 2.0,
        "sample.guidance_method": "path_drop"})
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    losses = tl.logged(str(workdir))
    assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(list(losses.values())))
    first, last = tl.load_state(str(workdir), 4), tl.load_state(str(workdir), 8)
    fusion = lambda s: np.asarray(s["params"]["sprint_fusion"]["kernel"])
    assert fusion(first).shape == (64, 32) and not np.allclose(fusion(first), fusion(last))
    assert (workdir / "samples" / "step_0000008.png").exists()
