"""Evaluation binary: sample a checkpoint's EMA weights and score the samples.

    python -m tread_jax.evaluate --config=configs/imagenet256.py:dit_xl2_tread \\
        --workdir=/ckpt/dit_xl2_tread --num_samples=50000 --guidance_scale=1.0 \\
        --reference=/data/VIRTUAL_imagenet256_labeled.npz --save_npz

Restores only the EMA parameters of ``--step`` (default: the latest) from the training
workdir, sharded as in training, and samples ``--num_samples`` images with balanced class
labels (label ``i % num_classes`` for sample ``i``, the list shuffled with ``--seed``), the
noise of sample ``i`` drawn from ``fold_in(key(seed), i)``. Batches are split over every
device of every host; latent samples are decoded by the config's VAE on device; features and
streaming statistics come from ``metrics.evaluator.run`` (Inception for image datasets, the
digits classifier for the digits). Progress is saved under
``<workdir>/eval/<step>/<settings>/progress.npz`` so that an interrupted evaluation resumes;
metrics go to ``metrics.json`` there (or ``--output``), ``--save_npz`` adds an ADM-format
``samples.npz`` (uint8 ``arr_0``, labels ``arr_1``) for ADM's evaluator suite.

``SampleEvaluator`` is the same evaluation as a library, used by the binary and by the
training loop (``config.eval.every``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from tread_jax import cli, data, diffusion, sharding, train
from tread_jax.metrics import evaluator, reference_stats

@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is sampled and how; all but the batch size enter the progress fingerprint."""

    num_samples: int
    num_steps: int
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    sampler: str | None = None  # None: the config's
    seed: int = 0
    per_device_batch: int = 32

    def tag(self) -> str:
        """Directory name for these settings: results of different settings never mix."""
        parts = [f"n{self.num_samples}", f"steps{self.num_steps}", f"cfg{self.guidance_scale:g}"]
        if self.guidance_interval:
            parts.append(f"interval{self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}")
        if self.sampler:
            parts.append(self.sampler)
        return "_".join([*parts, f"seed{self.seed}"])


