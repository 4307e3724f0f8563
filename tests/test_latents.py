"""Latent ImageNet pipeline: prepare_latents end to end on real photos, the latent dataset, configs.

The photos are crops of scikit-image's sample images written as JPEG into a small image-folder
tree (3 classes, plus one corrupt file); the VAE is a random-weight diffusers AutoencoderKL of
the SD block structure with small widths, saved in diffusers format.
"""
import functools
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image
from skimage import data as skdata

from tread_jax import data, models, routing
from tread_jax import vae as vae_lib
from tread_jax.data import imagenet, latents, prepare_latents

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # 4x4x4 latents: enough for every code path, cheap on CPU
# wnid -> (sample photo, crop boxes (top, left, height, width)); varied sizes and aspect ratios.
TREE = {
    "n01000001": ("astronaut", [(0, 0, 200, 150), (100, 120, 90, 160), (256, 256, 64, 64)]),
    "n01000002": ("coffee", [(10, 20, 301, 457), (150, 300, 120, 80)]),
    "n01000003": ("chelsea", [(0, 0, 300, 451), (40, 100, 140, 140), (200, 10, 70, 100)]),
}
CORRUPT = "n01000002/zz_corrupt.JPEG"  # sorts last in its class: it lands in shard 1 of 3
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's BOX filter: output pixel i averages the input pixels whose centres lie in
    [i, i + 1) * n_in / n_out (whole pixels, equal weights)."""
    scale = n_in / n_out
    offset = (np.arange(n_in)[None, :] + 0.5) / scale - (np.arange(n_out)[:, None] + 0.5)
    inside = ((offset >= -0.5) & (offset < 0.5)).astype(np.float64)
    return inside / inside.sum(axis=1, keepdims=True)


def adm_reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's recipe, with the BOX halvings done as area averages in numpy."""
    array = np.asarray(image, np.float64)
    while min(array.shape[:2]) >= 2 * size:
        h, w = array.shape[0] // 2, array.shape[1] // 2
        # Width first, rounded half up to 8 bits in between, as in Pillow's two separable passes.
        array = np.floor(np.einsum("xw,hwc->hxc", _box_matrix(array.shape[1], w), array) + 0.5)
        array = np.floor(np.einsum("yh,hwc->ywc", _box_matrix(array.shape[0], h), array) + 0.5)
    small = Image.fromarray(array.astype(np.uint8))
    scale = size / min(small.size)
    small = small.resize((round(small.width * scale), round(small.height * scale)), Image.BICUBIC)
    out = np.asarray(small)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ImageNet-style tree; returns (root, [(path, label, PIL image as stored)] in sorted order)."""
    root = tmp_path_factory.mktemp("imagenet")
    expected = []
    for label, (wnid, (photo, boxes)) in enumerate(sorted(TREE.items())):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        pixels = getattr(skdata, photo)()
        for k, (top, left, h, w) in enumerate(boxes):
            path = folder / f"img_{k}.JPEG"
            Image.fromarray(pixels[top : top + h, left : left + w]).save(path, quality=90)
            with Image.open(path) as stored:  # what the tool will decode, JPEG loss included
                expected.append((str(path), label, stored.convert("RGB")))
    (root / "train" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, expected


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def prepared(tree, vae_dir, tmp_path_factory):
    """An interrupted CLI run (1 of 3 shards), then a resumed in-process run."""
    root, _ = tree
    out = tmp_path_factory.mktemp("tfds")
    args = [f"--data_dir={root}", f"--vae={vae_dir}", f"--resolution={RESOLUTION}", f"--output_dir={out}",
            "--batch_size=2", "--shard_size=3", "--num_workers=2"]
    first = subprocess.run(
        [sys.executable, "-m", "tread_jax.data.prepare_latents", *args, "--max_shards=1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    dataset_dir = out / latents.dataset_name(RESOLUTION) / latents.VERSION
    after_first = sorted(p.name for p in dataset_dir.iterdir())
    shard0 = prepare_latents.shard_path(dataset_dir, latents.dataset_name(RESOLUTION), 0, 3)
    stat0 = shard0.stat()
    summary = prepare_latents.prepare(
        source="folder", data_dir=str(root), vae=str(vae_dir), resolution=RESOLUTION, output_dir=str(out),
        batch_size=2, shard_size=3, num_workers=2,
    )
    return dict(out=out, dataset_dir=dataset_dir, first=first, after_first=after_first, shard0=shard0,
                stat0=stat0, summary=summary, args=args)


def test_interrupted_run_resumes_without_duplicates(prepared, tree, vae_dir):
    name = latents.dataset_name(RESOLUTION)
    # The first run stopped after one shard: one final shard, no TFDS metadata, a hint to rerun.
    assert [n for n in prepared["after_first"] if n.startswith(name)] == [prepared["shard0"].name]
    assert "dataset_info.json" not in prepared["after_first"]
    assert "run the same command again" in prepared["first"].stdout
    summary = prepared["summary"]
    assert (summary.num_shards, summary.shards_skipped, summary.shards_written) == (3, 1, 2)
    assert summary.complete
    # The finished shard was left alone, and nothing temporary remains.
    stat = prepared["shard0"].stat()
    assert (stat.st_ino, stat.st_mtime_ns) == (prepared["stat0"].st_ino, prepared["stat0"].st_mtime_ns)
    names = sorted(p.name for p in prepared["dataset_dir"].iterdir())
    assert not [n for n in names if n.startswith(".tmp")]
    assert [n for n in names if n.startswith(name)] == [f"{name}-train.array_record-{s:05d}-of-00003" for s in range(3)]
    # The corrupt file is reported, listed and skipped; every real image is encoded once.
    corrupt = str(tree[0] / "train" / CORRUPT)
    assert summary.failed == (corrupt,)
    assert summary.images_encoded == len(tree[1]) - 3  # the 3 images of shard 0 came from the first run
    assert (prepared["dataset_dir"] / "failed_images.txt").read_text() == corrupt + "\n"
    # A rerun of a complete dataset does nothing; changed settings are refused before any work.
    again = prepare_latents.prepare(source="folder", data_dir=str(tree[0]), vae=str(vae_dir), resolution=RESOLUTION,
                                    output_dir=str(prepared["out"]), batch_size=2, shard_size=3)
    assert (again.shards_written, again.shards_skipped, again.complete) == (0, 3, True)
    with pytest.raises(ValueError, match="flip"):
        prepare_latents.prepare(source="folder", data_dir=str(tree[0]), vae=str(vae_dir), resolution=RESOLUTION,
                                output_dir=str(prepared["out"]), batch_size=2, shard_size=3, flip=False)


def test_records_are_the_vae_moments_of_crops_and_mirrors(prepared, tree, vae_dir):
    _, expected = tree
    builder = tfds.builder_from_directory(os.fspath(prepared["dataset_dir"]))
    assert builder.info.splits["train"].shard_lengths == [6, 4, 6]  # (3, 2 + corrupt, 3) images x 2
    assert builder.info.features["label"].names == sorted(TREE)
    source = builder.as_data_source(split="train")
    records = [source[i] for i in range(len(source))]
    assert len(records) == 2 * len(expected)
    side = RESOLUTION // 8
    for r in records:
        for key in ("mean", "logvar"):
            assert r[key].dtype == np.float16 and r[key].shape == (side, side, 4)
    assert [int(r["label"]) for r in records] == [label for _, label, _ in expected for _ in range(2)]

    # Reference: the crop (checked against ADM's recipe below) of each stored JPEG and of its
    # mirror, encoded separately by the Flax VAE in float32.
    vae, _ = vae_lib.load_vae(vae_dir)
    graphdef, params = nnx.split(vae)
    crops = np.stack([imagenet.center_crop_arr(image, RESOLUTION) for _, _, image in expected])
    views = np.stack([crops, crops[:, :, ::-1]], axis=1).reshape(-1, RESOLUTION, RESOLUTION, 3)
    encode = jax.jit(functools.partial(vae_lib.encode_moments, graphdef))
    mean, logvar = encode(params, views.astype(np.float32) / 127.5 - 1.0)
    stored_mean = np.stack([r["mean"] for r in records]).astype(np.float32)
    stored_logvar = np.stack([r["logvar"] for r in records]).astype(np.float32)
    # Equal up to float16 storage (relative spacing 2^-11).
    np.testing.assert_allclose(stored_mean, mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(stored_logvar, logvar, rtol=1e-3, atol=1e-4)
    # Mirrors are real encodings, not copies: they differ from the originals.
    assert np.abs(stored_mean[1::2] - stored_mean[0::2]).max() > 1e-2

    # The data pipeline reads them: scaled mean and std, as the train step expects.
    config = data.default_config()
    config.name, config.data_dir, config.in_memory = latents.dataset_name(RESOLUTION), str(prepared["out"]), False
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        info = data.dataset_info(config)
        assert (info.image_shape, info.num_classes, info.num_train) == ((side, side, 4), 3, 16)
        batch = next(data.create_train_iterator(config, global_batch_size=16, seed=0, process_index=0, process_count=1))
    assert sorted(batch) == ["image", "image_std", "label"]
    # One epoch of 16 = every record once, shuffled: compare column-wise sorted values.
    np.testing.assert_allclose(np.sort(batch["image"].reshape(16, -1), axis=0), np.sort(latents.SCALE * stored_mean.reshape(16, -1), axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.sort(batch["image_std"].reshape(16, -1), axis=0),
                               np.sort(latents.SCALE * np.exp(0.5 * stored_logvar).reshape(16, -1), axis=0), rtol=1e-6)
    # Fresh noise per key around the mean, unchanged pixel batches.
    z1 = latents.sample_latents(batch, jax.random.key(1))
    z2 = latents.sample_latents(batch, jax.random.key(2))
    assert z1.shape == batch["image"].shape and not np.allclose(z1, z2)
    assert latents.sample_latents({"image": batch["image"]}, jax.random.key(1)) is batch["image"]
    # Samples (grids, evaluation) decode through the same VAE.
    decode, params = latents.vae_decoder(str(vae_dir))
    images = np.asarray(jax.jit(decode)(params, batch["image"][:2]))
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.abs(images).max() <= 1.0


def test_missing_latents_name_the_preparation_command(tmp_path):
    config = data.default_config()
    config.name, config.data_dir = "imagenet256_latents", str(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m tread_jax.data.prepare_latents .*--resolution=256"):
        data.dataset_info(config)


def test_adm_center_crop_matches_reference():
    photo = Image.fromarray(skdata.chelsea())  # 451 x 300: odd width, non-integer box ratio
    cases = [(photo, 64), (photo, 32), (Image.fromarray(skdata.astronaut()), 64),
             (photo.crop((0, 0, 97, 61)), 32), (photo.crop((0, 0, 32, 40)), 32)]
    for image, size in cases:
        ours = imagenet.center_crop_arr(image, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, adm_reference_crop(image, size))


def test_tfds_manual_tar_lists_the_same_images(tree, tmp_path):
    root, _ = tree
    folder_refs, folder_classes = imagenet.list_image_folder(root)
    # ILSVRC2012_img_train.tar: one uncompressed tar per class, as ImageNet distributes it.
    with tarfile.open(tmp_path / imagenet.TFDS_TRAIN_TAR, "w") as outer:
        for wnid in reversed(folder_classes):  # stored order must not matter
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for path in sorted((root / "train" / wnid).iterdir(), reverse=True):
                    inner.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)
    tar_refs, tar_classes = imagenet.list_imagenet_tar(tmp_path)
    assert tar_classes == folder_classes
    assert [r.label for r in tar_refs] == [r.label for r in folder_refs]
    assert [r.read_bytes() for r in tar_refs] == [r.read_bytes() for r in folder_refs]
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        imagenet.list_imagenet_tar(root)


def _load_config(name: str, variant: str | None):
    spec = importlib.util.spec_from_file_location(f"test_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant is not None else module.get_config()


# Parameter counts in the paper's table (docs/method.md), for 32x32x4 latents and 1000 classes.
PAPER_PARAMS = {"DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-L/2": 458e6, "DiT-XL/2": 675e6}


def test_paper_variants_build():
    counts = {}
    for name in PAPER_PARAMS:
        abstract = nnx.eval_shape(lambda name=name: models.create_model(
            name, input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0)))
        counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert abs(counts[name] / PAPER_PARAMS[name] - 1) < 0.01, (name, counts[name])
    expected_routes = {"S": (2, 8), "B": (2, 8), "L": (2, 20), "XL": (2, 24)}
    for model in ("dit_s2", "dit_b2", "dit_l2", "dit_xl2", "sit_b2", "sit_xl2"):
        for suffix in ("", "_tread", "_tread_ft"):
            config = _load_config("imagenet256", model + suffix)
            size = config.model.name.split("-")[1].split("/")[0]
            assert config.model.name in PAPER_PARAMS and dict(config.model.overrides) == {}
            assert config.diffusion.name == ("flow" if model.startswith("sit") else "edm")
            start, end = expected_routes[size]
            expected = (routing.Route(start, end, 0.5),) if suffix == "_tread" else ()
            assert routing.parse_routes(config.routes) == expected
            assert (config.global_batch_size, config.optim.learning_rate, config.ema_decay) == (256, 1e-4, 0.9999)
            assert config.model.compute_dtype == "bfloat16" and config.data.name == "imagenet256_latents"
            assert config.num_train_steps == (500_000 if suffix == "_tread_ft" else 400_000)
    default = _load_config("imagenet256", None)
    assert default.model.name == "DiT-XL/2"
    assert routing.parse_routes(default.routes) == (routing.Route(2, 24, 0.5),)
    # The Mamba-style backbone: the paper's 111M SSM, routed over 2..depth-4 of its 19 blocks.
    for suffix, routes in (("", ()), ("_tread", (routing.Route(2, 15, 0.5),))):
        config = _load_config("imagenet256", "ssm_b2" + suffix)
        assert (config.model.name, routing.parse_routes(config.routes), config.diffusion.name) == (
            "SSM-B/2", routes, "edm")
    abstract = nnx.eval_shape(lambda: models.create_model(
        "SSM-B/2", input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0)))
    assert abs(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) / 111e6 - 1) < 0.02
    big = _load_config("imagenet512", "sit_xl2_tread")
    assert (big.data.name, big.diffusion.name, big.routes) == ("imagenet512_latents", "flow", default.routes)
    with pytest.raises(ValueError, match="unknown ImageNet variant"):
        _load_config("imagenet256", "dit_xl2_ft")


def test_lightningdit_variants_take_lightningdits_released_schedule():
    """configs/lightningdit_xl_vavae_f16d32.yaml of hustvl/LightningDiT: 80K steps at batch 1024,
    AdamW 2e-4 with beta2 0.95; rectified flow with logit-normal(0, 1) timesteps."""
    for suffix, routes in (("", ()), ("_tread", (routing.Route(2, 24, 0.5),))):
        config = _load_config("imagenet256", "lightningdit_xl2" + suffix)
        assert (config.model.name, dict(config.model.overrides), config.diffusion.name) == ("LightningDiT-XL/2", {}, "flow")
        assert (config.diffusion.logit_mean, config.diffusion.logit_std) == (0.0, 1.0)
        assert routing.parse_routes(config.routes) == routes
        assert (config.num_train_steps, config.global_batch_size) == (80_000, 1024)
        optim = config.optim
        assert (optim.learning_rate, optim.b1, optim.b2, optim.weight_decay, optim.warmup_steps, optim.grad_clip) == (
            2e-4, 0.9, 0.95, 0.0, 0, 0.0)
        assert (config.ema_decay, config.label_dropout, config.data.name) == (0.9999, 0.1, "imagenet256_latents")
    abstract = nnx.eval_shape(lambda: models.create_model(
        "LightningDiT-XL/2", input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0)))
    assert abstract.blocks[0].q_norm is None  # the released config's use_qknorm: false
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 674_924_944
    assert _load_config("imagenet256", "dit_xl2").optim.b2 == 0.999  # the others keep the paper's


def test_train_step_draws_fresh_latents_around_the_stored_mean():
    from tread_jax import train_step

    config = _load_config("imagenet256", "dit_s2")
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(64, 4, 4, 4)).astype(np.float32)
    std = rng.uniform(0.1, 2.0, size=mean.shape).astype(np.float32)
    batch = {"image": jax.numpy.asarray(mean), "image_std": jax.numpy.asarray(std)}
    draw = jax.jit(lambda key: train_step.model_input(config, batch, key))
    x1, x2 = np.asarray(draw(jax.random.key(1))), np.asarray(draw(jax.random.key(2)))
    # (x - mean) / std is standard normal, and a new key draws new noise.
    z = (x1 - mean) / std
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    assert not np.allclose(x1, x2)
    config.data.sample_latents = False  # train on the stored mean
    np.testing.assert_array_equal(train_step.model_input(config, batch, jax.random.key(1)), mean)
    # Pixel batches have no std and pass through.
    assert train_step.model_input(_load_config("digits", None), {"image": batch["image"]}, jax.random.key(1)) is batch["image"]


def test_trainer_runs_on_prepared_latents(prepared, vae_dir, tmp_path):
    from tread_jax import train

    config = _load_config("imagenet256", "dit_s2_tread")
    config.model.overrides = dict(depth=4, hidden_size=32, num_heads=2)
    config.model.compute_dtype = "float32"
    config.routes = [dict(start=1, end=2, ratio=0.5)]
    config.data.name, config.data.data_dir = latents.dataset_name(RESOLUTION), str(prepared["out"])
    config.data.num_threads = 1
    config.global_batch_size, config.num_train_steps = 4, 3
    config.log_every, config.checkpoint_every = 1, 3
    # Grids of two chosen classes, decoded to pixels by the (tiny) VAE.
    config.data.vae = str(vae_dir)
    config.sample.update(every=3, per_class=2, num_steps=2, classes=[0, 2])
    config.eval.every = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, config.data.name, data.DatasetSpec(**latents.spec_kwargs(RESOLUTION)))
        result = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 3 and np.isfinite(result["loss"])
    samples = tmp_path / "work" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "step_0000003.png", "step_0000003_class0.png", "step_0000003_class2.png"]
    # A row per class of 2 decoded RGB samples: 2x2 tiles of 32 px with 1 px padding, upscaled x2.
    grid = Image.open(samples / "step_0000003.png")
    assert grid.mode == "RGB" and grid.size == (2 * (2 * (RESOLUTION + 1) + 1),) * 2
