"""The trainer end to end on a tiny DiT over the real digits: guards, logs, samples, report,
EMA and the version-1 route loss.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import trainer_testlib as tl
from tread_jax import data, diffusion, routing, sampling, train, train_state

tl.enable_compilation_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"model.name": "DiT-Q/2"}, ValueError, r"unknown model 'DiT-Q/2'; known: DiT-S/2"),
        ({"routes": [dict(start=1, end=5, ratio=0.5)]}, ValueError, r"need 0 <= start <= end < depth=2"),
        ({"routes": [dict(start=0, end=1, ratio=1.0)]}, ValueError, r"ratio is the routed fraction"),
        ({"mesh.fsdp": 3}, ValueError, r"does not divide the 1 devices"),
        ({"global_batch_size": 0}, ValueError, r"global_batch_size must be positive, got 0"),
        ({"data.name": "imagenet"}, ValueError, r"unknown dataset 'imagenet'"),
        ({"optim.decay_steps": 2}, ValueError, r"decay_steps \(2\) must exceed optim.warmup_steps \(2\)"),
        ({"optim.decay_steps": 6}, ValueError, r"decay_steps \(6\) is below num_train_steps \(8\)"),
        ({"init_from": "gs://bucket/routed"}, ValueError, r"init_from 'gs://bucket/routed' is a URL; .* mount"),
    ],
)
def test_bad_config_fails_before_any_work(data_dir, tmp_path, changes, error, message):
    config = tl.tiny_config(data_dir, **changes)
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_and_unwritable_workdir(data_dir, tmp_path, monkeypatch):
    # A dataset the user must prepare (like the ImageNet latents) that is not there.
    spec = data.DATASETS["digits"]
    monkeypatch.setitem(
        data.DATASETS, "absent",
        data.DatasetSpec("absent_ds", "1.0.0", spec.decode, True, None, "run the preparation tool first"),
    )
    with pytest.raises(FileNotFoundError, match=r"dataset 'absent' not found at .*: run the preparation tool first"):
        train.train_and_evaluate(tl.tiny_config(data_dir, **{"data.name": "absent"}), str(tmp_path / "run"))

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"workdir '.*a_file/run' is not writable"):
        train.train_and_evaluate(tl.tiny_config(data_dir), str(blocker / "run"))

    # A bucket URL would otherwise become a local folder named "gs:", lost with the VM.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"workdir 'gs://bucket/run' is a URL; .* mount the bucket"):
        train.train_and_evaluate(tl.tiny_config(data_dir), "gs://bucket/run")
    assert not (tmp_path / "gs:").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.name=DiT-Q/2", "unknown model 'DiT-Q/2'; known:"),
        # Routes are overridable on the command line (a tuple literal), and checked like the rest.
        ("--config.routes=((1, 3, 0.5), (2, 5, 0.5))", "routes Route(start=1, end=3, ratio=0.5) and "
                                                       "Route(start=2, end=5, ratio=0.5) overlap"),
    ],
)
def test_main_reports_a_bad_flag_in_one_line(tmp_path, flag, message):
    done = subprocess.run(
        [sys.executable, "-m", "tread_jax.main", f"--config={tl.DIGITS_CONFIG}", f"--workdir={tmp_path}", flag],
        cwd=tl.REPO, env=tl.subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("tread_jax: error: " + message)
    assert "Traceback" not in done.stderr


def test_run_writes_metrics_samples_and_quality_report(data_dir, tmp_path, monkeypatch):
    from tread_jax.metrics import digits

    scored, score = [], digits.digits_quality  # the report scores clipped images, as saved ones are
    monkeypatch.setattr(digits, "digits_quality",
                        lambda images, *a, **k: scored.append(images) or score(images, *a, **k))
    config = tl.tiny_config(
        data_dir, log_every=2, **{"sample.every": 4, "sample.per_class": 2, "sample.num_steps": 3,
                                  "eval.report": "digits", "eval.num_samples": 30, "eval.num_steps": 3,
                                  "eval.draws": 2},
    )
    result = train.train_and_evaluate(config, str(tmp_path))

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert set(r) == {"step", "loss", "grad_norm", "learning_rate", "steps_per_s", "images_per_s"}
        assert np.isfinite(r["loss"]) and r["steps_per_s"] > 0
    assert records[-1]["learning_rate"] == pytest.approx(config.optim.learning_rate)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "Total" in (tmp_path / "parameter_overview.txt").read_text()

    samples = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert samples == ["step_0000004.png", "step_0000008.png"] + [f"step_0000008_class{k}.png" for k in range(10)]

    report = json.loads((tmp_path / "quality_report.json").read_text())
    assert report == result["report"]
    assert report["num_samples"] == 30 and 0.0 <= report["accuracy"] <= 1.0
    assert report["fd_train_vs_test"] > 0 and report["fd_generated_vs_test"] > 0
    assert report["classifier_test_accuracy"] > 0.9  # the judge itself reads real digits well
    assert len(scored) == 2 and all(np.abs(images).max() <= 1.0 for images in scored)
    assert not np.array_equal(scored[0], scored[1])  # two fresh draws, averaged
    assert report["fd_ratio_to_floor"] == pytest.approx(np.mean(report["fd_ratio_per_draw"]))


def _one_step(config, params_tx_state=None):
    info = data.dataset_info(config.data)
    parts = train.ModelParts(config, info)
    tx = train_state.create_optimizer(config.optim)
    state = train_state.init_train_state(parts.init()[0], tx)
    rest = parts.init()[1]
    images, labels = data.load_split_arrays(config.data, "train")
    batch = {"image": jnp.asarray(images[:16]), "label": jnp.asarray(labels[:16])}
    step = train.make_train_step(config, parts, diffusion.create_objective(config.diffusion), tx,
                                 routing.parse_routes(config.routes))
    return state, *jax.jit(step)(state, batch, rest)


def test_ema_decay_inside_the_step(data_dir):
    start, after, _ = _one_step(tl.tiny_config(data_dir, ema_decay=0.0))
    jax.tree.map(np.testing.assert_array_equal, after.ema_params, after.params)
    start, after, _ = _one_step(tl.tiny_config(data_dir, ema_decay=1.0))
    jax.tree.map(np.testing.assert_array_equal, after.ema_params, start.params)
    assert int(after.step) == 1


def test_learning_rate_warmup_then_constant_or_cosine_decay():
    optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, decay_steps=0))
    constant = train_state.learning_rate_schedule(optim)
    np.testing.assert_allclose([constant(s) for s in (0, 5, 10, 1000)], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    optim.decay_steps = 110
    cosine = train_state.learning_rate_schedule(optim)
    # Halfway through the decay, cos(pi/2) leaves half the peak; at decay_steps, nothing.
    np.testing.assert_allclose([cosine(s) for s in (5, 10, 60, 110)], [5e-4, 1e-3, 5e-4, 0], atol=1e-9)


def test_version1_route_loss_differs_from_the_plain_mean(data_dir):
    _, _, plain = _one_step(tl.tiny_config(data_dir))
    _, _, kept_only = _one_step(tl.tiny_config(data_dir, **{"route_loss.enabled": True}))
    _, _, with_mae = _one_step(tl.tiny_config(data_dir, **{"route_loss.enabled": True, "route_loss.mae_coef": 0.5}))
    losses = [float(m.loss.compute()) for m in (plain, kept_only, with_mae)]
    assert all(np.isfinite(losses))
    # Same noise, labels and token selection: only the reduction over tokens differs.
    assert len(set(losses)) == 3 and losses[2] > losses[1]


def test_dense_finetune_continues_a_routed_run(data_dir, tmp_path):
    routed_dir, dense_dir = str(tmp_path / "routed"), str(tmp_path / "dense")
    dense = dict(routes=[], init_from=routed_dir, num_train_steps=6, checkpoint_every=2)
    with pytest.raises(FileNotFoundError, match=r"init_from '.*routed' holds no checkpoint"):
        train.train_and_evaluate(tl.tiny_config(data_dir, **dense), dense_dir)
    train.train_and_evaluate(tl.tiny_config(data_dir, num_train_steps=4), routed_dir)

    # EMA decay 1 freezes the EMA at what the run started from: the routed run's step-4 state.
    train.train_and_evaluate(tl.tiny_config(data_dir, ema_decay=1.0, **dense), dense_dir)
    records = [json.loads(line) for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6]
    routed = train.restore_ema(tl.tiny_config(data_dir), routed_dir)
    finetuned = train.restore_ema(tl.tiny_config(data_dir), dense_dir)
    assert (routed.step, finetuned.step) == (4, 6)
    jax.tree.map(np.testing.assert_array_equal, finetuned.params, routed.params)

    # The notebook's sampler reads the same weights.
    sampler = sampling.EmaSampler(tl.tiny_config(data_dir), dense_dir)
    images = sampler.sample(np.arange(3), seed=0, num_steps=2)
    assert sampler.step == 6 and images.shape == (3, 8, 8, 1) and np.isfinite(images).all()


def test_in_loop_evaluation_writes_eval_metrics(data_dir, tmp_path):
    config = tl.tiny_config(data_dir, num_train_steps=4, log_every=2,
                            **{"eval.every": 2, "eval.num_samples": 20, "eval.num_steps": 2, "eval.per_device_batch": 10})
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and r["eval/fd_generated_vs_test"] > 0
        assert not {"eval/num_samples", "eval/seed", "eval/step"} & set(r)
    assert (tmp_path / "eval" / "4").is_dir()
