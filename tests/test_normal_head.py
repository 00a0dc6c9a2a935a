"""Bae normal head: align-corners resize, WS conv and UpSampleGN vs PyTorch, uncertainty-guided sampling, train/eval
outputs at a non-512 size, GT lookup and the summed training loss (tiny widths, CPU, jit)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2i_jax.perception.normal_head import (
    NormalHead,
    UpSampleGN,
    WSConv,
    bilinear_at_points,
    gather_gt_at_points,
    normal_training_loss,
    resize_bilinear_align_corners,
    uncertainty_guided_sampling,
)
from tests.test_fusion import numpy_init

IMAGE = (320, 448)
SKIP_CHANNELS = (32, 8, 8, 8, 8)
KAPPA_MIN = 0.01  # κ = ELU(k) + 1.01 and ELU > -1


def nchw(x: jax.Array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


class TorchWSConv2d(torch.nn.Conv2d):
    """Bae et al.'s weight-standardised Conv2d, re-implemented."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def angular_loss(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """Stand-in loss: mean angle over valid pixels (pred normals are unit, GT normalised here)."""
    gt = gt / jnp.maximum(jnp.linalg.norm(gt, axis=-1, keepdims=True), 1e-6)
    cos = jnp.clip(jnp.sum(pred[..., :3] * gt, axis=-1), -0.999, 0.999)
    return jnp.sum(jnp.where(mask, jnp.arccos(cos), 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# ----------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("src,dst", [((5, 7), (10, 14)), ((5, 7), (9, 4)), ((1, 3), (4, 6))])
def test_align_corners_resize_matches_torch(src, dst):
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    ours = jax.jit(resize_bilinear_align_corners, static_argnums=1)(jnp.asarray(x), dst)
    ref = nhwc(F.interpolate(nchw(x), size=dst, mode="bilinear", align_corners=True))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-6)


def test_bilinear_at_points_matches_resize_then_gather():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 5)).astype(np.float32))
    idx = jnp.asarray(rng.integers(0, 12 * 14, size=(2, 30)), jnp.int32)
    ours = jax.jit(bilinear_at_points, static_argnums=2)(x, idx, (12, 14))
    ref = jnp.take_along_axis(resize_bilinear_align_corners(x, (12, 14)).reshape(2, -1, 5), idx[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- layers vs PyTorch


def assert_close_rel(ours, ref, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rtol * np.abs(ref).max())


def test_ws_conv_matches_torch():
    torch.manual_seed(0)
    conv = TorchWSConv2d(10, 16, kernel_size=3, padding=1)
    x = np.random.default_rng(2).normal(size=(2, 12, 9, 10)).astype(np.float32)
    params = {"kernel": conv.weight.detach().permute(2, 3, 1, 0).numpy(), "bias": conv.bias.detach().numpy()}
    ours = jax.jit(WSConv(16).apply)({"params": params}, jnp.asarray(x))
    assert_close_rel(ours, nhwc(conv(nchw(x))))


def test_upsample_gn_matches_torch():
    torch.manual_seed(1)
    c_in, c_skip, c_out = 12, 4, 16
    net = torch.nn.Sequential(
        TorchWSConv2d(c_in + c_skip, c_out, 3, padding=1), torch.nn.GroupNorm(8, c_out), torch.nn.LeakyReLU(),
        TorchWSConv2d(c_out, c_out, 3, padding=1), torch.nn.GroupNorm(8, c_out), torch.nn.LeakyReLU(),
    )
    for norm in (net[1], net[4]):  # non-trivial affine parameters
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 7, c_in)).astype(np.float32)
    skip = rng.normal(size=(2, 10, 14, c_skip)).astype(np.float32)
    up = F.interpolate(nchw(x), size=(10, 14), mode="bilinear", align_corners=True)
    ref = nhwc(net(torch.cat([up, nchw(skip)], dim=1)))

    t = lambda p: p.detach().numpy()
    params = {}
    for i, (conv, norm) in enumerate([(net[0], net[1]), (net[3], net[4])]):
        params[f"conv{i}"] = {"kernel": t(conv.weight.permute(2, 3, 1, 0)), "bias": t(conv.bias)}
        params[f"norm{i}"] = {"scale": t(norm.weight), "bias": t(norm.bias)}
    ours = jax.jit(UpSampleGN(c_out).apply)({"params": params}, jnp.asarray(x), jnp.asarray(skip))
    assert_close_rel(ours, ref)


# ----------------------------------------------------------------------------------------------- sampling


