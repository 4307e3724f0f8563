"""The one evaluation path: checkpoint -> sampler -> (VAE decode) -> features -> statistics -> metrics.

Used by the evaluation binary (``evaluate_checkpoint``), by the trainer (``TrainingEvaluator``:
every ``config.eval.every`` steps, and the end-of-run report) and by the digits report. Samples
come from ``sampler.Sampler`` (sample ``i``'s noise from ``(seed, i)``); features and streaming
statistics from ``metrics.evaluator.run``, with the extractor the dataset calls for (the FID
Inception for images, the digits classifier for the digits, fitted once per process). Progress
is saved under ``<workdir>/eval/<step>/<settings>/progress.npz`` so that an interrupted
evaluation resumes; metrics go to ``metrics.json`` there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from tread_jax import data, paths, runtime, sharding
from tread_jax.metrics import evaluator, reference_stats
from tread_jax.model_builder import EmaWeights, ModelBuilder, restore_ema
from tread_jax.sampler import Sampler


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is sampled and how; all but the batch size enter the progress fingerprint."""

    num_samples: int
    num_steps: int
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    guidance_method: str = "cfg"  # sampler.GUIDANCE_METHODS
    guidance_sparsity: tuple[float, float] = (0.75, 0.0)  # sparse guidance: (weak, strong) routed fractions
    sampler: str | None = None  # None: the config's
    seed: int = 0
    per_device_batch: int = 32

    def tag(self) -> str:
        """Directory name for these settings: results of different settings never mix."""
        parts = [f"n{self.num_samples}", f"steps{self.num_steps}", f"cfg{self.guidance_scale:g}"]
        if self.guidance_interval:
            parts.append(f"interval{self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}")
        if self.guidance_method == "sparse":
            parts.append(f"sparse{self.guidance_sparsity[0]:g}-{self.guidance_sparsity[1]:g}")
        elif self.guidance_method != "cfg":
            parts.append(self.guidance_method)
        if self.sampler:
            parts.append(self.sampler)
        return "_".join([*parts, f"seed{self.seed}"])


def settings_from_config(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> EvalSettings:
    """``config.eval`` values (with defaults) replaced by the non-None ``overrides``.

    Default sample count: ``eval.num_samples``, else ``eval.samples_per_class`` per class, else
    50K (FID-50K).
    """
    ev = config.get("eval", ml_collections.ConfigDict())
    values = dict(
        num_samples=ev.get("num_samples", None) or ev.get("samples_per_class", 0) * num_classes or 50_000,
        num_steps=ev.get("num_steps", 40),
        guidance_scale=float(ev.get("guidance", 1.0)),
        guidance_interval=tuple(ev.get("guidance_interval", None) or ()) or None,
        guidance_method=ev.get("guidance_method", "cfg"),
        guidance_sparsity=tuple(ev.get("guidance_sparsity", (0.75, 0.0))),
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
    sparsity = tuple(float(v) for v in values["guidance_sparsity"])
    if len(sparsity) != 2:
        raise ValueError(f"guidance_sparsity needs two numbers weak,strong; got {sparsity}")
    values["guidance_sparsity"] = sparsity
    settings = EvalSettings(**values)
    if settings.num_samples < 1 or settings.per_device_batch < 1:
        raise ValueError(f"num_samples and per_device_batch must be positive: {settings}")
    return settings


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """``i % num_classes`` for i < num_samples, shuffled with ``seed``: every class equally often."""
    labels = np.arange(num_samples, dtype=np.int32) % num_classes
    return labels[np.random.default_rng(seed).permutation(num_samples)]


def create_extractor(config: ml_collections.ConfigDict, workdir: str, *, reference: str | None,
                     mesh: jax.sharding.Mesh, per_device_batch: int, pr_samples: int = evaluator.DEFAULT_PR_SAMPLES,
                     inception_weights: str | None = None, preprocessing: str = "adm") -> evaluator.FeatureExtractor:
    """The digits judge for the digits dataset, the FID Inception (with ``reference``) otherwise.

    Reference statistics computed from images are cached under ``<workdir>/eval/reference_cache``.
    """
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
            reference, model, mesh=mesh, global_batch_size=per_device_batch * sharding.data_parallel_size(mesh),
            pr_samples=pr_samples, cache_dir=os.path.join(paths.absolute(workdir), "eval", "reference_cache"))
    return evaluator.InceptionExtractor(model, reference=stats, reference_pool=features, pr_samples=pr_samples)


class _SampleWriter:
    """Samples as uint8 into ``samples.npy`` (a memmap, so a resumed run continues it), packed
    into ADM's ``samples.npz`` (``arr_0`` images, ``arr_1`` labels) at the end. Process 0 writes;
    the other processes only take part in the gather. A memory map needs a local file: for a
    ``gs://`` directory the samples are kept on this machine's disk and the finished npz uploaded."""

    def __init__(self, directory: str, num_samples: int, image_shape: tuple[int, int, int], labels: np.ndarray):
        local = directory
        if paths.is_remote(directory):
            local = os.path.join(tempfile.gettempdir(), "tread_jax_samples", hashlib.sha256(directory.encode()).hexdigest()[:16])
            os.makedirs(local, exist_ok=True)
        self.npy = os.path.join(local, "samples.npy")
        self.local_npz = os.path.join(local, "samples.npz")
        self.npz = os.path.join(directory, "samples.npz")
        self.labels = labels
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
            with zipfile.ZipFile(self.local_npz, "w", allowZip64=True) as zf:
                zf.write(self.npy, "arr_0.npy")
                with zf.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, self.labels)
            os.remove(self.npy)
            if self.local_npz != self.npz:
                epath.Path(self.local_npz).copy(self.npz, overwrite=True)
                os.remove(self.local_npz)
        return self.npz


