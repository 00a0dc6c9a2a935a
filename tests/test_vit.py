"""The Flax ViT (InvPT's backbone) against timm's `VisionTransformer`: tiny random PyTorch ViTs saved in timm's
state-dict layout, converted by `weights_conversion.timm_vit`, InvPT's features compared in fp32 (relative error
<= 1e-4); the position-embedding resize against PyTorch's bicubic `F.interpolate` / timm's `resample_abs_pos_embed`.

Each reference is either timm itself (skipped where `import timm` fails: timm imports torchvision, whose PyPI wheel
needs a CUDA torch) or `RestatedViT`, timm's ViT re-stated with its module names, so that CPU-only CI checks the
same numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from d2i_jax.models.vit import VisionTransformer, resize_pos_embed
from weights_conversion.timm_vit import convert_timm_vit, load_timm_vit, param_shapes
from weights_conversion.torch_to_flax import ConversionError

RTOL = 1e-4
# InvPT's ViT-L/16 (24 blocks, maps after blocks 6, 12, 18) shrunk: 4 blocks, maps after blocks 1, 2, 3
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
OUT_BLOCKS = (1, 2, 3)
SIZE = (32, 48)  # a non-square 4x6 grid


class RestatedViT(torch.nn.Module):
    """timm's `VisionTransformer` as InvPT configures it (class token, learned position embeddings, pre-norm blocks
    with qkv bias, exact GELU, LayerNorm eps 1e-6, classifier `head`), with timm's parameter names."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 num_classes: int = 5):
        super().__init__()
        grid = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + grid, embed_dim))
        self.blocks = torch.nn.ModuleList(RestatedBlock(embed_dim, num_heads) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = torch.nn.Linear(embed_dim, num_classes)


class RestatedBlock(torch.nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.num_heads), dim=-1)
        x = x + self.attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def timm_or_skip():
    try:
        import timm
    except ImportError as e:  # timm's torchvision import fails beside a CPU-only torch
        pytest.skip(f"timm is not importable: {e}")
    return timm


def reference_vit(kind: str, img_size: tuple[int, int], seed: int) -> torch.nn.Module:
    """A random ViT in timm's layout; every parameter random, norm affines included."""
    torch.manual_seed(seed)
    if kind == "timm":
        model = timm_or_skip().models.vision_transformer.VisionTransformer(img_size=img_size, num_classes=5, **TINY)
    else:
        model = RestatedViT(img_size, **TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 if is_norm_scale else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def reference_resize(kind: str, pos_embed: torch.Tensor, new: tuple[int, int], old: tuple[int, int]) -> torch.Tensor:
    """InvPT's load-time resize: bicubic, align_corners=False, no antialiasing, class token kept."""
    if kind == "timm":
        resample = timm_or_skip().layers.pos_embed.resample_abs_pos_embed
        return resample(pos_embed, list(new), list(old), num_prefix_tokens=1, antialias=False)
    grid = pos_embed[:, 1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


@torch.no_grad()
def reference_maps(model: torch.nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """InvPT's features as NHWC maps: the `OUT_BLOCKS` outputs, then the final norm's output, class token dropped."""
    x = model.patch_embed.proj(torch.from_numpy(images).permute(0, 3, 1, 2))
    b, c, rows, cols = x.shape
    x = torch.cat([model.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + model.pos_embed
    to_map = lambda t: t[:, 1:].reshape(b, rows, cols, c).numpy()
    maps = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i + 1 in OUT_BLOCKS:
            maps.append(to_map(x))
    return [*maps, to_map(model.norm(x))]


def flax_vit(img_size: tuple[int, int], drop_path_rate: float = 0.0) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, drop_path_rate=drop_path_rate, out_blocks=OUT_BLOCKS, **TINY)


@functools.cache
def jitted_apply(module: VisionTransformer, train: bool = False):
    return jax.jit(lambda params, x, rng: module.apply({"params": params}, x, train=train, dropout_key=rng))


def images(img_size: tuple[int, int], batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *img_size, 3)).astype(np.float32)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(params=["restated", "timm"])
def kind(request) -> str:
    return request.param


# ------------------------------------------------------------------------------------------------- features


def test_features_match_reference(kind, tmp_path):
    ref = reference_vit(kind, SIZE, seed=0)
    assert {"head.weight", "head.bias", "blocks.3.attn.qkv.bias", "patch_embed.proj.weight"} <= set(ref.state_dict())
    save_file(torch_state(ref), tmp_path / "model.safetensors")
    module = flax_vit(SIZE)
    params = load_timm_vit(tmp_path / "model.safetensors", module)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, param_shapes(module))

    x = images(SIZE)
    out = jitted_apply(module)(params, x, jax.random.key(0))
    expected = reference_maps(ref, x)
    assert [m.shape for m in out.maps] == [(2, 4, 6, 32)] * 4
    errors = [relative_error(o, e) for o, e in zip(out.maps, expected, strict=True)]
    assert max(errors) <= RTOL, errors
    assert out.tokens.shape == (2, 1 + 4 * 6, 32)
    np.testing.assert_array_equal(out.tokens[:, 1:].reshape(2, 4, 6, 32), out.maps[-1])


def test_checkpoint_from_another_size(kind, tmp_path):
    """Trained on a square 4x4 grid, used on 5x7 (as InvPT takes the 384-pixel ViT-L to 512x512 or 448x576)."""
    old, new = (32, 32), (40, 56)
    trained = reference_vit(kind, old, seed=1)
    torch.save(torch_state(trained), tmp_path / "model.pth")
    state = torch_state(trained)
    state["pos_embed"] = reference_resize(kind, state["pos_embed"], (5, 7), (4, 4))
    ref = reference_vit(kind, new, seed=2)
    ref.load_state_dict(state)

    module = flax_vit(new)
    x = images(new, seed=3)
    out = jitted_apply(module)(load_timm_vit(tmp_path / "model.pth", module), x, jax.random.key(0))
    errors = [relative_error(o, e) for o, e in zip(out.maps, reference_maps(ref, x), strict=True)]
    assert max(errors) <= RTOL, errors


# ------------------------------------------------------------------------------------------------- pos-embed resize


@pytest.mark.parametrize(("old", "new"), [((4, 6), (9, 5)), ((24, 24), (28, 36)), ((7, 5), (3, 4))])
def test_resize_pos_embed_matches_reference(kind, old, new):
    pos_embed = torch.randn(1, 1 + old[0] * old[1], 8, generator=torch.Generator().manual_seed(0))
    expected = reference_resize(kind, pos_embed, new, old)
    ours = resize_pos_embed(jnp.asarray(pos_embed.numpy()), new, old)
    assert ours.shape == (1, 1 + new[0] * new[1], 8)
    np.testing.assert_array_equal(ours[:, 0], pos_embed[:, 0].numpy())
    assert relative_error(ours, expected) <= 1e-5  # fp32 rounding, summed in another order


def test_resize_pos_embed_square_default_and_errors():
    pos_embed = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, 4)), jnp.float32)
    np.testing.assert_array_equal(resize_pos_embed(pos_embed, (4, 4)), pos_embed)
    assert resize_pos_embed(pos_embed, (2, 3)).shape == (1, 7, 4)
    with pytest.raises(ValueError, match="not a square grid: pass old_grid"):
        resize_pos_embed(pos_embed[:, :13], (4, 4))
    with pytest.raises(ValueError, match=r"old_grid \(3, 3\) has 9"):
        resize_pos_embed(pos_embed, (4, 4), old_grid=(3, 3))


