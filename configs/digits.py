"""The embedded default: a small DiT trained with TREAD on scikit-learn's 8x8 digits, on CPU.

Command (from the repository root):

    python -m tread_jax.main --config=configs/digits.py --workdir=/tmp/tread_digits

Measured (shared 2-core CPU, other jobs running, load average 1.5-2.6): compile 15 s,
2200 steps at a median 8.6 steps/s (8.5-9.0 when the machine was otherwise quiet), training
loop 5m29s (4.8 steps/s for its first 500 steps while a test run shared the CPU; ~4m35s
without it), whole command 6m04s; quality report with EMA weights, 1000 samples, Heun 18
steps, guidance 1: accuracy 0.955, Frechet distance 1.74 against a real train-vs-test floor of
1.00 (ratio 1.74). Accuracy meets the issue's bar (>= 0.95, narrowly); the distance does not
(<= 1.5x). EMA decay was the tried lever: 0.998 over 2400 steps gave 0.924 / 1.80x, 0.99 over
2300 steps 0.952 / 1.83x, so 0.995 stays.

Model: DiT with 6 blocks of width 128 and 4 heads, patch 2 (16 tokens per 8x8 digit), one
TREAD route sending half the tokens around blocks 1..3. EDM objective, Adam 1e-3 with a
short warmup (a small model on 1.5K images tolerates and needs a higher rate than DESIGN's
1e-4), EMA 0.995 (half-life ~140 steps: the EMA starts at the random initial weights, and
with 0.999 a 1.5K-step run still carried 22% of them, which drove accuracy to 16% against 88%
for the raw weights), Heun with 18 steps for samples. The training budget is a step count, not wall time, so results reproduce.

Variant ``configs/digits.py:ssm``: the same run with the Mamba-style SSM backbone (6 blocks of
width 128, state 16, sequential scan, the faster one on CPU) routed over blocks 1..3 with the
kept tokens in scan order. Measured only briefly (0.4-0.75 steps/s on the shared 2-core CPU,
loss 1.56 -> 0.60 over 400 steps); its quality report is not measured yet.
"""

import ml_collections

from tread_jax import data, diffusion


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """``variant``: None (DiT) or "ssm" (the text after ``:`` in ``--config``)."""
    if variant not in (None, "", "ssm"):
        raise ValueError(f"unknown digits variant {variant!r}; known: ssm")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "DiT-S/2"  # named size, then resized by the overrides below
    config.model.overrides = dict(depth=6, hidden_size=128, num_heads=4)
    config.model.compute_dtype = "float32"  # bfloat16 on accelerators
    config.model.scan_blocks = False  # scan over stretches of blocks (faster compiles, deep models)
    config.model.remat = "none"  # activation checkpointing per block: "none", "dots" or "full"
    # TREAD routes: blocks start..end (0-based, inclusive) see 1 - ratio of the tokens.
    config.routes = (dict(start=1, end=3, ratio=0.5),)
    # Version-1 loss (kept-token loss + mae_coef x routed-token loss); off = version 3.
    config.route_loss = ml_collections.ConfigDict(dict(enabled=False, mae_coef=0.0))

    config.diffusion = diffusion.default_config("edm")
    config.label_dropout = 0.1  # classifier-free guidance training (null class = num_classes)

    config.data = data.default_config()
    config.global_batch_size = 64
    config.num_train_steps = 2200

    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=200, decay_steps=0,
             grad_clip=0.0)
    )
    config.ema_decay = 0.995

    # Device mesh: sizes of the (data, fsdp) axes, -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.fsdp_min_size = 2**16  # parameters with fewer elements stay replicated

    config.log_every = 100
    config.checkpoint_every = 1000
    config.max_to_keep = 3
    # Periodic sample grids from the EMA weights: per_class samples of every class.
    config.sample = ml_collections.ConfigDict(dict(every=1000, per_class=10, num_steps=18, guidance=1.0))
    # End-of-run quality report ("digits": classifier accuracy and Frechet distance; "" = none).
    # num_samples 0: one sample per training digit, with its label (the floor's N and class mix).
    config.eval = ml_collections.ConfigDict(dict(report="digits", num_samples=0, num_steps=18, guidance=1.0))

    if variant == "ssm":
        config.model.name = "SSM-S/2"
        config.model.overrides = dict(depth=6, hidden_size=128, d_state=16, scan_method="sequential")
    return config
