"""The embedded default: a small DiT trained with TREAD on scikit-learn's 8x8 digits, on CPU.

Command (from the repository root):

    python -m tread_jax.main --config=configs/digits.py --workdir=/tmp/tread_digits

Measured (2-core CPU, nothing else running, 2026-11-23): compile 10.7 s, 2000 steps at a
median 8.05 steps/s (4.6-8.8 per 100-step window; the slow one holds the step-1000 grid),
training loop 4m36s including the compile, whole command 6m15s. Quality report (EMA weights;
three draws of 1501 samples, one per training digit with its label; Heun 18 steps, guidance 1;
samples clipped to [-1, 1] as saved images are): accuracy 0.975 (bar >= 0.95: met), Frechet
distance 1.453 against the real train-vs-test floor of 1.000, ratio 1.454 (bar <= 1.5: met;
the three draws: 1.494 / 1.386 / 1.482). A rerun reproduces these figures exactly: the
training budget is a step count, not wall time.

Why three draws of 1501: a Frechet distance estimated from N samples is biased upwards as N
shrinks (two random halves of the real training digits are 1.58x the floor apart), so each
draw has the floor's N and class mix; one draw still moves by about 0.05x the floor with the
sampling seed, and the mean of three keeps the expectation without that luck.

How the settings were chosen (ratio = mean of the three draws, clipped samples, 2200 steps of
the previous default unless noted; each row changes the row named):

| settings | ratio |
|---|---|
| previous default (sigma_data 0.5, P_mean -0.8, Adam b2 0.999, constant rate), unclipped | 1.529 |
| previous default, clipped | 1.497 |
| Heun 32 or 64 steps instead of 18 | 1.498 / 1.502 |
| sigma_data 0.75 (the digits' measured std) | 1.477 |
| Adam b2 0.99 | 1.464 |
| both ("base") | 1.457 |
| base, EMA ramped up from 0.1 to 0.998 (tried, not kept) | 1.457 |
| base, stratified noise levels | 1.455 |
| base, cosine decay to 0 | 1.453 |
| base, P_mean -0.4 | 1.432 |
| base at width 96 for 3000 steps (the same wall time) | 1.447 |
| this config: base, P_mean -0.4, stratified, cosine, warmup 100; 2000 steps | 1.454 |

The distance falls about 0.03 per 200 steps around here (1.52 / 1.49 / 1.455 at 1800 / 2000 /
2200 for "base, stratified"), so 2000 steps trade some of it for time: the 5-minute training
budget on this shared CPU. Earlier: lr 2e-3 vs 3e-3 no different; batch 32 no better per
second; route 1..4 instead of 1..3 worse (1.77, unclipped); stochastic Heun (churn) no better.

Model: DiT with 6 blocks of width 128 and 4 heads, patch 2 (16 tokens per 8x8 digit), one
TREAD route sending half the tokens around blocks 1..3. EDM objective with sigma_data set to
the digits' standard deviation and training noise levels higher than EDM's default (P_mean
-0.4), Adam 3e-3 with b2 0.99 (a small model on 1.5K images tolerates and needs a much higher
rate than DESIGN's 1e-4), warmup 100 steps then a cosine decay to 0 at the last step, EMA
0.995 (half-life ~140 steps: the EMA starts at the random initial weights, and with 0.999 a
1.5K-step run still carried 22% of them), Heun with 18 steps for samples. Changing
``num_train_steps`` needs ``optim.decay_steps`` changed with it (preflight says so).

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
    config.diffusion.sigma_data = 0.75  # the digits' measured standard deviation in [-1, 1]
    # Training noise levels higher than EDM's default (ln sigma ~ N(-1.2, 1.2^2)), drawn one per
    # probability slice of the batch; measured better here (docstring).
    config.diffusion.P_mean = -0.4
    config.diffusion.stratified = True
    config.label_dropout = 0.1  # classifier-free guidance training (null class = num_classes)

    config.data = data.default_config()
    config.global_batch_size = 64
    config.num_train_steps = 2000

    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, warmup_steps=100,
             decay_steps=2000, grad_clip=0.0)  # cosine to 0 at the last step (num_train_steps)
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
    # num_samples 0: one sample per training digit, with its label (the floor's N and class mix);
    # the report averages `draws` fresh sets of them.
    config.eval = ml_collections.ConfigDict(dict(report="digits", num_samples=0, draws=3, num_steps=18, guidance=1.0))

    if variant == "ssm":
        config.model.name = "SSM-S/2"
        config.model.overrides = dict(depth=6, hidden_size=128, d_state=16, scan_method="sequential")
    return config