def test_uncertainty_guided_sampling():
    b, h, w = 2, 8, 10
    n, n_imp = int(0.4 * h * w), int(0.7 * int(0.4 * h * w))
    rng = np.random.default_rng(4)
    kappa = np.stack([rng.permutation(h * w).astype(np.float32) + 1.5 for _ in range(b)]).reshape(b, h, w)
    valid = rng.random((b, h, w)) < 0.6
    # Make sure the lowest κ overall are invalid, so ignoring the mask would give a different answer.
    for i in range(b):
        valid[i].reshape(-1)[np.argsort(kappa[i].reshape(-1))[:5]] = False
    sample = jax.jit(functools.partial(uncertainty_guided_sampling, sampling_ratio=0.4, importance_ratio=0.7))
    idx_a = np.asarray(sample(jnp.asarray(kappa), jnp.asarray(valid), jax.random.key(0)))
    idx_b = np.asarray(sample(jnp.asarray(kappa), jnp.asarray(valid), jax.random.key(1)))
    assert idx_a.shape == (b, n) and idx_a.dtype == np.int32

    for i in range(b):
        flat_k, flat_v = kappa[i].reshape(-1), valid[i].reshape(-1)
        valid_ids = np.flatnonzero(flat_v)
        expected = valid_ids[np.argsort(flat_k[valid_ids])][:n_imp]
        np.testing.assert_array_equal(idx_a[i, :n_imp], expected)  # lowest κ first, valid only
        assert flat_v[idx_a[i, :n_imp]].all()
        for idx in (idx_a[i], idx_b[i]):
            assert len(np.unique(idx)) == n and idx.min() >= 0 and idx.max() < h * w
        np.testing.assert_array_equal(idx_a[i, :n_imp], idx_b[i, :n_imp])  # keys only change the random part
    assert not np.array_equal(idx_a[:, n_imp:], idx_b[:, n_imp:])


def test_gather_gt_at_points():
    b, height, width, level = 2, 12, 16, (6, 8)
    rng = np.random.default_rng(5)
    gt = rng.normal(size=(b, height, width, 3)).astype(np.float32)
    mask = rng.random((b, height, width, 1)) < 0.5
    idx = rng.integers(0, level[0] * level[1], size=(b, 9))
    r, c = idx // level[1], idx % level[1]
    expected_src = {
        True: (np.round(r * (height - 1) / (level[0] - 1)), np.round(c * (width - 1) / (level[1] - 1))),
        False: (np.floor((r + 0.5) * height / level[0]), np.floor((c + 0.5) * width / level[1])),
    }
    for align_corners, (rows, cols) in expected_src.items():
        normals, valid = gather_gt_at_points(
            jnp.asarray(gt), jnp.asarray(mask), jnp.asarray(idx), level, align_corners=align_corners
        )
        bi = np.arange(b)[:, None]
        rows, cols = rows.astype(int), cols.astype(int)
        np.testing.assert_array_equal(np.asarray(normals), gt[bi, rows, cols])
        np.testing.assert_array_equal(np.asarray(valid), mask[bi, rows, cols, 0])
    # At full resolution both mappings are the identity.
    full = rng.integers(0, height * width, size=(b, 9))
    normals, _ = gather_gt_at_points(jnp.asarray(gt), jnp.asarray(mask), jnp.asarray(full), (height, width))
    np.testing.assert_array_equal(np.asarray(normals), gt.reshape(b, -1, 3)[np.arange(b)[:, None], full])


# ----------------------------------------------------------------------------------------------- full head


