"""The one sampler: class-conditional samples from a model's (EMA) parameters, as pixels.

Used by the training grids, in-loop evaluation, the evaluation binary, the digits report and
the notebook. The noise of sample ``i`` is ``normal(fold_in(key(seed), i))``, a function of
the seed and the sample's global index alone, so an image does not depend on the batch size,
the device count, the host count or where an interrupted run resumed. Batches are split over
every device of every host; latent samples are decoded to pixels by the dataset's VAE on
device; the result is clipped to [-1, 1], the data range.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from tread_jax import data, diffusion, routing, runtime, sharding
from tread_jax.metrics import evaluator
from tread_jax.model_builder import EmaWeights, ModelBuilder


def create_objective(config: ml_collections.ConfigDict, sampler: str | None = None) -> diffusion.Objective:
    """The config's objective, with its sampler replaced by ``sampler`` when given (flow: euler/heun)."""
    settings = config.diffusion.to_dict()
    if sampler is not None:
        if "sampler" not in diffusion.default_config(settings["name"]):
            raise ValueError(f"the {settings['name']} objective has one sampler; --sampler applies to flow")
        settings["sampler"] = sampler
    return diffusion.create_objective(ml_collections.ConfigDict(settings))


GUIDANCE_METHODS = ("cfg", "sparse", "path_drop")


def create_guidance(config: ml_collections.ConfigDict, model: ModelBuilder, method: str, scale: float,
                    interval: tuple[float, float] | None, sparsity: tuple[float, float]) -> diffusion.Guidance | None:
    """The guidance ``method`` names: "cfg" (classifier-free), "sparse" (Sparse Guidance: routed
    fractions ``sparsity = (weak, strong)`` over the config's routes, or the published placement
    ``routing.default_route`` for a model trained densely) or "path_drop" (SPRINT models)."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance method {method!r}; known: {', '.join(GUIDANCE_METHODS)}")
    abstract = model.abstract_model
    grid = (model.image_shape[0] // model.patch_size, model.image_shape[1] // model.patch_size)
    if method == "sparse":
        routes = routing.parse_routes(config.get("routes", ())) or (routing.default_route(abstract.depth),)
        return diffusion.Guidance(scale=scale, interval=interval, sparsity=tuple(sparsity), routes=routes,
                                  token_grid=grid, keep_order=abstract.keep_order)
    if method == "path_drop":
        if abstract.sprint_span is None:
            raise ValueError("path-drop guidance needs a SPRINT model (a route with rejoin='sprint')")
        return diffusion.Guidance(scale=scale, interval=interval, null_class=model.num_classes, path_drop=True,
                                  token_grid=grid, keep_order=abstract.keep_order)
    if scale != 1.0 or interval:
        return diffusion.Guidance(scale=scale, interval=interval, null_class=model.num_classes)
    return None


class Sampler:
    """``images(params, labels, indices, seed)`` on device, ``sample(...)`` as numpy on the host.

    ``num_steps`` sampler steps, guided by ``guidance_method`` (``create_guidance``) with
    ``guidance_scale`` (1 = none) optionally only inside ``guidance_interval``. Dense unless
    the guidance routes on purpose (sparse guidance); sample ``i``'s token draws, like its
    noise, depend on the seed and ``i`` alone (``fold_in(fold_in(key(seed), i), 1)``, then the
    network evaluation's index). ``name`` names the compiled programs for the multi-process
    compile barrier: unique per Sampler.
    """

    def __init__(self, config: ml_collections.ConfigDict, model: ModelBuilder, mesh: jax.sharding.Mesh,
                 param_shardings: Any, *, num_steps: int, guidance_scale: float = 1.0,
                 guidance_interval: tuple[float, float] | None = None, sampler: str | None = None,
                 guidance_method: str = "cfg", guidance_sparsity: tuple[float, float] = (0.75, 0.0),
                 name: str):
        self.model = model
        self.mesh = mesh
        self.name = name
        objective = create_objective(config, sampler)
        guidance = create_guidance(config, model, guidance_method, guidance_scale, guidance_interval,
                                   guidance_sparsity)
        decode, decoder_params = data.pixel_decoder(config.data)
        replicated = sharding.replicated(mesh)
        self._decoder_params = jax.device_put(decoder_params, replicated)
        height, width, channels = model.image_shape
        # The SD VAE maps each latent position to 8x8 RGB pixels.
        self.pixel_shape = (height, width, channels) if decode is None else (height * 8, width * 8, 3)

        def generate(params: Any, decoder_params: Any, labels: jax.Array, indices: jax.Array,
                     seed: jax.Array) -> jax.Array:
            base_key = jax.random.key(seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
            noise = jax.vmap(lambda k: jax.random.normal(k, model.image_shape))(keys)
            token_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            x = objective.sample(model.bind(params), noise, labels, num_steps=num_steps, guidance=guidance,
                                 keys=token_keys)
            if decode is not None:
                x = decode(decoder_params, x)
            return jnp.clip(x, -1.0, 1.0)

        batch = sharding.batch_sharding(mesh)
        self._jitted = jax.jit(generate, in_shardings=(param_shardings, replicated, batch, batch, replicated),
                               out_shardings=batch)
        self._compiled: dict[int, Any] = {}  # per global batch size

    @classmethod
    def for_ema(cls, config: ml_collections.ConfigDict, ema: EmaWeights, *, name: str, **settings: Any) -> Sampler:
        """A sampler for restored EMA weights (``model_builder.restore_ema``)."""
        return cls(config, ema.model, ema.mesh, ema.param_shardings, name=name, **settings)

    def images(self, params: Any, labels: np.ndarray, indices: np.ndarray, seed: int) -> jax.Array:
        """Samples of global ``indices`` [B] with class ``labels`` [B], a global array split over
        the mesh on the batch axis (B a multiple of the data-parallel size)."""
        args = (params, self._decoder_params, evaluator.global_array(np.asarray(labels, np.int32), self.mesh),
                evaluator.global_array(np.asarray(indices, np.int32), self.mesh), jnp.uint32(seed))
        size = len(indices)
        if size not in self._compiled:
            self._compiled[size] = runtime.compile_everywhere(self._jitted, *args, name=f"{self.name}_{size}")
        return self._compiled[size](*args)

    def sample(self, params: Any, labels: np.ndarray, *, seed: int, batch_size: int | None = None) -> np.ndarray:
        """All samples for ``labels`` (sample ``i`` of class ``labels[i]``) as numpy [N, H, W, C]
        on every process, generated ``batch_size`` at a time (default: all at once)."""
        labels = np.asarray(labels, np.int32)
        parallel = sharding.data_parallel_size(self.mesh)
        batch_size = -(-(batch_size or len(labels)) // parallel) * parallel
        padded = np.concatenate([labels, np.zeros(batch_size, np.int32)])
        chunks = []
        for start in range(0, len(labels), batch_size):
            indices = np.arange(start, start + batch_size)
            images = self.images(params, padded[indices], indices, seed)
            chunks.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
        return np.concatenate(chunks)[: len(labels)]
