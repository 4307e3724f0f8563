"""Public DiT checkpoints: diffusers' DiTPipeline against our sampler, the eval binary on an
imported diffusers folder, clear errors for missing files, and training started from one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # before diffusers (tests/conftest.py)
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
from flax import nnx
from flax.nnx import traversals
from test_dit import _diffusers_dit
from test_vae import TINY as TINY_VAE, _randomise

import cli_testlib
import trainer_testlib as tl
from tread_jax import data, diffusion, evaluation, model_builder, pretrained
from tread_jax.data import latents
from tread_jax.metrics import evaluator
from tread_jax.models import DiT, convert

GUIDANCE = 1.5


def _max_rel(got, want) -> float:
    """Largest error relative to the reference's largest magnitude."""
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# diffusers' DiTPipeline against our DDPM objective (DDIM) and VAE decode


def test_dit_pipeline_guided_trajectory_matches_ours(tmp_path):
    # DiTPipeline hard-codes the null class 1000 (ImageNet's count); DDIM with as many steps as
    # training steps (100, to keep it short), where diffusers' fixed stride t - T // N is DiT's
    # respacing. The pipeline drops the learned variance (DDIM does not use it) and guides all
    # latent channels.
    steps = 100
    transformer = _diffusers_dit(2, 16, 2, 8, 2, 4, 1000)
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE).eval()
    _randomise(vae, 1)
    scheduler = DDIMScheduler(num_train_timesteps=steps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    recorded = {}
    decode = vae.decode

    def recording_decode(z, *args, **kwargs):  # the latents the pipeline ends with, scaled by 1/0.18215
        recorded["latents"] = z.clone()
        return decode(z, *args, **kwargs)

    vae.decode = recording_decode
    labels = [3, 997]
    expected = pipe(labels, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=steps, output_type="np").images
    # The pipeline's first draw from the generator is the starting noise.
    noise = _nhwc(torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))

    transformer.save_pretrained(tmp_path / "dit" / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    config = tl.tiny_config(data.default_data_dir())
    config.data.name, config.data.vae = latents.dataset_name(256), str(tmp_path / "vae")
    config.model.name, config.model.compute_dtype = "DiT-S/2", "float32"
    # diffusers' timestep features (half - 1 in the frequency denominator): the pipeline's.
    config.model.overrides = dict(depth=2, hidden_size=32, num_heads=2, timestep_freq_shift=1)
    config.diffusion = diffusion.default_config("ddpm")
    config.diffusion.sampler, config.diffusion.num_timesteps, config.diffusion.num_steps = "ddim", steps, steps
    ema = model_builder.import_ema(config, str(tmp_path / "dit"))
    objective = diffusion.create_objective(config.diffusion)
    guidance = diffusion.Guidance(scale=GUIDANCE, null_class=ema.model.num_classes)
    decode_ours, vae_params = latents.vae_decoder(config.data.vae)

    @jax.jit
    def sample(params, vae_params, noise, labels):
        x = objective.sample(ema.model.bind(params), noise, labels, num_steps=steps, guidance=guidance)
        return x, decode_ours(vae_params, x)

    x, images = sample(ema.params, vae_params, jnp.asarray(noise), jnp.asarray(labels, jnp.int32))
    want_latents = _nhwc(recorded["latents"][:2] * vae.config.scaling_factor)
    assert np.abs(want_latents).max() > 0.5 and np.abs(want_latents - noise).max() > 0.5  # the trajectory moved
    print(f"max relative error: latents {_max_rel(x, want_latents):.2e}, "
          f"images {_max_rel(np.asarray(images) / 2 + 0.5, expected):.2e}")
    assert _max_rel(x, want_latents) < 1e-4
    assert _max_rel(np.asarray(images) / 2 + 0.5, expected) < 1e-4


# ----------------------------------------------------------------------------------------------
# The eval binary on a diffusers folder; missing files; training from it


NUM_SAMPLES = 16


@pytest.fixture(scope="module")
def digits_dit(tmp_path_factory):
    """A tiny random diffusers DiT for the digits (8x8x1, 10 classes), saved with save_pretrained
    as a pipeline folder would hold it, and the config that fits it."""
    root = tmp_path_factory.mktemp("pretrained")
    torch_model = _diffusers_dit(2, 16, 2, 8, 2, 1, 10)
    torch_model.save_pretrained(root / "dit" / "transformer")
    config = tl.tiny_config(data.default_data_dir())
    config.model.compute_dtype = "float32"
    config.model.overrides = dict(depth=2, hidden_size=32, num_heads=2, timestep_freq_shift=1)
    config.diffusion = diffusion.default_config("ddpm")
    config.diffusion.guided_channels = 1
    data.dataset_info(config.data)  # prepares the digits once, before the runs
    return root, torch_model, config


def _evaluate_argv(config_file, source, workdir, *extra):
    return ["tread_jax.evaluate", f"--config={config_file}", f"--from_diffusers={source}", f"--workdir={workdir}",
            f"--num_samples={NUM_SAMPLES}", "--num_steps=3", f"--guidance_scale={GUIDANCE}", "--per_device_batch=8",
            *extra]


def test_eval_binary_scores_a_diffusers_folder_and_fails_clearly(digits_dit):
    root, torch_model, config = digits_dit
    config_file = tl.write_config(config, root / "config.py")
    out = root / "out"
    cases = {
        "partial": (root / "dit", ["--save_npz", "--max_batches=1"]),
        "resumed": (root / "dit", ["--save_npz"]),
        "no folder": (root / "nowhere", []),
        "no weights": (root / "no_weights", []),
        "step": (root / "dit", ["--step=3"]),
    }
    (root / "no_weights" / "transformer").mkdir(parents=True)
    (root / "no_weights" / "transformer" / "config.json").write_text(json.dumps(dict(torch_model.config)))
    commands = []
    for name, (source, extra) in cases.items():
        case_dir = root / "cases" / name.replace(" ", "_")
        case_dir.mkdir(parents=True)
        commands.append((name, _evaluate_argv(config_file, source, out, *extra), case_dir, "run"))
    results = cli_testlib.run_commands(commands, tl.subprocess_env())

    for name in ("partial", "resumed"):
        assert results[name][0] == 0, results[name][1][-3000:]
    directory = out / "eval" / "0" / f"n{NUM_SAMPLES}_steps3_cfg1.5_seed0"
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["complete"] and metrics["samples_done"] == NUM_SAMPLES and metrics["step"] == 0
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_generated_vs_test"] > 0

    # The samples are those of the diffusers weights: our sampler on the converted model, with the
    # evaluation's labels and per-sample noise (fold_in(key(seed), i)).
    model = convert.dit_from_diffusers(torch_model)
    labels = evaluation.balanced_labels(NUM_SAMPLES, 10, 0)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (8, 8, 1)))(
        jnp.arange(NUM_SAMPLES))
    objective = diffusion.create_objective(config.diffusion)
    guidance = diffusion.Guidance(scale=GUIDANCE, null_class=10)
    x = jax.jit(lambda n, y: objective.sample(model, n, y, num_steps=3, guidance=guidance))(noise, jnp.asarray(labels))
    want = np.asarray(evaluator.to_uint8(jnp.clip(x, -1.0, 1.0)))
    with np.load(directory / "samples.npz") as saved:
        got, saved_labels = saved["arr_0"], saved["arr_1"]
    np.testing.assert_array_equal(saved_labels, labels)
    assert want.std() > 10 and np.abs(got.astype(int) - want.astype(int)).max() <= 1

    code, output, kind = results["no folder"]
    assert code == 1 and kind == "FileNotFoundError"
    assert f"diffusers DiT folder not found: {root / 'nowhere'}" in output and "transformer/config.json" in output
    code, output, kind = results["no weights"]
    assert code == 1 and kind == "FileNotFoundError"
    assert f"{root / 'no_weights' / 'transformer' / 'diffusion_pytorch_model.safetensors'} not found" in output
    code, output, kind = results["step"]
    assert code == 1 and "--step names a checkpoint" in output