def settings_from_config(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> EvalSettings:
    """``config.eval`` values (with defaults) replaced by the non-None ``overrides``.

    Default sample count: ``eval.num_samples``, else ``eval.samples_per_class`` per class (the
    digits report's setting), else 50K (FID-50K).
    """
    ev = config.get("eval", ml_collections.ConfigDict())
    values = dict(
        num_samples=ev.get("num_samples", None) or ev.get("samples_per_class", 0) * num_classes or 50_000,
        num_steps=ev.get("num_steps", 40),
        guidance_scale=float(ev.get("guidance", 1.0)),
        guidance_interval=tuple(ev.get("guidance_interval", None) or ()) or None,
        sampler=None,
        seed=config.seed,
        per_device_batch=ev.get("per_device_batch", 32),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["guidance_interval"] is not None:
        interval = tuple(float(v) for v in values["guidance_interval"])
        if len(interval) != 2:
            raise ValueError(f"guidance_interval needs two numbers lo,hi; got {interval}")
        values["guidance_interval"] = interval
    settings = EvalSettings(**values)
    if settings.num_samples < 1 or settings.per_device_batch < 1:
        raise ValueError(f"num_samples and per_device_batch must be positive: {settings}")
    return settings


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """``i % num_classes`` for i < num_samples, shuffled with ``seed``: every class equally often."""
    labels = np.arange(num_samples, dtype=np.int32) % num_classes
    return labels[np.random.default_rng(seed).permutation(num_samples)]


def _objective(config: ml_collections.ConfigDict, sampler: str | None) -> diffusion.Objective:
    settings = config.diffusion.to_dict()
    if sampler is not None:
        if "sampler" not in diffusion.default_config(settings["name"]):
            raise ValueError(f"the {settings['name']} objective has one sampler; --sampler applies to flow")
        settings["sampler"] = sampler
    return diffusion.create_objective(ml_collections.ConfigDict(settings))


def create_extractor(config: ml_collections.ConfigDict, *, reference: str | None, mesh: jax.sharding.Mesh,
                     global_batch_size: int, pr_samples: int = evaluator.DEFAULT_PR_SAMPLES,
                     inception_weights: str | None = None, preprocessing: str = "adm",
                     cache_dir: str = ".") -> evaluator.FeatureExtractor:
    """The digits judge for the digits dataset, the FID Inception (with ``reference``) otherwise."""
    if config.data.name == "digits":
        from tread_jax.metrics import digits  # pylint: disable=g-import-not-at-top

        train_split = data.load_split_arrays(config.data, "train")
        test_split = data.load_split_arrays(config.data, "test")
        classifier = digits.DigitsClassifier(*train_split, seed=config.seed)
        return evaluator.DigitsExtractor(classifier, train_split, test_split)
    from tread_jax.metrics import inception  # pylint: disable=g-import-not-at-top

    model = inception.load_inception(inception_weights, preprocessing=preprocessing)
    stats = features = None
    if reference:
        stats, features = reference_stats.load_reference(
            reference, model, mesh=mesh, global_batch_size=global_batch_size, pr_samples=pr_samples,
            cache_dir=cache_dir)
    return evaluator.InceptionExtractor(model, reference=stats, reference_pool=features, pr_samples=pr_samples)


class _SampleWriter:
    """Samples as uint8 into ``samples.npy`` (a memmap, so a resumed run continues it), packed
    into ADM's ``samples.npz`` (``arr_0`` images, ``arr_1`` labels) at the end. Process 0 writes;
    the other processes only take part in the gather."""

    def __init__(self, directory: str, num_samples: int, image_shape: tuple[int, int, int], labels: np.ndarray):
        self.npy = os.path.join(directory, "samples.npy")
        self.npz = os.path.join(directory, "samples.npz")
        self.labels = labels
        self.num_samples = num_samples
        self._array = None
        if jax.process_index() == 0:
            shape = (num_samples, image_shape[0], image_shape[1], 3)
            if os.path.exists(self.npy):
                self._array = np.load(self.npy, mmap_mode="r+")
            else:
                self._array = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8, shape=shape)
        self._to_uint8 = jax.jit(evaluator.to_uint8)

    def write(self, images: jax.Array, indices: np.ndarray, count: int) -> None:
        pixels = np.asarray(multihost_utils.process_allgather(self._to_uint8(images), tiled=True))
        if self._array is not None:
            self._array[indices[:count]] = pixels[:count]

    def flush(self) -> None:
        if self._array is not None:
            self._array.flush()

    def finish(self) -> str:
        """Packs the finished samples into the ADM npz (uncompressed, as np.savez) and removes the .npy."""
        if self._array is not None:
            self.flush()
            self._array = None
            with zipfile.ZipFile(self.npz, "w", allowZip64=True) as zf:
                zf.write(self.npy, "arr_0.npy")
                with zf.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, self.labels)
            os.remove(self.npy)
        return self.npz


