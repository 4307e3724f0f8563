"""ImageNet 256x256 in SD-VAE latent space (32x32x4): the paper's runs, selected by name.

Command (from the repository root), after preparing the latents once:

    python -m tread_jax.data.prepare_latents --source=folder --data_dir=/data/imagenet \\
        --resolution=256 --vae=stabilityai/sd-vae-ft-ema --output_dir=/data/tfds
    python -m tread_jax.main --config=configs/imagenet256.py:dit_xl2_tread \\
        --config.data.data_dir=/data/tfds --workdir=/ckpt/dit_xl2_tread

Variants (the text after ``:``; no text = ``dit_xl2_tread``, the paper's headline run):
``dit_s2``, ``dit_b2``, ``dit_l2``, ``dit_xl2``, ``sit_b2``, ``sit_xl2``, ``ssm_b2``,
``lightningdit_xl2`` (dense baselines; LightningDiT below), the same names with ``_tread``
(``routing.default_route``: one route over blocks 2..depth-4 at ratio 0.5: S/B 2->8, L 2->20,
XL 2->24, SSM-B 2->15), and ``<model>_tread_ft``:
the dense fine-tune of a routed run (the paper's guided "(F)" rows), which starts from the
routed run's checkpoint with routing off:

    python -m tread_jax.main --config=configs/imagenet256.py:dit_xl2_tread_ft \\
        --config.init_from=/ckpt/dit_xl2_tread --config.data.data_dir=/data/tfds --workdir=/ckpt/dit_xl2_tread_ft

SPRINT (Park et al., arXiv 2510.21986) variants ``sit_b2_sprint``, ``sit_xl2_sprint`` (and any
``<model>_sprint``): blocks 0-1 dense, blocks 2..depth-3 on 25% of the tokens (one per 2x2 group,
``Route(group=2)``), their output scattered into a learned mask token and fused with the dense
output of block 1 by a Linear(2D -> D), the last 2 blocks dense; each sample's whole sparse path is
dropped with probability 0.1 (what path-drop guidance's weak branch uses). Then ``_sprint_ft``, the
published full-token fine-tune (mask ratio 0, path drops kept; 200K steps at batch 1024, lr 2e-4,
gradient clipping 1.0 as the published ``SIT_XL_SPRINT_256_ft.yaml``):

    python -m tread_jax.main --config=configs/imagenet256.py:sit_xl2_sprint \
        --config.data.data_dir=/data/tfds --workdir=/ckpt/sit_xl2_sprint
    python -m tread_jax.main --config=configs/imagenet256.py:sit_xl2_sprint_ft \
        --config.init_from=/ckpt/sit_xl2_sprint --config.data.data_dir=/data/tfds --workdir=/ckpt/sit_xl2_sprint_ft
    python -m tread_jax.evaluate --config=configs/imagenet256.py:sit_xl2_sprint_ft \
        --workdir=/ckpt/sit_xl2_sprint_ft --num_samples=50000 --guidance=path_drop --guidance_scale=3.0

Expected (from the paper, not measured here; its SiT-XL/2 uses SwiGLU and RMS-normed q/k, our
blocks are DiT's): SiT-XL/2, 400 epochs then the fine-tune, FID-50K 1.96 with classifier-free
guidance and 1.62 with path-drop guidance (the published sampler: SDE, 250 steps, scale 3.0),
at 47% of the dense model's training FLOPs. Training: 2M steps at batch 256 (the published
``max_train_steps``), gradient clipping 1.0. ``benchmarks/sampling.py --flops`` counts the
FLOPs per image of each guidance method.

REPA (Yu et al. 2024, arXiv 2410.06940) variants: any of the above with ``_repa`` before
``_ft`` (``sit_xl2_repa``, ``sit_xl2_tread_repa``, ``dit_xl2_tread_repa``, ``sit_b2_tread_repa``):
the tokens after block 8 (XL, L; block 4 for S, B, SSM-B) pass through REPA's 3-layer MLP
projector and are aligned (``coef`` 0.5 x negative cosine) with DINOv2-B/14 features of the
clean 256 px crop resized to 224; under TREAD the block is inside the route, so only the kept
tokens align, each with the feature at its own position. The latents must be prepared with
``--store_images``; DINOv2's ``config.json`` and ``model.safetensors`` are downloaded on first
use into ``$TREAD_JAX_CACHE/dinov2-vitb14/`` (or place them there):

    python -m tread_jax.data.prepare_latents --source=folder --data_dir=/data/imagenet \
        --resolution=256 --vae=stabilityai/sd-vae-ft-ema --output_dir=/data/tfds_images --store_images
    python -m tread_jax.main --config=configs/imagenet256.py:sit_xl2_tread_repa \
        --config.data.data_dir=/data/tfds_images --workdir=/ckpt/sit_xl2_tread_repa

Expected (from the paper, not measured here): SiT-XL/2 + REPA, FID-50K 5.9 at 400K steps
without guidance (SiT-XL/2 alone: 8.3 at 7M steps). TREAD + REPA together was not measured
by either paper nor here.

LightningDiT (Yao et al. 2025, arXiv 2501.01423; github.com/hustvl/LightningDiT) variants
``lightningdit_xl2`` (dense) and ``lightningdit_xl2_tread`` (one route over blocks 2..24 at ratio
0.5, ``routing.default_route``): the TREAD paper's LightningDiT setting as far as our VAE allows.
The model is ``LightningDiT-XL/2`` (DiT-XL's 28 blocks of width 1152 with the modern block as
LightningDiT's released config: SwiGLU, RMSNorm, 2-D RoPE, the fixed sin-cos table, adaLN with
shift, no QK-norm; 674.9M parameters at 32x32x4, DiT-XL/2's 674.8M), the flow objective with
logit-normal(0, 1) timesteps, and LightningDiT's released training schedule
(``configs/lightningdit_xl_vavae_f16d32.yaml`` with ``train.py``): 80K steps at global batch
1024, AdamW lr 2e-4, betas 0.9/0.95, no weight decay, no warmup, no gradient clipping, EMA
0.9999, label dropout 0.1:

    python -m tread_jax.main --config=configs/imagenet256.py:lightningdit_xl2_tread \
        --config.data.data_dir=/data/tfds --workdir=/ckpt/lightningdit_xl2_tread

Expected (from the TREAD paper, not measured here): LightningDiT FID 5.14 dense, 3.71 with
TREAD, at 80K steps. What differs from that setting:
- VAE: ours is SD-VAE (``stabilityai/sd-vae-ft-ema``, 32x32x4 latents scaled by 0.18215) at
  patch 2; LightningDiT's is its VA-VAE (f16d32: 16x16x32 latents, normalised per channel) at
  patch 1 (``LightningDiT-XL/1``). Both give 256 tokens of the same width, so the transformer's
  cost is the same, but the latent space is not, and VA-VAE's alignment with DINOv2 is much of
  LightningDiT's fast convergence: FIDs are not comparable across the two.
- Loss: LightningDiT adds a velocity-direction term (``use_cosine_loss``: 1 - cosine
  similarity of predicted and target velocity per sample), which we do not implement; ours is
  the mean squared velocity error alone.
- Time: LightningDiT's path runs from noise at t=0 to data at t=1; ours the other way (the flow
  objective's docstring). The logit-normal(0, 1) density is symmetric, so the training
  distribution is the same; a LightningDiT checkpoint would need t -> 1 - t and v -> -v.
- Sampling: LightningDiT's FID-50K uses Euler with 250 steps, a timestep shift 0.3 and, with
  guidance, a guidance interval; our flow sampler is Euler with 250 steps, no shift.
- Route: these variants take TREAD's default (blocks 2..depth-4, ratio 0.5); the route the
  TREAD paper used for its LightningDiT row was not checked against the paper here.
- ``_tread_ft`` appends this repository's 100K dense steps, as for the other models.

DiT = EDM objective (as the published TREAD code); SiT = the same network with the flow
objective; SSM = the Mamba-style backbone (SSM-B/2, 112.6M parameters, 19 blocks; the paper's
111M Mamba) with the EDM objective and routing that keeps the kept tokens in scan order. Training as
published (configs/common.py, docs/method.md): global batch 256, AdamW 1e-4 (betas 0.9/0.999,
no decay, no warmup, no clipping), EMA 0.9999, bfloat16 compute with float32 parameters, 400K
steps, label dropout 0.1 for classifier-free guidance.

Hardware: sized for one host with 8 GPUs of 80 GB (A100/H100) or a Cloud TPU slice of 16-32
chips; the batch is split over every device the job has, so smaller machines run it too,
only slower (DiT-XL/2 keeps about 11 GB of float32 parameters, Adam state and EMA).

Expected FID-50K at 400K steps, no guidance (paper, ImageNet 256; docs/method.md):

    model      params  dense   TREAD
    DiT-S/2    33M     68.40   47.04
    DiT-B/2    130M    43.47   21.34
    DiT-L/2    458M    23.33    9.10
    DiT-XL/2   675M    19.47    7.38
    SiT-B/2    130M    33.00   15.98
    SiT-XL/2   675M    17.20    4.89
    Mamba      111M    69.39   61.17   (the paper's SSM backbone; ours is SSM-B/2)

The fine-tune length (100K dense steps after the routed 400K) is this repository's choice.

In-loop evaluation: every ``eval.every`` = 50K steps, 5K samples from the EMA weights (classes
balanced, ``eval.num_steps`` sampler steps, 32 per device) are scored by the FID Inception and
written as ``eval/<metric>`` scalars. Set ``--config.eval.reference=/data/VIRTUAL_imagenet256_labeled.npz``
(ADM's reference batch) for FID/sFID/precision/recall; without it ("") only the Inception Score
is computed. ``--config.eval.every=0`` turns it off; FID-50K comes from ``tread_jax.evaluate``.
"""

