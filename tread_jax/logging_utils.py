"""Training metrics: on-device aggregation (clu.metrics), writers (TensorBoard, JSON lines),
a console progress line, and sample image grids. Only process 0 writes anything, into a local
or ``gs://`` workdir.
"""

# No `from __future__ import annotations`: clu.metrics.Collection reads its fields' annotations
# as metric classes, which postponed (string) annotations would break.
import io
import json
import os
import time
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics
from etils import epath
from PIL import Image

from tread_jax import paths, pixels

NO_BAD_STEP = np.iinfo(np.int32).max


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
    """The earliest step whose loss or gradient norm was not finite (``NO_BAD_STEP`` if none); the
    loop also checks the state itself before saving it (``train_state.is_finite``).

    Aggregated on device like the averages, so detecting a divergence costs no host sync
    until the trainer looks at it (log and checkpoint steps).
    """

    step: jax.Array

    @classmethod
    def from_model_output(cls, *, step: jax.Array, loss: jax.Array, grad_norm: jax.Array, **_):
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        return cls(step=jnp.where(finite, NO_BAD_STEP, step).astype(jnp.int32))

    @classmethod
    def empty(cls) -> "FirstNonFinite":
        return cls(step=jnp.array(NO_BAD_STEP, jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.minimum(self.step, other.step))

    def compute(self) -> jax.Array:
        return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """What one train step reports; merged over the steps between two log lines."""

    loss: metrics.Average.from_output("loss")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    first_nonfinite_step: FirstNonFinite


class MetricWriter:
    """Scalars and images to TensorBoard event files (tensorboardX, no TensorFlow); scalars also
    to metrics.jsonl.

    ``start_step`` is the step a resumed run continues from (its checkpoint's step). Whatever the
    interrupted run logged after it is dropped, so that the steps it redoes are not logged twice:
    metrics.jsonl keeps only the records up to ``start_step``, and the TensorBoard writer opens
    with ``purge_step=start_step + 1``, which makes TensorBoard discard the older events from that
    step on. ``None`` (a fresh run) keeps whatever is there.
    """

    def __init__(self, workdir: str, start_step: int | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top

        # Event files in a bucket go through gcsfs like every other file of the run.
        record_writer.register_writer_factory("gs", _BucketEventFiles())

        jsonl_path = os.path.join(workdir, "metrics.jsonl")
        purge_step = None
        if start_step is not None:
            _truncate_jsonl(jsonl_path, start_step)
            purge_step = start_step + 1
        # Event file names carry whole seconds only; a writer opened in the same second as the
        # previous run's would overwrite its file. The suffix keeps them apart and in order.
        self._tensorboard = SummaryWriter(
            logdir=os.path.join(workdir, "tensorboard"),
            purge_step=purge_step,
            filename_suffix=f".{time.time_ns()}",
        )
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = JsonLines(jsonl_path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._jsonl.append(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images (uint8 ``[H, W, C]`` with C = 1 or 3, or ``[H, W]`` gray, e.g.
        ``np.asarray(image_grid(...))``) to TensorBoard, beside the scalars."""
        if not self.enabled:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 2:  # a gray PIL image as an array
                image = image[..., None]
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
                raise ValueError(f"image {name!r}: expected uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
            self._tensorboard.add_image(name, image, step, dataformats="HWC")
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


class _BucketEventFile:
    """A tensorboardX event file on Cloud Storage: kept in memory and uploaded whole at each
    flush, since an object cannot be appended to."""

    def __init__(self, path: str):
        self._path = path
        self._content = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._content.write(data)

    def flush(self) -> None:
        paths.write_bytes(self._path, self._content.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory for ``gs://`` log directories."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        del path  # a bucket has no folders to create


class JsonLines:
    """Appends lines to a file. A Cloud Storage object cannot be appended to: there the lines
    are kept and the object is uploaded whole after each line (metrics files stay small)."""

    def __init__(self, path: str):
        self._path = path
        if paths.is_remote(path):
            self._file = None
            self._text = epath.Path(path).read_text() if epath.Path(path).exists() else ""
        else:
            self._file = open(path, "a", encoding="utf-8")

    def append(self, line: str) -> None:
        if self._file is None:
            self._text += line + "\n"
            paths.write_text(self._path, self._text)
        else:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the records of ``path`` up to ``last_step``, replacing the file atomically.

    A line that does not parse (cut short by a kill mid-write) is dropped too. The file is
    replaced whole (``paths.write_text``), so a crash here leaves either the old file or the
    new one, never a half-written one.
    """
    source = epath.Path(path)
    if not source.exists():
        return
    kept = []
    for line in source.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(line + "\n")
    paths.write_text(path, "".join(kept))


def format_duration(seconds: float) -> str:
    """``3725 -> '1h02m05s'``, ``65 -> '1m05s'``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Throughput:
    """Steps/s and ETA over the window since the previous log line (compile time excluded)."""

    def __init__(self, start_step: int):
        self._step = start_step
        self._time = time.perf_counter()

    def update(self, step: int) -> float:
        """Steps per second since the last call; call only after a host sync."""
        now = time.perf_counter()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        return rate


def progress_line(step: int, total: int, scalars: Mapping[str, float], steps_per_s: float) -> str:
    """One console line: step, loss, speed and time left."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    eta_text = format_duration(eta) if np.isfinite(eta) else "?"
    return (
        f"step {step}/{total} ({100.0 * step / total:.0f}%) | loss {scalars['loss']:.4f} | "
        f"grad norm {scalars['grad_norm']:.3f} | lr {scalars['learning_rate']:.2e} | "
        f"{steps_per_s:.2f} steps/s | {scalars['images_per_s']:.0f} img/s | ETA {eta_text}"
    )


def image_grid(images: np.ndarray, columns: int, *, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tiles ``[N, H, W, C]`` images in [-1, 1] row by row (C = 1 or 3), upscaled by ``scale``."""
    images = pixels.to_uint8(np.asarray(images))
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def _readable_scale(images: np.ndarray) -> int:
    """Small images (8x8 digits) are upscaled so that a grid is readable in an image viewer."""
    return max(1, 64 // images.shape[1])


def class_grid(images: np.ndarray, labels: np.ndarray) -> Image.Image:
    """One row per class, in label order; every class in ``labels`` must occur equally often."""
    images, labels = np.asarray(images), np.asarray(labels)
    per_class = len(labels) // len(np.unique(labels))
    return image_grid(images[np.argsort(labels, kind="stable")], per_class, scale=_readable_scale(images))


def save_class_grids(
    images: np.ndarray, labels: np.ndarray, directory: str, prefix: str, *, per_class_files: bool
) -> list[str]:
    """Writes ``<prefix>.png`` (one row per class) and optionally ``<prefix>_class<k>.png``.

    ``images`` must hold the same number of samples for every class in ``labels``. Returns the
    paths written (none on processes other than 0).
    """
    if jax.process_index() != 0:
        return []
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    images, labels = np.asarray(images), np.asarray(labels)
    classes = np.unique(labels)
    per_class = len(labels) // len(classes)
    scale = _readable_scale(images)
    written = [os.path.join(directory, f"{prefix}.png")]
    _save_png(class_grid(images, labels), written[0])
    if per_class_files:
        columns = int(np.ceil(np.sqrt(per_class)))
        for k in classes:
            path = os.path.join(directory, f"{prefix}_class{int(k)}.png")
            _save_png(image_grid(images[labels == k], columns, scale=scale), path)
            written.append(path)
    return written


def _save_png(picture: Image.Image, path: str) -> None:
    with epath.Path(path).open("wb") as f:
        picture.save(f, format="PNG")
