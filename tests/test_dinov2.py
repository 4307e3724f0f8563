"""DINOv2 port vs Hugging Face transformers' Dinov2Model / Dinov2WithRegistersModel, CPU float32.

The torch models get random weights (every parameter, so a swapped or mis-laid tensor shows),
are saved with ``save_pretrained`` (the published file layout) and read back by the port.
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import load_file

from tread_jax import cache as cache_lib
from tread_jax.models import dinov2 as dinov2_lib
from tread_jax.models import flops

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=518, patch_size=14)


def _max_rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0) * 0.5)


def _torch_model(tmp_path, registers: int, seed: int = 0, **overrides) -> tuple[torch.nn.Module, str]:
    kwargs = {**TINY, **overrides}
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    model.eval()
    _randomise(model, seed)
    folder = tmp_path / f"dinov2-r{registers}-{seed}"
    model.save_pretrained(folder)
    return model, str(folder)


def _images(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _reference_patch_tokens(model: torch.nn.Module, images: np.ndarray, registers: int) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).last_hidden_state
    return out[:, 1 + registers:].numpy()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [224, 518])
def test_patch_features_match_transformers(tmp_path, registers, size):
    """224: positions interpolated from the 37x37 table (transformers' run-time resize: plain
    bicubic without registers, antialiased with them); 518: the native grid."""
    model, folder = _torch_model(tmp_path, registers)
    ours, config = dinov2_lib.load_dinov2(folder, image_size=size)
    assert config.num_register_tokens == registers
    images = _images(size)
    want = _reference_patch_tokens(model, images, registers)
    got = ours(jnp.asarray(images))
    assert got.shape == want.shape == (2, (size // 14) ** 2, TINY["hidden_size"])
    err = _max_rel(got, want)
    print(f"registers={registers} size={size}: max relative error {err:.2e}")
    assert err <= 1e-5


def test_repa_position_resize_is_the_antialiased_one(tmp_path):
    """REPA resizes the table once with timm's resample_abs_pos_embed (bicubic, antialiased) and
    runs at that grid: the reference is transformers' model holding that resized table."""
    model, folder = _torch_model(tmp_path, 0, seed=3)
    with torch.no_grad():
        table = model.embeddings.position_embeddings
        patches = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True)
        resized = torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    model.embeddings.position_embeddings = torch.nn.Parameter(resized)
    images = _images(224, seed=4)
    want = _reference_patch_tokens(model, images, 0)
    repa, _ = dinov2_lib.load_dinov2(folder, image_size=224, antialias=True)
    assert _max_rel(repa(jnp.asarray(images)), want) <= 1e-5
    plain, _ = dinov2_lib.load_dinov2(folder, image_size=224, antialias=False)
    assert _max_rel(plain(jnp.asarray(images)), want) > 1e-3  # the choice matters