# ------------------------------------------------------------------------------------------------- errors, training


def test_conversion_errors_name_keys():
    module = flax_vit(SIZE)
    state = {k: v.numpy() for k, v in torch_state(reference_vit("restated", SIZE, seed=0)).items()}
    assert jax.tree.map(lambda x: x.shape, convert_timm_vit(state, module)) == jax.tree.map(
        lambda x: x.shape, param_shapes(module))  # head.* ignored
    state["blocks.0.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    del state["blocks.1.attn.qkv.bias"]
    state["blocks.7.norm1.weight"] = np.ones(32, np.float32)
    state["pos_embed"] = np.zeros((1, 1 + 24, 16), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_timm_vit(state, module, what="vit.safetensors")
    message = str(info.value)
    assert "vit.safetensors: checkpoint does not match the model (3 missing, 1 unexpected, 2 shape mismatches)" in (
        message)
    assert "blocks_1/attn/qkv/bias (96,)" in message
    assert "blocks.7.norm1.weight (32,)" in message
    assert "blocks.0.mlp.fc1.weight: checkpoint (64, 32) -> (32, 64), model expects (32, 128)" in message
    assert "pos_embed: checkpoint (1, 25, 16) -> (1, 25, 16), model expects (1, 25, 32)" in message
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_timm_vit("missing.safetensors", module)


def test_wrong_image_size_is_refused():
    module = flax_vit(SIZE)
    with pytest.raises(ValueError, match=r"ViT built for \(32, 48, 3\) \(H, W, C\) images got \(48, 32, 3\)"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 48, 32, 3)))


def test_drop_path_drops_whole_residual_branches_in_training():
    """Stochastic depth: per sample, each residual branch of block i is dropped with rate i / (depth - 1) * rate (0
    for the first block) or scaled by 1 / keep; off without `train`."""
    module = flax_vit(SIZE, drop_path_rate=0.9)
    params = param_shapes(module)
    params = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape) * 0.2, params)
    x = np.repeat(images(SIZE, batch=1), 16, axis=0)  # one image, 16 draws of the masks
    rng = jax.random.key(4)
    evaluated = jitted_apply(module)(params, x, rng)
    trained = jitted_apply(module, train=True)(params, x, rng)
    np.testing.assert_allclose(trained.maps[0], evaluated.maps[0], rtol=1e-6, atol=1e-6)  # block 1: rate 0
    after_2, after_3 = np.asarray(trained.maps[1]), np.asarray(trained.maps[2])
    assert len({a.tobytes() for a in after_3}) > 1  # masks differ between the samples
    assert any(np.array_equal(a, b) for a, b in zip(after_2, after_3, strict=True))  # block 3 skipped whole
    assert not np.allclose(after_3, evaluated.maps[2], atol=1e-3)


def test_invpt_nyud_configuration():
    """The defaults are InvPT's ViT-L/16 (timm's `vit_large_patch16_384` less its classifier); at NYUD-v2's 448x576
    the four maps are 28x36x1024."""
    module = VisionTransformer(img_size=(448, 576))
    x = jnp.zeros((1, 448, 576, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(variables)) == 304_133_120
    assert variables["params"]["pos_embed"].shape == (1, 1 + 28 * 36, 1024)
    out = jax.eval_shape(module.apply, variables, x)
    assert [m.shape for m in out.maps] == [(1, 28, 36, 1024)] * 4
