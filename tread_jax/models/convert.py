"""Import diffusers' ``DiTTransformer2DModel`` weights into our DiT.

The hub's DiT checkpoints (``facebook/DiT-XL-2-256`` and friends) are the original DiT weights
in diffusers' layout. Differences the converter bridges:

- diffusers gives every block its own copy of the timestep/label embedder
  (``transformer_blocks.i.norm1.emb.*``); the original DiT, like ours, has one. Block 0's copy is
  used and the others must be identical (they are in converted checkpoints).
- diffusers' timestep features divide the log-frequencies by ``half - 1``
  (``downscale_freq_shift=1``) where the original DiT divides by ``half``; ``dit_from_diffusers``
  builds with ``timestep_freq_shift=1`` to reproduce diffusers' outputs. The hub weights were
  trained with the original features, which ``configs/dit_xl2_pretrained.py`` keeps (0).
- separate ``to_q``/``to_k``/``to_v`` projections become our fused ``qkv`` kernel, whose output
  is split into q, k, v in thirds.
- the patch convolution ``[D, C, p, p]`` becomes a Linear over patch pixels ordered ``(p, p, C)``
  (see :func:`tread_jax.models.layers.patchify`); torch's ``[out, in]`` Linear weights become
  ``[in, out]`` kernels.

diffusers normalises before the MLP with its ``norm_eps`` (default 1e-5); the original DiT and
this model use 1e-6 for every LayerNorm. The difference is small (about 2e-6 relative on the
random-weight test models); the parity test builds diffusers with ``norm_eps=1e-6``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from tread_jax.models.dit import DiT

_EMB = "norm1.emb."

# diffusers options whose other values change the computation in ways our DiT does not model.
_REQUIRED_CONFIG = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(
        value, "detach"
    ):  # a torch tensor; torch itself is not a dependency of this module
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def dit_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our DiT constructor arguments for a diffusers ``DiTTransformer2DModel`` config."""
    for key, want in _REQUIRED_CONFIG.items():
        if key in config and config[key] != want:
            raise ValueError(
                f"diffusers config has {key}={config[key]!r}; only {want!r} is supported"
            )
    heads = int(config["num_attention_heads"])
    in_channels = int(config["in_channels"])
    return {
        "input_size": int(config["sample_size"]),
        "patch_size": int(config["patch_size"]),
        "in_channels": in_channels,
        "out_channels": int(config.get("out_channels") or in_channels),
        "hidden_size": heads * int(config["attention_head_dim"]),
        "depth": int(config["num_layers"]),
        "num_heads": heads,
        "num_classes": int(config["num_embeds_ada_norm"]),
        "timestep_freq_shift": 1,
    }