class SampleEvaluator:
    """Samples from given EMA parameters and scores them; built once, called per checkpoint.

    ``parts``/``objective``/``mesh``/``param_shardings`` are the trainer's (``train.ModelParts``,
    the objective, the mesh and the shardings of the EMA parameters), so the training loop can
    call it with ``state.ema_params`` directly.
    """

    def __init__(self, config: ml_collections.ConfigDict, settings: EvalSettings, *, parts: Any,
                 mesh: jax.sharding.Mesh, param_shardings: Any, extractor: evaluator.FeatureExtractor):
        self.settings = settings
        self.extractor = extractor
        self.mesh = mesh
        self.num_classes = parts.num_classes
        self.global_batch_size = settings.per_device_batch * sharding.data_parallel_size(mesh)
        self.labels = balanced_labels(settings.num_samples, parts.num_classes, settings.seed)
        objective = _objective(config, settings.sampler)
        guidance = None
        if settings.guidance_scale != 1.0 or settings.guidance_interval:
            guidance = diffusion.Guidance(scale=settings.guidance_scale, interval=settings.guidance_interval,
                                          null_class=parts.num_classes)
        decode, decoder_params = reference_stats.pixel_decoder(config.data)
        replicated = sharding.replicated(mesh)
        self._decoder_params = jax.device_put(decoder_params, replicated)
        base_key = jax.random.key(settings.seed)
        num_steps = settings.num_steps

        def generate(params: Any, rest: Any, decoder_params: Any, labels: jax.Array, indices: jax.Array) -> jax.Array:
            model = parts.merge(params, rest)
            # Noise of sample i from (seed, i) alone: the same images for any batch size, device
            # count or resume point.
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
            noise = jax.vmap(lambda k: jax.random.normal(k, parts.image_shape))(keys)
            x = objective.sample(model, noise, labels, num_steps=num_steps, guidance=guidance)
            if decode is not None:
                x = decode(decoder_params, x)
            return jnp.clip(x, -1.0, 1.0)

        batch = sharding.batch_sharding(mesh)
        self._generate = jax.jit(generate, in_shardings=(param_shardings, replicated, replicated, batch, batch),
                                 out_shardings=batch)
        info_shape = parts.image_shape
        self.pixel_shape = info_shape if decode is None else (info_shape[0] * 8, info_shape[1] * 8, 3)

    def __call__(self, params: Any, rest: Any, step: int, *, output_dir: str, save_npz: bool = False,
                 max_batches: int | None = None) -> dict[str, Any]:
        """Evaluates ``params`` (EMA) of training step ``step``; progress and results in ``output_dir``.

        Returns the metrics (with ``complete`` False when ``max_batches`` stopped it early).
        """
        s = self.settings
        os.makedirs(output_dir, exist_ok=True)
        padded = np.concatenate([self.labels, np.zeros(self.global_batch_size, np.int32)])

        def images_fn(indices: np.ndarray) -> jax.Array:
            return self._generate(params, rest, self._decoder_params,
                                  evaluator.global_array(padded[indices], self.mesh),
                                  evaluator.global_array(indices.astype(np.int32), self.mesh))

        writer = _SampleWriter(output_dir, s.num_samples, self.pixel_shape, self.labels) if save_npz else None
        started = time.perf_counter()
        accs, done = evaluator.run(
            images_fn, self.extractor, num_samples=s.num_samples, global_batch_size=self.global_batch_size,
            mesh=self.mesh, labels=self.labels, progress_path=os.path.join(output_dir, "progress.npz"),
            # The batch size is left out: sample i does not depend on it, so a resume may change it.
            fingerprint={"step": int(step), "save_npz": bool(save_npz),
                         **{k: v for k, v in dataclasses.asdict(s).items() if k != "per_device_batch"}},
            max_batches=max_batches, on_batch=writer.write if writer else None,
            on_save=writer.flush if writer else None, description=f"eval step {step}",
        )
        result: dict[str, Any] = {**dataclasses.asdict(s), "step": int(step), "samples_done": done,
                                  "complete": done == s.num_samples, "extractor": self.extractor.name}
        if done == s.num_samples:
            result.update(self.extractor.metrics(accs))
            if writer is not None:
                result["samples_npz"] = writer.finish()
        result["seconds_this_run"] = time.perf_counter() - started
        return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, settings: EvalSettings, *,
                        step: int | None = None, reference: str | None = None, output: str | None = None,
                        save_npz: bool = False, max_batches: int | None = None,
                        pr_samples: int = evaluator.DEFAULT_PR_SAMPLES, inception_weights: str | None = None,
                        preprocessing: str = "adm") -> dict[str, Any]:
    """The binary without flags: restore, sample, score, write the metrics JSON; returns the metrics."""
    ema = train.restore_ema(config, workdir, step)
    mesh, step = ema.mesh, ema.step
    eval_dir = os.path.join(os.path.abspath(workdir), "eval")
    extractor = create_extractor(
        config, reference=reference, mesh=mesh, global_batch_size=settings.per_device_batch * jax.device_count(),
        pr_samples=pr_samples, inception_weights=inception_weights, preprocessing=preprocessing,
        cache_dir=os.path.join(eval_dir, "reference_cache"))
    evaluate = SampleEvaluator(config, settings, parts=ema.parts, mesh=mesh, param_shardings=ema.param_shardings,
                               extractor=extractor)
    output_dir = os.path.join(eval_dir, str(step), settings.tag())
    result = evaluate(ema.params, ema.rest, step, output_dir=output_dir, save_npz=save_npz, max_batches=max_batches)
    if reference:
        result["reference"] = os.path.abspath(reference)
    if jax.process_index() == 0:
        path = output or os.path.join(output_dir, "metrics.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        result["metrics_json"] = path
    return result


def make_in_loop_evaluator(config: ml_collections.ConfigDict, workdir: str, *, parts: Any, mesh: jax.sharding.Mesh,
                           param_shardings: Any) -> Callable[[Any, Any, int], dict[str, Any]] | None:
    """For ``train_and_evaluate``: ``evaluate(ema_params, rest, step) -> metrics`` every
    ``config.eval.every`` steps with ``config.eval`` settings (None when ``every`` is 0).

    Results go to ``<workdir>/eval/<step>/<settings>/metrics.json`` as with the binary.
    """
    every = config.eval.get("every", 0)
    if not every:
        return None
    settings = settings_from_config(config, parts.num_classes)
    eval_dir = os.path.join(os.path.abspath(workdir), "eval")
    extractor = create_extractor(
        config, reference=config.eval.get("reference", None) or None, mesh=mesh,
        global_batch_size=settings.per_device_batch * sharding.data_parallel_size(mesh),
        cache_dir=os.path.join(eval_dir, "reference_cache"))
    evaluate = SampleEvaluator(config, settings, parts=parts, mesh=mesh, param_shardings=param_shardings,
                               extractor=extractor)

    def run(ema_params: Any, rest: Any, step: int) -> dict[str, Any]:
        output_dir = os.path.join(eval_dir, str(step), settings.tag())
        result = evaluate(ema_params, rest, step, output_dir=output_dir)
        if jax.process_index() == 0:
            with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return result

    return run


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation result as ``eval/<name>`` scalars for the training log: the
    metrics and the time taken, without the settings and bookkeeping fields."""
    skip = {field.name for field in dataclasses.fields(EvalSettings)} | {"step", "samples_done"}
    return {f"eval/{k}": float(v) for k, v in result.items()
            if k not in skip and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _define_flags() -> None:
    """The binary's flags, defined only when it runs: the trainer imports this module, and flags
    defined at import would collide with those of other binaries in the same process."""
    cli.define_config_flag("The training run's config file, FILE[:VARIANT].")
    cli.define_workdir_flag("The training run's workdir: checkpoints in, evaluation results out.")
    cli.define_multihost_flags()
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_integer("num_samples", None, "Samples to generate (default: config.eval).")
    flags.DEFINE_string("sampler", None, "Sampler of the objective (flow: euler or heun).")
    flags.DEFINE_integer("num_steps", None, "Sampling steps (default: config.eval.num_steps).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_list("guidance_interval", None, "lo,hi: guide only at noise levels in [lo, hi].")
    flags.DEFINE_string("reference", None, "ADM reference .npz (images and/or mu, sigma).")
    flags.DEFINE_string("output", None, "Metrics JSON (default: <workdir>/eval/<step>/<settings>/metrics.json).")
    flags.DEFINE_bool("save_npz", False, "Also write the samples as an ADM-format .npz.")
    flags.DEFINE_integer("per_device_batch", None, "Samples per device per batch.")
    flags.DEFINE_integer("seed", None, "Seed of the labels and noise (default: config.seed).")
    flags.DEFINE_integer("max_batches", None, "Stop after this many batches (progress is kept).")
    flags.DEFINE_integer("pr_samples", evaluator.DEFAULT_PR_SAMPLES, "Samples kept for precision/recall.")
    flags.DEFINE_string("inception_weights", None, "pytorch-fid .pth (default: cache/download).")
    flags.DEFINE_enum("inception_preprocessing", "adm", ["adm", "pytorch_fid"],
                      "Inception input convention; 'adm' matches ADM's reference statistics.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cli.initialize_distributed()
    f = flags.FLAGS
    config, workdir = f.config, f.workdir
    with cli.user_errors():
        settings = settings_from_config(
            config, data.dataset_info(config.data).num_classes, num_samples=f.num_samples, num_steps=f.num_steps,
            guidance_scale=f.guidance_scale, guidance_interval=f.guidance_interval, sampler=f.sampler, seed=f.seed,
            per_device_batch=f.per_device_batch)
        if f.reference and not os.path.isfile(f.reference):
            raise FileNotFoundError(f"reference batch not found: {f.reference}")
        result = evaluate_checkpoint(
            config, workdir, settings, step=f.step, reference=f.reference, output=f.output,
            save_npz=f.save_npz, max_batches=f.max_batches, pr_samples=f.pr_samples,
            inception_weights=f.inception_weights, preprocessing=f.inception_preprocessing)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    _define_flags()
    cli.run(main, "tread_jax.evaluate")
