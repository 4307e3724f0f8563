"""Evaluation binary: sample a checkpoint's EMA weights and score the samples (``tread_jax.evaluation``).

    python -m tread_jax.evaluate --config=configs/imagenet256.py:dit_xl2_tread \\
        --workdir=/ckpt/dit_xl2_tread --num_samples=50000 --guidance_scale=1.0 \\
        --reference=/data/VIRTUAL_imagenet256_labeled.npz --save_npz

Restores only the EMA parameters of ``--step`` (default: the latest) from the training
workdir, sharded as in training, and samples ``--num_samples`` images with balanced class
labels (label ``i % num_classes`` for sample ``i``, the list shuffled with ``--seed``), the
noise of sample ``i`` drawn from ``fold_in(key(seed), i)``. Batches are split over every
device of every host; latent samples are decoded by the config's VAE on device; features and
streaming statistics come from ``metrics.evaluator.run`` (Inception for image datasets, the
digits classifier for the digits). Progress is saved under
``<workdir>/eval/<step>/<settings>/progress.npz`` so that an interrupted evaluation resumes;
metrics go to ``metrics.json`` there (or ``--output``), ``--save_npz`` adds an ADM-format
``samples.npz`` (uint8 ``arr_0``, labels ``arr_1``) for ADM's evaluator suite.

The binary needs only the training workdir (checkpoints and the dataset metadata recorded
there) and the config: not the training data.

``--from_diffusers=SOURCE`` evaluates a public diffusers DiT instead of a checkpoint: SOURCE is a
hub id (``facebook/DiT-XL-2-256``, ``facebook/DiT-XL-2-512``: fetched once into the local cache)
or a local diffusers folder (``transformer/config.json`` and
``transformer/diffusion_pytorch_model.safetensors``). The config names the model, objective and
sampler that fit it (``configs/dit_xl2_pretrained.py``); ``--workdir`` only receives the results,
under ``eval/0/<settings>``:

    python -m tread_jax.evaluate --config=configs/dit_xl2_pretrained.py:256_cfg1.5 \
        --from_diffusers=facebook/DiT-XL-2-256 --workdir=/ckpt/dit_xl2_256_pretrained \
        --reference=/data/VIRTUAL_imagenet256_labeled.npz

``tread_jax.evaluation`` is the same evaluation as a library, used by the binary and by the
training loop (``config.eval.every``).
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from tread_jax import cli, evaluation, host_allocator, model_builder, pretrained, workdir as workdir_lib
from tread_jax.metrics import evaluator


def _define_flags() -> None:
    """The binary's flags, defined only when it runs: flags defined at import would collide with
    those of other binaries imported into the same process (the command-line tests do that)."""
    cli.define_config_flag("The training run's config file, FILE[:VARIANT].")
    cli.define_workdir_flag("The training run's workdir: checkpoints in, evaluation results out.")
    cli.define_multihost_flags()
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_string("from_diffusers", None, "Evaluate this diffusers DiT (hub id or folder) instead of a checkpoint.")
    flags.DEFINE_integer("num_samples", None, "Samples to generate (default: config.eval).")
    flags.DEFINE_string("sampler", None, "Sampler of the objective (flow: euler or heun; ddpm: ddpm or ddim).")
    flags.DEFINE_integer("num_steps", None, "Sampling steps (default: config.eval.num_steps).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_list("guidance_interval", None, "lo,hi: guide only at noise levels in [lo, hi].")
    flags.DEFINE_enum("guidance", None, ["cfg", "sparse", "path_drop"], "Guidance method (default: config.eval).")
    flags.DEFINE_list("guidance_sparsity", None, "weak,strong routed fractions for --guidance=sparse.")
    flags.DEFINE_string("reference", None, "ADM reference .npz (images and/or mu, sigma).")
    flags.DEFINE_string("output", None, "Metrics JSON (default: <workdir>/eval/<step>/<settings>/metrics.json).")
    flags.DEFINE_bool("save_npz", False, "Also write the samples as an ADM-format .npz.")
    flags.DEFINE_integer("per_device_batch", None, "Samples per device per batch.")
    flags.DEFINE_integer("seed", None, "Seed of the labels and noise (default: config.seed).")
    flags.DEFINE_integer("max_batches", None, "Stop after this many batches (progress is kept).")
    flags.DEFINE_integer("pr_samples", evaluator.DEFAULT_PR_SAMPLES, "Samples kept for precision/recall.")
    flags.DEFINE_string("inception_weights", None, "pytorch-fid .pth (default: cache/download).")
    flags.DEFINE_enum("inception_preprocessing", "adm", ["adm", "pytorch_fid"],
                      "Inception input convention; 'adm' matches ADM's reference statistics.")


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    config, workdir = f.config, f.workdir
    with cli.user_errors():
        if f.from_diffusers and f.step is not None:
            raise ValueError("--step names a checkpoint of the workdir; --from_diffusers evaluates an imported model")
        # Resolved once: a hub id's files are checked against their digests on every resolve.
        imported = pretrained.resolve(f.from_diffusers) if f.from_diffusers else None
        if imported:
            num_classes = pretrained.dataset_info(imported, config.data.name).num_classes
        else:
            num_classes = workdir_lib.dataset_info(config, workdir).num_classes
        settings = evaluation.settings_from_config(
            config, num_classes, num_samples=f.num_samples, num_steps=f.num_steps,
            guidance_scale=f.guidance_scale, guidance_interval=f.guidance_interval, guidance_method=f.guidance,
            guidance_sparsity=f.guidance_sparsity, sampler=f.sampler, seed=f.seed,
            per_device_batch=f.per_device_batch)
        if f.reference and not os.path.isfile(f.reference):
            raise FileNotFoundError(f"reference batch not found: {f.reference}")
        weights = model_builder.import_ema(config, str(imported)) if imported else None
        result = evaluation.evaluate_checkpoint(
            config, workdir, settings, step=f.step, reference=f.reference, output=f.output,
            save_npz=f.save_npz, max_batches=f.max_batches, pr_samples=f.pr_samples,
            inception_weights=f.inception_weights, preprocessing=f.inception_preprocessing, weights=weights)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()
    _define_flags()
    cli.run(main, "tread_jax.evaluate")
