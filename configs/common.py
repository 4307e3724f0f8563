"""The base every training config starts from: the published TREAD training recipe.

Not a runnable config: ``configs/digits.py`` and ``configs/imagenet256.py`` (and through it
``imagenet512.py``) load it, call ``base_config()`` and set what their data, model and hardware
need, so that every field a run uses is either the paper's default here or set on purpose there.
Values as the published code (version 3 / ICCV), documented in ``docs/method.md``: AdamW 1e-4
with betas (0.9, 0.999), no schedule, no clipping, no weight decay; global batch 256; EMA 0.9999
every step; bfloat16 compute with float32 parameters; label dropout 0.1 for classifier-free
guidance; EDM with its default noise distribution.
"""

import ml_collections

from tread_jax import data, diffusion


def base_config() -> ml_collections.ConfigDict:
    """The fields the trainer reads, at the published defaults; routes are off (dense)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "DiT-XL/2"
    config.model.overrides = {}  # size settings replacing the named size's (depth, hidden_size, ...)
    config.model.compute_dtype = "bfloat16"  # parameters and optimizer state stay float32
    # One lax.scan per stretch of blocks (same parameter layout; compiles slower on XLA:CPU,
    # untested on accelerators) and activation checkpointing per block ("none", "dots", "full").
    config.model.scan_blocks = False
    config.model.remat = "none"
    # TREAD routes: blocks start..end (0-based, inclusive) see 1 - ratio of the tokens;
    # routing.default_route(depth) is the published placement. () = dense.
    config.routes = ()
    # Version-1 loss (kept-token loss + mae_coef x routed-token loss); off = version 3.
    config.route_loss = ml_collections.ConfigDict(dict(enabled=False, mae_coef=0.0))

    # REPA (Yu et al. 2024; tread_jax/diffusion/repa.py): align the projected tokens after block
    # ``depth`` (1-based; the kept ones under routing) with DINOv2 features of the clean image,
    # loss weight ``coef``. Needs latents prepared with --store_images.
    config.repa = ml_collections.ConfigDict(dict(
        enabled=False, encoder="dinov2-vitb14", depth=8, coef=0.5, projector_width=2048, encoder_image_size=224,
        encoder_dtype="bfloat16"))

    config.diffusion = diffusion.default_config("edm")
    config.label_dropout = 0.1  # classifier-free guidance training (null class = num_classes)

    config.data = data.default_config()
    # Global batches placed on the devices ahead of the step that uses them (the loop then
    # never waits for the input pipeline while the pipeline keeps up).
    config.data.device_prefetch = 2
    config.global_batch_size = 256
    config.num_train_steps = 400_000
    # decay_steps > 0: cosine decay reaching 0 at that step (preflight wants it >= num_train_steps).
    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, decay_steps=0,
             grad_clip=0.0)
    )
    config.ema_decay = 0.9999

    # Device mesh: sizes of the (data, fsdp) axes, -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.fsdp_min_size = 2**16  # parameters with fewer elements stay replicated

    # Train steps per jitted call (lax.scan over that many batches): fewer dispatches for small,
    # fast steps; same results as 1. Every interval and num_train_steps must be a multiple of it.
    config.steps_per_call = 1
    # Persistent compilation cache, relative to the workdir (absolute paths as given; "" = off).
    # In the workdir by default, so that a job restarted after a preemption finds it there.
    config.compilation_cache_dir = "compilation_cache"
    # Steps to trace with jax.profiler after the warm-up, into <workdir>/profile (0 = none).
    config.profile_steps = 0

    config.log_every = 100
    config.checkpoint_every = 10_000
    config.max_to_keep = 3
    # Periodic sample grids from the EMA weights: per_class samples of every class (0 = never).
    # Guidance: scale ``guidance``; ``guidance_method`` "cfg", "sparse" (Sparse Guidance: the
    # routed fractions ``guidance_sparsity`` = (weak, strong), both branches class-conditional) or
    # "path_drop" (SPRINT models).
    guidance = dict(guidance=1.0, guidance_method="cfg", guidance_sparsity=(0.75, 0.0))
    config.sample = ml_collections.ConfigDict(dict(every=10_000, per_class=4, num_steps=40, **guidance))
    # Evaluation settings: the end-of-run report ("" = none) and the sampler it uses.
    config.eval = ml_collections.ConfigDict(dict(report="", num_steps=40, **guidance))
    return config
