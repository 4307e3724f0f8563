"""The embedded default: a small DiT trained with TREAD on scikit-learn's 8x8 digits, on CPU.

Command (from the repository root):

    python -m tread_jax.main --config=configs/digits.py --workdir=/tmp/tread_digits

Measured (2-core CPU, nothing else running): compile 12.6 s, 2200 steps at a median 7.8
steps/s (4.8-8.8 per 100-step window), training loop 5m10s including the compile (4m57s of
training), whole command 5m57s. Quality report (EMA weights, 1501 samples: one per training
digit, with its label; Heun 18 steps, guidance 1): accuracy 0.965 (bar >= 0.95: met), Frechet
distance 1.571 against the real train-vs-test floor of 1.000 (ratio 1.57; bar <= 1.5: not met).
The same config for 2400 steps: 0.967 / 1.56, but 5m22s of training loop.

Not met yet: the distance bar (<= 1.5x the floor). The report scores one sample per real
training digit (1501, with its label): a Frechet distance estimated from N samples is biased
upwards as N shrinks (two random halves of the real training digits are 1.54x the floor
apart), so the generated side gets the floor's N. The ratio still moves by about 0.1 with
the sampling seed (seeds 1/2/3 after 2400 steps of this config: 1.56 / 1.41 / 1.55; the
report uses seed 1). Tried, as ratios averaged over seeds 1-3 unless noted: lr 2e-3 vs 3e-3
at 2600 steps 1.52 vs 1.51; P_mean -1.2 vs -0.8 at lr 3e-3 about 1.54 (between 1.57 at 2200
and 1.51 at 2600 steps) vs 1.505 at 2400; batch 32 for 3600-4400 steps 1.54 (no better per
second than batch 64); route 1..4 instead of 1..3 1.77 (worse); cosine decay worse (1000
samples, seed 1: 1.81 vs 1.74); stochastic Heun (churn) no better; EMA 0.998 and 0.99 worse
than 0.995. The distance still falls with steps, so a faster step is the likeliest way to the
bar within 5 minutes of training.

Model: DiT with 6 blocks of width 128 and 4 heads, patch 2 (16 tokens per 8x8 digit), one
TREAD route sending half the tokens around blocks 1..3. EDM objective with training noise
levels a little higher than EDM's default (P_mean -0.8), Adam 3e-3 with a short warmup (a
small model on 1.5K images tolerates and needs a much higher rate than DESIGN's 1e-4), EMA
0.995 (half-life ~140 steps: the EMA starts at the random initial weights, and with 0.999 a
1.5K-step run still carried 22% of them, which drove accuracy to 16% against 88% for the raw
weights), Heun with 18 steps for samples. The training budget is a step count, not wall time,
so results reproduce (two runs of the same config gave bit-identical reports).

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
    # One lax.scan per stretch of blocks (same parameter layout; compiles slower on XLA:CPU,
    # untested on accelerators) and activation checkpointing per block ("none", "dots", "full").
    config.model.scan_blocks = False
    config.model.remat = "none"
    # TREAD routes: blocks start..end (0-based, inclusive) see 1 - ratio of the tokens.
    config.routes = (dict(start=1, end=3, ratio=0.5),)
    # Version-1 loss (kept-token loss + mae_coef x routed-token loss); off = version 3.
    config.route_loss = ml_collections.ConfigDict(dict(enabled=False, mae_coef=0.0))

    config.diffusion = diffusion.default_config("edm")
    # Training noise levels a little higher than EDM's default (ln sigma ~ N(-1.2, 1.2^2));
    # measured slightly better here (docstring).
    config.diffusion.P_mean = -0.8
    config.label_dropout = 0.1  # classifier-free guidance training (null class = num_classes)

    config.data = data.default_config()
    config.global_batch_size = 64
    config.num_train_steps = 2200

    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=200, decay_steps=0,
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
