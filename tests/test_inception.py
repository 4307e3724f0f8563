"""FID Inception: parity with pytorch-fid's network (random weights, CPU), the torch-free
checkpoint reader, resizing and input scaling, and the checksummed weight cache."""

import datetime
import hashlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid import inception as pytorch_fid_inception
from torchvision.models.inception import Inception3

from tread_jax.metrics import inception


def _pytorch_fid_network() -> torch.nn.Module:
    """pytorch-fid's fid_inception_v3() without its download: torchvision's Inception3 with the
    FID blocks swapped in, random weights, and BatchNorm statistics that keep activations at a
    sensible scale (set from one calibration batch), then perturbed."""
    torch.manual_seed(0)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    fid = pytorch_fid_inception
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = 1.0  # running statistics := statistics of the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.rand(1, 3, 160, 160) * 2 - 1)
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.05)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
    net.eval()
    return net


@pytest.fixture(scope="module")
def torch_net():
    return _pytorch_fid_network()


@pytest.fixture(scope="module")
def checkpoint(torch_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(torch_net.state_dict(), path)
    return path


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_matches_pytorch_fid_through_the_checkpoint_loader(torch_net, checkpoint):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)  # NHWC in [-1, 1]

    # pytorch-fid's InceptionV3.forward: [0, 1] input, bilinear resize to 299, 2x - 1.
    captured = {}
    torch_net.avgpool.register_forward_hook(
        lambda m, i, o: captured.__setitem__("pool", o.flatten(1)))
    torch_net.Mixed_6d.register_forward_hook(  # ADM's mixed_6/conv = Mixed_6d.branch1x1
        lambda m, i, o: captured.__setitem__("spatial", o[:, :7].permute(0, 2, 3, 1).flatten(1)))
    x = torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        logits = torch_net(x)
        logits_unbiased = logits - torch_net.fc.bias

    model = inception.load_inception(checkpoint)
    apply, state = inception.inception_apply_fn(model)
    out = jax.jit(apply)(state, jnp.asarray(images))

    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    assert float(jnp.std(out["pool"])) > 1e-2  # activations are alive, not all zero
    for name, want in [("pool", captured["pool"]), ("logits", logits),
                       ("logits_unbiased", logits_unbiased), ("spatial", captured["spatial"])]:
        err = _relative_error(out[name], want.numpy())
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
        np.testing.assert_allclose(out[name], want.numpy(), rtol=0,
                                   atol=1e-4 * float(want.abs().max()))


