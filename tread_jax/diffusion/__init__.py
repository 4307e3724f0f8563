"""Diffusion objectives: one loss and one sampler per formulation, behind a small interface.

``create_objective(config)`` builds an objective from an ml_collections config whose ``name`` is
"edm", "flow" or "ddpm"; ``default_config(name)`` gives the published defaults (docs/method.md) for config files to embed.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import ml_collections

from tread_jax.diffusion.ddpm import DDPM
from tread_jax.diffusion.edm import EDM
from tread_jax.diffusion.flow import Flow
from tread_jax.diffusion.guidance import Guidance, RawNet, drop_labels, guided_net
from tread_jax.diffusion.route_loss import routed_loss, token_loss

OBJECTIVES = {"edm": EDM, "flow": Flow, "ddpm": DDPM}


class Objective(Protocol):
    """What the trainer and the evaluator use."""

    def output_channels(self, data_channels: int) -> int:
        """Channels the network must output for data with ``data_channels`` channels."""

    def loss(self, net: RawNet, x: jax.Array, class_labels: jax.Array, key: jax.Array) -> jax.Array:
        """Per-element weighted loss f32[B,H,W,C]; net is the raw network (routing bound by the caller)."""

    def network_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations per sample that ``sample`` makes in ``num_steps`` steps (default:
        the objective's), without guidance (classifier-free guidance doubles the batch)."""

    def sample(
        self,
        net: RawNet,
        noise: jax.Array,
        class_labels: jax.Array,
        *,
        num_steps: int | None = None,
        guidance: Guidance | None = None,
        keys: jax.Array | None = None,
    ) -> jax.Array:
        """x0 from standard-normal noise (any scaling of the noise happens inside); ``keys``: one
        per sample, for guidance that draws tokens (sparse guidance)."""


def default_config(name: str) -> ml_collections.ConfigDict:
    """The objective's hyperparameters with the published defaults (docs/method.md), plus ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    fields = {f.name: f.default for f in dataclasses.fields(OBJECTIVES[name])}
    return ml_collections.ConfigDict({"name": name, **fields})


def create_objective(config: ml_collections.ConfigDict) -> Objective:
    """The objective ``config.name`` names, its unset hyperparameters at their defaults."""
    settings = dict(config)
    name = settings.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    known = {f.name for f in dataclasses.fields(OBJECTIVES[name])}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {name} objective settings {unknown}; known: {sorted(known)}")
    return OBJECTIVES[name](**settings)


__all__ = [
    "DDPM",
    "EDM",
    "Flow",
    "Guidance",
    "Objective",
    "RawNet",
    "create_objective",
    "default_config",
    "drop_labels",
    "guided_net",
    "routed_loss",
    "token_loss",
]
