"""Digits quality metrics: the judge classifier is accurate on real held-out digits, and its
feature-space Frechet distance separates real digits from noise."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tread_jax.metrics import digits


@pytest.fixture(scope="module")
def split():
    data = load_digits()
    images = (data.images / 8.0 - 1.0).astype(np.float32)[..., None]  # 0..16 -> [-1, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=0.2, random_state=0, stratify=data.target)
    return (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="module")
def classifier(split):
    return digits.DigitsClassifier(*split[0])


def test_classifier_is_accurate_on_held_out_digits(classifier, split):
    x_test, y_test = split[1]
    assert np.mean(classifier.predict(x_test) == y_test) > 0.9
    assert classifier.features(x_test).shape == (len(x_test), 128)


def test_classifier_is_deterministic(classifier, split):
    again = digits.DigitsClassifier(*split[0])
    x_test = split[1][0]
    np.testing.assert_array_equal(again.features(x_test), classifier.features(x_test))


def test_quality_report_separates_real_digits_from_noise(split, classifier):
    (x_train, y_train), (x_test, y_test) = split
    rng = np.random.default_rng(0)
    # "Generated" = real digits not used for fitting the judge; an ideal generator.
    real_like = digits.digits_quality(x_test, y_test, split[0], split[1])  # fits its own
    noise = rng.uniform(-1, 1, size=x_test.shape).astype(np.float32)
    noisy = digits.digits_quality(noise, y_test, split[0], split[1], classifier=classifier)

    floor = real_like["fd_train_vs_test"]
    assert 0 < floor < 5
    # Same set: zero up to the float64 eigendecomposition's rounding (floor is about 1).
    assert real_like["fd_generated_vs_test"] == pytest.approx(0, abs=1e-4)
    assert real_like["accuracy"] == real_like["classifier_test_accuracy"] > 0.9
    assert noisy["fd_generated_vs_test"] > 20 * floor
    assert noisy["accuracy"] < 0.3  # noise is not classified as the intended digits

    # Real training digits as samples: near the floor, and perfectly classified.
    train_as_samples = digits.digits_quality(x_train[:360], y_train[:360], split[0], split[1],
                                             classifier=classifier)
    assert train_as_samples["fd_generated_vs_test"] < 3 * floor
    assert train_as_samples["accuracy"] > 0.95


def test_bad_inputs_are_rejected(split):
    x_test, y_test = split[1]
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        digits.digits_quality(x_test[..., 0], y_test, split[0], split[1])
    with pytest.raises(ValueError, match="one label per generated image"):
        digits.digits_quality(x_test, y_test[:5], split[0], split[1])
