"""Samples from a finished (or running) training job: the EMA weights of its latest checkpoint.

``train_and_evaluate`` samples with the settings of its config; this module lets a notebook or
script sample the same weights again with other settings (guidance scale, step count) without
retraining. It reuses the trainer's own model construction, shardings and restore
(``train.restore_ema``).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np

from tread_jax import diffusion, train


class EmaSampler:
    """``sample(labels, seed, num_steps=..., guidance=...) -> images`` in [-1, 1], NHWC numpy."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self._ema = train.restore_ema(config, workdir)
        self.num_classes = self._ema.parts.num_classes
        self.step = self._ema.step
        self._objective = diffusion.create_objective(config.diffusion)
        self._samplers: dict[tuple[int, float], Callable] = {}

    def sample(self, labels: np.ndarray, seed: int, *, num_steps: int, guidance: float = 1.0) -> np.ndarray:
        """Dense sampling from the EMA weights; guidance 1.0 means plain class-conditional."""
        key = (int(num_steps), float(guidance))
        if key not in self._samplers:  # one compiled sampler per setting
            self._samplers[key] = train.make_sample_fn(
                self._ema.parts, self._objective, self._ema.mesh, num_steps=key[0], guidance=key[1]
            )
        return self._samplers[key](self._ema.params, self._ema.rest, np.asarray(labels), seed)
