"""Sample-quality metrics.

* ``inception``: the FID Inception v3 in Flax (pool, logits and sFID spatial features) and a
  torch-free reader for pytorch-fid's released weights.
* ``fid``: FID/sFID, Inception Score, precision/recall, streaming feature statistics and
  ADM-format reference batches (numpy only).
* ``digits``: classifier-based quality numbers for the embedded 8x8 digits default.

Submodules are imported explicitly (``from tread_jax.metrics import fid``) so that the numpy
metrics do not pull in JAX or scikit-learn.
"""
