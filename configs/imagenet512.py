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

Expected result: DESIGN.md's reference table (the paper's FID at 400K steps) covers ImageNet
256 only; there is no 400K-step TREAD figure at 512 to compare against here.
"""

import importlib.util
import os

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    # Loaded by path: config files are not a package, and this keeps one definition of the variants.
    path = os.path.join(os.path.dirname(__file__), "imagenet256.py")
    spec = importlib.util.spec_from_file_location("configs_imagenet256", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(variant, 512)
