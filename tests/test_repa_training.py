"""REPA in training: the backbone's hook, the projector in the model, the alignment term of the
train step, checked against a per-sample loop that gathers each image's kept tokens itself."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import trainer_testlib as tl
from tread_jax import data, diffusion, model_builder, models, routing, train_state
from tread_jax.diffusion import repa
from tread_jax.models.layers import sincos_pos_embed_2d
from tread_jax.train_step import REPA_IMAGE_KEY, RepaTrainMetrics, make_train_step

SIZE, PATCH, DEPTH = 8, 2, 4  # 16 tokens on a 4x4 grid
ENCODER_WIDTH = 384  # dinov2-vits14's, the encoder named in the config
INFO = data.DatasetInfo("tiny", (SIZE, SIZE, 1), 10, 32, 0)


def _randomised(params):
    """Parameters made non-zero: adaLN-Zero initialises every block to the identity, under
    which the tokens after any block are the same."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.1 * jax.random.normal(k, a.shape, a.dtype)
                                        for a, k in zip(leaves, keys)])


def _tiny_dit(sprint_span=None) -> nnx.Module:
    model = models.create_model("DiT-S/2", input_size=SIZE, in_channels=1, num_classes=10, depth=DEPTH,
                                hidden_size=32, num_heads=2, sprint_span=sprint_span, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, _randomised(params))


def _inputs(batch: int = 3):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, SIZE, SIZE, 1)), jnp.float32),
            jnp.asarray(rng.standard_normal(batch), jnp.float32), jnp.asarray(rng.integers(0, 10, batch)))


