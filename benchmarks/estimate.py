"""Time and cost estimates for a training config and its FID-50K evaluation, from analytic FLOPs.

An estimate, not a measurement: time = FLOPs / (chips x peak x MFU). Training counts three
forward passes per image (forward, and a backward of about twice its cost) with the config's
routes applied, plus REPA's encoder forward, projector and loss when ``config.repa`` is enabled
(``repa.repa_macs``, printed on their own line with their share of the step). FID-50K sampling
counts the dense forward passes of the config's sampler (``Objective.network_evaluations``:
EDM's Heun 2N - 1 for N steps, flow's Euler N or Heun 2N, DDPM's N) at the config's
``eval.num_steps``, twice that with guidance (``eval.guidance`` other than 1; an upper bound
for a guidance interval, and for sparse and path-drop guidance, whose weak branch is cheaper).
The MFU is an input: measure it on the target device with ``benchmarks/train_step.py`` and pass
it here. Peaks are the vendors' dense bfloat16 figures; prices are on-demand list prices per
chip-hour that were not checked against current price lists (pass ``--usd_per_chip_hour`` with
yours).

The README's launch estimates:

    python benchmarks/estimate.py --config=configs/imagenet256.py:dit_xl2_tread --mfu=0.4
"""

from __future__ import annotations

import math

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from tread_jax import diffusion, evaluation, models, routing
from tread_jax.data import latents
from tread_jax.diffusion import repa
from tread_jax.models.flops import dit_forward_macs

# name: (dense bfloat16 peak TFLOP/s per chip, assumed USD per chip-hour, chips per typical slice)
CHIPS = {
    "tpu-v4": (275.0, 3.22, 16),  # v4-32: 16 chips
    "tpu-v5e": (197.0, 1.20, 32),
    "tpu-v5p": (459.0, 4.20, 16),  # v5p-32: 16 chips
    "h100": (989.0, 3.00, 8),
    "a100": (312.0, 1.80, 8),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (file[:variant])")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation to assume (measure it first)")
_FID_SAMPLES = flags.DEFINE_integer("fid_samples", 50_000, "samples for the FID evaluation")
_FID_STEPS = flags.DEFINE_integer("fid_steps", None, "sampler steps for the FID samples (default: the config's "
                                   "eval.num_steps)")
_GUIDED = flags.DEFINE_bool("guided", None, "FID samples with guidance (default: the config's eval.guidance != 1)")
_PRICES = flags.DEFINE_list("usd_per_chip_hour", [], "overrides, e.g. tpu-v4=3.0,h100=2.5")


def latent_size(data_name: str) -> int:
    """Side of the model input for a registered ImageNet latent dataset."""
    for resolution in latents.RESOLUTIONS:
        if latents.dataset_name(resolution) == data_name:
            return resolution // latents.DOWNSAMPLE
    raise ValueError(f"dataset {data_name!r} is not an ImageNet latent dataset; known: "
                     f"{[latents.dataset_name(r) for r in latents.RESOLUTIONS]}")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if not 0 < _MFU.value <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {_MFU.value}")
    prices = {name: spec[1] for name, spec in CHIPS.items()}
    for item in _PRICES.value:
        name, _, price = item.partition("=")
        if name not in CHIPS:
            raise ValueError(f"unknown chip {name!r} in --usd_per_chip_hour; known: {', '.join(CHIPS)}")
        prices[name] = float(price)

    size = latent_size(config.data.name)
    routes = routing.parse_routes(config.routes)
    model = nnx.eval_shape(lambda: models.create_model(
        config.model.name, input_size=size, in_channels=latents.LATENT_CHANNELS, num_classes=1000,
        sprint_span=routing.sprint_span(routes), rngs=nnx.Rngs(0), **dict(config.model.get("overrides", {}) or {})))
    routed, dense = (dit_forward_macs(model, size, size, r) for r in (routes, ()))
    images = config.global_batch_size * config.num_train_steps
    step_macs = 3 * routed  # per image: forward and a backward of about twice its cost
    extra = None
    if repa.active_config(config) is not None:
        extra = repa.repa_macs(config.repa, model.hidden_size, model.depth, size * latents.DOWNSAMPLE,
                               model.num_tokens(size, size), routes)
        step_macs += extra.total
    train_flops = 2 * step_macs * images
    settings = evaluation.settings_from_config(config, num_classes=1000)
    fid_steps = _FID_STEPS.value or settings.num_steps
    guided = _GUIDED.value if _GUIDED.value is not None else settings.guidance_scale != 1.0
    objective = diffusion.create_objective(config.diffusion)
    evaluations = objective.network_evaluations(fid_steps) * (2 if guided else 1)
    fid_flops = 2 * dense * evaluations * _FID_SAMPLES.value

    print(f"{config.model.name}, {size}x{size} latents, routes {routes}, batch {config.global_batch_size}, "
          f"{config.num_train_steps:,} steps")
    print(f"forward GMACs per image: {routed / 1e9:.2f} routed, {dense / 1e9:.2f} dense "
          f"(ratio {routed / dense:.3f}); training {train_flops:.3g} FLOP; FID-{_FID_SAMPLES.value // 1000}K "
          f"sampling {fid_flops:.3g} FLOP ({evaluations} evaluations per image: {config.diffusion.name}, "
          f"{fid_steps} steps{', guided' if guided else ''})")
    if extra is not None:
        print(f"REPA per image: encoder {extra.encoder / 1e9:.2f} GMACs (forward), projector and loss "
              f"{(extra.projector + extra.loss) / 1e9:.2f} GMACs (forward + backward): {extra.total / step_macs:.1%} "
              f"of the training step's FLOPs (encoder {extra.encoder / step_macs:.1%}), "
              f"+{extra.total / (step_macs - extra.total):.1%} over the step without REPA")
    print(f"at an assumed MFU of {_MFU.value:.0%} (estimates, not measurements):")
    print(f"{'chip':9}{'peak TF/s':>10}{'chips':>7}{'train h':>9}{'chip-h':>9}{'USD':>9}{'FID h':>7}")
    for name, (peak, _, chips) in CHIPS.items():
        rate = chips * peak * 1e12 * _MFU.value
        hours = train_flops / rate / 3600
        print(f"{name:9}{peak:10.0f}{chips:7d}{hours:9.1f}{hours * chips:9.0f}"
              f"{math.ceil(hours * chips * prices[name]):9,d}{fid_flops / rate / 3600:7.2f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
