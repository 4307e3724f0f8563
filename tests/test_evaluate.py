"""The evaluation binary, the evaluator loop and reference statistics.

End to end on a tiny digits checkpoint written by the real trainer: the binary through its
main function; an interrupted evaluation that resumes; 8 fake CPU devices against 1; the
Inception path (random weights, never downloaded) sharded over 8 devices; reference
statistics through ADM ``.npz`` files; and the symmetric FID trace formula against sqrtm.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg, special

import trainer_testlib as tl
from tread_jax.metrics import evaluator, fid

NUM_SAMPLES = 24
EVAL_ARGS = [f"--num_samples={NUM_SAMPLES}", "--num_steps=2"]
TAG = f"n{NUM_SAMPLES}_steps2_cfg1_seed0"


# ----------------------------------------------------------------------------------------------
# Pure numerics


def _sqrtm_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_fid_agrees_with_sqrtm(seed):
    rng = np.random.default_rng(seed)
    dim = 96
    mats = []
    for _ in range(2):
        a = rng.normal(size=(dim, dim)) * rng.uniform(0.1, 3, dim)
        mats.append(a @ a.T / dim + 1e-3 * np.eye(dim))
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) * 0.1
    got = fid.frechet_distance(mu1, mats[0], mu2, mats[1])
    assert got == pytest.approx(_sqrtm_fid(mu1, mats[0], mu2, mats[1]), rel=1e-6)
    # Singular covariance (fewer samples than dimensions): finite, real, and near sqrtm's value.
    feats = rng.normal(size=(40, dim))
    singular = np.cov(feats, rowvar=False)
    got = fid.frechet_distance(feats.mean(0), singular, mu2, mats[1])
    assert np.isfinite(got)
    assert got == pytest.approx(_sqrtm_fid(feats.mean(0), singular, mu2, mats[1]), rel=1e-4)


def test_streaming_accumulators_match_batch_metrics():
    rng = np.random.default_rng(0)
    n, classes, dim = 53, 7, 5
    logits = rng.normal(size=(n, classes)) * 3
    feats = rng.normal(size=(n, dim))
    labels = rng.integers(0, classes, n)
    outputs = {"logits": logits, "feats": feats, "pred": logits.argmax(1)}

    def fresh():
        return {"is": evaluator.ScoreSplits("logits", classes, n),
                "m": evaluator.Moments("feats", dim),
                "pr": evaluator.FeatureSample("feats", dim, 20),
                "acc": evaluator.Accuracy("pred")}

    # Two "processes" take interleaved, shuffled rows; merge after a state round trip.
    order = rng.permutation(n)
    parts = [fresh(), fresh()]
    for p, rows in enumerate((order[::2], order[1::2])):
        for chunk in np.array_split(rows, 3):
            for acc in parts[p].values():
                acc.update({k: v[chunk] for k, v in outputs.items()}, labels[chunk], chunk)
    restored = fresh()
    evaluator.load_accumulators_state(restored, evaluator.accumulators_state(parts[0]))
    for name in restored:
        restored[name].merge(parts[1][name])

    mean, std = restored["is"].result()
    expected = fid.inception_score(logits, splits=10)
    assert (mean, std) == pytest.approx(expected, rel=1e-10)
    assert restored["m"].stats.mean == pytest.approx(feats.mean(0), rel=1e-10)
    np.testing.assert_allclose(restored["m"].stats.covariance, np.cov(feats, rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(restored["pr"].values(), feats[:20].astype(np.float32))
    assert restored["acc"].result() == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert mean > 1.0 and special.softmax(logits, 1).shape == (n, classes)


def test_balanced_labels():
    from tread_jax import evaluation

    labels = evaluation.balanced_labels(1000, 10, seed=3)
    np.testing.assert_array_equal(np.bincount(labels), [100] * 10)
    np.testing.assert_array_equal(labels, evaluation.balanced_labels(1000, 10, seed=3))
    assert not np.array_equal(labels, np.arange(1000) % 10)  # shuffled


def test_digits_extractor_matches_digits_quality():
    import jax

    from tread_jax import data, sharding
    from tread_jax.metrics import digits

    config = tl.tiny_config(data.default_data_dir())
    train_split = data.load_split_arrays(config.data, "train")
    test_split = data.load_split_arrays(config.data, "test")
    classifier = digits.DigitsClassifier(*train_split, seed=0)
    extractor = evaluator.DigitsExtractor(classifier, train_split, test_split)
    # "Samples": 50 real test digits with their labels (some misclassified: the judge is not perfect).
    images, labels = test_split[0][:50], test_split[1][:50]
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    accs, done = evaluator.run(
        lambda idx: evaluator.global_array(images[np.minimum(idx, 49)], mesh), extractor,
        num_samples=50, global_batch_size=16 * jax.device_count(), mesh=mesh, labels=labels)
    got = extractor.metrics(accs)
    expected = digits.digits_quality(images, labels, train_split, test_split, classifier=classifier)
    assert done == 50
    for key in ("accuracy", "classifier_test_accuracy"):
        assert got[key] == expected[key], key
    # Distances subtract traces about 100x larger than themselves: rounding shows at 1e-7.
    for key in ("fd_train_vs_test", "fd_generated_vs_test"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


# ----------------------------------------------------------------------------------------------
# End to end on a trained checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits workdir with one checkpoint from the real trainer (2 steps of a tiny DiT)."""
    from tread_jax import data

    root = tmp_path_factory.mktemp("evaluate")
    config = tl.tiny_config(data.default_data_dir(), num_train_steps=2, checkpoint_every=2)
    config_file = tl.write_config(config, root / "config.py")
    workdir = root / "trained"
    proc = tl.run_main(config_file, str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tl.saved_steps(str(workdir)) == [2]
    return config_file, workdir


def _copy(workdir: Path, name: str) -> Path:
    target = workdir.parent / name
    shutil.copytree(workdir / "checkpoints", target / "checkpoints")
    shutil.copy(workdir / "dataset.json", target / "dataset.json")
    return target


def _run_evaluate(config_file, workdir, *extra, num_devices=None):
    command = [sys.executable, "-m", "tread_jax.evaluate", f"--config={config_file}",
               f"--workdir={workdir}", *EVAL_ARGS, *extra]
    return subprocess.run(command, cwd=tl.REPO, env=tl.subprocess_env(num_devices),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_device(checkpoint):
    """The binary, one device: samples saved as an ADM batch."""
    config_file, trained = checkpoint
    workdir = _copy(trained, "one_device")
    proc = _run_evaluate(config_file, workdir, "--per_device_batch=8", "--save_npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "eval" / "2" / TAG


EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    sys.path.insert(0, "tests")
    import trainer_testlib as tl
    from tread_jax import data, evaluation, sharding
    from tread_jax.metrics import evaluator, fid, inception, reference_stats

    config_file, root = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8
    config = tl.load_config(config_file)
    settings = evaluation.settings_from_config(config, 10, num_samples=%(n)d, num_steps=2, per_device_batch=1)
    # Uninterrupted, then interrupted after 1 batch of 8 and resumed with another batch size.
    full = evaluation.evaluate_checkpoint(config, root + "/full", settings)
    part = evaluation.evaluate_checkpoint(config, root + "/resumed", settings, max_batches=1)
    rest = evaluation.evaluate_checkpoint(config, root + "/resumed", settings)
    json.dump({"full": full, "part": part, "rest": rest}, open(root + "/sampling.json", "w"))

    # The Inception path: random weights, sharded over 8 devices and over a 1-device mesh.
    model = inception.InceptionV3(preprocessing="adm")
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            leaf, shape = str(path[-1]), var.shape
            if leaf == "kernel":
                value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
            elif leaf in ("var", "scale"):
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(size=shape) * 0.1
            var.set_value(jnp.asarray(value, jnp.float32))
    mesh8 = sharding.create_mesh({"data": 4, "fsdp": 2})
    mesh1 = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)
    num = 16
    for name, mesh in (("eight", mesh8), ("one", mesh1)):
        images_fn, size = reference_stats.dataset_images_fn(config.data, "test", mesh)
        extractor = evaluator.InceptionExtractor(model, pr_samples=12)
        accs, _ = evaluator.run(images_fn, extractor, num_samples=num, global_batch_size=8, mesh=mesh)
        reference_stats.write_reference(f"{root}/ref_{name}.npz", extractor.statistics(accs),
                                        accs["pr_features"].values())
        if name == "eight":
            accs_eight = accs
    # The same digits as an ADM image batch: statistics computed from its images, cached.
    images, _ = data.load_split_arrays(config.data, "test")
    fid.write_adm_npz(f"{root}/images.npz", images=np.asarray(jax.jit(evaluator.to_uint8)(images[:num])))
    stats, pr = reference_stats.load_reference(f"{root}/images.npz", model, mesh=mesh8, global_batch_size=8,
                                               pr_samples=12, cache_dir=f"{root}/cache")
    reference_stats.write_reference(f"{root}/ref_from_images.npz", stats, pr)
    # Scoring against a reference: the reference set against itself (read back from its file).
    ref = fid.read_adm_statistics(f"{root}/ref_eight.npz")
    extractor = evaluator.InceptionExtractor(model, reference=ref, reference_pool=pr, pr_samples=12)
    json.dump(extractor.metrics(accs_eight), open(root + "/self_metrics.json", "w"))
""") % {"n": NUM_SAMPLES}


@pytest.fixture(scope="module")
def eight_devices(checkpoint):
    config_file, trained = checkpoint
    root = trained.parent
    for name in ("full", "resumed"):
        _copy(trained, name)
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT, str(config_file), str(root)],
                          cwd=tl.REPO, env=tl.subprocess_env(8), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _progress(directory: Path) -> dict:
    with np.load(directory / "progress.npz") as saved:
        return {k: saved[k] for k in saved.files}


def test_binary_writes_metrics_and_adm_samples(one_device):
    metrics = json.loads((one_device / "metrics.json").read_text())
    assert metrics["complete"] and metrics["samples_done"] == NUM_SAMPLES and metrics["step"] == 2
    assert 0 <= metrics["accuracy"] <= 1
    # Two training steps: far from real digits; the real-data floor is far below.
    assert metrics["fd_generated_vs_test"] > 3 * metrics["fd_train_vs_test"] > 0
    assert metrics["classifier_test_accuracy"] > 0.9
    chunks = list(fid.iter_adm_images(one_device / "samples.npz", 10))
    images = np.concatenate(chunks)
    assert images.shape == (NUM_SAMPLES, 8, 8, 3) and images.std() > 0
    with np.load(one_device / "samples.npz") as saved:
        labels = saved["arr_1"]
    # 24 samples over 10 classes: every class 2 or 3 times.
    assert sorted(np.bincount(labels, minlength=10)) == [2] * 6 + [3] * 4
    assert not (one_device / "samples.npy").exists()


def test_interrupted_evaluation_resumes_to_the_same_statistics(eight_devices):
    runs = json.loads((eight_devices / "sampling.json").read_text())
    assert not runs["part"]["complete"] and runs["part"]["samples_done"] == 8
    assert runs["rest"]["complete"] and runs["full"]["complete"]
    full = _progress(eight_devices / "full" / "eval" / "2" / TAG)
    resumed = _progress(eight_devices / "resumed" / "eval" / "2" / TAG)
    assert int(full["next_index"]) == int(resumed["next_index"]) == NUM_SAMPLES
    for key in ("features/mean", "features/m2", "accuracy/correct"):
        np.testing.assert_allclose(resumed[key], full[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("accuracy", "fd_generated_vs_test"):
        assert runs["rest"][key] == pytest.approx(runs["full"][key], rel=1e-5)


def test_eight_devices_match_one_device(one_device, eight_devices):
    one = _progress(one_device)
    eight = _progress(eight_devices / "full" / "eval" / "2" / TAG)
    assert int(one["features/count"]) == int(eight["features/count"]) == NUM_SAMPLES
    np.testing.assert_allclose(eight["features/mean"], one["features/mean"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eight["features/m2"], one["features/m2"], rtol=1e-4, atol=1e-3)
    assert abs(float(eight["accuracy/correct"]) - float(one["accuracy/correct"])) <= 1


def test_inception_sharded_on_eight_devices_and_reference_round_trip(eight_devices):
    eight = fid.read_adm_statistics(eight_devices / "ref_eight.npz")
    one = fid.read_adm_statistics(eight_devices / "ref_one.npz")
    from_images = fid.read_adm_statistics(eight_devices / "ref_from_images.npz")
    assert eight.mu.shape == (2048,) and eight.sigma_s.shape == (2023, 2023)
    assert np.abs(eight.sigma).max() > 0
    for other in (one, from_images):
        for field in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(getattr(other, field), getattr(eight, field), rtol=1e-3,
                                       atol=1e-4 * np.abs(getattr(eight, field)).max(), err_msg=field)
    with np.load(eight_devices / "ref_eight.npz") as a, np.load(eight_devices / "ref_one.npz") as b:
        assert a["pr_features"].shape == (12, 2048)
        np.testing.assert_allclose(a["pr_features"], b["pr_features"], rtol=1e-3, atol=1e-4)
    self_metrics = json.loads((eight_devices / "self_metrics.json").read_text())
    assert abs(self_metrics["fid"]) < 1e-9 * np.trace(eight.sigma)  # rank 15 of 2048: singular
    assert abs(self_metrics["sfid"]) < 1e-9 * np.trace(eight.sigma_s)
    assert self_metrics["precision"] == 1.0 and self_metrics["recall"] == 1.0
    assert self_metrics["inception_score"] >= 1.0


def test_evaluation_compiles_with_the_multi_process_barrier(checkpoint, monkeypatch):
    # Every program of the evaluation goes through the barrier the trainer uses (gloo's 30 s
    # connection limit on multi-process CPU), each under its own name.
    from tread_jax import evaluation, runtime

    config_file, trained = checkpoint
    names, compile_everywhere = [], runtime.compile_everywhere
    monkeypatch.setattr(runtime, "compile_everywhere",
                        lambda jitted, *args, name: names.append(name) or compile_everywhere(jitted, *args, name=name))
    config = tl.load_config(config_file)
    settings = evaluation.settings_from_config(config, 10, num_samples=8, num_steps=2, per_device_batch=8)
    result = evaluation.evaluate_checkpoint(config, str(_copy(trained, "barrier")), settings)
    assert result["complete"]
    assert len(names) == len(set(names)) == 2, names
    assert any(n.startswith("eval_") for n in names) and any(n.startswith("extract_digits") for n in names)


def test_training_evaluations_compile_each_program_once(checkpoint, tmp_path, monkeypatch):
    # In-loop evaluation every N steps reuses the sampler's and the extractor's compiled
    # programs: compiling the FID Inception again at each evaluation would cost minutes a run.
    from tread_jax import evaluation, model_builder, runtime

    config_file, trained = checkpoint
    names, compile_everywhere = [], runtime.compile_everywhere
    monkeypatch.setattr(runtime, "compile_everywhere",
                        lambda jitted, *args, name: names.append(name) or compile_everywhere(jitted, *args, name=name))
    config = tl.load_config(config_file)
    config.eval.every, config.eval.num_samples, config.eval.num_steps, config.eval.per_device_batch = 1, 8, 2, 8
    workdir = str(_copy(trained, "in_loop"))
    ema = model_builder.restore_ema(config, workdir)
    evaluations = evaluation.TrainingEvaluator(config, workdir, model=ema.model, mesh=ema.mesh,
                                               param_shardings=ema.param_shardings)
    first = evaluations.periodic(ema.params, 1)
    second = evaluations.periodic(ema.params, 2)
    timeless = lambda metrics: {k: v for k, v in metrics.items() if "seconds" not in k}
    assert timeless(first) == timeless(second) and "eval/accuracy" in first  # same weights, same samples
    assert len(names) == 2, names  # one sampler and one extractor program, for both evaluations
