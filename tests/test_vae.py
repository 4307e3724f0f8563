"""tread_jax.vae: parity with diffusers' AutoencoderKL, checkpoint loading, and the weight cache."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from tread_jax import cache, vae as vae_lib

# The real SD layout (4 down/up blocks, 2 resnets per block, 4 latent channels) at small widths.
TINY = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=16,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: diffusers starts norms at 1/0 and some biases at zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:  # conv / linear weights, scaled to keep activations O(1)
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random-weight diffusers AutoencoderKL saved with save_pretrained, plus its outputs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**TINY).eval()
    _randomise(model, seed=1)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    latents = torch.randn(2, 4, 4, 4, generator=gen)
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return dict(folder=folder, images=nhwc(images), latents=nhwc(latents),
                mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(decoded))


def _max_rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def compiled(reference):
    """The loaded VAE split into graphdef/params, with encode/decode jitted once for the module."""
    vae, config = vae_lib.load_vae(reference["folder"])
    graphdef, params = nnx.split(vae)
    encode = jax.jit(lambda p, x: vae_lib.encode_moments(graphdef, p, x))
    decode = jax.jit(lambda p, z: vae_lib.decode(graphdef, p, z))
    return dict(config=config, params=params, encode=encode, decode=decode)


def test_matches_diffusers(reference, compiled):
    config, params = compiled["config"], compiled["params"]
    assert config.block_out_channels == (32, 32, 64, 64) and config.downsample_factor == 8
    mean, logvar = compiled["encode"](params, jnp.asarray(reference["images"]))
    decoded = compiled["decode"](params, jnp.asarray(reference["latents"]))
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and decoded.shape == (2, 32, 32, 3)
    assert _max_rel(mean, reference["mean"]) < 1e-4
    assert _max_rel(logvar, reference["logvar"]) < 1e-4
    assert _max_rel(decoded, reference["decoded"]) < 1e-4
    # The outputs are far from trivial, so agreement above says something.
    assert np.std(reference["logvar"]) > 0.1 and np.std(reference["decoded"]) > 0.1


def test_logvar_is_clipped_like_diffusers(reference, compiled):
    params = jax.tree.map(lambda a: a, compiled["params"])
    # Push the log-variance half of quant_conv far out of range in both directions.
    bias = params["quant_conv"]["bias"]
    bias[...] = bias[...].at[4:6].set(1e4).at[6:].set(-1e4)
    _, logvar = compiled["encode"](params, jnp.asarray(reference["images"]))
    np.testing.assert_array_equal(np.asarray(logvar[..., :2]), 20.0)
    np.testing.assert_array_equal(np.asarray(logvar[..., 2:]), -30.0)


def test_nchw_input_is_refused(reference, compiled):
    with pytest.raises(ValueError, match=r"images must be NHWC with 3 channels, got shape \(2, 3, 32, 32\)"):
        compiled["encode"](compiled["params"], jnp.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"latents must be NHWC with 4 channels"):
        compiled["decode"](compiled["params"], jnp.zeros((2, 4, 4)))


def test_legacy_attention_names_load_identically(reference, tmp_path):
    tensors = load_file(str(reference["folder"] / vae_lib.WEIGHTS_FILE))
    legacy = {}
    for key, value in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if value.ndim == 2:  # stored as 1x1 convolutions, as the LDM code had them
                    value = value[:, :, None, None]
        legacy[key] = value
    assert any(".proj_attn.weight" in k and v.ndim == 4 for k, v in legacy.items())
    save_file(legacy, str(tmp_path / vae_lib.WEIGHTS_FILE))
    (tmp_path / vae_lib.CONFIG_FILE).write_text((reference["folder"] / vae_lib.CONFIG_FILE).read_text())
    modern, _ = vae_lib.load_vae(reference["folder"])
    old, _ = vae_lib.load_vae(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(modern)), nnx.to_flat_state(nnx.state(old))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def _copy_with(reference, tmp_path, tensors=None, config_update=None):
    config = json.loads((reference["folder"] / vae_lib.CONFIG_FILE).read_text())
    config.update(config_update or {})
    (tmp_path / vae_lib.CONFIG_FILE).write_text(json.dumps(config))
    if tensors is None:
        tensors = load_file(str(reference["folder"] / vae_lib.WEIGHTS_FILE))
    save_file(tensors, str(tmp_path / vae_lib.WEIGHTS_FILE))
    return tmp_path


def test_wrong_keys_are_listed(reference, tmp_path):
    tensors = load_file(str(reference["folder"] / vae_lib.WEIGHTS_FILE))
    tensors["encoder.extra.weight"] = tensors.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match=r"missing keys \[decoder\.conv_out\.bias\]; "
                                         r"unexpected keys \[encoder\.extra\.weight\]"):
        vae_lib.load_vae(_copy_with(reference, tmp_path, tensors))


def test_shape_mismatch_is_reported(reference, tmp_path):
    tensors = load_file(str(reference["folder"] / vae_lib.WEIGHTS_FILE))
    tensors["encoder.conv_out.weight"] = tensors["encoder.conv_out.weight"][:, :32]
    with pytest.raises(ValueError, match=r"shape mismatch for encoder\.conv_out\.weight: "
                                         r"file \(8, 32, 3, 3\), model \(3, 3, 64, 8\)"):
        vae_lib.load_vae(_copy_with(reference, tmp_path, tensors))


def test_unsupported_architecture_is_refused(reference, tmp_path):
    folder = _copy_with(reference, tmp_path, config_update={"act_fn": "gelu"})
    with pytest.raises(ValueError, match="unsupported act_fn='gelu'"):
        vae_lib.load_vae(folder)


def test_missing_files(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="VAE directory not found"):
        vae_lib.load_vae(tmp_path / "nowhere")
    (tmp_path / vae_lib.CONFIG_FILE).write_text((reference["folder"] / vae_lib.CONFIG_FILE).read_text())
    with pytest.raises(FileNotFoundError, match=f"lacks {vae_lib.WEIGHTS_FILE}"):
        vae_lib.load_vae(tmp_path)


def test_bfloat16_compute_stays_close(reference):
    vae, _ = vae_lib.load_vae(reference["folder"], compute_dtype=jnp.bfloat16)
    mean, logvar = nnx.jit(lambda m, x: m.encode_moments(x))(vae, jnp.asarray(reference["images"]))
    assert mean.dtype == logvar.dtype == jnp.float32  # outputs are float32 whatever the compute
    assert 1e-5 < _max_rel(mean, reference["mean"]) < 0.1  # really ran in bfloat16, still close


def test_batch_sharded_matches_unsharded(reference, tmp_path):
    """encode/decode jit with the batch split over 2 devices (fresh process: device count)."""
    np.savez(tmp_path / "io.npz", images=reference["images"], latents=reference["latents"],
             mean=reference["mean"], decoded=reference["decoded"])
    script = textwrap.dedent(f"""
        import functools, jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        from tread_jax import vae as vae_lib
        io = np.load({str(tmp_path / "io.npz")!r})
        vae, _ = vae_lib.load_vae({str(reference["folder"])!r})
        graphdef, params = nnx.split(vae)
        mesh = jax.make_mesh((2,), ("data",))
        batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        params = jax.device_put(params, rep)
        enc = jax.jit(functools.partial(vae_lib.encode_moments, graphdef), out_shardings=(batch, batch))
        dec = jax.jit(functools.partial(vae_lib.decode, graphdef), out_shardings=batch)
        mean, _ = enc(params, jax.device_put(io["images"], batch))
        out = dec(params, jax.device_put(io["latents"], batch))
        assert len(mean.sharding.device_set) == 2 and mean.sharding.spec == P("data")
        for got, want in ((mean, io["mean"]), (out, io["decoded"])):
            err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
            assert err < 1e-4, err
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# The download cache, exercised over file:// URLs (the real urllib path, no network).

