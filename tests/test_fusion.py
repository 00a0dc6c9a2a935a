"""Feature grouping and fusion: SD1.5 shapes (shape-only), a non-512 image with tiny widths, normalisation state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from d2i_jax.models.unet import UNet2DConditionModel
from d2i_jax.perception.fusion import FeatureFusion, group_by_stride

TINY_REDUCE = (16, 8, 8, 8)
TINY_DECONV = (4, 4)


def numpy_init(module, *args, seed: int = 0, **kwargs):
    """Variables of `module.init(key, *args, **kwargs)` filled from NumPy: XLA-CPU compiles of PRNG-heavy inits
    take many seconds, so the tests draw parameters here (kernels ~ N(0, 1/fan_in), BatchNorm mean 0 / var 1)."""
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['var']", "sigma']", "['scale']")):
            return jnp.ones(s.shape, s.dtype)
        if name.endswith("['mean']"):
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if name.endswith("['kernel']") else 10
        return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def sd15_block_shapes(image_size: tuple[int, int]) -> list[jax.ShapeDtypeStruct]:
    """Shapes of the 25 SD1.5 UNet block outputs for one image (eval_shape: nothing is computed)."""
    h, w = image_size[0] // 8, image_size[1] // 8

    def run():
        sample, context = jnp.zeros((1, h, w, 4)), jnp.zeros((1, 77, 768))
        (_, feats), _ = UNet2DConditionModel().init_with_output(
            jax.random.key(0), sample, 0, context, return_features=True
        )
        return feats.block_outputs()

    return jax.eval_shape(run)


@pytest.fixture(scope="module")
def shapes_512():
    return sd15_block_shapes((512, 512))


def fake_features(shapes, image_size, channel_divisor=80, batch=2):
    """Small-channel stand-ins with the real spatial sizes; feature i is filled with the value i."""
    out = []
    for i, s in enumerate(shapes):
        h, w = s.shape[1] * image_size[0] // 512, s.shape[2] * image_size[1] // 512
        out.append(jnp.full((batch, h, w, s.shape[-1] // channel_divisor), float(i)))
    return out


def test_sd15_groups_and_fusion_shapes(shapes_512):
    assert len(shapes_512) == 25
    groups = jax.eval_shape(lambda f: group_by_stride(f, (512, 512)), shapes_512)
    assert [g.shape for g in groups] == [(1, 8, 8, 7680), (1, 16, 16, 7040), (1, 32, 32, 4160), (1, 64, 64, 2560)]

    fusion = FeatureFusion()
    variables = jax.eval_shape(functools.partial(fusion.init, image_size=(512, 512), train=False), jax.random.key(0),
                               groups)
    outs = jax.eval_shape(functools.partial(fusion.apply, image_size=(512, 512), train=False), variables, groups)
    assert [o.shape for o in outs] == [
        (1, 16, 16, 2048), (1, 32, 32, 176), (1, 64, 64, 64), (1, 128, 128, 40), (1, 256, 256, 24)
    ]


def test_group_by_stride_order_and_content(shapes_512):
    feats = fake_features(shapes_512, (512, 512))
    groups = jax.jit(group_by_stride, static_argnums=1)(feats, (512, 512))
    assert [g.shape[1] for g in groups] == [8, 16, 32, 64]
    # Each group is its features concatenated in block order: the fill values read back the block indices.
    for g in groups:
        members = [i for i, f in enumerate(feats) if f.shape[1] == g.shape[1]]
        expected = np.concatenate([np.full(feats[i].shape[-1], float(i)) for i in members])
        np.testing.assert_array_equal(np.asarray(g[0, 0, 0]), expected)


def test_group_by_stride_rejects_bad_sizes(shapes_512):
    feats = fake_features(shapes_512, (512, 512))
    with pytest.raises(ValueError, match="divisible by 64"):
        group_by_stride(feats, (500, 512))
    with pytest.raises(ValueError, match="uniform stride"):
        group_by_stride([*feats, jnp.zeros((2, 5, 5, 1))], (512, 512))


@pytest.fixture(scope="module")
def tiny_run(shapes_512):
    """Tiny-width fusion at 320x448: groups, variables, and one jitted train-mode and eval-mode step."""
    image_size = (320, 448)
    feats = fake_features(shapes_512, image_size)
    rng = np.random.default_rng(0)
    feats = [f + rng.normal(size=f.shape).astype(np.float32) for f in feats]
    groups = group_by_stride(feats, image_size)
    fusion = FeatureFusion(reduce_channels=TINY_REDUCE, deconv_channels=TINY_DECONV)
    variables = numpy_init(fusion, groups, image_size=image_size, train=False)

    @jax.jit
    def train_step(variables, groups):
        return fusion.apply(variables, groups, image_size, train=True, mutable=["batch_stats"])

    @jax.jit
    def eval_step(variables, groups):
        return fusion.apply(variables, groups, image_size, train=False, mutable=["batch_stats"])

    return fusion, groups, variables, train_step, eval_step


def test_fusion_non512_shapes(tiny_run):
    _, groups, variables, train_step, eval_step = tiny_run
    assert [g.shape[1:3] for g in groups] == [(5, 7), (10, 14), (20, 28), (40, 56)]
    expected = [(2, 10, 14, 16), (2, 20, 28, 8), (2, 40, 56, 8), (2, 80, 112, 4), (2, 160, 224, 4)]
    for step in (train_step, eval_step):
        outs, _ = step(variables, groups)
        assert [o.shape for o in outs] == expected
        assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)


def test_batch_stats_update_in_train_only(tiny_run):
    _, groups, variables, train_step, eval_step = tiny_run
    stats = variables["batch_stats"]
    _, new = train_step(variables, groups)
    changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), stats, new["batch_stats"])
    flat = jax.tree_util.tree_flatten_with_path(changed)[0]
    # Every BatchNorm mean/var and every spectral-norm u moves after one training step.
    assert all(c for _, c in flat), [jax.tree_util.keystr(p) for p, c in flat if not c]
    assert sum("['u']" in jax.tree_util.keystr(p) for p, _ in flat) == 9  # 3 SegBlocks x (2 convs + shortcut)

    _, same = eval_step(variables, groups)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats, same["batch_stats"])


def test_spectral_norm_tracks_top_singular_value(tiny_run):
    _, groups, variables, train_step, _ = tiny_run
    for _ in range(40):  # power iteration converges over training steps (one iteration per step)
        _, state = train_step(variables, groups)
        variables = {**variables, **state}
    kernel = np.asarray(variables["params"]["merge3"]["conv1"]["kernel"])
    w = kernel.reshape(-1, kernel.shape[-1]).T  # [out, k*k*in]
    u = np.asarray(variables["batch_stats"]["merge3"]["conv1"]["u"])
    top = np.linalg.svd(w, compute_uv=False)[0]
    np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(u @ w), top, rtol=1e-3)


@pytest.mark.parametrize("scheme", ["pytorch", "flax"])
def test_initialisers(scheme):
    """PyTorch's defaults: every weight and bias ~ U(+-1/sqrt(fan_in)), fan-in of a transposed conv from its output
    channels; flax's: lecun-normal kernels, zero biases."""
    groups = [jnp.ones((1, 1, 1, 48)), jnp.ones((1, 2, 2, 40)), jnp.ones((1, 4, 4, 24)), jnp.ones((1, 8, 8, 16))]
    fusion = FeatureFusion(reduce_channels=(64, 32, 32, 32), deconv_channels=(16, 8), param_init=scheme)
    params = jax.jit(lambda k: fusion.init(k, groups, (64, 64), train=False))(jax.random.key(0))["params"]
    modules = {path[:-1]: None for path in traverse_util.flatten_dict(params)}
    flat = traverse_util.flatten_dict(params)
    checked = 0
    for module in modules:
        if "norm" in module[-1]:  # BatchNorm affine: ones and zeros in both schemes
            continue
        kernel = np.asarray(flat[(*module, "kernel")])
        fan_in = 4 * kernel.shape[-1] if "deconv" in module[-1] else int(np.prod(kernel.shape[:-1]))
        bound = 1 / np.sqrt(fan_in)
        bias = flat.get((*module, "bias"))
        if scheme == "pytorch":
            for leaf in (kernel, *([] if bias is None else [np.asarray(bias)])):
                assert bound >= np.abs(leaf).max() > 0.5 * bound, module
            expected_std = bound / np.sqrt(3)
        else:
            assert bias is None or not np.asarray(bias).any(), module
            expected_std = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
        if kernel.size > 1000:
            np.testing.assert_allclose(kernel.std(), expected_std, rtol=0.15, err_msg=str(module))
        checked += 1
    assert checked == 4 + 3 * 3 + 2  # reduce convs, SegBlock convs, transposed convs
