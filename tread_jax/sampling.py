"""Samples from a finished (or running) training job: the EMA weights of its latest checkpoint.

``train_and_evaluate`` samples with the settings of its config; this module lets a notebook or
script sample the same weights again with other settings (guidance scale, step count) without
retraining. It reuses the trainer's own model construction, shardings and checkpoint restore.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from tread_jax import data, diffusion, sharding, train, train_state
from tread_jax.checkpoint import Checkpointer


class EmaSampler:
    """``sample(labels, seed, num_steps=..., guidance=...) -> images`` in [-1, 1], NHWC numpy."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        info = data.dataset_info(config.data)
        self.num_classes = info.num_classes
        self._parts = train._ModelParts(config, info)  # pylint: disable=protected-access
        self._objective = diffusion.create_objective(config.diffusion)
        self._mesh = sharding.create_mesh(config.mesh)
        tx = train_state.create_optimizer(config.optim)

        def init():
            params, rest = self._parts.init()
            return train_state.init_train_state(params, tx), rest

        abstract_state, _ = jax.eval_shape(init)
        shardings = sharding.state_shardings(abstract_state, self._mesh, config.fsdp_min_size)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        # The restore API also positions a data iterator; this one is built lazily and never read.
        iterator = data.create_train_iterator(
            config.data, global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        checkpointer = Checkpointer(workdir, save_interval_steps=1, max_to_keep=config.max_to_keep)
        try:
            restored = checkpointer.restore_latest(abstract, iterator)
        finally:
            checkpointer.close()
        if restored is None:
            raise FileNotFoundError(f"no usable checkpoint in {checkpointer.directory}")
        state, self.step = restored
        self._ema_params = state.ema_params
        self._rest = jax.jit(lambda: init()[1], out_shardings=sharding.replicated(self._mesh))()
        self._samplers: dict[tuple[int, float], Callable] = {}

    def sample(self, labels: np.ndarray, seed: int, *, num_steps: int, guidance: float = 1.0) -> np.ndarray:
        """Dense sampling from the EMA weights; guidance 1.0 means plain class-conditional."""
        key = (int(num_steps), float(guidance))
        if key not in self._samplers:  # one compiled sampler per setting
            self._samplers[key] = train.make_sample_fn(
                self._parts, self._objective, self._mesh, num_steps=key[0], guidance=key[1]
            )
        return self._samplers[key](self._ema_params, self._rest, np.asarray(labels), seed)
