"""REPA: projector and alignment loss vs REPA's torch code, routed alignment vs a per-sample loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from tread_jax import routing
from tread_jax.diffusion import repa
from tread_jax.models import dinov2 as dinov2_lib

HIDDEN, WIDTH, Z_DIM = 12, 20, 8


def _max_rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _projector_pair(seed: int = 0) -> tuple[repa.Projector, torch.nn.Sequential]:
    """Our projector and REPA's build_mlp holding the same (non-zero) weights."""
    ours = repa.Projector(HIDDEN, Z_DIM, width=WIDTH, rngs=nnx.Rngs(seed))
    reference = torch.nn.Sequential(  # REPA models/sit.py build_mlp
        torch.nn.Linear(HIDDEN, WIDTH), torch.nn.SiLU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.SiLU(),
        torch.nn.Linear(WIDTH, Z_DIM))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for layer, linear in zip(ours.layers, reference[::2]):
            layer.bias[...] = jnp.asarray(rng.standard_normal(layer.bias.shape) * 0.1, jnp.float32)
            linear.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(layer.bias[...]).copy()))
    return ours, reference


def _repa_loss_torch(zs_tilde: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """REPA loss.py SILoss's projection loss for one encoder, verbatim in structure."""
    proj_loss = 0.0
    bsz = zs.shape[0]
    for z_j, z_tilde_j in zip(zs, zs_tilde):
        z_tilde_j = F.normalize(z_tilde_j, dim=-1)
        z_j = F.normalize(z_j, dim=-1)
        proj_loss += torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    return proj_loss / bsz


def test_projector_is_build_mlp():
    ours, reference = _projector_pair()
    x = np.random.default_rng(1).standard_normal((3, 5, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    assert _max_rel(ours(jnp.asarray(x)), want) <= 1e-6


def test_projector_init_is_xavier_uniform_with_zero_bias():
    projector = repa.Projector(256, 64, rngs=nnx.Rngs(0))
    shapes = [(256, 2048), (2048, 2048), (2048, 64)]
    assert [tuple(layer.kernel.shape) for layer in projector.layers] == shapes
    for layer, (fan_in, fan_out) in zip(projector.layers, shapes):
        kernel = np.asarray(layer.kernel[...])
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
        assert np.allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.05)
        assert not np.asarray(layer.bias[...]).any()


def test_dense_loss_and_gradients_match_repa():
    """All tokens: our loss (times coef) and its gradients w.r.t. the hidden tokens and the
    projector's weights equal REPA's torch formula under autograd."""
    ours, reference = _projector_pair(seed=2)
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((4, 9, HIDDEN)).astype(np.float32)
    features = rng.standard_normal((4, 9, Z_DIM)).astype(np.float32)
    coef = 0.7

    def loss_fn(projector, h):
        return repa.alignment_loss(projector(h), jnp.asarray(features), coef=coef)
    loss, (grad_params, grad_hidden) = nnx.value_and_grad(loss_fn, argnums=(0, 1))(ours, jnp.asarray(hidden))

    h_t = torch.from_numpy(hidden).requires_grad_(True)
    want = coef * _repa_loss_torch(reference(h_t), torch.from_numpy(features))
    want.backward()
    assert abs(float(loss) - want.item()) <= 1e-6 * abs(want.item())
    assert _max_rel(grad_hidden, h_t.grad.numpy()) <= 1e-5
    for layer_grad, linear in zip(grad_params.layers.values(), reference[::2]):
        assert _max_rel(layer_grad.kernel[...], linear.weight.grad.numpy().T) <= 1e-5
        assert _max_rel(layer_grad.bias[...], linear.bias.grad.numpy()) <= 1e-5


def test_routed_alignment_matches_a_per_sample_loop():
    """Inside a route the backbone holds each sample's kept tokens (gathered in the plan's
    order): each is projected on its own and compared with the encoder feature at its original
    position, in a plain numpy loop; loss and gradient w.r.t. the held tokens agree."""
    ours, _ = _projector_pair(seed=4)
    batch, tokens = 3, 16
    plan = routing.draw_plan(jax.random.key(0), [routing.Route(1, 3, 0.5), routing.Route(5, 6, 0.75)],
                             batch_size=batch, num_tokens=tokens)
    rng = np.random.default_rng(5)
    sequence = rng.standard_normal((batch, tokens, HIDDEN)).astype(np.float32)
    features = rng.standard_normal((batch, tokens, Z_DIM)).astype(np.float32)
    for depth, route_index in [(3, 0), (7, 1)]:
        positions = repa.aligned_positions(plan, depth)
        assert positions is plan.kept[route_index]
        held = routing.gather_tokens(jnp.asarray(sequence), positions)  # what the blocks see

        def loss_fn(h):
            return repa.alignment_loss(ours(h), jnp.asarray(features), positions, coef=0.5)
        loss, grad = jax.value_and_grad(loss_fn)(held)

        kept = np.asarray(positions)
        terms = []
        for b in range(batch):
            for j, position in enumerate(kept[b]):
                z = np.asarray(ours(jnp.asarray(sequence[b, position])), np.float64)
                target = features[b, position].astype(np.float64)
                terms.append(-z @ target / np.linalg.norm(z) / np.linalg.norm(target))
        assert len(terms) == batch * kept.shape[1]
        assert abs(float(loss) - 0.5 * np.mean(terms)) <= 1e-6

        # Gradient: REPA's formula in torch on the same gathered tokens.
        _, reference = _projector_pair(seed=4)
        h_t = torch.from_numpy(np.array(held)).requires_grad_(True)
        gathered = torch.from_numpy(np.take_along_axis(features, kept[..., None], axis=1))
        (0.5 * _repa_loss_torch(reference(h_t), gathered)).backward()
        assert _max_rel(grad, h_t.grad.numpy()) <= 1e-5


def test_aligned_positions_follow_the_route_covering_the_block():
    plan = routing.draw_plan(jax.random.key(1), [routing.Route(2, 4, 0.5), routing.Route(6, 6, 0.5)],
                             batch_size=2, num_tokens=8)
    # depth d is the output of 0-based block d - 1.
    expected = {1: None, 2: None, 3: 0, 4: 0, 5: 0, 6: None, 7: 1, 8: None}
    for depth, route in expected.items():
        got = repa.aligned_positions(plan, depth)
        assert got is (None if route is None else plan.kept[route]), depth
    assert repa.aligned_positions(None, 4) is None
    with pytest.raises(ValueError, match="counts blocks from 1"):
        repa.aligned_positions(plan, 0)


def test_bad_shapes_fail_with_one_line():
    z, f = jnp.zeros((2, 4, 8)), jnp.ones((2, 6, 8))
    with pytest.raises(ValueError, match="4 projected tokens but 6 encoder tokens"):
        repa.alignment_loss(z, f)
    with pytest.raises(ValueError, match=r"positions must be \[B=2, K=4\]"):
        repa.alignment_loss(z, f, jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="differ in batch or width"):
        repa.alignment_loss(z, jnp.ones((2, 4, 7)))
    with pytest.raises(ValueError, match="must be \\[B, tokens, D\\]"):
        repa.alignment_loss(z[0], f)


def test_encoder_features_are_repas_targets(tmp_path):
    """256x256 images in [-1, 1] -> REPA's preprocessing -> DINOv2 at 224, as torch computes it
    (REPA resizes the position table once with antialiasing: here via the loader's option)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=518, patch_size=14)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "dino")
    encoder, _ = dinov2_lib.load_dinov2(tmp_path / "dino", image_size=224, antialias=True)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3)).astype(np.float32)

    with torch.no_grad():
        table = model.embeddings.position_embeddings
        grid = F.interpolate(table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(16, 16),
                             mode="bicubic", antialias=True)
        model.embeddings.position_embeddings = torch.nn.Parameter(
            torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1))
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(dinov2_lib.IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(dinov2_lib.IMAGENET_STD)[:, None, None]
        x = F.interpolate((x - mean) / std, 224, mode="bicubic")
        want = model(x).last_hidden_state[:, 1:].numpy()

    got = repa.encoder_features(encoder, jnp.asarray(pixels / 127.5 - 1.0))
    assert got.shape == (2, 256, 24)
    assert _max_rel(got, want) <= 1e-5
    # No gradient flows into the encoder's input.
    grad = jax.grad(lambda im: repa.encoder_features(encoder, im).sum())(jnp.asarray(pixels / 127.5 - 1.0))
    assert not np.asarray(grad).any()


# ------------------------------------------------------------------------------------------------
# Analytic cost (tread_jax/models/flops.py, repa.repa_macs), against counts written out by hand.

def _repa_config(encoder: str = "dinov2-vitb14", depth: int = 8):
    import ml_collections

    return ml_collections.ConfigDict(dict(enabled=True, encoder=encoder, depth=depth, coef=0.5,
                                          projector_width=2048, encoder_image_size=224))


def test_encoder_config_of_the_published_names():
    assert repa.encoder_config("dinov2-vitb14") == dinov2_lib.DinoV2Config()  # config.json of dinov2-base
    large = repa.encoder_config("dinov2-vitl14-reg")
    assert (large.hidden_size, large.num_hidden_layers, large.num_register_tokens) == (1024, 24, 4)
    assert repa.encoder_width("dinov2-vits14") == 384


def test_dinov2_macs_by_hand():
    from tread_jax.models import flops

    # ViT-B/14 at 224: 16x16 patches of 14x14x3, 257 tokens (class token), 12 blocks of width 768.
    n, d = 257, 768
    block = n * (3 * d * d + d * d) + n * 2 * d * 4 * d + 2 * n * n * d  # qkv, out, MLP, attention
    want = 256 * 14 * 14 * 3 * d + 12 * block
    assert flops.dinov2_forward_macs(repa.encoder_config("dinov2-vitb14"), 224) == want
    assert want / 1e9 == pytest.approx(23.16, abs=0.01)
    # With 4 registers: 261 tokens in every block.
    registers = flops.dinov2_forward_macs(repa.encoder_config("dinov2-vitb14-reg"), 224)
    n = 261
    assert registers - want == 12 * ((n - 257) * (4 * d * d + 8 * d * d) + 2 * (n * n - 257 * 257) * d)


def test_repa_macs_of_dit_xl2_by_hand():
    from tread_jax import models
    from tread_jax.models import flops

    model = nnx.eval_shape(lambda: models.create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000,
                                                       rngs=nnx.Rngs(0)))
    step = 3 * flops.dit_forward_macs(model, 32, 32)
    dense = repa.repa_macs(_repa_config(), model.hidden_size, model.depth, 256, 256)
    encoder = flops.dinov2_forward_macs(repa.encoder_config("dinov2-vitb14"), 224)
    resize = 3 * (224 * 256 * 256 + 224 * 224 * 256)  # rows, then columns, of 3 channels
    assert dense.encoder == encoder + resize
    projector = 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)  # 256 tokens through REPA's build_mlp
    assert dense.projector == 3 * projector and dense.loss == 3 * 3 * 256 * 768
    # The encoder is about 6% of a dense DiT-XL/2 step with REPA (README), REPA in all about 8%.
    assert dense.encoder / (step + dense.total) == pytest.approx(0.060, abs=0.001)
    assert dense.total / step == pytest.approx(0.083, abs=0.001)
    # Block 8 inside the route 2..24 at ratio 0.5: the projector sees the 128 kept tokens.
    routed = repa.repa_macs(_repa_config(), model.hidden_size, model.depth, 256, 256,
                             (routing.Route(2, 24, 0.5),))
    assert routed.encoder == dense.encoder and 2 * routed.projector == dense.projector
    outside = repa.repa_macs(_repa_config(depth=2), model.hidden_size, model.depth, 256, 256,
                              (routing.Route(2, 24, 0.5),))
    assert outside.projector == dense.projector  # block 2 (1-based) is before the route
