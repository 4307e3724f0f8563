"""The reusable evaluation loop: images -> features on device -> streaming statistics -> metrics.

One ``run`` loop serves the evaluation binary (samples of a checkpoint), in-loop evaluation
during training, and reference statistics of a dataset. It walks a fixed list of sample
indices in global batches; a caller-supplied ``images_fn(indices)`` produces each batch as a
global array split over the mesh (sampling from a model, or reading a dataset), a
``FeatureExtractor`` maps it to features on device, and every process folds only the rows its
own devices hold into streaming accumulators, which are merged across processes when progress
is saved and at the end. Images never leave the devices (unless samples are being saved),
and nothing grows with the number of samples except a bounded feature sample for
precision/recall.

Extractors: ``InceptionExtractor`` (FID/sFID/IS/precision/recall on the FID Inception) for
image datasets; ``DigitsExtractor`` (accuracy and Frechet distance in the feature space of a
classifier fitted on the real digits) for the embedded 8x8 digits, where Inception features
mean nothing.

Resuming: ``run`` with a ``progress_path`` saves the accumulators' state and the next sample
index there every ``save_every`` batches (process 0 writes; the file is replaced atomically),
together with a fingerprint of the settings; a later ``run`` with the same fingerprint
continues from it. Sample ``i``'s content depends on ``i`` alone (its noise is drawn from the
seed folded with ``i``), so a resumed run, or one on another number of devices, sees the same
images.
"""

from __future__ import annotations

import abc
import functools
import io
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from scipy import special

from tread_jax import paths, pixels, runtime, sharding
from tread_jax.metrics import fid

DEFAULT_PR_SAMPLES = 10_000  # ADM's reference batches hold 10K images; 10K x 2048 f32 = 80 MB
IS_SPLITS = 10
PR_NEIGHBOURS = 3


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] images -> uint8 RGB as saved samples are (``pixels.to_uint8``).

    Grayscale is repeated to three channels: ADM batches and the Inception take RGB. Scoring the
    quantized images makes the binary's numbers equal those of its saved ``.npz``.
    """
    x = pixels.to_uint8(jnp.asarray(images))
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ----------------------------------------------------------------------------------------------
# Streaming accumulators: update with this process's rows, merge partial results, save state.


class Accumulator(abc.ABC):
    """A streaming statistic of per-sample outputs; ``state`` is a dict of numpy arrays."""

    @abc.abstractmethod
    def update(self, outputs: Mapping[str, np.ndarray], labels: np.ndarray,
               indices: np.ndarray) -> None:
        """Fold in rows: ``outputs[name]`` [n, ...], their class labels and sample indices [n]."""

    @abc.abstractmethod
    def merge(self, other: Accumulator) -> None:
        """Absorb another accumulator of the same kind built over disjoint samples."""

    @abc.abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """The accumulated values as arrays (for progress files and cross-host merging)."""

    @abc.abstractmethod
    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the accumulated values by a saved ``state``."""


class Moments(Accumulator):
    """Mean and covariance of one output (FID/sFID features) via ``fid.FeatureStatistics``."""

    def __init__(self, key: str, dim: int):
        self.key = key
        self.stats = fid.FeatureStatistics(dim)

    def update(self, outputs, labels, indices) -> None:
        self.stats.update(outputs[self.key])

    def merge(self, other: Accumulator) -> None:
        self.stats = self.stats.merge(other.stats)

    def state(self) -> dict[str, np.ndarray]:
        return self.stats.state()

    def load(self, state) -> None:
        self.stats = fid.FeatureStatistics.from_state(state)