def test_real_size_vits14_shapes_and_values(tmp_path):
    """The published ViT-S/14 shape (384 wide, 12 blocks, 6 heads) at 224."""
    model, folder = _torch_model(tmp_path, 0, seed=5, hidden_size=384, num_hidden_layers=12,
                                 num_attention_heads=6)
    ours, config = dinov2_lib.load_dinov2(folder, image_size=224)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    images = _images(224, batch=1, seed=6)
    got = ours(jnp.asarray(images))
    assert got.shape == (1, 256, 384)
    err = _max_rel(got, _reference_patch_tokens(model, images, 0))
    print(f"ViT-S/14 at 224: max relative error {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("sizes", [(37, 16), (16, 37), (4, 7), (7, 4), (37, 32), (256, 224), (5, 1)])
def test_bicubic_matrix_is_torch_interpolate(antialias, sizes):
    n_in, n_out = sizes
    x = np.random.default_rng(n_in * n_out).standard_normal((1, 3, n_in, n_in)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(n_out, n_out), mode="bicubic",
                         align_corners=False, antialias=antialias).numpy()
    w = dinov2_lib.bicubic_resize_matrix(n_in, n_out, antialias=antialias)
    assert _max_rel(w @ x @ w.T, want) <= 2e-6


def test_bicubic_matrix_with_a_scale_factor():
    # The DINOv2 hub code's offset: scale_factor (16 + 0.1) / 37, output floor(37 * that) = 16.
    x = np.random.default_rng(0).standard_normal((1, 2, 37, 37)).astype(np.float32)
    factor = 16.1 / 37
    want = F.interpolate(torch.from_numpy(x), scale_factor=(factor, factor), mode="bicubic",
                         align_corners=False).numpy()
    w = dinov2_lib.bicubic_resize_matrix(37, 16, scale_factor=factor)
    assert _max_rel(w @ x @ w.T, want) <= 2e-6


def test_repa_image_preprocessing_matches_torch():
    """REPA: x/255, ImageNet normalisation, then bicubic 256 -> 224 (no antialiasing)."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3)).astype(np.float32)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(dinov2_lib.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(dinov2_lib.IMAGENET_STD)[:, None, None]
    want = F.interpolate((x - mean) / std, 224, mode="bicubic").permute(0, 2, 3, 1).numpy()
    images = jnp.asarray(pixels / 127.5 - 1.0)  # this package's [-1, 1] convention
    got = dinov2_lib.resize_bicubic(dinov2_lib.normalize_imagenet(images), 224)
    assert got.shape == (2, 224, 224, 3)
    assert _max_rel(got, want) <= 1e-5


def test_missing_files_say_what_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"dinov2-vitb14 is not available offline \(HF_HUB_OFFLINE "
                       r"is set\)\. Download config\.json and model\.safetensors from "
                       r"https://huggingface\.co/facebook/dinov2-base and place them in .*dinov2-vitb14"):
        dinov2_lib.load_dinov2("dinov2-vitb14", cache_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    unreachable = (tmp_path / "nowhere").as_uri() + "/{file}"
    with pytest.raises(FileNotFoundError, match="downloading config.json failed"):
        dinov2_lib.ensure_dinov2("dinov2-vits14-reg", tmp_path, url=unreachable)
    with pytest.raises(FileNotFoundError, match="DINOv2 folder not found"):
        dinov2_lib.load_dinov2(tmp_path / "absent")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="half lacks model.safetensors"):
        dinov2_lib.load_dinov2(tmp_path / "half")
    with pytest.raises(ValueError, match="unknown DINOv2 model 'dinov2-vitg14'"):
        dinov2_lib.ensure_dinov2("dinov2-vitg14", tmp_path)


def test_download_is_checksummed_and_cached(tmp_path, monkeypatch):
    _, folder = _torch_model(tmp_path, 4, seed=7)
    source = tmp_path / "hub"
    source.mkdir()
    digests = {}
    for name in (dinov2_lib.CONFIG_FILE, dinov2_lib.WEIGHTS_FILE):
        data = (tmp_path / folder / name).read_bytes()
        (source / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    url = source.as_uri() + "/{file}"
    with pytest.raises(ValueError, match="expected 0000"):
        dinov2_lib.ensure_dinov2("dinov2-vits14-reg", tmp_path / "cache", url=url,
                                 sha256={**digests, dinov2_lib.WEIGHTS_FILE: "0000"})
    cached = dinov2_lib.ensure_dinov2("dinov2-vits14-reg", tmp_path / "cache", url=url, sha256=digests)
    assert cached == tmp_path / "cache" / "dinov2-vits14-reg"

    def no_network(url, dest):
        raise AssertionError(f"fetched {url} although it is cached")
    monkeypatch.setattr(cache_lib, "download", no_network)
    monkeypatch.setattr(dinov2_lib, "DINOV2_SHA256", digests)
    model, config = dinov2_lib.load_dinov2("dinov2-vits14-reg", cache_dir=tmp_path / "cache")
    assert config.num_register_tokens == 4 and model.grid == 16


def test_bad_inputs_fail_with_one_line(tmp_path):
    model, folder = _torch_model(tmp_path, 0)
    ours, _ = dinov2_lib.load_dinov2(folder, image_size=224)
    with pytest.raises(ValueError, match=r"built for NHWC \[B, 224, 224, 3\] images, got shape \(1, 3, 224, 224\)"):
        ours(jnp.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        dinov2_lib.load_dinov2(folder, image_size=230)
    tensors = load_file(f"{folder}/model.safetensors")
    config = dinov2_lib.read_config(f"{folder}/config.json")
    del tensors["encoder.layer.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.mlp.fc2.bias'\]"):
        dinov2_lib.dinov2_from_state_dict(tensors, config)
    swiglu = tmp_path / "swiglu.json"
    swiglu.write_text('{"model_type": "dinov2", "use_swiglu_ffn": true}')
    with pytest.raises(ValueError, match="only the GELU-MLP variants"):
        dinov2_lib.read_config(swiglu)


def test_jitted_pure_form_and_bfloat16(tmp_path):
    model, folder = _torch_model(tmp_path, 4, seed=8)
    ours, _ = dinov2_lib.load_dinov2(folder, image_size=224)
    images = jnp.asarray(_images(224, seed=9))
    graphdef, params = nnx.split(ours)
    jitted = jax.jit(dinov2_lib.features, static_argnums=0)(graphdef, params, images)
    assert _max_rel(jitted, _reference_patch_tokens(model, np.asarray(images), 4)) <= 1e-5
    half, _ = dinov2_lib.load_dinov2(folder, image_size=224, compute_dtype=jnp.bfloat16)
    out = half(images)
    assert out.dtype == jnp.bfloat16 and _max_rel(out.astype(jnp.float32), jitted) < 0.1


@pytest.mark.parametrize("size,registers", [("B", 0), ("L", 4)])
def test_analytic_macs_match_xla(size, registers):
    """The published B/14 and L/14 shapes at 224, counted by XLA from the lowered program."""
    width, depth, heads = {"B": (768, 12, 12), "L": (1024, 24, 16)}[size]
    config = dinov2_lib.DinoV2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                     num_register_tokens=registers)
    graphdef, params = dinov2_lib._skeleton(config, 224, jnp.float32)
    lowered = jax.jit(dinov2_lib.features, static_argnums=0).lower(
        graphdef, params, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    xla = lowered.cost_analysis()["flops"] / 2
    # XLA also counts the elementwise work (GELU, norms, softmax): about 2% more.
    assert flops.dinov2_forward_macs(config, 224) == pytest.approx(xla, rel=0.03)
    if size == "B":
        assert flops.dinov2_forward_macs(config, 224) / 1e9 == pytest.approx(23.2, abs=0.05)
