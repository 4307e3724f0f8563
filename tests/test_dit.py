"""DiT: parity with diffusers, the paper's sizes and costs, analytic FLOPs, bfloat16 compute."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from flax import nnx

from tread_jax.models import create_model
from tread_jax.models.convert import dit_from_diffusers
from tread_jax.models.flops import dit_forward_macs
from tread_jax import routing
from tread_jax.routing import Route

PAPER = {  # DiT paper, Table 4: parameters (millions) and forward GFLOPs (MACs) at 256x256
    "DiT-S/2": (33, 6.06),
    "DiT-B/2": (130, 23.01),
    "DiT-L/2": (458, 80.71),
    "DiT-XL/2": (675, 118.64),
}
ROUTED_COST = {  # docs/method.md: routed/dense forward cost with the default route
    "DiT-S/2": 0.70,
    "DiT-B/2": 0.70,
    "DiT-L/2": 0.60,
    "DiT-XL/2": 0.58,
}


def _diffusers_dit(
    heads: int,
    head_dim: int,
    depth: int,
    size: int,
    patch: int,
    channels: int,
    classes: int,
):
    """Random diffusers DiT laid out like the official checkpoints (one shared embedder)."""
    torch.manual_seed(heads * 100 + depth * 10 + patch)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=depth,
        sample_size=size,
        patch_size=patch,
        num_embeds_ada_norm=classes,
        norm_eps=1e-6,  # the original DiT's LayerNorm eps, which our model uses
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # DiT zero-initialises these; random values make a wrong mapping visible.
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0.0, 0.1)
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


@pytest.mark.parametrize(
    "heads,head_dim,depth,size,patch,channels",
    [(2, 32, 2, 8, 2, 4), (3, 32, 3, 16, 4, 3)],
    ids=["hidden64-depth2-patch2", "hidden96-depth3-patch4"],
)
def test_matches_diffusers(heads, head_dim, depth, size, patch, channels):
    classes = 10
    ref_model = _diffusers_dit(heads, head_dim, depth, size, patch, channels, classes)
    ours = dit_from_diffusers(ref_model)
    assert (
        ours.hidden_size == heads * head_dim
        and ours.depth == depth
        and ours.patch_size == patch
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, channels, size, size)).astype(np.float32)
    t = np.array([0.0, 250.5, 999.0], np.float32)
    y = np.array([0, 7, classes])  # the last one is the null class
    with torch.no_grad():
        ref = ref_model(
            torch.from_numpy(x),
            timestep=torch.from_numpy(t),
            class_labels=torch.from_numpy(y),
        ).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    # One compile instead of op-by-op dispatch.
    forward = jax.jit(lambda x, t, y: ours(x, t, y))
    out = np.asarray(
        forward(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y))
    )

    assert out.shape == ref.shape == (3, size, size, 2 * channels)
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_converter_rejects_bad_input():
    ref_model = _diffusers_dit(2, 32, 2, 8, 2, 4, 10)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"][
        0, 0
    ] += 1.0
    with pytest.raises(ValueError, match="differs from block 0"):
        dit_from_diffusers(state, ref_model.config)
    with pytest.raises(ValueError, match="config"):
        dit_from_diffusers(state)
    state = dict(ref_model.state_dict())
    del state["proj_out_2.bias"]
    with pytest.raises(ValueError, match="lacks 'proj_out_2.bias'"):
        dit_from_diffusers(state, ref_model.config)


@functools.cache
def _abstract(name: str):
    """DiT at ImageNet-256 latent shape, learn-sigma output (8 channels), built without memory."""
    return nnx.eval_shape(
        lambda: create_model(
            name,
            input_size=32,
            in_channels=4,
            out_channels=8,
            num_classes=1000,
            rngs=nnx.Rngs(0),
        )
    )


def _xla_macs(model, routes=()) -> float:
    """Forward MACs of one 32x32x4 sample from XLA's cost analysis of the lowered program."""
    graphdef, params = nnx.split(model, nnx.Param)

    def forward(params, x, t, y, key):
        plan = routing.draw_plan(key, routes, batch_size=1, num_tokens=model.num_tokens(32, 32))
        return nnx.merge(graphdef, params)(x, t, y, route_plan=plan)

    lowered = jax.jit(forward).lower(
        params,
        jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.random.key(0),
    )
    return lowered.cost_analysis()["flops"] / 2  # one multiply-add is two flops


@pytest.mark.parametrize("name", list(PAPER))
def test_parameter_count_and_cost_match_paper(name):
    model = _abstract(name)
    params, gmacs = PAPER[name]
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert round(count / 1e6) == params

    analytic = dit_forward_macs(model, 32, 32) / 1e9
    xla = _xla_macs(model) / 1e9
    assert analytic == pytest.approx(gmacs, rel=0.01)
    assert xla == pytest.approx(gmacs, rel=0.03)
    assert analytic == pytest.approx(xla, rel=0.02)


@pytest.mark.parametrize("name", list(ROUTED_COST))
def test_routed_cost_ratio(name):
    model = _abstract(name)
    route, quoted = routing.default_route(model.depth), ROUTED_COST[name]
    ratio = dit_forward_macs(model, 32, 32, (route,)) / dit_forward_macs(model, 32, 32)
    assert ratio == pytest.approx(quoted, abs=0.015)
    if (
        name == "DiT-S/2"
    ):  # XLA agrees on the routed program too (one size keeps the test short)
        xla_ratio = _xla_macs(model, (route,)) / _xla_macs(model)
        assert xla_ratio == pytest.approx(ratio, rel=0.01)


