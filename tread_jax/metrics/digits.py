"""Quality numbers for the embedded digits default (scikit-learn's 8x8 digits).

Inception features mean nothing on 8x8 grayscale digits, so the digits run is judged in the
feature space of a small classifier fitted on the real training digits: a one-hidden-layer MLP
(128 ReLU units). Its hidden activations play the part of Inception's pool features for a
Frechet distance, and its predictions give the share of class-conditional samples that land in
the intended class. Images are NHWC [N, 8, 8, 1] in [-1, 1], as the pipeline produces them.
"""

from __future__ import annotations

import numpy as np
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from tread_jax.metrics.fid import frechet_distance

IMAGE_SHAPE = (8, 8, 1)
HIDDEN_UNITS = 128


def _flatten(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"digits images must be [N, 8, 8, 1] in [-1, 1], got {images.shape}")
    return images.reshape(len(images), -1)


class DigitsClassifier:
    """An MLP (64 -> 128 ReLU -> 10) fitted on real digits; deterministic for a given seed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, seed: int = 0):
        x = _flatten(images)
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ValueError(f"need one label per image, got {labels.shape} for {len(x)} images")
        self._mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), activation="relu",
                                  alpha=1e-3, learning_rate_init=3e-3, max_iter=400,
                                  random_state=seed)
        # One BLAS thread: on these tiny matrices a multi-threaded BLAS on a busy 2-core CPU
        # was measured 15x slower (46 s instead of 3 s).
        with threadpool_limits(limits=1):
            self._mlp.fit(x, labels)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations [N, 128] (float64): the space for the Frechet distance."""
        x = _flatten(images).astype(np.float64)
        return np.maximum(x @ self._mlp.coefs_[0] + self._mlp.intercepts_[0], 0.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class per image [N]."""
        return self._mlp.predict(_flatten(images))


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                            np.cov(b, rowvar=False))


def digits_quality(generated: np.ndarray, labels: np.ndarray,
                   real_train: tuple[np.ndarray, np.ndarray],
                   real_test: tuple[np.ndarray, np.ndarray], *,
                   classifier: DigitsClassifier | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Score generated digits against the real ones.

    ``generated``/``labels``: class-conditional samples [N, 8, 8, 1] and the classes they were
    drawn for. ``real_train``/``real_test``: (images, labels) of the real split; the classifier
    is fitted on the training part with ``seed`` unless a fitted ``classifier`` is passed (to
    reuse one across evaluations). Returns
    ``accuracy`` (share of samples classified as their intended class),
    ``fd_generated_vs_test`` and ``fd_train_vs_test`` (Frechet distances in the classifier's
    hidden features; the second is the floor that real data reaches), and
    ``classifier_test_accuracy`` (how well the judge itself does on real held-out digits).
    """
    num_generated = len(_flatten(generated))
    labels = np.asarray(labels)
    if labels.shape != (num_generated,):
        raise ValueError(f"need one label per generated image, got {labels.shape} for "
                         f"{num_generated} images")
    if num_generated < 2:
        raise ValueError("need at least 2 generated images for a Frechet distance")
    if classifier is None:
        classifier = DigitsClassifier(*real_train, seed=seed)
    test_images, test_labels = real_test
    test_features = classifier.features(test_images)
    return {
        "accuracy": float(np.mean(classifier.predict(generated) == labels)),
        "fd_generated_vs_test": _frechet(classifier.features(generated), test_features),
        "fd_train_vs_test": _frechet(classifier.features(real_train[0]), test_features),
        "classifier_test_accuracy": float(np.mean(classifier.predict(test_images)
                                                  == np.asarray(test_labels))),
    }