@pytest.fixture(scope="module")
def head_setup():
    rng = np.random.default_rng(6)
    skips = [
        jnp.asarray(rng.normal(size=(2, IMAGE[0] // s, IMAGE[1] // s, c)).astype(np.float32))
        for s, c in zip((32, 16, 8, 4, 2), SKIP_CHANNELS, strict=True)
    ]
    head = NormalHead(decoder_channels=(16, 16, 8, 8), mlp_hidden=16)
    params = numpy_init(head, skips, train=False)["params"]
    gt = rng.normal(size=(2, *IMAGE, 3)).astype(np.float32)
    mask = np.ones((2, *IMAGE), bool)
    mask[:, : IMAGE[0] // 4] = False  # top quarter invalid
    return head, params, skips, jnp.asarray(gt), jnp.asarray(mask)


@pytest.fixture(scope="module")
def train_run(head_setup):
    """Loss, gradients and train-mode outputs from one jitted value_and_grad."""
    head, params, skips, gt, mask = head_setup

    def loss(params, key):
        out = head.apply({"params": params}, skips, train=True, gt_mask=mask, sampling_key=key)
        return normal_training_loss(out, gt, mask, angular_loss), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return step(params, jax.random.key(0)), step(params, jax.random.key(1))


def check_normal_kappa(pred):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pred[..., :3]), axis=-1), 1.0, atol=1e-5)
    assert float(pred[..., 3].min()) >= KAPPA_MIN


def test_eval_mode_full_maps(head_setup):
    head, params, skips, _, _ = head_setup
    out = jax.jit(lambda p, s: head.apply({"params": p}, s, train=False))(params, skips)
    assert out.points is None and out.indices is None
    assert [m.shape for m in out.maps] == [(2, IMAGE[0] // s, IMAGE[1] // s, 4) for s in (8, 4, 2, 1)]
    for m in out.maps:
        check_normal_kappa(m)


def test_train_mode_points(train_run, head_setup):
    (_, out), _ = train_run[0]
    mask = np.asarray(head_setup[4])
    assert len(out.points) == len(out.indices) == 3
    for level, (level_map, points, idx) in enumerate(zip(out.maps[1:], out.points, out.indices, strict=True)):
        h, w = IMAGE[0] // 2 ** (2 - level), IMAGE[1] // 2 ** (2 - level)
        n = int(0.4 * h * w)
        assert level_map.shape == (2, h, w, 4) and points.shape == (2, n, 4) and idx.shape == (2, n)
        check_normal_kappa(points)
        idx = np.asarray(idx)
        assert all(len(np.unique(i)) == n for i in idx)
        # The refined map carries the point predictions at the sampled pixels.
        np.testing.assert_array_equal(np.asarray(level_map).reshape(2, -1, 4)[np.arange(2)[:, None], idx], points)
        # Importance part: only valid pixels (GT rows 0 .. H/4 - 1 are invalid; rows map by align corners).
        rows = idx[:, : int(0.7 * n)] // w
        src_rows = np.round(rows * (IMAGE[0] - 1) / (h - 1)).astype(int)
        assert mask[0, src_rows, 0].all()


def test_train_sampling_depends_on_key(train_run):
    (_, out_a), _ = train_run[0]
    (_, out_b), _ = train_run[1]
    for a, b in zip(out_a.indices, out_b.indices, strict=True):
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_training_loss_and_gradients(train_run):
    (value, _), grads = train_run[0]
    assert np.isfinite(float(value)) and float(value) > 0
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    # Every refinement MLP and the 1/8 conv receive gradient (the points and the 1/8 map are both scored).
    for name in ("refine0", "refine1", "refine2"):
        assert float(jnp.abs(grads[name]["dense0"]["kernel"]).max()) > 0, name
    for name in ("out_res8", "conv_bottleneck"):
        assert float(jnp.abs(grads[name]["kernel"]).max()) > 0, name


def test_head_needs_sampling_key_in_train(head_setup):
    head, params, skips, _, _ = head_setup
    with pytest.raises(ValueError, match="sampling_key"):
        jax.eval_shape(lambda p: head.apply({"params": p}, skips, train=True), params)


def test_default_head_shapes_512():
    """Full-size widths on the SD1.5 fusion outputs at 512 px, shape-only (eval_shape computes nothing)."""
    skips = [jax.ShapeDtypeStruct((1, 512 // s, 512 // s, c), jnp.float32)
             for s, c in zip((32, 16, 8, 4, 2), (2048, 176, 64, 40, 24), strict=True)]
    head = NormalHead()
    variables = jax.eval_shape(functools.partial(head.init, train=False), jax.random.key(0), skips)
    assert variables["params"]["conv_bottleneck"]["kernel"].shape == (1, 1, 2048, 2048)
    assert [variables["params"][f"up{i}"]["conv1"]["kernel"].shape[-1] for i in range(1, 5)] == [1024, 512, 256, 128]
    assert variables["params"]["refine0"]["dense0"]["kernel"].shape == (512 + 4, 128)
    out = jax.eval_shape(lambda v, s, k: head.apply(v, s, train=True, sampling_key=k), variables, skips,
                         jax.random.key(0))
    assert [p.shape for p in out.points] == [(1, int(0.4 * s * s), 4) for s in (128, 256, 512)]
    out = jax.eval_shape(lambda v, s: head.apply(v, s, train=False), variables, skips)
    assert [m.shape for m in out.maps] == [(1, s, s, 4) for s in (64, 128, 256, 512)]