def test_a_model_that_does_not_fit_the_checkpoint_is_named(digits_dit):
    root, _, config = digits_dit
    config = tl.tiny_config(data.default_data_dir(), **{"model.overrides": dict(depth=3, hidden_size=32, num_heads=2)})
    config.diffusion = diffusion.default_config("ddpm")
    with pytest.raises(ValueError, match=r"does not fit the checkpoint .*blocks/2/"):
        model_builder.import_ema(config, str(root / "dit"))
    config.model.overrides = dict(depth=2, hidden_size=32, num_heads=2)
    config.diffusion = diffusion.default_config("edm")  # C output channels, not DDPM's 2C
    with pytest.raises(ValueError, match="does not fit the checkpoint .*final_layer/proj"):
        model_builder.import_ema(config, str(root / "dit"))


def test_hub_checkpoint_is_fetched_once_and_checked(tmp_path, digits_dit, monkeypatch):
    root, _, _ = digits_dit
    # A file:// "hub" laid out as huggingface.co/{repo}/resolve/main/{file}.
    hub = tmp_path / "hub"
    repo = pretrained.HUB_CHECKPOINTS[0]
    (hub / repo / "transformer").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (hub / repo / "transformer" / name).write_bytes((root / "dit" / "transformer" / name).read_bytes())
    url = hub.as_uri() + "/{repo}/{file}"
    folder = pretrained.fetch_hub_checkpoint(repo, tmp_path / "cache", url=url)
    assert folder == tmp_path / "cache" / repo.replace("/", "--") / "transformer"
    assert (folder / "diffusion_pytorch_model.safetensors.sha256").is_file()
    assert pretrained.read_config(folder)["num_layers"] == 2
    # Tampered after the first download: refused.
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="does not match its sha256"):
        pretrained.fetch_hub_checkpoint(repo, tmp_path / "cache", url=url)
    # Offline and not cached: one line naming the files and the folder.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"facebook/DiT-XL-2-256 is not available offline .* into "):
        pretrained.fetch_hub_checkpoint(repo, tmp_path / "empty", url=url)
    with pytest.raises(ValueError, match="unknown hub checkpoint"):
        pretrained.fetch_hub_checkpoint("facebook/DiT-B-2", tmp_path / "cache", url=url)
    assert pretrained.is_diffusers_source(repo) and pretrained.is_diffusers_source(str(root / "dit"))
    assert not pretrained.is_diffusers_source("") and not pretrained.is_diffusers_source(str(tmp_path))


