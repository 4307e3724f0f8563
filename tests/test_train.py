"""The trainer end to end on a tiny DiT over the real digits: guards, logs, samples, report,
EMA and the version-1 route loss.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import trainer_testlib as tl
from tread_jax import data, diffusion, model_builder, routing, train, train_state
from tread_jax.sampler import Sampler
from tread_jax import sharding, train_step
from tread_jax.train_step import after, gradient_norm, make_train_step

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
        ({"steps_per_call": 2, "log_every": 3}, ValueError,
         r"log_every \(3\) must be a multiple of steps_per_call \(2\)"),
        ({"data.device_prefetch": 0}, ValueError, r"data.device_prefetch must be positive, got 0"),
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
    from tread_jax.metrics import digits, evaluator

    # The report scores clipped images, as saved ones are; the classifier is fitted once per run.
    scored, host_outputs = [], evaluator.DigitsExtractor.host_outputs
    monkeypatch.setattr(evaluator.DigitsExtractor, "host_outputs",
                        lambda self, outputs: scored.append(outputs["image"]) or host_outputs(self, outputs))
    fits, fit = [], digits.DigitsClassifier.__init__
    monkeypatch.setattr(digits.DigitsClassifier, "__init__", lambda self, *a, **k: fits.append(1) or fit(self, *a, **k))
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
    assert len(fits) == 1
    assert len(scored) == 2 and all(np.abs(images).max() <= 1.0 for images in scored)
    assert not np.array_equal(scored[0], scored[1])  # two fresh draws, averaged
    assert report["fd_ratio_to_floor"] == pytest.approx(np.mean(report["fd_ratio_per_draw"]))


def _one_step(config):
    info = data.dataset_info(config.data)
    model = model_builder.ModelBuilder(config, info)
    tx = train_state.create_optimizer(config.optim)
    state = train_state.init_train_state(model.init_params(), tx)
    images, labels = data.load_split_arrays(config.data, "train")
    batch = {"image": jnp.asarray(images[:16]), "label": jnp.asarray(labels[:16])}
    step = make_train_step(config, model, diffusion.create_objective(config.diffusion), tx,
                           routing.parse_routes(config.routes))
    return state, *jax.jit(step)(state, batch)


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
    routed = model_builder.restore_ema(tl.tiny_config(data_dir), routed_dir)
    finetuned = model_builder.restore_ema(tl.tiny_config(data_dir), dense_dir)
    assert (routed.step, finetuned.step) == (4, 6)
    jax.tree.map(np.testing.assert_array_equal, finetuned.params, routed.params)

    # The notebook's sampler reads the same weights.
    sampler = Sampler.for_ema(tl.tiny_config(data_dir), finetuned, num_steps=2, name="test")
    images = sampler.sample(finetuned.params, np.arange(3), seed=0)
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()


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


def test_a_non_finite_state_is_never_saved(data_dir, tmp_path):
    # The loss and gradient of step 1 are finite; the update overflows every parameter.
    config = tl.tiny_config(data_dir, checkpoint_every=1, **{
        "optim.learning_rate": 1e39, "optim.warmup_steps": 0, "optim.decay_steps": 0})
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 1; stopping \(no checkpoint was written\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert tl.saved_steps(str(tmp_path)) == []


def test_sigterm_during_start_up_exits_0_and_loses_nothing(data_dir, tmp_path):
    import signal
    import time

    config_file = tl.write_config(tl.tiny_config(data_dir, num_train_steps=4), tmp_path / "config.py")
    workdir = tmp_path / "run"
    assert tl.run_main(config_file, str(workdir)).returncode == 0
    before = tl.load_state(str(workdir), 4)
    # Resume with more steps; SIGTERM as soon as the trainer announces itself (before restoring,
    # compiling and the first step).
    config_file = tl.write_config(tl.tiny_config(data_dir, num_train_steps=8), tmp_path / "more.py")
    proc = subprocess.Popen(tl.main_command(config_file, str(workdir)), cwd=tl.REPO, env=tl.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    line = proc.stdout.readline()
    assert "process(es)" in line, line
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "before the first step: exiting at step 4" in out
    assert tl.saved_steps(str(workdir)) == [4]
    jax.tree.map(np.testing.assert_array_equal, tl.load_state(str(workdir), 4), before)
    assert time.time() - started < 240


def test_sampling_needs_only_the_workdir(data_dir, tmp_path, monkeypatch):
    train.train_and_evaluate(tl.tiny_config(data_dir, num_train_steps=2, checkpoint_every=2), str(tmp_path))
    recorded = json.loads((tmp_path / "dataset.json").read_text())
    assert recorded["image_shape"] == [8, 8, 1] and recorded["num_classes"] == 10 and recorded["pixel_space"]

    def no_data(*args, **kwargs):
        raise AssertionError("the training data was opened")

    from tread_jax.data import pipeline

    monkeypatch.setattr(pipeline, "_open_builder", no_data)
    config = tl.tiny_config(str(tmp_path / "elsewhere"))
    ema = model_builder.restore_ema(config, str(tmp_path))
    images = Sampler.for_ema(config, ema, num_steps=2, name="workdir_only").sample(ema.params, np.arange(4), seed=1)
    assert ema.step == 2 and images.shape == (4, 8, 8, 1)
    assert not (tmp_path / "elsewhere").exists()


def test_gradient_norm_is_optax_global_norm():
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": {"x": -rng.normal(size=5).astype(np.float32)}}
    np.testing.assert_allclose(jax.jit(gradient_norm)(grads), optax.global_norm(grads), rtol=1e-6)
    grads["b"]["x"][1] = np.nan
    assert np.isnan(gradient_norm(grads))


@pytest.mark.parametrize("scalar", [2.5, np.inf, -np.inf, np.nan])
def test_after_keeps_the_values_unless_the_scalar_is_not_finite(scalar):
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": {"x": rng.normal(size=5).astype(np.float32)}}
    tied = jax.jit(after)(tree, jnp.float32(scalar))
    if np.isfinite(scalar):
        jax.tree.map(np.testing.assert_array_equal, tied, tree)
    else:
        assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(tied))


@pytest.mark.parametrize("bad", [None, "params", "ema", "moment"])
def test_state_is_finite_looks_at_every_floating_point_leaf(bad):
    tx = optax.adamw(1e-3)
    state = train_state.init_train_state({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, tx)
    if bad == "params":
        state = state.replace(params={**state.params, "b": state.params["b"].at[1].set(jnp.inf)})
    elif bad == "ema":
        state = state.replace(ema_params={**state.ema_params, "w": state.ema_params["w"].at[0, 2].set(jnp.nan)})
    elif bad == "moment":
        adam = state.opt_state[0]
        state = state.replace(opt_state=(adam._replace(nu={**adam.nu, "w": adam.nu["w"] - jnp.inf}),
                                         *state.opt_state[1:]))
    assert bool(jax.jit(train_state.is_finite)(state)) == (bad is None)


def _copied_state_matrices(hlo: str) -> list[str]:
    """The floating-point matrices among a step's inputs that compiled HLO text copies: entry
    parameters, and the state that a ``steps_per_call`` loop carries (get-tuple-element)."""
    entry = hlo[hlo.index("\nENTRY"):]
    matrix = r"(?:bf|f)\d+\[\d+,[\d,]+\]\S*"  # floating point, two or more dimensions
    parameters = set(re.findall(rf"%(\S+) = {matrix} parameter\(\d+\)", entry))
    copied = re.findall(rf"= {matrix} copy\(%([^,)\s]+)\)", hlo)
    return [name for name in copied if name in parameters or name.startswith("get-tuple-element")]


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_the_train_call_updates_the_donated_state_in_place(data_dir, steps_per_call):
    # Without ``train_step.after``'s tie, XLA copies every kernel that the backward pass reads before
    # the update overwrites its buffer (this model: 13 per call, with one step or two). Vectors and
    # scalars that only the reported loss or the step counter read may still be copied: they cost
    # nothing.
    config = tl.tiny_config(data_dir, steps_per_call=steps_per_call)
    info = data.dataset_info(config.data)
    model = model_builder.ModelBuilder(config, info)
    tx = train_state.create_optimizer(config.optim)
    mesh = sharding.create_mesh(config.mesh)
    abstract_state = jax.eval_shape(lambda: train_state.init_train_state(model.init_params(), tx))
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
    call = train_step.jit_train_call(config, model, diffusion.create_objective(config.diffusion), tx,
                                     routing.parse_routes(config.routes), mesh, state_sharding)
    lead = (steps_per_call,) if steps_per_call > 1 else ()
    batches = {"image": jax.ShapeDtypeStruct((*lead, 16, 8, 8, 1), jnp.float32),
               "label": jax.ShapeDtypeStruct((*lead, 16), jnp.int32)}
    metrics = jax.eval_shape(train_step.metrics_type(config).empty)
    hlo = call.lower(abstract_state, batches, metrics).compile().as_text()
    assert _copied_state_matrices(hlo) == []


def test_the_ddpm_objective_trains_and_samples_through_the_trainer(data_dir, tmp_path):
    # DDPM's learned variance doubles the model's output channels (the objective says so), and
    # its loss, ancestral sampler and grids run through the ordinary loop.
    config = tl.tiny_config(data_dir, **{"sample.every": 8, "sample.num_steps": 4, "sample.per_class": 1})
    config.diffusion = diffusion.default_config("ddpm")
    workdir = str(tmp_path / "ddpm")
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == 8 and np.isfinite(result["loss"])
    kernel = tl.load_state(workdir, 8)["params"]["final_layer"]["proj"]["kernel"]
    assert kernel.shape[-1] == 2 * 2 * 2 * 1  # patch 2 x 2, epsilon and variance of 1 channel
    assert (tmp_path / "ddpm" / "samples" / "step_0000008.png").exists()