@pytest.fixture()
def hub(reference, tmp_path):
    """A fake hub folder served as file:// URLs, and the files' real digests."""
    source = tmp_path / "hub"
    source.mkdir()
    digests = {}
    for name in (vae_lib.CONFIG_FILE, vae_lib.WEIGHTS_FILE):
        data = (reference["folder"] / name).read_bytes()
        (source / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return dict(url=source.as_uri() + "/{file}", digests=digests, cache=tmp_path / "cache")


def test_download_verifies_and_caches(hub, reference, compiled, monkeypatch):
    folder = vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=hub["digests"])
    assert folder == hub["cache"] / "sd-vae-ft-ema"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [vae_lib.CONFIG_FILE, vae_lib.WEIGHTS_FILE, vae_lib.CONFIG_FILE + ".sha256",
         vae_lib.WEIGHTS_FILE + ".sha256"])
    vae, _ = vae_lib.load_vae(folder)
    mean, _ = compiled["encode"](nnx.state(vae), jnp.asarray(reference["images"]))
    assert _max_rel(mean, reference["mean"]) < 1e-4

    # A second call is served from the cache: any network access would fail here.
    def no_network(url, dest):
        raise AssertionError(f"fetched {url} although it is cached")
    monkeypatch.setattr(cache, "download", no_network)
    assert vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=hub["digests"]) == folder

    # The hub name resolves through the cache named by $TREAD_JAX_CACHE.
    monkeypatch.setenv("TREAD_JAX_CACHE", str(hub["cache"]))
    _, config = vae_lib.load_vae("stabilityai/sd-vae-ft-ema")
    assert config.latent_channels == 4


def test_download_with_wrong_checksum_is_discarded(hub):
    wrong = dict(hub["digests"], **{vae_lib.WEIGHTS_FILE: "0" * 64})
    with pytest.raises(ValueError, match="expected 0000"):
        vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=wrong)
    folder = hub["cache"] / "sd-vae-ft-ema"
    assert not (folder / vae_lib.WEIGHTS_FILE).exists()
    assert not (folder / (vae_lib.WEIGHTS_FILE + ".part")).exists()


def test_first_download_digest_is_recorded_and_checked(hub):
    # No published digest: the first download is trusted and its digest recorded.
    unpinned = {name: None for name in hub["digests"]}
    folder = vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=unpinned)
    recorded = (folder / (vae_lib.WEIGHTS_FILE + ".sha256")).read_text().strip()
    assert recorded == hub["digests"][vae_lib.WEIGHTS_FILE]
    with (folder / vae_lib.WEIGHTS_FILE).open("r+b") as f:  # flip one byte in the cached file
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="does not match its sha256"):
        vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=unpinned)


def test_offline_failure_says_what_to_place_where(hub, monkeypatch):
    folder = hub["cache"] / "sd-vae-ft-ema"
    unreachable = hub["url"].replace("/hub/", "/no-such-hub/")
    with pytest.raises(FileNotFoundError) as err:
        vae_lib.ensure_sd_vae(hub["cache"], url=unreachable, sha256=hub["digests"])
    message = str(err.value)
    assert vae_lib.CONFIG_FILE in message and vae_lib.WEIGHTS_FILE in message and str(folder) in message
    assert not list(folder.glob("*.part"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        vae_lib.ensure_sd_vae(hub["cache"], url=hub["url"], sha256=hub["digests"])
