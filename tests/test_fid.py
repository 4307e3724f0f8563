"""FID/sFID, IS, precision/recall, streaming statistics and ADM batches against independent
answers (closed forms, hand-computed cases, brute force)."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from tread_jax.metrics import fid


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_fid_of_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 32)) * rng.uniform(0.1, 3, 32) + 1.5
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_of_rank_deficient_set_with_itself_is_near_zero():
    # Fewer samples than dimensions: singular covariance, as with 2048-d features of few images.
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(20, 48))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * np.trace(sigma)


def test_fid_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(2)
    dim = 24
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # shared eigenbasis, not axis-aligned
    a, b = rng.uniform(0.1, 4, dim), rng.uniform(0.1, 4, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_matches_symmetric_form_for_general_covariances():
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), evaluated with eigh only.
    rng = np.random.default_rng(3)
    dim = 16
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(4)
    # Large mean relative to spread: where a naive sum-of-outer-products would lose digits.
    feats = rng.normal(size=(1000, 20)) * 0.01 + 100.0
    stats = fid.FeatureStatistics(20)
    for chunk in np.array_split(feats, [7, 300, 301, 640]):  # uneven, including size 1
        stats.update(chunk)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-8,
                               atol=1e-12)


def test_merged_statistics_equal_statistics_of_union_and_survive_state_round_trip():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(100, 8)), rng.normal(size=(37, 8)) + 2
    sx, sy = fid.FeatureStatistics(8), fid.FeatureStatistics(8)
    sx.update(x)
    sy.update(y)
    merged = fid.FeatureStatistics.from_state(sx.state()).merge(sy)
    both = np.concatenate([x, y])
    np.testing.assert_allclose(merged.mean, both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance, np.cov(both, rowvar=False), rtol=1e-10)
    assert sx.count == 100  # merge leaves its inputs alone
    assert merged.frechet_distance(merged) == pytest.approx(0, abs=1e-8)


def test_statistics_reject_wrong_feature_shape():
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        fid.FeatureStatistics(8).update(np.zeros((4, 9)))


def test_inception_score_is_one_for_uniform_predictions():
    mean, std = fid.inception_score(np.zeros((200, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_is_class_count_for_confident_balanced_predictions():
    classes = 10
    labels = np.tile(np.arange(classes), 30)  # every split of 30 holds each class 3 times
    probs = np.eye(classes)[labels]
    assert fid.inception_score(probs, from_logits=False)[0] == pytest.approx(classes, rel=1e-12)
    # The same from (very confident) logits.
    assert fid.inception_score(probs * 50.0)[0] == pytest.approx(classes, rel=1e-6)


def test_inception_score_of_confident_single_class_is_one():
    probs = np.zeros((50, 5))
    probs[:, 2] = 1
    assert fid.inception_score(probs, splits=5, from_logits=False)[0] == pytest.approx(1.0)


def test_precision_recall_hand_computed_case():
    # Real points 0,1,2,3 on a line (k=1: every real radius^2 = 1); fake points 0.5 and 10
    # (each other's neighbour: radius^2 = 90.25). Fake 0.5 lies in the ball of real 0, fake 10
    # in no real ball -> precision 1/2. The ball around fake 0.5 covers all real points ->
    # recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert fid.precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_identical_sets_and_separated_sets():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(300, 16))
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.normal(size=(300, 16)) + 50.0
    assert fid.precision_recall(real, far) == (0.0, 0.0)
    # Half of the fakes copy real points, half are far away: precision exactly 1/2.
    mixed = np.concatenate([real[:150], far[:150]])
    precision, recall = fid.precision_recall(real, mixed)
    assert precision == 0.5
    assert 0 < recall < 1


def test_precision_recall_fall_as_samples_move_away():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(400, 8))
    results = [fid.precision_recall(real, rng.normal(size=(400, 8)) + shift)
               for shift in (0.0, 1.0, 2.0, 4.0)]
    precisions, recalls = zip(*results)
    assert precisions[0] > 0.8 and recalls[0] > 0.8
    assert all(a > b for a, b in zip(precisions, precisions[1:]))
    assert all(a > b for a, b in zip(recalls, recalls[1:]))
    assert precisions[-1] < 0.05 and recalls[-1] < 0.05


def test_precision_recall_batching_matches_brute_force():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(90, 6)), rng.normal(size=(70, 6)) * 1.3 + 0.3
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real = np.sort(d_rr, axis=1)[:, 3]
    r_fake = np.sort(d_ff, axis=1)[:, 3]
    precision = np.mean((d_fr <= r_real[None, :]).any(axis=1))
    recall = np.mean((d_fr.T <= r_fake[None, :]).any(axis=1))
    got = fid.precision_recall(real, fake, batch_size=7)
    assert got == pytest.approx((precision, recall))
    assert 0.1 < got[0] < 1 and 0.1 < got[1] < 1  # a non-degenerate case


def test_adm_batch_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(10, 5, 4, 3), dtype=np.uint8)
    s = _random_spd(rng, 6)
    stats = fid.ReferenceStatistics(mu=rng.normal(size=6), sigma=s, mu_s=rng.normal(size=3),
                                    sigma_s=s[:3, :3])
    path = tmp_path / "ref.npz"
    fid.write_adm_npz(path, images=images, stats=stats)
    with np.load(path) as raw:  # the key names ADM's evaluator reads
        assert sorted(raw.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    back = fid.read_adm_statistics(path)
    for field in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(back, field), getattr(stats, field))
    chunks = list(fid.iter_adm_images(path, batch_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), images)


def test_adm_batch_written_by_numpy_like_adm_samples(tmp_path):
    # ADM's sampling scripts write np.savez(path, images, labels) -> arr_0, arr_1; compressed
    # archives must stream too.
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, images, np.array([1, 2]))
    assert fid.read_adm_statistics(path) is None
    np.testing.assert_array_equal(np.concatenate(list(fid.iter_adm_images(path, 64))), images)


def test_adm_batch_rejects_non_uint8_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        fid.write_adm_npz(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="no images"):
        next(fid.iter_adm_images(tmp_path / "stats_only.npz", 4))
    assert fid.read_adm_statistics(tmp_path / "stats_only.npz").mu_s is None
