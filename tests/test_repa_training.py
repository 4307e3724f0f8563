"""REPA in training: the backbone's hook, the projector in the model, the alignment term of the
train step, checked against a per-sample loop that gathers each image's kept tokens itself."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import test_latents
import trainer_testlib as tl
from tread_jax import data, diffusion, model_builder, models, routing, train_state
from tread_jax.data import latents
from tread_jax.diffusion import repa
from tread_jax.models import convert
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
    config.repa.update(enabled=True, encoder="dinov2-vits14", depth=depth, projector_width=16)
    config.optim.warmup_steps = 0
    return config


ENCODER_WEIGHTS = jax.random.normal(jax.random.key(7), (12, ENCODER_WIDTH))


def _encoder(weights: jax.Array, images: jax.Array) -> jax.Array:
    """A fixed map of clean images to features on the model's 4x4 token grid (any encoder will
    do here: what is tested is where its features are compared)."""
    patches = images.reshape(-1, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 16, 12)
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
    after, metrics = step(state, batch, ENCODER_WEIGHTS)  # eagerly, so the recorded inputs are concrete
    assert isinstance(metrics, RepaTrainMetrics) and set(metrics.compute()) >= {"loss", "alignment_loss"}

    (x_t, noise_labels, labels), = objective.seen
    route_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0), 3)[2]
    plan = routing.draw_plan(route_key, routes, batch_size=4, num_tokens=16)
    model = builder.bind(state.params)
    kept = plan.kept[0] if routed else None
    tokens = _reference_tokens(model, x_t, noise_labels, labels, depth, routes, kept)
    features = np.asarray(_encoder(ENCODER_WEIGHTS, jnp.asarray(batch[REPA_IMAGE_KEY], jnp.float32) / 127.5 - 1))
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
    with pytest.raises(ValueError, match=r"config.repa.depth must be a block of 1..4"):
        model_builder.ModelBuilder(_config(False, DEPTH + 1), INFO)
    config = _config(False, 2)
    builder = model_builder.ModelBuilder(config, INFO)
    with pytest.raises(ValueError, match="needs the REPA encoder"):
        make_train_step(config, builder, diffusion.create_objective(config.diffusion),
                        train_state.create_optimizer(config.optim), ())
    with pytest.raises(ValueError, match="neither one of"):
        repa.encoder_width("/nonexistent/encoder")


# ------------------------------------------------------------------------------------------------
# Stored images and the trainer end to end: a tiny latent dataset prepared with --store_images
# from JPEG crops of scikit-image photos, a random tiny SD VAE and a random tiny DINOv2 saved in
# the published file layout.

RESOLUTION = 64  # 8x8x4 latents: a 4x4 token grid at patch 2
PHOTOS = {"n01000001": ("astronaut", [(0, 0, 200, 150), (100, 120, 90, 160)]),
          "n01000002": ("coffee", [(10, 20, 301, 457), (150, 300, 120, 80)])}


def _tree(root, photos):
    from PIL import Image
    from skimage import data as skdata

    paths = []
    for wnid, (photo, boxes) in sorted(photos.items()):
        (root / "train" / wnid).mkdir(parents=True)
        pixels = getattr(skdata, photo)()
        for i, (top, left, h, w) in enumerate(boxes):
            path = root / "train" / wnid / f"img_{i}.JPEG"
            Image.fromarray(pixels[top:top + h, left:left + w]).save(path, quality=90)
            paths.append(path)
    return paths


vae_dir = test_latents.vae_dir  # the random tiny SD VAE fixture, saved in diffusers format


@pytest.fixture(scope="module")
def stored(tmp_path_factory, vae_dir):
    from tread_jax.data import prepare_latents

    root = tmp_path_factory.mktemp("imagenet")
    paths = _tree(root, PHOTOS)
    out = tmp_path_factory.mktemp("tfds")
    summary = prepare_latents.prepare(source="folder", data_dir=str(root), vae=str(vae_dir), resolution=RESOLUTION,
                                      output_dir=str(out), batch_size=2, shard_size=2, num_workers=2,
                                      store_images=True)
    assert summary.complete
    return dict(root=root, paths=paths, out=out, dataset_dir=summary.dataset_dir)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A random tiny DINOv2 (patch 14: a 4x4 grid at 56 px) saved as transformers saves one."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56, patch_size=14))
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


def _latent_config(out):
    config = data.default_config()
    config.name, config.data_dir, config.in_memory = latents.dataset_name(RESOLUTION), str(out), False
    return config


def test_prepared_records_store_the_crops_and_mirrors_losslessly(stored, vae_dir):
    import tensorflow_datasets as tfds
    from PIL import Image

    from tread_jax.data import imagenet, prepare_latents

    source = tfds.builder_from_directory(stored["dataset_dir"]).as_data_source(split="train")
    records = [source[i] for i in range(len(source))]
    crops = [imagenet.center_crop_arr(Image.open(p).convert("RGB"), RESOLUTION) for p in stored["paths"]]
    assert len(records) == 2 * len(crops)
    for i, crop in enumerate(crops):  # each image, then its mirror, as the latents are stored
        np.testing.assert_array_equal(latents.decode_images([records[2 * i][latents.IMAGE_FEATURE]])[0], crop)
        np.testing.assert_array_equal(latents.decode_images([records[2 * i + 1][latents.IMAGE_FEATURE]])[0],
                                      crop[:, ::-1])

    # The pipeline hands them out only when asked, each with its own record's latents.
    config = _latent_config(stored["out"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        plain = next(data.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0,
                                                process_count=1))
        batch = next(data.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0,
                                                process_count=1, repa_images=True))
    assert sorted(plain) == ["image", "image_std", "label"]
    assert batch[latents.IMAGE_FEATURE].dtype == np.uint8
    means = [latents.SCALE * r["mean"].astype(np.float32) for r in records]
    for row in range(8):
        match = [k for k, m in enumerate(means) if np.array_equal(m, batch["image"][row])]
        assert len(match) == 1
        want = latents.decode_images([records[match[0]][latents.IMAGE_FEATURE]])[0]
        np.testing.assert_array_equal(batch[latents.IMAGE_FEATURE][row], want)

    # Resuming with the other setting is refused before any work.
    with pytest.raises(ValueError, match="store_images"):
        prepare_latents.prepare(source="folder", data_dir=str(stored["root"]), vae=str(vae_dir),
                                resolution=RESOLUTION, output_dir=str(stored["out"]), batch_size=2, shard_size=2)


def test_latents_without_images_say_how_to_prepare_them(tmp_path, vae_dir):
    from tread_jax.data import prepare_latents

    root = tmp_path / "imagenet"
    _tree(root, {"n01000001": ("astronaut", [(0, 0, 200, 150)])})
    prepare_latents.prepare(source="folder", data_dir=str(root), vae=str(vae_dir), resolution=RESOLUTION,
                            output_dir=str(tmp_path / "tfds"), batch_size=2, shard_size=2)
    config = _latent_config(tmp_path / "tfds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        with pytest.raises(ValueError, match=r"has none: prepare the latents with: python -m "
                                             r"tread_jax.data.prepare_latents .* --store_images"):
            data.create_train_iterator(config, global_batch_size=2, seed=0, process_index=0, process_count=1,
                                       repa_images=True)


def _trainer_config(stored, dinov2_dir, routed: bool) -> ml_collections.ConfigDict:
    config = tl.load_config(tl.REPO / "configs" / "imagenet256.py", "dit_s2_tread")
    config.model.overrides = dict(depth=4, hidden_size=32, num_heads=2)
    config.model.compute_dtype = "float32"
    config.routes = [dict(start=1, end=2, ratio=0.5)] if routed else []
    config.repa.update(enabled=True, encoder=str(dinov2_dir), depth=2, projector_width=32, encoder_image_size=56,
                       encoder_dtype="float32")
    config.data.name, config.data.data_dir = latents.dataset_name(RESOLUTION), str(stored["out"])
    config.data.num_threads = 1
    config.global_batch_size, config.num_train_steps = 8, 40
    config.optim.learning_rate = 1e-3
    config.log_every, config.checkpoint_every = 5, 40
    config.sample.every, config.eval.every, config.eval.report = 0, 0, ""
    return config


@pytest.mark.parametrize("routed", [False, True])
def test_trainer_trains_with_repa_and_the_alignment_loss_falls(stored, dinov2_dir, tmp_path, routed):
    from tread_jax import train

    config = _trainer_config(stored, dinov2_dir, routed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.data.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        result = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 40
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    alignment = [r["alignment_loss"] for r in records]
    assert len(alignment) == 8 and all(np.isfinite(alignment)) and all(np.isfinite(r["loss"]) for r in records)
    # -coef * cosine: near 0 for a fresh projector, towards -coef as the tokens align.
    assert -0.5 <= min(alignment) and alignment[-1] < alignment[0] - 0.1, alignment


def test_check_compiles_the_repa_step(stored, dinov2_dir, tmp_path):
    from tread_jax import run_check

    config = _trainer_config(stored, dinov2_dir, routed=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.data.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        text = run_check.describe_run(config, str(tmp_path / "run"))
        config.repa.encoder = str(tmp_path / "nowhere")
        with pytest.raises(ValueError, match="neither one of"):  # a missing encoder, before compiling
            run_check.describe_run(config, str(tmp_path / "run"))
    assert "train step memory" in text and "repa" in text and "REPA FLOPs per step" in text


@pytest.mark.parametrize("variant, depth, route_end", [
    ("sit_xl2_tread_repa", 8, 24), ("dit_xl2_tread_repa", 8, 24), ("sit_b2_tread_repa", 4, 8)])
def test_imagenet_repa_variants(variant, depth, route_end):
    config = tl.load_config(tl.REPO / "configs" / "imagenet256.py", variant)
    assert config.repa.enabled and config.repa.depth == depth and config.repa.coef == 0.5
    assert config.repa.encoder == "dinov2-vitb14" and config.repa.encoder_image_size == 224
    # The aligned block lies inside the TREAD route: only kept tokens align.
    (route,) = config.routes
    assert route["start"] <= depth - 1 <= route["end"] == route_end
    assert not tl.load_config(tl.REPO / "configs" / "imagenet256.py", "sit_xl2_tread").repa.enabled
    builder = model_builder.ModelBuilder(config, data.DatasetInfo("imagenet256_latents", (32, 32, 4), 1000, 1, 0))
    hidden = builder.abstract_model.hidden_size
    shapes = [layer["kernel"].shape for layer in builder.abstract_params()["repa_projector"]["layers"].values()]
    assert shapes == [(hidden, 2048), (2048, 2048), (2048, 768)]  # REPA's build_mlp to DINOv2-B's width


def test_init_from_a_diffusers_dit_starts_a_fresh_projector(stored, dinov2_dir, tmp_path):
    """A hub DiT has no projector: training from it imports the backbone and initialises the
    projector as a run from scratch would, then trains both."""
    from test_dit import _diffusers_dit
    from test_pretrained import _flat

    from tread_jax import train

    config = _trainer_config(stored, dinov2_dir, routed=True)
    config.diffusion = diffusion.default_config("ddpm")  # the hub DiTs' learned variance
    config.num_train_steps, config.checkpoint_every, config.log_every = 1, 1, 1
    config.init_from = str(tmp_path / "dit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.data.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        info = data.dataset_info(config.data)
        torch_model = _diffusers_dit(2, 16, 4, 8, 2, 4, info.num_classes)  # DiT-S/2 at depth 4, width 32
        torch_model.save_pretrained(tmp_path / "dit" / "transformer")
        result = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 1
    (record,) = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(record["alignment_loss"]) and np.isfinite(record["loss"])
    params = _flat(tl.load_state(str(tmp_path / "work"), 1)["params"])
    imported = _flat(nnx.to_pure_dict(nnx.state(convert.dit_from_diffusers(torch_model), nnx.Param)))
    fresh = _flat({"repa_projector": model_builder.ModelBuilder(config, info).init_projector_params()})
    assert params.keys() == imported.keys() | fresh.keys()
    # One AdamW step moves each parameter by at most the learning rate (1e-3) from where it started.
    for start in (imported, fresh):
        moved = max(float(np.abs(params[k] - np.asarray(v)).max()) for k, v in start.items())
        assert 1e-4 < moved <= 1.01e-3


@pytest.mark.parametrize("routed, variants", [
    (False, [(True, "full")]), (True, [(True, "none"), (False, "dots"), (True, "full")])])
def test_repa_gradients_through_scan_and_remat_equal_the_plain_path(routed, variants):
    """The hook splits a stretch at the aligned block: scanned and rematerialised halves must give
    the plain path's alignment loss and gradients."""
    routes = (routing.Route(0, DEPTH - 1, 0.5),) if routed else ()
    plan = routing.draw_plan(jax.random.key(3), routes, batch_size=3, num_tokens=16) if routed else None
    x, noise_labels, class_labels = _inputs()
    features = _encoder(ENCODER_WEIGHTS, jax.random.uniform(jax.random.key(4), (3, SIZE, SIZE, 3), minval=-1))

    def gradients(scan: bool, policy: str):
        config = _config(routed=False, depth=2)  # block 2 of 4: both halves of the stretch have 2 blocks
        config.model.update(compute_dtype="float32", scan_blocks=scan, remat=policy)
        builder = model_builder.ModelBuilder(config, INFO)

        def loss(params):
            network = builder.bind(params)
            _, tokens = network(x, noise_labels, class_labels, route_plan=plan, repa_depth=2)
            return repa.alignment_loss(network.repa_projector(tokens), features, repa.aligned_positions(plan, 2))

        return jax.jit(jax.value_and_grad(loss))(_randomised(builder.init_params()))

    want_loss, want = gradients(False, "none")
    # The alignment term reaches the blocks before the hook, not those after it.
    assert np.abs(want["blocks"][1]["fc1"]["kernel"]).max() > 0 and not np.any(want["blocks"][2]["fc1"]["kernel"])
    for scan, policy in variants:  # (scan_blocks, remat)
        got_loss, got = gradients(scan, policy)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                                       err_msg=f"scan_blocks={scan}, remat={policy}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("routed", [False, True])
def test_ssm_trains_a_step_with_repa(routed):
    config = _config(routed, depth=1)
    config.model.name = "SSM-S/2"
    config.model.overrides = dict(depth=2, hidden_size=32)
    config.routes = [dict(start=0, end=1, ratio=0.5)] if routed else []  # block 1 aligns its kept tokens
    builder = model_builder.ModelBuilder(config, INFO)
    tx = train_state.create_optimizer(config.optim)
    state = train_state.init_train_state(builder.init_params(), tx)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((4, SIZE, SIZE, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 4)),
             REPA_IMAGE_KEY: jnp.asarray(rng.integers(0, 256, (4, SIZE, SIZE, 3)), jnp.uint8)}
    step = jax.jit(make_train_step(config, builder, diffusion.create_objective(config.diffusion), tx,
                                   routing.parse_routes(config.routes), encoder=_encoder))
    after, metrics = step(state, batch, ENCODER_WEIGHTS)
    values = metrics.compute()
    assert np.isfinite(values["loss"]) and -0.5 <= values["alignment_loss"] <= 0.5
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params["repa_projector"],
                         after.params["repa_projector"])
    assert all(jax.tree.leaves(moved))