import dataclasses
import os

import ml_collections

from tread_jax import cli, diffusion, models, routing
from tread_jax.data import latents

common = cli.load_config_module(os.path.join(os.path.dirname(__file__), "common.py"))

# variant prefix -> (model name, objective)
MODELS = {
    "dit_s2": ("DiT-S/2", "edm"),
    "dit_b2": ("DiT-B/2", "edm"),
    "dit_l2": ("DiT-L/2", "edm"),
    "dit_xl2": ("DiT-XL/2", "edm"),
    "sit_b2": ("DiT-B/2", "flow"),
    "sit_xl2": ("DiT-XL/2", "flow"),
    "ssm_b2": ("SSM-B/2", "edm"),
    "lightningdit_xl2": ("LightningDiT-XL/2", "flow"),
}
DEFAULT_VARIANT = "dit_xl2_tread"
TRAIN_STEPS = 400_000
FINETUNE_STEPS = 100_000
# LightningDiT's released schedule (configs/lightningdit_xl_vavae_f16d32.yaml, train.py): the
# AdamW betas are (0.9, beta2), weight decay 0, no clipping (no max_grad_norm in the config).
LIGHTNINGDIT_TRAIN_STEPS = 80_000
LIGHTNINGDIT_BATCH = 1024
LIGHTNINGDIT_LR = 2e-4
LIGHTNINGDIT_B2 = 0.95
# SPRINT's published schedule (SIT_XL_SPRINT_256.yaml and _ft.yaml).
SPRINT_TRAIN_STEPS = 2_000_000
SPRINT_FINETUNE_STEPS = 200_000
SPRINT_FINETUNE_BATCH = 1024
SPRINT_FINETUNE_LR = 2e-4
# REPA's alignment depth by model depth (the paper: block 4 of B's 12, block 8 of L's 24 and
# XL's 28); S and SSM-B follow B.
REPA_DEPTH = {12: 4, 19: 4, 24: 8, 28: 8}
# DiT's showcase classes (macaw, golden retriever, arctic fox, otter, red panda, ...) for grids.
GRID_CLASSES = [88, 207, 279, 360, 387, 417, 974, 979]


