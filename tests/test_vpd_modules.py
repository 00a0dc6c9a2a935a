"""VPD heads against a PyTorch re-statement with the public names (tests/public_vpd): random small-width PyTorch
modules (norm statistics and affines perturbed), their state dicts converted by `weights_conversion.vpd`, outputs
and train-mode BatchNorm updates compared in fp32 (max |delta| <= 1e-4); the losses against PyTorch's formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2i_jax.perception.vpd import SemanticFPN, TextAdapter, VPDDepthDecoder, channel_dropout, resize_nearest
from d2i_jax.vpd_losses import cross_entropy_ignore, silog_loss
from tests import public_vpd as public
from weights_conversion import vpd as convert
from weights_conversion.torch_to_flax import ConversionError

ATOL = 1e-4
SEG = {"in_channels": (16, 12, 20, 24), "text_dim": 12, "out_channels": 8, "channels": 8, "num_classes": 5}
DEPTH = {"ldm_prior": (16, 8, 24), "encoder_channels": 32, "decoder_channels": 8, "filters": (4, 4, 4),
         "kernels": (2, 2, 2)}


def close(ours, ref, what: str, atol: float = ATOL) -> None:
    if isinstance(ref, torch.Tensor):
        ref = ref.detach()
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err <= atol, f"{what}: max abs error {err:.2e}"


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial norm affines, running statistics and gammas (VPD's 1e-4 gate would hide the adapter MLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or (t.ndim == 1 and not name.endswith("bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def state_of(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The state dict as NumPy, with unrelated checkpoint keys the converters must leave alone."""
    state = {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    state[prefix + "class_embeddings"] = np.zeros((3, 4), np.float32)
    state[prefix + "unet.diffusion_model.out.0.weight"] = np.zeros(4, np.float32)
    return state


def features(channels: tuple[int, ...], side: int, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
    """NHWC features, finest first, each level half the previous side."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, side >> i, side >> i, c)).astype(np.float32) for i, c in enumerate(channels)]


def torch_in(feats: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous() for f in feats]


def init_shapes(model, *args, **kwargs):
    """The module's variable shapes, nothing computed."""
    return jax.tree.map(lambda x: tuple(x.shape), jax.eval_shape(lambda: model.init(jax.random.key(0), *args,
                                                                                     **kwargs)))


def apply(model, variables, feats, **kwargs):
    """`model.apply` compiled as one program, with XLA's CPU backend optimisations off (they cost more than they
    save on these tiny inputs)."""
    fast_compile = {"xla_backend_optimization_level": 0}
    return jax.jit(lambda v, f: model.apply(v, f, **kwargs), compiler_options=fast_compile)(variables, feats)


def assert_same_tree(converted, shapes) -> None:
    assert jax.tree.map(lambda x: tuple(x.shape), converted) == shapes


# ------------------------------------------------------------------------------------------------- text adapter


def test_text_adapter_matches_vpd():
    torch.manual_seed(0)
    ref = public.VPDSegHead(SEG["in_channels"], text_dim=SEG["text_dim"])
    perturb(ref, 1)
    texts = np.random.default_rng(2).normal(size=(5, SEG["text_dim"])).astype(np.float32)
    variables = convert.convert_text_adapter(state_of(ref))
    assert_same_tree(variables, init_shapes(TextAdapter(), texts))
    assert sorted(variables["params"]) == ["fc1", "fc2", "gamma"]
    ours = TextAdapter().apply(variables, texts)
    close(ours, ref.text_adapter(torch.from_numpy(texts), ref.gamma), "text adapter")

    gamma = jax.jit(TextAdapter().init)(jax.random.key(0), texts)["params"]["gamma"]
    np.testing.assert_array_equal(gamma, np.full(SEG["text_dim"], 1e-4, np.float32))


# ------------------------------------------------------------------------------------------------- semantic FPN


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    ref = public.VPDSegHead(SEG["in_channels"], SEG["text_dim"], SEG["out_channels"], SEG["channels"],
                            SEG["num_classes"], dropout=0.0)
    perturb(ref, 3)
    model = SemanticFPN(SEG["num_classes"], SEG["out_channels"], SEG["channels"], dropout_ratio=0.0)
    return ref, model, features(SEG["in_channels"], 16, seed=4)


def test_fpn_conversion_shapes(seg):
    ref, model, feats = seg
    variables = convert.convert_fpn({"module." + k: v for k, v in state_of(ref).items()})
    shapes = init_shapes(model, feats, train=False)
    assert sorted(shapes["params"]) == ["decode_head", "neck"]
    assert sorted(shapes["params"]["decode_head"]) == [
        "conv_seg", "scale0_0", "scale1_0", "scale2_0", "scale2_1", "scale3_0", "scale3_1", "scale3_2"]
    assert_same_tree(variables, shapes)


def test_fpn_eval_matches_mmseg(seg):
    ref, model, feats = seg
    variables = convert.convert_fpn(state_of(ref))
    ours = apply(model, variables, feats, train=False)
    assert ours.shape == (2, 16, 16, SEG["num_classes"])
    close(ours, nhwc(ref.eval()(torch_in(feats))), "FPN logits (eval)")


def test_fpn_train_matches_mmseg(seg):
    ref, model, feats = seg
    variables = convert.convert_fpn(state_of(ref))
    ours, updates = apply(model, variables, feats, train=True, mutable=["batch_stats"])
    close(ours, nhwc(ref.train()(torch_in(feats))), "FPN logits (train)")
    after = convert.convert_fpn(state_of(ref))["batch_stats"]
    jax.tree.map(lambda a, b: close(a, b, "FPN running statistics"), updates["batch_stats"], after)


def test_fpn_dropout_needs_key_and_drops_channels(seg):
    ref, _, feats = seg
    model = SemanticFPN(SEG["num_classes"], SEG["out_channels"], SEG["channels"])
    variables = convert.convert_fpn(state_of(ref))
    with pytest.raises(ValueError, match="dropout_key"):
        model.apply(variables, feats, train=True, mutable=["batch_stats"])
    out, _ = apply(model, variables, feats, train=True, dropout_key=jax.random.key(1), mutable=["batch_stats"])
    assert out.shape == (2, 16, 16, SEG["num_classes"]) and bool(jnp.all(jnp.isfinite(out)))

    x = jnp.ones((4, 3, 5, 400))
    y = jax.jit(channel_dropout, static_argnums=1)(x, 0.25, jax.random.key(2))
    per_channel = y[:, 0, 0, :]
    assert bool(jnp.all(y == per_channel[:, None, None, :]))  # whole channels
    assert set(np.unique(np.asarray(per_channel)).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
    assert abs(float(jnp.mean(per_channel == 0)) - 0.25) < 0.05


def test_resize_nearest_matches_torch():
    x = np.random.default_rng(5).normal(size=(1, 5, 7, 2)).astype(np.float32)
    for size in ((10, 14), (8, 9), (3, 4)):
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="nearest")
        close(resize_nearest(jnp.asarray(x), size), nhwc(ref), f"nearest {size}", atol=0.0)


# ------------------------------------------------------------------------------------------------- depth decoder


def depth_pair(filters=DEPTH["filters"], kernels=DEPTH["kernels"], seed: int = 0):
    torch.manual_seed(seed)
    ref = public.VPDDepthHead(DEPTH["ldm_prior"], DEPTH["encoder_channels"], DEPTH["decoder_channels"], filters,
                              kernels, text_dim=8)
    perturb(ref, seed + 1)
    model = VPDDepthDecoder(DEPTH["encoder_channels"], DEPTH["decoder_channels"], filters, kernels)
    return ref, model


def depth_features(seed: int = 6) -> list[np.ndarray]:
    c0, c1, c2 = DEPTH["ldm_prior"]
    return features((c0, c1, c2 // 2, c2 - c2 // 2), 16, seed=seed)  # strides 8 ... 64 of a 128 px image


@pytest.fixture(scope="module")
def depth():
    ref, model = depth_pair()
    return ref, model, depth_features()


def test_depth_conversion_shapes(depth):
    ref, model, feats = depth
    variables = convert.convert_depth_decoder(state_of(ref))
    assert_same_tree(variables, init_shapes(model, feats, train=False))
    adapter = convert.convert_text_adapter(state_of(ref), prefix="encoder.")
    close(adapter["params"]["gamma"], ref.encoder.gamma.detach().numpy(), "depth gamma", atol=0.0)


def test_depth_eval_matches_vpd(depth):
    ref, model, feats = depth
    variables = convert.convert_depth_decoder(state_of(ref))
    ours = apply(model, variables, feats, train=False)
    assert ours.shape == (2, 128, 128, 1)
    close(ours, nhwc(ref.eval()(torch_in(feats))), "depth (eval)")
    cropped = apply(model, variables, feats, train=False, valid_size=(96, 96))
    close(cropped, nhwc(ref(torch_in(feats), crop=True)), "depth (eval, padded input cropped)")


def test_depth_train_matches_vpd(depth):
    ref, model, feats = depth
    variables = convert.convert_depth_decoder(state_of(ref))
    ours, updates = apply(model, variables, feats, train=True, mutable=["batch_stats"])
    close(ours, nhwc(ref.train()(torch_in(feats))), "depth (train)")
    after = convert.convert_depth_decoder(state_of(ref))["batch_stats"]
    jax.tree.map(lambda a, b: close(a, b, "depth running statistics"), updates["batch_stats"], after)


def test_depth_deconv_kernels_3_and_4():
    ref, model = depth_pair(filters=(4, 4), kernels=(4, 3), seed=7)
    feats = depth_features(seed=8)
    ours = apply(model, convert.convert_depth_decoder(state_of(ref)), feats, train=False)
    close(ours, nhwc(ref.eval()(torch_in(feats))), "depth (deconv kernels 4, 3)")


def test_converter_reports_missing_and_unexpected(depth):
    ref, _, _ = depth
    state = state_of(ref)
    del state["decoder.conv_layers.1.running_var"]
    state["last_layer_depth.4.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"(?s)1 missing.*running_var.*last_layer_depth\.4\.weight"):
        convert.convert_depth_decoder(state)


# ------------------------------------------------------------------------------------------------- losses


def test_silog_matches_vpd():
    rng = np.random.default_rng(9)
    pred = rng.uniform(0.5, 10, size=(2, 12, 16)).astype(np.float32)
    gt = rng.uniform(0.5, 10, size=(2, 12, 16)).astype(np.float32)
    gt[rng.uniform(size=gt.shape) < 0.3] = 0.0
    ref = public.silog(torch.from_numpy(pred), torch.from_numpy(gt)).item()
    loss = jax.jit(silog_loss, static_argnames=("lam", "scale"))
    close(loss(pred, gt), ref, "silog", atol=1e-5)
    close(loss(pred, gt, gt > 0, scale=10.0), 10 * ref, "silog x10", atol=1e-4)
    d = np.log(gt[gt > 0]) - np.log(pred[gt > 0])
    close(loss(pred, gt, lam=0.85), np.sqrt(np.mean(d**2) - 0.85 * np.mean(d) ** 2), "silog lam", atol=1e-5)

    value, grad = jax.jit(jax.value_and_grad(silog_loss))(jnp.asarray(pred), jnp.zeros_like(gt))
    assert float(value) == 0.0 and bool(jnp.all(grad == 0))


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_matches_torch(avg_non_ignore):
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(2, 6, 7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 6, 7))
    labels[rng.uniform(size=labels.shape) < 0.4] = 255
    t_logits, t_labels = torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels)
    if avg_non_ignore:
        ref = F.cross_entropy(t_logits, t_labels, ignore_index=255)
    else:  # mmseg 0.x: reduction='none', then mean over every pixel
        ref = F.cross_entropy(t_logits, t_labels, ignore_index=255, reduction="none").mean()
    ours = cross_entropy_ignore(jnp.asarray(logits), jnp.asarray(labels), 255, avg_non_ignore=avg_non_ignore)
    close(ours, ref.item(), "cross-entropy", atol=1e-5)
    assert float(cross_entropy_ignore(logits, np.full(labels.shape, 255), avg_non_ignore=avg_non_ignore)) == 0.0