def test_the_hub_configs_generic_class_is_read_as_a_dit(tmp_path, digits_dit):
    # The hub checkpoints were converted to the generic Transformer2DModel (diffusers'
    # scripts/convert_dit_to_diffusers.py); with norm_type "ada_norm_zero" it is a DiT.
    root, _, _ = digits_dit
    config = json.loads((root / "dit" / "transformer" / "config.json").read_text())
    for name, norm, ok in (("Transformer2DModel", "ada_norm_zero", True), ("Transformer2DModel", "layer_norm", False),
                           ("UNet2DModel", "ada_norm_zero", False)):
        folder = tmp_path / f"{name}_{norm}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": name, "norm_type": norm}))
        assert pretrained.is_diffusers_source(str(folder)) == ok
        if ok:
            assert pretrained.read_config(folder)["num_layers"] == 2
        else:
            with pytest.raises(ValueError, match="does not describe a diffusers DiT"):
                pretrained.read_config(folder)


def test_routed_training_starts_from_imported_weights(digits_dit):
    root, torch_model, config = digits_dit
    config = config.copy_and_resolve_references()
    config.routes = [dict(start=0, end=0, ratio=0.5)]  # TREAD routing on the imported model
    config.init_from = str(root / "dit")
    config.num_train_steps, config.checkpoint_every = 1, 1
    config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 0
    config_file = tl.write_config(config, root / "train_config.py")
    workdir = root / "finetune"
    proc = subprocess.run(tl.main_command(config_file, str(workdir)), cwd=tl.REPO, env=tl.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised from the diffusers DiT" in proc.stdout + proc.stderr
    state = tl.load_state(str(workdir), 1)
    imported = _flat(nnx.to_pure_dict(nnx.state(convert.dit_from_diffusers(torch_model), nnx.Param)))
    params, ema = _flat(state["params"]), _flat(state["ema_params"])  # numpy arrays (tl.load_state)
    assert params.keys() == imported.keys() == ema.keys()
    # One AdamW step moves each parameter by at most the learning rate; the EMA by 1 - decay of that.
    moved = max(float(np.abs(params[k] - imported[k]).max()) for k in imported)
    ema_moved = max(float(np.abs(ema[k] - imported[k]).max()) for k in imported)
    assert 1e-4 < moved <= 1.01e-3 and ema_moved <= (1.0 - config.ema_decay) * 1.01e-3
    assert int(state["step"]) == 1


def _flat(tree) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}``: checkpoints restore integer keys as strings."""
    return {"/".join(map(str, path)): v for path, v in traversals.flatten_mapping(tree).items()}


@pytest.mark.parametrize("resolution", [256, 512])
def test_published_configs_fit_the_hub_checkpoints(tmp_path, resolution):
    path = Path(tl.REPO) / "configs" / "dit_xl2_pretrained.py"
    config = tl.load_config(path, f"{resolution}_cfg1.5")
    assert (config.eval.guidance, config.eval.num_steps, config.diffusion.name) == (1.5, 250, "ddpm")
    assert config.diffusion.guided_channels == 3 and config.data.name == latents.dataset_name(resolution)
    assert tl.load_config(path, str(resolution)).eval.guidance == 1.0
    # The hub checkpoints' transformer config, as diffusers' scripts/convert_dit_to_diffusers.py
    # writes it: the configured model has exactly the parameter shapes the converter produces.
    hub_config = dict(_class_name="Transformer2DModel", sample_size=resolution // 8, num_layers=28,
                      attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2, attention_bias=True,
                      num_attention_heads=16, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                      norm_type="ada_norm_zero", norm_elementwise_affine=False)
    (tmp_path / "config.json").write_text(json.dumps(hub_config))
    model = model_builder.ModelBuilder(config, pretrained.dataset_info(tmp_path, config.data.name))
    converted = nnx.eval_shape(lambda: DiT(**convert.dit_kwargs_from_diffusers(hub_config), rngs=nnx.Rngs(0)))
    want = {k: v.shape for k, v in _flat(nnx.to_pure_dict(nnx.state(converted, nnx.Param))).items()}
    assert {k: v.shape for k, v in _flat(model.abstract_params()).items()} == want
    assert sum(np.prod(shape) for shape in want.values()) == pytest.approx(675e6, rel=1e-3)  # the paper's 675M


def test_unknown_published_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        tl.load_config(Path(tl.REPO) / "configs" / "dit_xl2_pretrained.py", "1024")