class Evaluation:
    """Samples from given EMA parameters with ``settings`` and scores them with ``extractor``;
    built once, called per checkpoint. ``param_shardings`` are the EMA parameters' (the
    trainer's, or those ``restore_ema`` gives)."""

    def __init__(self, config: ml_collections.ConfigDict, settings: EvalSettings, *, model: ModelBuilder,
                 mesh: jax.sharding.Mesh, param_shardings: Any, extractor: evaluator.FeatureExtractor,
                 name: str = "eval"):
        self.settings = settings
        self.extractor = extractor
        self.mesh = mesh
        self.global_batch_size = settings.per_device_batch * sharding.data_parallel_size(mesh)
        self.labels = balanced_labels(settings.num_samples, model.num_classes, settings.seed)
        self.sampler = Sampler(config, model, mesh, param_shardings, num_steps=settings.num_steps,
                               guidance_scale=settings.guidance_scale,
                               guidance_interval=settings.guidance_interval, sampler=settings.sampler,
                               guidance_method=settings.guidance_method,
                               guidance_sparsity=settings.guidance_sparsity, name=name)

    def score(self, params: Any, labels: np.ndarray, seed: int, *, description: str,
              progress_path: str | None = None, fingerprint: dict[str, Any] | None = None,
              max_batches: int | None = None, writer: _SampleWriter | None = None
              ) -> tuple[dict[str, Any], int]:
        """``(metrics, samples done)`` of samples ``i`` of class ``labels[i]`` drawn with ``seed``."""
        padded = np.concatenate([labels, np.zeros(self.global_batch_size, np.int32)])
        accs, done = evaluator.run(
            lambda indices: self.sampler.images(params, padded[indices], indices, seed), self.extractor,
            num_samples=len(labels), global_batch_size=self.global_batch_size, mesh=self.mesh, labels=labels,
            progress_path=progress_path, fingerprint=fingerprint, max_batches=max_batches,
            on_batch=writer.write if writer else None, on_save=writer.flush if writer else None,
            description=description,
        )
        return (self.extractor.metrics(accs) if done == len(labels) else {}), done

    def __call__(self, params: Any, step: int, *, workdir: str, output: str | None = None,
                 save_npz: bool = False, max_batches: int | None = None) -> dict[str, Any]:
        """Evaluates ``params`` (EMA) of training step ``step``; progress and results under
        ``<workdir>/eval/<step>/<settings>``, the metrics JSON there (or at ``output``).

        Returns the metrics (with ``complete`` False when ``max_batches`` stopped it early).
        """
        s = self.settings
        output_dir = os.path.join(paths.absolute(workdir), "eval", str(step), s.tag())
        epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
        writer = _SampleWriter(output_dir, s.num_samples, self.sampler.pixel_shape, self.labels) if save_npz else None
        started = time.perf_counter()
        metrics, done = self.score(
            params, self.labels, s.seed, description=f"eval step {step}",
            progress_path=os.path.join(output_dir, "progress.npz"),
            # The batch size is left out: sample i does not depend on it, so a resume may change it.
            fingerprint={"step": int(step), "save_npz": bool(save_npz),
                         **{k: v for k, v in dataclasses.asdict(s).items() if k != "per_device_batch"}},
            max_batches=max_batches, writer=writer)
        result: dict[str, Any] = {**dataclasses.asdict(s), "step": int(step), "samples_done": done,
                                  "complete": done == s.num_samples, "extractor": self.extractor.name, **metrics}
        if writer is not None and done == s.num_samples:
            result["samples_npz"] = writer.finish()
        result["seconds_this_run"] = time.perf_counter() - started
        if jax.process_index() == 0:
            path = output or os.path.join(output_dir, "metrics.json")
            paths.write_text(path, json.dumps(result, indent=2))
            result["metrics_json"] = path
        return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, settings: EvalSettings, *,
                        step: int | None = None, reference: str | None = None, output: str | None = None,
                        save_npz: bool = False, max_batches: int | None = None,
                        pr_samples: int = evaluator.DEFAULT_PR_SAMPLES, inception_weights: str | None = None,
                        preprocessing: str = "adm", weights: EmaWeights | None = None) -> dict[str, Any]:
    """The binary without flags: restore, sample, score, write the metrics JSON; returns the metrics.

    Needs only the workdir (its checkpoint and recorded dataset metadata) and the config.
    ``weights`` given (an imported model, ``model_builder.import_ema``): those are scored instead
    of a checkpoint of the workdir, which then only receives the results.
    """
    ema = weights if weights is not None else restore_ema(config, workdir, step)
    extractor = create_extractor(
        config, workdir, reference=reference, mesh=ema.mesh, per_device_batch=settings.per_device_batch,
        pr_samples=pr_samples, inception_weights=inception_weights, preprocessing=preprocessing)
    evaluation = Evaluation(config, settings, model=ema.model, mesh=ema.mesh, param_shardings=ema.param_shardings,
                            extractor=extractor)
    result = evaluation(ema.params, ema.step, workdir=workdir, output=output, save_npz=save_npz,
                        max_batches=max_batches)
    if reference:
        result["reference"] = os.path.abspath(reference)
    return result


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation result as ``eval/<name>`` scalars for the training log: the
    metrics and the time taken, without the settings and bookkeeping fields."""
    skip = {field.name for field in dataclasses.fields(EvalSettings)} | {"step", "samples_done"}
    return {f"eval/{k}": float(v) for k, v in result.items()
            if k not in skip and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


class TrainingEvaluator:
    """What the trainer evaluates from its EMA parameters: every ``config.eval.every`` steps
    (``config.eval`` settings, scalars for the log) and, with ``config.eval.report``, the
    end-of-run report. The extractor is built once (the digits classifier is fitted once)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, model: ModelBuilder,
                 mesh: jax.sharding.Mesh, param_shardings: Any):
        self.config = config
        self.workdir = workdir
        self.every = config.eval.get("every", 0)
        self.report = config.eval.get("report", "")
        if self.report not in ("", "digits"):
            raise ValueError(f"unknown eval.report {self.report!r}; known: 'digits'")
        self._model, self._mesh, self._param_shardings = model, mesh, param_shardings
        self._settings = settings_from_config(config, model.num_classes)
        self._shared: Evaluation | None = None

    def _evaluation(self) -> Evaluation:
        """The in-loop evaluation and the report share one sampler and one extractor."""
        if self._shared is None:
            settings = self._settings
            extractor = create_extractor(
                self.config, self.workdir, reference=self.config.eval.get("reference", None) or None,
                mesh=self._mesh, per_device_batch=settings.per_device_batch)
            self._shared = Evaluation(self.config, settings, model=self._model, mesh=self._mesh,
                                      param_shardings=self._param_shardings, extractor=extractor)
        return self._shared

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def periodic(self, ema_params: Any, step: int) -> dict[str, float]:
        """Evaluates with ``config.eval`` settings; returns the ``eval/<metric>`` scalars."""
        return scalar_metrics(self._evaluation()(ema_params, step, workdir=self.workdir))

    def final_report(self, ema_params: Any) -> dict[str, Any] | None:
        """The configured end-of-run report (None when none is configured)."""
        if not self.report:
            return None
        return digits_report(self.config, self.workdir, ema_params, self._evaluation())