def _reference_tokens(model, x, noise_labels, class_labels, depth, routes, kept):
    """Tokens after block ``depth`` (1-based), one image at a time: blocks outside the route see
    every token, blocks inside it only the image's own kept tokens, gathered here by indexing."""
    grid = (SIZE // PATCH, SIZE // PATCH)
    out = []
    for b in range(x.shape[0]):
        tokens = model.patch_embed(x[b:b + 1]) + sincos_pos_embed_2d(model.hidden_size, *grid)
        c = model.t_embedder(noise_labels[b:b + 1]) + model.y_embedder(class_labels[b:b + 1])
        route = routes[0] if routes else None
        for i in range(depth):
            inside = route is not None and route.start <= i <= route.end
            if inside and i == route.start:
                tokens = tokens[:, np.asarray(kept[b])]
            tokens = model.blocks[i](tokens, c, *model.block_args(i, None, grid))
            if inside and i == route.end and i < depth - 1:
                raise AssertionError("the reference covers depths that end inside or before the route")
        out.append(tokens[0])
    return np.stack(out)


@pytest.mark.parametrize("routed", [False, True])
def test_hook_returns_the_block_tokens_and_leaves_the_output_alone(routed):
    model = _tiny_dit()
    x, noise_labels, class_labels = _inputs()
    routes = (routing.Route(1, 2, 0.5),) if routed else ()
    plan = routing.draw_plan(jax.random.key(3), routes, batch_size=3, num_tokens=16) if routed else None
    plain = model(x, noise_labels, class_labels, route_plan=plan)
    for depth in range(1, DEPTH + 1):
        out, tokens = model(x, noise_labels, class_labels, route_plan=plan, repa_depth=depth)
        np.testing.assert_array_equal(out, plain)  # the split stretch computes the same
        positions = repa.aligned_positions(plan, depth)
        if routed and depth in (2, 3):  # blocks 1..2 (0-based): the kept half, at their positions
            np.testing.assert_array_equal(positions, plan.kept[0])
            assert tokens.shape == (3, 8, 32)
            want = _reference_tokens(model, x, noise_labels, class_labels, depth, routes, plan.kept[0])
            np.testing.assert_allclose(tokens, want, rtol=2e-5, atol=2e-5)
        else:  # outside the route every token, in order
            assert positions is None and tokens.shape == (3, 16, 32)
            if depth <= 1 or not routed:
                want = _reference_tokens(model, x, noise_labels, class_labels, depth, (), None)
                np.testing.assert_allclose(tokens, want, rtol=2e-5, atol=2e-5)


def test_hook_in_a_skipped_sprint_span_and_bad_depths_fail():
    model = _tiny_dit(sprint_span=(1, 2))
    x, noise_labels, class_labels = _inputs()
    plain = model(x, noise_labels, class_labels)
    np.testing.assert_array_equal(model(x, noise_labels, class_labels, repa_depth=2)[0], plain)
    with pytest.raises(ValueError, match="lies in the SPRINT span"):
        model(x, noise_labels, class_labels, route_plan=routing.path_drop_plan(16), repa_depth=2)
    with pytest.raises(ValueError, match=r"repa_depth must be a block of 1..4"):
        model(x, noise_labels, class_labels, repa_depth=0)


def _config(routed: bool, depth: int) -> ml_collections.ConfigDict:
    config = tl.tiny_config("", **{"model.overrides": dict(depth=DEPTH, hidden_size=32, num_heads=2)})
    config.routes = [dict(start=1, end=2, ratio=0.5)] if routed else []
    config.repa = dict(enabled=True, encoder="dinov2-vits14", depth=depth, coef=0.5, projector_width=16,
                       encoder_image_size=224)
    config.optim.warmup_steps = 0
    return config


def _encoder(images: jax.Array) -> jax.Array:
    """A fixed map of clean images to features on the model's 4x4 token grid (any encoder will
    do here: what is tested is where its features are compared)."""
    patches = images.reshape(-1, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 16, 12)
    weights = jax.random.normal(jax.random.key(7), (12, ENCODER_WIDTH))
    return jnp.tanh(patches @ weights)


class _Recording:
    """An objective that records what its loss feeds the network (the noisy input)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def output_channels(self, channels):
        return self.inner.output_channels(channels)

    def loss(self, net, x, class_labels, key):
        def recording(x_t, noise_labels, labels):
            self.seen.append((x_t, noise_labels, labels))
            return net(x_t, noise_labels, labels)
        return self.inner.loss(recording, x, class_labels, key)


@pytest.mark.parametrize("routed, depth", [(False, 2), (True, 2), (True, 3)])
def test_train_step_aligns_the_kept_tokens_at_their_positions(routed, depth):
    config = _config(routed, depth)
    builder = model_builder.ModelBuilder(config, INFO)
    tx = train_state.create_optimizer(config.optim)
    state = train_state.init_train_state(_randomised(builder.init_params()), tx)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((4, SIZE, SIZE, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 4)),
             REPA_IMAGE_KEY: jnp.asarray(rng.integers(0, 256, (4, SIZE, SIZE, 3)), jnp.uint8)}
    config.data.sample_latents = False
    objective = _Recording(diffusion.create_objective(config.diffusion))
    routes = routing.parse_routes(config.routes)
    step = make_train_step(config, builder, objective, tx, routes, encoder=_encoder)
    after, metrics = step(state, batch)  # eagerly, so the recorded inputs are concrete
    assert isinstance(metrics, RepaTrainMetrics)

    (x_t, noise_labels, labels), = objective.seen
    route_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0), 3)[2]
    plan = routing.draw_plan(route_key, routes, batch_size=4, num_tokens=16)
    model = builder.bind(state.params)
    kept = plan.kept[0] if routed else None
    tokens = _reference_tokens(model, x_t, noise_labels, labels, depth, routes, kept)
    features = np.asarray(_encoder(jnp.asarray(batch[REPA_IMAGE_KEY], jnp.float32) / 127.5 - 1))
    projected = np.asarray(model.repa_projector(jnp.asarray(tokens)))
    cosines = []
    for b in range(4):
        for j in range(projected.shape[1]):
            target = features[b, int(kept[b, j]) if routed else j]
            p = projected[b, j]
            cosines.append(p @ target / np.linalg.norm(p) / np.linalg.norm(target))
    assert projected.shape[1] == (8 if routed else 16)
    np.testing.assert_allclose(metrics.compute()["alignment_loss"], -0.5 * np.mean(cosines), rtol=1e-5)

    # The projector is part of the trained parameters and the alignment term reaches it
    # (weight decay is 0: only a gradient moves a parameter).
    assert config.optim.weight_decay == 0
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params["repa_projector"],
                         after.params["repa_projector"])
    assert all(jax.tree.leaves(moved))


def test_repa_config_errors():
    config = _config(False, DEPTH + 1)
    builder = model_builder.ModelBuilder(config, INFO)
    tx = train_state.create_optimizer(config.optim)
    objective = diffusion.create_objective(config.diffusion)
    with pytest.raises(ValueError, match=r"config.repa.depth must be a block of 1..4"):
        make_train_step(config, builder, objective, tx, (), encoder=_encoder)
    with pytest.raises(ValueError, match="needs the REPA encoder"):
        make_train_step(_config(False, 2), builder, objective, tx, ())
    with pytest.raises(ValueError, match="neither one of"):
        repa.encoder_width("/nonexistent/encoder")