def test_reader_handles_zip_and_legacy_torch_formats(torch_net, checkpoint, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save(torch_net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    want = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    for path in (checkpoint, legacy):
        got = inception.load_torch_state_dict(path)
        assert list(got) == list(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key  # e.g. int64 num_batches_tracked
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_reader_handles_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[1:, ::2], "half": torch.ones(3, dtype=torch.float16)}
    for legacy in (False, True):
        path = tmp_path / f"views_{legacy}.pth"
        torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
        got = inception.load_torch_state_dict(path)
        for key, value in tensors.items():
            np.testing.assert_array_equal(got[key], value.numpy())
            assert got[key].dtype == value.numpy().dtype


def test_reader_refuses_objects_other_than_tensors(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"w": torch.zeros(2), "when": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(pickle.UnpicklingError, match="datetime.date"):
        inception.load_torch_state_dict(path)
    not_torch = tmp_path / "plain.pth"
    not_torch.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        inception.load_torch_state_dict(not_torch)
    with pytest.raises(FileNotFoundError):
        inception.load_torch_state_dict(tmp_path / "missing.pth")


def test_reader_refuses_tensors_reaching_past_their_storage(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, good)
    bad = tmp_path / "truncated.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:8] if item.filename.endswith("data/0") else data)
    np.testing.assert_array_equal(inception.load_torch_state_dict(good)["w"], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="outside its storage"):
        inception.load_torch_state_dict(bad)


def test_state_dict_mismatches_are_named(torch_net):
    state = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(ValueError, match="Mixed_6d.branch1x1.bn.running_var"):
        inception.inception_from_state_dict(missing)
    wrong_shape = dict(state, **{"fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match="fc.bias"):
        inception.inception_from_state_dict(wrong_shape)
    extra = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match="AuxLogits"):
        inception.inception_from_state_dict(extra)


@pytest.mark.parametrize("shape", [(64, 64), (512, 512), (100, 300), (299, 299)])
def test_resize_matches_torch_bilinear(shape):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(2, *shape, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = inception.preprocess(jnp.asarray(images), "pytorch_fid")
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_tf_legacy_resize_samples_at_scaled_corners():
    # TF1 ResizeBilinear, align_corners=False: output i reads input i * in / out.
    x = jnp.asarray([[0.0, 4.0]]).reshape(1, 1, 2, 1)
    got = inception.resize_bilinear_tf_legacy(jnp.broadcast_to(x, (1, 4, 2, 1)), 4)
    np.testing.assert_allclose(got[0, 0, :, 0], [0.0, 2.0, 4.0, 4.0])  # 0, .5, 1, 1.5->clamped
    rng = np.random.default_rng(2)
    img = rng.normal(size=(1, 5, 7, 1)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear_tf_legacy(jnp.asarray(img), 3))

    def reference(y, x_):  # direct evaluation, one output pixel at a time
        sy, sx = y * 5 / 3, x_ * 7 / 3
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
        fy, fx = sy - y0, sx - x0
        top = img[0, y0, x0, 0] * (1 - fx) + img[0, y0, x1, 0] * fx
        bottom = img[0, y1, x0, 0] * (1 - fx) + img[0, y1, x1, 0] * fx
        return top * (1 - fy) + bottom * fy

    want = np.array([[reference(y, x_) for x_ in range(3)] for y in range(3)])
    np.testing.assert_allclose(got[0, :, :, 0], want, rtol=1e-5, atol=1e-6)


def test_uint8_and_float_inputs_agree():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    as_float = jnp.asarray(pixels, jnp.float32) / 127.5 - 1
    for mode in ("pytorch_fid", "adm"):
        np.testing.assert_allclose(inception.preprocess(jnp.asarray(pixels), mode),
                                   inception.preprocess(as_float, mode), atol=1e-5)
    # ADM's graph maps [0, 255] with (x - 128) / 128; pytorch-fid with x / 127.5 - 1.
    np.testing.assert_allclose(inception.preprocess(jnp.asarray(pixels), "adm"),
                               (pixels.astype(np.float32) - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(inception.preprocess(jnp.asarray(pixels), "pytorch_fid"),
                               pixels.astype(np.float32) / 127.5 - 1, atol=1e-6)


def test_bad_inputs_fail_before_any_work():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        inception.preprocess(jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="preprocessing"):
        inception.InceptionV3(preprocessing="clean_fid")


def _weights_file(tmp_path, content=b"fake inception weights"):
    source = tmp_path / "source" / "pt_inception-test.pth"
    source.parent.mkdir()
    source.write_bytes(content)
    return source, hashlib.sha256(content).hexdigest()


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch):
    source, digest = _weights_file(tmp_path)
    monkeypatch.setenv("TREAD_JAX_CACHE", str(tmp_path / "cache"))
    path = inception.fetch_inception_weights(url=source.as_uri(), sha256_prefix=digest[:8])
    assert path == tmp_path / "cache" / source.name
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # now served from the cache
    assert inception.fetch_inception_weights(url=source.as_uri(),
                                             sha256_prefix=digest[:8]) == path


def test_fetch_rejects_wrong_checksum(tmp_path):
    source, digest = _weights_file(tmp_path)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    with pytest.raises(ValueError, match="SHA-256"):
        inception.fetch_inception_weights(url=source.as_uri(), sha256_prefix=wrong,
                                          directory=tmp_path / "cache")
    assert not (tmp_path / "cache" / source.name).exists()


def test_fetch_offline_says_where_to_put_the_file(tmp_path):
    missing = (tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth").as_uri()
    with pytest.raises(FileNotFoundError) as err:
        inception.fetch_inception_weights(url=missing, directory=tmp_path / "cache")
    assert str(tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth") in str(err.value)
    assert not list((tmp_path / "cache").iterdir())  # no partial file left behind