def digits_report(config: ml_collections.ConfigDict, workdir: str, ema_params: Any,
                  evaluation: Evaluation) -> dict[str, Any]:
    """Class-conditional samples scored by the digits classifier, written to ``quality_report.json``.

    Keys: ``accuracy``, ``fd_generated_vs_test``, ``fd_train_vs_test`` (the real-data floor),
    ``classifier_test_accuracy``, ``fd_ratio_to_floor``, ``fd_ratio_per_draw``, ``num_samples``,
    ``sampling_and_scoring_s``.
    """
    extractor = evaluation.extractor
    if not isinstance(extractor, evaluator.DigitsExtractor):
        raise ValueError(f"eval.report 'digits' needs the digits dataset, not {config.data.name!r}")
    started = time.perf_counter()
    # By default one sample per training image, with its label: a Frechet distance estimated
    # from N samples is biased upwards by a term that shrinks with N (two random halves of the
    # real training digits are 1.5x the floor apart), so the generated side gets the same N
    # and class mix as the real training side of the floor it is compared with.
    num_samples = config.eval.get("num_samples", 0)
    num_classes = evaluation.sampler.model.num_classes
    labels = (np.arange(num_samples) % num_classes if num_samples else extractor.train_labels).astype(np.int32)
    # Each draw is a fresh set of N samples; the report averages the draws, which keeps the
    # expected distance of N samples but not the luck of one set (it moves by about 0.05x the
    # floor between draws of the digits model). Seeds apart from the grids' (config.seed) so
    # the report does not score the images shown in them; samples are clipped to the data
    # range by the sampler, as saved images are.
    draws = config.eval.get("draws", 1)
    results = [evaluation.score(ema_params, labels, config.seed + 1 + draw,
                                description=f"digits report, draw {draw + 1}/{draws}")[0]
               for draw in range(draws)]
    keys = ("accuracy", "fd_generated_vs_test", "fd_train_vs_test", "classifier_test_accuracy")
    report: dict[str, Any] = {key: float(np.mean([r[key] for r in results])) for key in keys}
    # The bar: generated-vs-test distance within 1.5x the real train-vs-test floor.
    report["fd_ratio_to_floor"] = report["fd_generated_vs_test"] / report["fd_train_vs_test"]
    report["fd_ratio_per_draw"] = [r["fd_generated_vs_test"] / r["fd_train_vs_test"] for r in results]
    report["num_samples"] = len(labels)
    report["sampling_and_scoring_s"] = time.perf_counter() - started
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "quality_report.json"), json.dumps(report, indent=2))
    runtime.say("quality report: " + json.dumps(report))
    return report