class ScoreSplits(Accumulator):
    """Inception Score without keeping the logits: per split, the sample count, the sum of
    sum_y p log p and the sum of p, from which IS = exp(E_x sum_y p log p - sum_y pbar log pbar).

    Splits are ``np.array_split`` of the sample indices 0..N-1, the chunks
    ``fid.inception_score`` uses, so both give the same number.
    """

    def __init__(self, key: str, num_classes: int, num_samples: int, splits: int = IS_SPLITS):
        self.key = key
        self.num_splits = max(1, min(splits, num_samples))
        sizes = [len(c) for c in np.array_split(np.arange(num_samples), self.num_splits)]
        self._bounds = np.cumsum(sizes)
        self.count = np.zeros(self.num_splits, np.float64)
        self.neg_entropy = np.zeros(self.num_splits, np.float64)
        self.prob_sum = np.zeros((self.num_splits, num_classes), np.float64)

    def update(self, outputs, labels, indices) -> None:
        probs = special.softmax(np.asarray(outputs[self.key], np.float64), axis=1)
        split = np.searchsorted(self._bounds, indices, side="right")
        np.add.at(self.count, split, 1)
        np.add.at(self.neg_entropy, split, special.xlogy(probs, probs).sum(axis=1))
        np.add.at(self.prob_sum, split, probs)

    def merge(self, other: Accumulator) -> None:
        self.count += other.count
        self.neg_entropy += other.neg_entropy
        self.prob_sum += other.prob_sum

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count.copy(), "neg_entropy": self.neg_entropy.copy(),
                "prob_sum": self.prob_sum.copy()}

    def load(self, state) -> None:
        self.count, self.neg_entropy, self.prob_sum = (
            np.array(state[k], np.float64) for k in ("count", "neg_entropy", "prob_sum"))

    def result(self) -> tuple[float, float]:
        """(mean, std) over the splits."""
        marginal = self.prob_sum / self.count[:, None]
        kl = self.neg_entropy / self.count - special.xlogy(marginal, marginal).sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


class FeatureSample(Accumulator):
    """The outputs ``key`` of samples 0..limit-1, for precision/recall (memory: limit x dim x 4
    bytes). Sample indices carry no order bias (shuffled labels, independent noise), so the
    first ``limit`` samples are a fair subset."""

    def __init__(self, key: str, dim: int, limit: int):
        self.key = key
        self.features = np.zeros((limit, dim), np.float32)
        self.filled = np.zeros(limit, bool)

    def update(self, outputs, labels, indices) -> None:
        keep = indices < len(self.filled)
        self.features[indices[keep]] = outputs[self.key][keep]
        self.filled[indices[keep]] = True

    def merge(self, other: Accumulator) -> None:
        self.features[other.filled] = other.features[other.filled]
        self.filled |= other.filled

    def state(self) -> dict[str, np.ndarray]:
        return {"features": self.features.copy(), "filled": self.filled.copy()}

    def load(self, state) -> None:
        self.features = np.array(state["features"], np.float32)
        self.filled = np.array(state["filled"], bool)

    def values(self) -> np.ndarray:
        return self.features[self.filled]


class Accuracy(Accumulator):
    """Share of samples whose ``key`` output (a predicted class) equals their label."""

    def __init__(self, key: str):
        self.key = key
        self.correct = np.zeros((), np.float64)
        self.total = np.zeros((), np.float64)

    def update(self, outputs, labels, indices) -> None:
        self.correct += np.sum(np.asarray(outputs[self.key]) == labels)
        self.total += len(labels)

    def merge(self, other: Accumulator) -> None:
        self.correct += other.correct
        self.total += other.total

    def state(self) -> dict[str, np.ndarray]:
        return {"correct": self.correct.copy(), "total": self.total.copy()}

    def load(self, state) -> None:
        self.correct = np.array(state["correct"], np.float64)
        self.total = np.array(state["total"], np.float64)

    def result(self) -> float:
        return float(self.correct / self.total)


Accumulators = dict[str, Accumulator]


def accumulators_state(accs: Accumulators) -> dict[str, np.ndarray]:
    """Flat ``{"name/field": array}`` of all accumulators (the progress file's layout)."""
    return {f"{name}/{k}": v for name, acc in accs.items() for k, v in acc.state().items()}


def load_accumulators_state(accs: Accumulators, flat: Mapping[str, np.ndarray]) -> None:
    for name, acc in accs.items():
        prefix = f"{name}/"
        acc.load({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})