def parse_variant(variant: str | None) -> tuple[str, str, bool, bool]:
    """``dit_xl2_tread_repa_ft`` -> ("dit_xl2", "tread", finetune=True, repa=True); method ""
    (dense), "tread" or "sprint"; ValueError if unknown."""
    name = variant or DEFAULT_VARIANT
    base, method, finetune, repa = name, "", False, False
    if base.endswith("_ft"):
        base, finetune = base[: -len("_ft")], True
    if base.endswith("_repa"):
        base, repa = base[: -len("_repa")], True
    for suffix in ("tread", "sprint"):
        if base.endswith(f"_{suffix}"):
            base, method = base[: -len(suffix) - 1], suffix
    if base not in MODELS or (finetune and not method):
        known = ", ".join(f"{m}[_repa], {m}_tread[_repa][_ft], {m}_sprint[_repa][_ft]" for m in MODELS)
        raise ValueError(f"unknown ImageNet variant {name!r}; known: {known}")
    return base, method, finetune, repa


def sprint_route(depth: int, finetune: bool) -> dict:
    """SPRINT's published route: blocks 2..depth-3 keep one token per 2x2 group (ratio 0.75; 0 in
    the fine-tune), fused back by mask token + Linear; path drop 0.1 (``cfg_mask_prob``)."""
    return dict(start=2, end=depth - 3, ratio=0.0 if finetune else 0.75, group=2, rejoin="sprint", path_drop=0.1)


