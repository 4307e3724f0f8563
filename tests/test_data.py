"""The digits dataset and the grain input pipeline (tread_jax.data)."""

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tread_jax import data
from tread_jax.data import digits, pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(path)
    return path


def make_config(data_dir: str, **overrides):
    config = data.default_config()
    config.data_dir = data_dir
    config.update(overrides)
    return config


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def as_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One sortable row per sample (label first), for multiset comparisons."""
    return np.concatenate([labels[:, None].astype(np.float32), images.reshape(len(images), -1)], 1)


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def test_prepared_digits_match_scikit_learn_and_the_documented_split(data_dir):
    info = data.dataset_info(make_config(data_dir))
    assert info == data.DatasetInfo("digits", (8, 8, 1), 10, 1501, 296)

    # Expected split computed here from the raw data and the documented rule: within each
    # class, in scikit-learn's order, every sixth sample is held out.
    raw = load_digits()
    rank = np.zeros(len(raw.target), dtype=int)
    for c in range(10):
        members = np.flatnonzero(raw.target == c)
        rank[members] = np.arange(len(members))
    scaled = (raw.images[..., None] / 8.0 - 1.0).astype(np.float32)
    for split, held_out in (("train", False), ("test", True)):
        images, labels = data.load_split_arrays(make_config(data_dir), split)
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.shape == (len(labels), 8, 8, 1)
        assert images.min() == -1.0 and images.max() == 1.0
        assert set(np.unique(labels)) == set(range(10))
        keep = (rank % 6 == 5) == held_out
        np.testing.assert_array_equal(
            sorted_rows(as_rows(images, labels)),
            sorted_rows(as_rows(scaled[keep], raw.target[keep])),
        )


def test_preparation_is_deterministic(data_dir, tmp_path):
    again = str(tmp_path / "again")
    digits.prepare(again)
    for split in ("train", "test"):
        a = data.load_split_arrays(make_config(data_dir), split)
        b = data.load_split_arrays(make_config(again), split)
        np.testing.assert_array_equal(a[0], b[0])  # same records in the same stored order
        np.testing.assert_array_equal(a[1], b[1])


def test_concurrent_preparation_builds_one_dataset(tmp_path):
    # flock excludes separate open() calls even within one process, so two threads exercise the
    # same lock as two processes of a multi-host run, without paying two interpreter start-ups.
    errors = []

    def prepare():
        try:
            digits.prepare(str(tmp_path))
        except Exception as e:  # pylint: disable=broad-except
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(os.listdir(tmp_path / digits.TFDS_NAME)) == [digits.VERSION]
    assert data.dataset_info(make_config(str(tmp_path))).num_train == 1501


def test_default_data_dir_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TREAD_JAX_CACHE", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path / "tensorflow_datasets")
    monkeypatch.delenv("TREAD_JAX_CACHE")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/tread_jax/tensorflow_datasets")


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_cover_each_record_once_per_epoch(data_dir, in_memory):
    config = make_config(data_dir, in_memory=in_memory)
    train = sorted_rows(as_rows(*data.load_split_arrays(config, "train")))
    # 1501 = 19 * 79: with batch 19 an epoch is exactly 79 batches.
    it = data.create_train_iterator(
        config, global_batch_size=19, seed=3, process_index=0, process_count=1
    )
    epochs = [take(it, 79) for _ in range(2)]
    first = epochs[0][0]
    assert first["image"].shape == (19, 8, 8, 1) and first["image"].dtype == np.float32
    assert first["label"].shape == (19,) and first["label"].dtype == np.int32
    orders = []
    for epoch in epochs:
        images = np.concatenate([b["image"] for b in epoch])
        labels = np.concatenate([b["label"] for b in epoch])
        np.testing.assert_array_equal(sorted_rows(as_rows(images, labels)), train)
        orders.append(labels)
    assert not np.array_equal(orders[0], orders[1])  # each epoch is reshuffled


def test_same_seed_same_batches_different_seed_different(data_dir):
    def batches(seed):
        it = data.create_train_iterator(
            make_config(data_dir), global_batch_size=32, seed=seed, process_index=0, process_count=1
        )
        return take(it, 5)

    assert_same_batches(batches(7), batches(7))
    a, b = batches(7), batches(8)
    assert not any(np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


@pytest.mark.parametrize("in_memory", [True, False])
def test_restored_iterator_continues_identically_across_an_epoch_end(data_dir, in_memory):
    config = make_config(data_dir, in_memory=in_memory, flip=True)
    kwargs = dict(global_batch_size=64, seed=11, process_index=0, process_count=1)
    it = data.create_train_iterator(config, **kwargs)
    take(it, 20)  # 1501 / 64 = 23.5 batches per epoch: the next 10 cross into epoch 2
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = take(it, 10)

    restored = data.create_train_iterator(config, **kwargs)
    next(restored)  # a fresh iterator that has moved elsewhere
    restored.set_state(state)
    assert_same_batches(take(restored, 10), expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_and_tile_the_global_batch(data_dir, process_count):
    config = make_config(data_dir, flip=True)
    batches = 30  # checks global batches 30..32; batch 31 spans the end of epoch 1 (1501 / 48)
    whole = take(
        data.create_train_iterator(
            config, global_batch_size=48, seed=5, process_index=0, process_count=1
        ),
        batches + 3,
    )
    shares = [
        take(
            data.create_train_iterator(
                config, global_batch_size=48, seed=5, process_index=p, process_count=process_count
            ),
            batches + 3,
        )
        for p in range(process_count)
    ]
    for k in range(batches, batches + 3):
        parts = [s[k] for s in shares]
        assert all(part["image"].shape[0] == 48 // process_count for part in parts)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[k][key])
        # The 1501 training images are distinct, so distinct bytes mean distinct records.
        seen = [{img.tobytes() for img in p["image"]} for p in parts]
        assert sum(len(s) for s in seen) == len(set().union(*seen)) == 48


def test_flip_mirrors_about_half_the_images(data_dir):
    kwargs = dict(global_batch_size=100, seed=2, process_index=0, process_count=1)
    plain = take(data.create_train_iterator(make_config(data_dir), **kwargs), 4)
    flipped = take(data.create_train_iterator(make_config(data_dir, flip=True), **kwargs), 4)
    assert not data.default_config().flip  # digits are not mirror symmetric
    num_flipped = 0
    for a, b in zip(plain, flipped):
        np.testing.assert_array_equal(a["label"], b["label"])
        same = np.all(a["image"] == b["image"], axis=(1, 2, 3))
        mirrored = np.all(a["image"][:, :, ::-1] == b["image"], axis=(1, 2, 3))
        assert np.all(same | mirrored)
        num_flipped += int(np.sum(mirrored & ~same))
    assert 140 <= num_flipped <= 260  # 400 fair coin flips, minus symmetric images


def test_bad_batch_and_process_arguments_fail_before_preparation(tmp_path):
    config = make_config(str(tmp_path / "empty"))
    for kwargs, match in [
        (dict(global_batch_size=30, process_index=0, process_count=4), "divisible"),
        (dict(global_batch_size=0, process_index=0, process_count=1), "positive"),
        (dict(global_batch_size=32, process_index=2, process_count=2), "process index"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.create_train_iterator(config, seed=0, **kwargs)
    assert not (tmp_path / "empty").exists()  # nothing was prepared


def test_missing_and_unknown_datasets_give_clear_errors(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(
        pipeline.DATASETS,
        "latents",
        data.DatasetSpec(
            tfds_name="some_latents",
            version="1.0.0",
            decode=digits.decode,
            pixel_space=False,
            prepare=None,
            prepare_hint="prepare it with: python -m some.tool",
        ),
    )
    config = make_config(str(tmp_path), name="latents")
    expected = re.escape(
        f"dataset 'latents' not found at {tmp_path}/some_latents/1.0.0: prepare it with: python"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        data.dataset_info(config)
    with pytest.raises(FileNotFoundError, match=expected):
        data.create_train_iterator(
            config, global_batch_size=8, seed=0, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="flip=True needs pixel data"):
        data.create_train_iterator(
            make_config(str(tmp_path), name="latents", flip=True),
            global_batch_size=8, seed=0, process_index=0, process_count=1,
        )
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known datasets: digits, imagenet256_latents, imagenet512_latents, latents$"):
        data.dataset_info(make_config(data_dir, name="nope"))
    with pytest.raises(ValueError, match="has no split 'validation'"):
        data.load_split_arrays(make_config(data_dir), "validation")
    assert not Path(tmp_path, "some_latents").exists()