# ----------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(abc.ABC):
    """A network on pixel images [-1, 1] NHWC that runs on device, what to accumulate from its
    outputs, and how to turn the accumulators into metrics.

    ``apply(params, images) -> {name: [B, ...]}`` is pure and compiled by ``compiled_apply``
    with ``params`` replicated and the batch split over the mesh. ``host_outputs``
    post-processes this process's rows on the host (identity unless a model only exists on the
    host).
    """

    name: str
    params: Any

    @abc.abstractmethod
    def apply(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
        """Device part of the feature computation."""

    def host_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return outputs

    def compiled_apply(self, mesh: jax.sharding.Mesh, images: jax.Array, *, name: str) -> tuple[Callable, Any]:
        """``(apply compiled for images like these on mesh, params placed for it)``.

        Compiled once per mesh and batch shape and kept, so that evaluations during training do
        not compile again; with the multi-process barrier (``name``), as the trainer compiles.
        """
        key = (mesh, images.shape, images.dtype)
        if key not in self._programs:
            replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
            params = jax.device_put(self.params, replicated)
            extract = jax.jit(self.apply, in_shardings=(replicated, split), out_shardings=split)
            self._programs[key] = runtime.compile_everywhere(extract, params, images, name=name), params
        return self._programs[key]

    @functools.cached_property
    def _programs(self) -> dict[tuple, tuple[Callable, Any]]:
        return {}

    @abc.abstractmethod
    def accumulators(self, num_samples: int) -> Accumulators:
        """Fresh accumulators for a run over ``num_samples`` samples."""

    @abc.abstractmethod
    def metrics(self, accs: Accumulators) -> dict[str, Any]:
        """Final numbers from merged accumulators."""


class InceptionExtractor(FeatureExtractor):
    """FID Inception features: pool (FID, precision/recall), spatial (sFID), unbiased logits (IS).

    ``reference``: the statistics to compare with (None: only IS and the statistics themselves);
    ``reference_pool``: pool features of reference images for precision/recall (None: skipped).
    Images are quantized to uint8 first (``to_uint8``), exactly as saved samples would be.
    """

    name = "inception"

    def __init__(self, model: Any, *, reference: fid.ReferenceStatistics | None = None,
                 reference_pool: np.ndarray | None = None,
                 pr_samples: int = DEFAULT_PR_SAMPLES):
        from tread_jax.metrics import inception  # pylint: disable=g-import-not-at-top

        self._apply, self.params = inception.inception_apply_fn(model)
        self._dims = {"pool": inception.POOL_DIM,
                      "spatial": 17 * 17 * inception.SPATIAL_CHANNELS,
                      "logits_unbiased": inception.NUM_LOGITS}
        if reference is not None and reference.mu.shape != (self._dims["pool"],):
            raise ValueError(f"reference mu has shape {reference.mu.shape}, expected "
                             f"({self._dims['pool']},) Inception pool features")
        self.reference = reference
        self.reference_pool = reference_pool
        self.pr_samples = pr_samples

    def apply(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
        out = self._apply(params, to_uint8(images))
        return {k: out[k] for k in ("pool", "spatial", "logits_unbiased")}

    def accumulators(self, num_samples: int) -> Accumulators:
        return {
            "pool": Moments("pool", self._dims["pool"]),
            "spatial": Moments("spatial", self._dims["spatial"]),
            "inception_score": ScoreSplits("logits_unbiased", self._dims["logits_unbiased"],
                                           num_samples),
            "pr_features": FeatureSample("pool", self._dims["pool"],
                                         min(self.pr_samples, num_samples)),
        }

    def statistics(self, accs: Accumulators) -> fid.ReferenceStatistics:
        """The accumulated FID and sFID statistics (what a reference batch stores)."""
        pool, spatial = accs["pool"].stats, accs["spatial"].stats
        return fid.ReferenceStatistics(mu=pool.mean, sigma=pool.covariance,
                                       mu_s=spatial.mean, sigma_s=spatial.covariance)

    def metrics(self, accs: Accumulators) -> dict[str, Any]:
        is_mean, is_std = accs["inception_score"].result()
        out: dict[str, Any] = {"inception_score": is_mean, "inception_score_std": is_std}
        if self.reference is None:
            return out
        stats = self.statistics(accs)
        out["fid"] = fid.frechet_distance(stats.mu, stats.sigma, self.reference.mu,
                                          self.reference.sigma)
        if self.reference.mu_s is not None:
            out["sfid"] = fid.frechet_distance(stats.mu_s, stats.sigma_s, self.reference.mu_s,
                                               self.reference.sigma_s)
        if self.reference_pool is not None:
            fake = accs["pr_features"].values()
            out["precision"], out["recall"] = fid.precision_recall(
                self.reference_pool, fake, k=PR_NEIGHBOURS)
            out["precision_recall_samples"] = [len(self.reference_pool), len(fake)]
        return out


class DigitsExtractor(FeatureExtractor):
    """The digits judge: a ``metrics.digits.DigitsClassifier`` fitted on the real training digits.

    It is a scikit-learn MLP on 64 pixels, so it runs on the host (``host_outputs``); the device
    part only hands the images over. Metrics are those of ``digits.digits_quality``, computed
    from streaming statistics: ``accuracy``, ``fd_generated_vs_test``, ``fd_train_vs_test`` (the
    real-data floor), ``fd_ratio_to_floor`` and ``classifier_test_accuracy``.
    """

    name = "digits"
    params = ()

    def __init__(self, classifier: Any, real_train: tuple[np.ndarray, np.ndarray],
                 real_test: tuple[np.ndarray, np.ndarray]):
        self.classifier = classifier
        self.train_labels = np.asarray(real_train[1])  # the digits report samples one per label
        test_images, test_labels = real_test
        self._test = self._statistics(test_images)
        self._floor = self._statistics(real_train[0]).frechet_distance(self._test)
        self._test_accuracy = float(np.mean(classifier.predict(test_images)
                                            == np.asarray(test_labels)))

    def _statistics(self, images: np.ndarray) -> fid.FeatureStatistics:
        features = self.classifier.features(images)
        stats = fid.FeatureStatistics(features.shape[1])
        stats.update(features)
        return stats

    def apply(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
        return {"image": images.astype(jnp.float32)}

    def host_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = outputs["image"]
        return {"features": self.classifier.features(images),
                "predicted": self.classifier.predict(images)}

    def accumulators(self, num_samples: int) -> Accumulators:
        from tread_jax.metrics import digits  # pylint: disable=g-import-not-at-top

        return {"features": Moments("features", digits.HIDDEN_UNITS),
                "accuracy": Accuracy("predicted")}

    def metrics(self, accs: Accumulators) -> dict[str, Any]:
        distance = accs["features"].stats.frechet_distance(self._test)
        return {
            "accuracy": accs["accuracy"].result(),
            "fd_generated_vs_test": distance,
            "fd_train_vs_test": self._floor,
            "fd_ratio_to_floor": distance / self._floor,
            "classifier_test_accuracy": self._test_accuracy,
        }


# ----------------------------------------------------------------------------------------------
# Multi-host plumbing


def local_rows(array: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of a batch-split global array, and their row numbers, in order."""
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard)  # replicas of a row block are identical; keep one
    starts = sorted(shards)
    data = np.concatenate([np.asarray(shards[s].data) for s in starts])
    rows = np.concatenate([np.arange(s, s + shards[s].data.shape[0]) for s in starts])
    return data, rows


def _allgather_exact(value: np.ndarray) -> np.ndarray:
    """[P, ...] values of every process, bit for bit (float64 travels as uint32 pairs, since
    jax without x64 would round it to float32)."""
    value = np.ascontiguousarray(value)
    as_words = value.reshape(-1).view(np.uint8)
    pad = (-len(as_words)) % 4
    words = np.concatenate([as_words, np.zeros(pad, np.uint8)]).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))
    return np.stack([g.view(np.uint8)[:value.nbytes].view(value.dtype).reshape(value.shape)
                     for g in gathered])


def merge_across_processes(accs: Accumulators, fresh: Callable[[], Accumulators]) -> Accumulators:
    """Accumulators of all processes' rows, identical on every process (process order)."""
    if jax.process_count() == 1:
        return accs
    gathered = {k: _allgather_exact(v) for k, v in accumulators_state(accs).items()}
    merged = fresh()
    load_accumulators_state(merged, {k: v[0] for k, v in gathered.items()})
    for p in range(1, jax.process_count()):
        part = fresh()
        load_accumulators_state(part, {k: v[p] for k, v in gathered.items()})
        for name in merged:
            merged[name].merge(part[name])
    return merged


def global_array(values: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """A host array known to every process (e.g. indices, labels) as a batch-split global array."""
    return jax.make_array_from_callback(values.shape, sharding.batch_sharding(mesh),
                                        lambda index: values[index])


# ----------------------------------------------------------------------------------------------
# Progress files


def _write_progress(path: str, next_index: int, fingerprint: Mapping[str, Any],
                    accs: Accumulators) -> None:
    content = io.BytesIO()
    np.savez(content, next_index=np.asarray(next_index, np.int64),
             fingerprint=np.asarray(json.dumps(fingerprint, sort_keys=True)),
             **accumulators_state(accs))
    paths.write_bytes(path, content.getvalue())  # atomic: an interruption leaves the previous progress intact


def _read_progress(path: str, fingerprint: Mapping[str, Any], accs: Accumulators) -> int:
    """Loads saved accumulators into ``accs`` and returns the next sample index (0 if none)."""
    if not epath.Path(path).exists():
        return 0
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as saved:
        saved_fingerprint = json.loads(str(saved["fingerprint"]))
        expected = json.loads(json.dumps(fingerprint, sort_keys=True))
        if saved_fingerprint != expected:
            changed = sorted(k for k in set(expected) | set(saved_fingerprint)
                             if expected.get(k) != saved_fingerprint.get(k))
            raise ValueError(f"{path} was saved with other settings ({', '.join(changed)}); "
                             "use the same settings to resume, or delete it to start over")
        load_accumulators_state(accs, {k: saved[k] for k in saved.files
                                       if k not in ("next_index", "fingerprint")})
        return int(saved["next_index"])


# ----------------------------------------------------------------------------------------------
# The loop


def run(
    images_fn: Callable[[np.ndarray], jax.Array],
    extractor: FeatureExtractor,
    *,
    num_samples: int,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    labels: np.ndarray | None = None,
    progress_path: str | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    save_every: int = 10,
    max_batches: int | None = None,
    on_batch: Callable[[jax.Array, np.ndarray, int], None] | None = None,
    on_save: Callable[[], None] | None = None,
    description: str = "evaluating",
) -> tuple[Accumulators, int]:
    """Accumulates ``extractor`` statistics over samples ``0..num_samples-1``.

    ``images_fn(indices)``: the images of the given sample indices [B] (the last batch is padded
    with indices >= num_samples, whose rows are ignored) as a global array [B, H, W, C] in
    [-1, 1], split over ``mesh`` on the batch axis. ``labels`` [num_samples]: class labels the
    accumulators may use (accuracy). ``on_batch(images, indices, count)``: called with every
    batch (e.g. to save samples), ``count`` the number of real rows. With ``progress_path``,
    progress is saved there every ``save_every`` batches (``on_save`` runs first, so side
    outputs are flushed before the index that covers them is) and resumed from it.
    ``max_batches`` stops early after that many batches of this call (tests, time limits).

    Returns the accumulators, merged over all processes, and the next sample index
    (``num_samples`` when complete).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    parallel = sharding.data_parallel_size(mesh)
    if global_batch_size < 1 or global_batch_size % parallel:
        raise ValueError(f"global batch {global_batch_size} is not a positive multiple of the "
                         f"data-parallel size {parallel}")
    labels = np.zeros(num_samples, np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
        raise ValueError(f"need one label per sample: {labels.shape} for {num_samples} samples")
    fingerprint = dict(fingerprint or {}, num_samples=num_samples, extractor=extractor.name)

    def fresh() -> Accumulators:
        return extractor.accumulators(num_samples)

    accs = fresh()
    start = _read_progress(progress_path, fingerprint, accs) if progress_path else 0
    if jax.process_index() != 0:
        accs = fresh()  # process 0 holds the saved (already merged) part

    padded_labels = np.concatenate([labels, np.zeros(global_batch_size, np.int32)])

    def save(next_index: int) -> Accumulators:
        merged = merge_across_processes(accs, fresh)
        if on_save is not None:
            on_save()
        if jax.process_index() == 0:
            _write_progress(progress_path, next_index, fingerprint, merged)
        return merged if jax.process_index() == 0 else fresh()

    batch_starts = range(start, num_samples, global_batch_size)
    if max_batches is not None:
        batch_starts = batch_starts[:max_batches]
    bar = None
    if jax.process_index() == 0 and len(batch_starts):
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top

        bar = tqdm(total=num_samples, initial=start, unit="img", desc=description,
                   dynamic_ncols=True, smoothing=0.1)
    next_index = saved_at = start
    started = time.perf_counter()
    for done, batch_start in enumerate(batch_starts, 1):
        indices = np.arange(batch_start, batch_start + global_batch_size)
        count = min(global_batch_size, num_samples - batch_start)
        images = images_fn(indices)
        if on_batch is not None:
            on_batch(images, indices, count)
        extract, params = extractor.compiled_apply(
            mesh, images, name=f"extract_{extractor.name}_{description}_{global_batch_size}")
        outputs = extract(params, images)
        local = {}
        for name, value in outputs.items():
            local[name], rows = local_rows(value)
        local = extractor.host_outputs(local)
        valid = rows < count
        rows = rows[valid]
        local = {k: v[valid] for k, v in local.items()}
        for acc in accs.values():
            acc.update(local, padded_labels[batch_start + rows], batch_start + rows)
        next_index = batch_start + count
        if bar is not None:
            bar.update(count)
        if progress_path and (done % save_every == 0 or next_index == num_samples):
            accs, saved_at = save(next_index), next_index
    if bar is not None:
        bar.close()
        rate = (next_index - start) / max(time.perf_counter() - started, 1e-9)
        print(f"{description}: {next_index - start} images at {rate:.1f} img/s", flush=True)
    if progress_path and next_index != saved_at:
        accs = save(next_index)  # stopped early (max_batches) between save points
    return merge_across_processes(accs, fresh), next_index