def build(variant: str | None, resolution: int) -> ml_collections.ConfigDict:
    """The config of ``variant`` on ImageNet latents at ``resolution`` (256 or 512)."""
    base, method, finetune, repa = parse_variant(variant)
    model_name, objective = MODELS[base]
    depth = models.model_spec(model_name)[1]["depth"]

    config = common.base_config()
    config.model.name = model_name
    # The TREAD fine-tune trains the routed run's weights densely; SPRINT's keeps its fused span.
    config.routes = ()
    if method == "tread" and not finetune:
        config.routes = (dataclasses.asdict(routing.default_route(depth)),)
    elif method == "sprint":
        config.routes = (sprint_route(depth, finetune),)
    config.diffusion = diffusion.default_config(objective)

    config.data.name = latents.dataset_name(resolution)
    config.data.in_memory = False  # 2.6M records (with mirrors) of 16 KB at 256 px
    config.data.flip = False  # mirrors are encoded into the dataset by prepare_latents --flip
    config.data.num_threads = 8
    # z = 0.18215 * (mean + std * noise), fresh noise each step; False: z = 0.18215 * mean.
    config.data.sample_latents = True
    config.data.vae = "stabilityai/sd-vae-ft-ema"  # decodes sample grids and evaluation samples

    config.num_train_steps = TRAIN_STEPS + (FINETUNE_STEPS if finetune else 0)
    if base.startswith("lightningdit"):
        config.num_train_steps = LIGHTNINGDIT_TRAIN_STEPS + (FINETUNE_STEPS if finetune else 0)
        config.global_batch_size = LIGHTNINGDIT_BATCH
        config.optim.learning_rate = LIGHTNINGDIT_LR
        config.optim.b2 = LIGHTNINGDIT_B2
    if method == "sprint":
        config.optim.grad_clip = 1.0
        config.num_train_steps = SPRINT_TRAIN_STEPS + (SPRINT_FINETUNE_STEPS if finetune else 0)
        if finetune:
            config.global_batch_size = SPRINT_FINETUNE_BATCH
            config.optim.learning_rate = SPRINT_FINETUNE_LR
    if repa:
        config.repa.enabled = True
        config.repa.depth = REPA_DEPTH[depth]
        # The encoder's grid matches the model's: 224 px (16x16 patches of 14) for 32x32 latents.
        config.repa.encoder_image_size = 224 * resolution // 256
    # Fine-tune: the routed run's workdir, whose latest checkpoint starts this run ("" = none).
    config.init_from = ""

    config.sample.classes = GRID_CLASSES
    # FID-50K comes from the evaluation binary (tread_jax.evaluate), not the end-of-run report;
    # in-loop evaluation tracks FID-5K (module docstring).
    config.eval.every = 50_000
    config.eval.num_samples = 5_000
    config.eval.per_device_batch = 32
    config.eval.reference = ""  # ADM reference .npz (VIRTUAL_imagenet256_labeled.npz); "" = IS only
    return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    return build(variant, 256)
