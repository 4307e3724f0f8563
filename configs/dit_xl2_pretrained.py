"""The public DiT-XL/2 checkpoints (Peebles & Xie 2023), sampled and scored by this repository's stack.

Evaluates facebook/DiT-XL-2-256 or facebook/DiT-XL-2-512 (the original weights in diffusers'
layout) exactly as a trained workdir is evaluated: FID-50K (and sFID, IS, precision, recall)
against ADM's reference batch, with DiT's sampler: DDPM with the learned variance, 250 of the 1000
steps (respaced), classifier-free guidance on the first 3 epsilon channels as DiT's own code
applies it (docs/method.md), float32, the sd-vae-ft-ema decoder. Variants (text after ``:``):
``256_cfg1.5`` (the default), ``256`` (no guidance), ``512_cfg1.5``, ``512``.

Command (from the repository root; the checkpoint, the VAE and the Inception weights are fetched
into ``$TREAD_JAX_CACHE`` on first use, ADM's reference batches come from
https://github.com/openai/guided-diffusion/tree/main/evaluations):

    python -m tread_jax.evaluate --config=configs/dit_xl2_pretrained.py:256_cfg1.5 \\
        --from_diffusers=facebook/DiT-XL-2-256 --workdir=/ckpt/dit_xl2_256_pretrained \\
        --reference=/data/VIRTUAL_imagenet256_labeled.npz
    python -m tread_jax.evaluate --config=configs/dit_xl2_pretrained.py:512_cfg1.5 \\
        --from_diffusers=facebook/DiT-XL-2-512 --workdir=/ckpt/dit_xl2_512_pretrained \\
        --reference=/data/VIRTUAL_imagenet512.npz

(``:256`` / ``:512`` for the rows without guidance.) Results go to
``<workdir>/eval/0/n50000_steps250_cfg1.5_seed0/metrics.json``; an interrupted run resumes.

Expected FID-50K, from the paper (Peebles & Xie 2023, tables 4 and 5), not measured here (no
weights or accelerator were available to this project):

    checkpoint      guidance 1.5   no guidance
    DiT-XL/2 256    2.27           9.62
    DiT-XL/2 512    3.04           12.03

Our samples use other random noise than DiT's ``sample_ddp.py`` and balanced labels (50 per
class; DiT draws labels uniformly at random), so expect the figures within the usual spread of
FID-50K between seeds (a few hundredths), not bit-equal samples.

Cost (estimate, not a measurement), from ``python benchmarks/estimate.py
--config=configs/dit_xl2_pretrained.py:256_cfg1.5 --mfu=0.4`` (DDPM's 250 evaluations per image,
doubled by the guidance; ``--noguided`` for the run without): FID-50K
with guidance at 256 is 5.9e18 FLOP, 0.52 h on 8 H100s, so about 4.2 hours on one H100 at an
assumed 40% of its dense bfloat16 peak (this config samples in float32: budget more); without
guidance 2.1 hours. At 512 (524.5 against 118.6 GMACs per evaluation): about 18 hours with
guidance, 9.2 without. The VAE decode and the Inception add under 1%.

Fine-tuning a public DiT with TREAD routing starts from the same source (training needs the
ImageNet latents, README):

    python -m tread_jax.main --config=configs/dit_xl2_pretrained.py:256 \\
        --config.init_from=facebook/DiT-XL-2-256 --config.routes='({"start": 2, "end": 24, "ratio": 0.5},)' \\
        --config.data.data_dir=/data/tfds --workdir=/ckpt/dit_xl2_256_tread_ft
"""

import os

import ml_collections

from tread_jax import cli, diffusion

imagenet256 = cli.load_config_module(os.path.join(os.path.dirname(__file__), "imagenet256.py"))

DEFAULT_VARIANT = "256_cfg1.5"
GUIDANCE = 1.5  # DiT's sample_ddp.py default, the paper's headline figures
DIT_GUIDED_CHANNELS = 3  # DiT's forward_with_cfg guides eps[:, :3] of the 4 latent channels


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    name = variant or DEFAULT_VARIANT
    resolution, _, guided = name.partition("_")
    if resolution not in ("256", "512") or guided not in ("", f"cfg{GUIDANCE:g}"):
        raise ValueError(f"unknown variant {name!r}; known: 256, 256_cfg1.5, 512, 512_cfg1.5")
    config = imagenet256.build("dit_xl2", int(resolution))  # dense DiT-XL/2 on SD-VAE latents
    config.model.compute_dtype = "float32"  # DiT's FIDs were measured in float32 (its README)
    config.diffusion = diffusion.default_config("ddpm")  # 1000 linear betas, learned variance
    config.diffusion.guided_channels = DIT_GUIDED_CHANNELS
    config.eval.num_samples = 50_000
    config.eval.num_steps = 250  # respaced ancestral steps
    config.eval.guidance = GUIDANCE if guided else 1.0
    config.eval.every = 0
    return config