def _shared_embedder(sd: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """Block 0's timestep/label embedder, after checking every block carries the same one."""
    prefix0 = f"transformer_blocks.0.{_EMB}"
    shared = {k[len(prefix0) :]: v for k, v in sd.items() if k.startswith(prefix0)}
    for i in range(1, depth):
        prefix = f"transformer_blocks.{i}.{_EMB}"
        for name, value in shared.items():
            other = sd.get(prefix + name)
            if (
                other is None
                or other.shape != value.shape
                or not np.array_equal(other, value)
            ):
                raise ValueError(
                    f"{prefix}{name} differs from block 0's; our DiT shares one timestep/label embedder"
                )
    return shared


def _linear(sd: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _our_params(sd: Mapping[str, np.ndarray], kwargs: Mapping[str, Any]) -> dict:
    """Nested dict of our parameter arrays, laid out like ``nnx.state(DiT, nnx.Param)``."""
    depth, num_classes = kwargs["depth"], kwargs["num_classes"]
    emb = _shared_embedder(sd, depth)
    table = emb["class_embedder.embedding_table.weight"]
    if table.shape[0] != num_classes + 1:
        raise ValueError(
            f"label table has {table.shape[0]} rows; expected num_classes + 1 = {num_classes + 1} "
            "(the last row is the null class, present when diffusers' class dropout is > 0)"
        )
    conv = sd["pos_embed.proj.weight"]  # [D, C, p, p]
    blocks = {}
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        qkv = [_linear(sd, f"{p}attn1.to_{n}") for n in "qkv"]
        blocks[i] = {
            "ada": _linear(sd, f"{p}norm1.linear"),
            "qkv": {
                "kernel": np.concatenate([w["kernel"] for w in qkv], axis=1),
                "bias": np.concatenate([w["bias"] for w in qkv]),
            },
            "attn_out": _linear(sd, f"{p}attn1.to_out.0"),
            "fc1": _linear(sd, f"{p}ff.net.0.proj"),
            "fc2": _linear(sd, f"{p}ff.net.2"),
        }
    return {
        "patch_embed": {
            "proj": {
                # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D], matching patchify's pixel order.
                "kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                "bias": sd["pos_embed.proj.bias"],
            }
        },
        "t_embedder": {
            "fc1": _linear(emb, "timestep_embedder.linear_1"),
            "fc2": _linear(emb, "timestep_embedder.linear_2"),
        },
        "y_embedder": {"table": {"embedding": table}},
        "blocks": blocks,
        # diffusers reshapes the projection to (p, q, c) and writes pixel (h*p + p', w*q + q'),
        # the same (p, p, C) order our unpatchify reads.
        "final_layer": {
            "ada": _linear(sd, "proj_out_1"),
            "proj": _linear(sd, "proj_out_2"),
        },
    }


def params_from_diffusers(
    state_dict: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[dict[str, Any], dict]:
    """``(DiT constructor kwargs, parameters)`` of a diffusers ``DiTTransformer2DModel``.

    ``state_dict`` holds torch tensors or numpy arrays; the parameters are nested dicts of float32
    numpy arrays laid out like ``nnx.to_pure_dict(nnx.state(DiT(**kwargs), nnx.Param))``.
    ValueError for a config or state dict our DiT cannot hold.
    """
    kwargs = dit_kwargs_from_diffusers(config)
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    try:
        return kwargs, _our_params(sd, kwargs)
    except KeyError as missing:
        raise ValueError(
            f"state dict lacks {missing.args[0]!r} for a {kwargs['depth']}-block DiT"
        ) from None


def dit_from_diffusers(
    model_or_state_dict: Any,
    config: Mapping[str, Any] | None = None,
    *,
    compute_dtype: jnp.dtype = jnp.float32,
) -> DiT:
    """Our DiT holding the weights of a diffusers ``DiTTransformer2DModel``.

    ``model_or_state_dict`` is the torch module (its ``config`` is used when ``config`` is None)
    or its state dict of torch tensors or numpy arrays; ``config`` is the diffusers config
    mapping. The result is built with ``timestep_freq_shift=1`` (diffusers' timestep features);
    it takes NHWC inputs and the same float timesteps as ``noise_labels``.
    """
    if hasattr(model_or_state_dict, "state_dict"):
        config = model_or_state_dict.config if config is None else config
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    if config is None:
        raise ValueError(
            "a state dict needs its diffusers config (num_layers, patch_size, ...)"
        )
    kwargs, ours = params_from_diffusers(state_dict, config)

    abstract = nnx.eval_shape(
        lambda: DiT(**kwargs, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, params = nnx.split(abstract, nnx.Param)
    converted = traversals.flatten_mapping(ours)
    want = traversals.flatten_mapping(nnx.to_pure_dict(params))
    mismatched = mismatched_parameters(want, converted)
    if mismatched:
        raise ValueError(
            f"converted parameters do not fit the DiT: {', '.join(mismatched[:5])}"
        )
    nnx.replace_by_pure_dict(
        params,
        traversals.unflatten_mapping({k: jnp.asarray(v) for k, v in converted.items()}),
    )
    return nnx.merge(graphdef, params)


def mismatched_parameters(want: Mapping[tuple, Any], got: Mapping[tuple, Any]) -> list[str]:
    """Sorted ``a/b/c`` paths of flat parameter mappings that one lacks or that differ in shape."""
    return sorted(
        "/".join(map(str, path))
        for path in set(want) | set(got)
        if path not in want or path not in got or tuple(want[path].shape) != tuple(got[path].shape)
    )
