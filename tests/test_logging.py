"""MetricWriter: a resumed run's logs read as if it had never stopped; images reach TensorBoard.

TensorBoard's own event reader (``EventAccumulator``, the tensorboard package is a test extra)
reads the event files back, so the purge is checked the way TensorBoard applies it, not with a
re-implementation of its rules.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from tread_jax import logging_utils
from tread_jax.logging_utils import MetricWriter, image_grid


def run_logging(workdir: Path, steps: range, *, start_step: int | None = None) -> None:
    """What the trainer does: one writer per run, a loss line every 10 steps."""
    writer = MetricWriter(str(workdir), start_step=start_step)
    for step in steps:
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.close()


def jsonl_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_reader(workdir: Path) -> event_accumulator.EventAccumulator:
    reader = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    reader.Reload()
    return reader


def tensorboard_steps(workdir: Path, tag: str = "loss") -> list[int]:
    return [event.step for event in tensorboard_reader(workdir).Scalars(tag)]


def test_resume_drops_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    # The first run logged up to step 170, its last checkpoint is at 150; the resumed run
    # redoes 160 and 170 and goes on to 200.
    run_logging(tmp_path, range(10, 180, 10))
    run_logging(tmp_path, range(160, 210, 10), start_step=150)
    expected = list(range(10, 210, 10))
    assert jsonl_steps(tmp_path) == expected
    assert tensorboard_steps(tmp_path) == expected
    # The values after the resume are the resumed run's (here the same function, so equal).
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([1.0 / s for s in expected])
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_drops_a_line_cut_short_by_a_kill(tmp_path):
    run_logging(tmp_path, range(10, 40, 10))
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 40, "lo')
    run_logging(tmp_path, range(40, 60, 10), start_step=30)
    assert jsonl_steps(tmp_path) == [10, 20, 30, 40, 50]


def test_without_start_step_the_history_is_kept(tmp_path):
    run_logging(tmp_path, range(10, 40, 10))
    run_logging(tmp_path, range(40, 60, 10))
    assert jsonl_steps(tmp_path) == [10, 20, 30, 40, 50]
    assert tensorboard_steps(tmp_path) == [10, 20, 30, 40, 50]


def test_resume_from_scratch_drops_everything(tmp_path):
    # No usable checkpoint: the run starts again at step 0 and its old logs go.
    run_logging(tmp_path, range(10, 40, 10))
    run_logging(tmp_path, range(10, 20, 10), start_step=0)
    assert jsonl_steps(tmp_path) == [10]
    assert tensorboard_steps(tmp_path) == [10]


def test_images_are_recorded_beside_the_scalars(tmp_path):
    grid = np.zeros((6, 10, 3), np.uint8)
    grid[:, :5] = 255
    gray = np.asarray(image_grid(np.zeros((2, 3, 3, 1), np.float32), columns=2))  # PIL "L": [H, W]
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(100, {"loss": 0.5})
    writer.write_images(100, {"samples/grid": grid, "samples/gray": gray})
    writer.close()
    reader = tensorboard_reader(tmp_path)
    assert set(reader.Tags()["images"]) == {"samples/grid", "samples/gray"}
    (event,) = reader.Images("samples/grid")
    assert (event.step, event.width, event.height) == (100, 10, 6)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grid)
    (event,) = reader.Images("samples/gray")
    assert (event.width, event.height) == gray.shape[::-1] == (9, 5)


@pytest.mark.parametrize("image", [np.zeros((4, 4, 3), np.float32), np.zeros((1, 4, 4, 3), np.uint8),
                                   np.zeros((4, 4, 2), np.uint8)], ids=["float", "batch", "2-channels"])
def test_images_must_be_uint8_hwc(tmp_path, image):
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match="expected uint8"):
        writer.write_images(1, {"x": image})
    writer.close()


def test_only_process_0_writes_or_purges(tmp_path, monkeypatch):
    run_logging(tmp_path, range(10, 40, 10))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(logging_utils.jax, "process_index", lambda: 1)
    writer = MetricWriter(str(tmp_path), start_step=0)
    writer.write_scalars(10, {"loss": 2.0})
    writer.write_images(10, {"grid": np.zeros((2, 2, 3), np.uint8)})
    writer.close()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