def test_modern_block_cost_matches_xla():
    """The analytic count follows the modern block's SwiGLU (gate, up, down), dense and routed."""
    model = _abstract("LightningDiT-S/2")
    route = routing.default_route(model.depth)
    assert dit_forward_macs(model, 32, 32) == pytest.approx(_xla_macs(model), rel=0.02)
    assert dit_forward_macs(model, 32, 32, (route,)) == pytest.approx(_xla_macs(model, (route,)), rel=0.02)


def _tiny(compute_dtype, **kw) -> nnx.Module:
    """A 4-block DiT whose parameters (adaLN and output ones included) are random and non-zero.

    Built abstractly and filled from numpy: eager initialisation compiles op by op and is slow.
    """
    abstract = nnx.eval_shape(
        lambda: create_model(
            "DiT-S/2",
            input_size=8,
            in_channels=4,
            num_classes=10,
            compute_dtype=compute_dtype,
            depth=4,
            hidden_size=32,
            num_heads=2,
            rngs=nnx.Rngs(0),
            **kw,
        )
    )
    graphdef, params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32), params
    )
    return nnx.merge(graphdef, params)


def _plan(routes, x):
    """The route plan of key 3 for the 4x4 tokens of ``x`` (the same tokens in every test)."""
    return routing.draw_plan(jax.random.key(3), routes, batch_size=x.shape[0], num_tokens=16)


def _qkv_input_dtypes(model, x, t, y, routes) -> list[jnp.dtype]:
    """Dtype of the activations entering each block's qkv projection, in program order."""
    jaxpr = jax.make_jaxpr(lambda x: model(x, t, y, route_plan=_plan(routes, x)))(x)
    kernel_shape = model.blocks[0].qkv.kernel.shape
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if (
                eqn.primitive.name == "dot_general"
                and eqn.invars[1].aval.shape == kernel_shape
            ):
                found.append(eqn.invars[0].aval.dtype)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_bfloat16_compute_and_float32_after_route():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t = jnp.array([-1.0, 0.5])
    y = jnp.array([3, 10])
    routes = (Route(1, 2, 0.5),)
    f32, bf16 = _tiny(jnp.float32), _tiny(jnp.bfloat16)

    def routed(model):  # the same key selects the same tokens in both precisions
        return jax.jit(lambda x: model(x, t, y, route_plan=_plan(routes, x)))(x)

    out32, out16 = routed(f32), routed(bf16)
    assert out16.dtype == jnp.float32 and bool(jnp.isfinite(out16).all())
    rel = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert 0 < rel < 0.05  # bfloat16 really ran, and computed the same function

    bf, f = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    # Block 3 follows the route's end and re-merges the tokens: it alone computes in float32.
    assert _qkv_input_dtypes(bf16, x, t, y, routes) == [bf, bf, bf, f]
    assert _qkv_input_dtypes(bf16, x, t, y, ()) == [bf] * 4
    assert (
        _qkv_input_dtypes(
            _tiny(jnp.bfloat16, float32_after_route=False), x, t, y, routes
        )
        == [bf] * 4
    )


def test_scanned_and_rematerialised_blocks_compute_the_same():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([-1.0, 0.5]), jnp.array([3, 10])
    routes = (Route(1, 2, 0.5),)  # stretches: block 0, the route 1..2 (scanned), block 3

    def value_and_grad(**options):
        graphdef, params = nnx.split(_tiny(jnp.float32, **options), nnx.Param)

        def loss(params):
            out = nnx.merge(graphdef, params)(x, t, y, route_plan=_plan(routes, x))
            return jnp.mean(jnp.square(out)), out

        fn = jax.value_and_grad(loss, has_aux=True)
        return jax.jit(fn)(params), str(jax.make_jaxpr(fn)(params))

    ((_, reference), reference_grads), plain = value_and_grad()
    assert " scan[" not in plain and " remat" not in plain
    for options in (dict(scan_blocks=True), dict(remat="full")):
        ((_, out), grads), program = value_and_grad(**options)
        assert (" scan[" in program) == options.get("scan_blocks", False), options
        assert (" remat" in program) == ("remat" in options), options
        np.testing.assert_allclose(out, reference, atol=1e-5 * float(jnp.abs(reference).max()))
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()) + 1e-12)


def test_scanned_blocks_keep_the_float32_block_after_a_route():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([-1.0, 0.5]), jnp.array([3, 10])
    bf, f = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    model = _tiny(jnp.bfloat16, scan_blocks=True, remat="dots")
    # Program order: block 0, one scan body for the route's blocks 1..2, then block 3 in float32.
    assert _qkv_input_dtypes(model, x, t, y, (Route(1, 2, 0.5),)) == [bf, bf, f]
    # Dense, blocks 0..3 form one stretch: a single scan body.
    assert _qkv_input_dtypes(model, x, t, y, ()) == [bf]


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("DiT-S/2", dict(remat="some"), "unknown remat policy 'some'; known: none, dots, full"),
        ("SSM-S/2", dict(scan_blocks=True), "SSM blocks differ by more than their weights"),
    ],
)
def test_bad_block_options_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: create_model(name, input_size=8, in_channels=4, num_classes=10,
                                            rngs=nnx.Rngs(0), **options))
