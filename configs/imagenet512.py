"""ImageNet 512x512 in SD-VAE latent space (64x64x4): the variants of configs/imagenet256.py.

Command (from the repository root), after preparing the latents once:

    python -m tread_jax.data.prepare_latents --source=folder --data_dir=/data/imagenet \\
        --resolution=512 --vae=stabilityai/sd-vae-ft-ema --output_dir=/data/tfds
    python -m tread_jax.main --config=configs/imagenet512.py:dit_xl2_tread \\
        --config.data.data_dir=/data/tfds --workdir=/ckpt/dit_xl2_tread_512

Variant names, routes (2..depth-4, ratio 0.5), objectives and training settings are those of
configs/imagenet256.py; no text after ``:`` = ``dit_xl2_tread``. Patch 2 on 64x64 latents gives
1024 tokens, four times the 256-pixel sequence, so a step costs roughly 4-5x more.
In-loop evaluation (5K samples every 50K steps) as there; for FID pass ADM's 512 reference
batch: ``--config.eval.reference=/data/VIRTUAL_imagenet512.npz``.

Hardware: sized for a Cloud TPU slice of 32-64 chips or several 8-GPU hosts (80 GB each).

Expected result: the paper's reference table (FID at 400K steps, docs/method.md) covers ImageNet
256 only; there is no 400K-step TREAD figure at 512 to compare against here.
"""

import os

import ml_collections

from tread_jax import cli

# One definition of the variants: this file builds them at 512.
imagenet256 = cli.load_config_module(os.path.join(os.path.dirname(__file__), "imagenet256.py"))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    return imagenet256.build(variant, 512)
