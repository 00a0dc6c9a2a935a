"""timm's `VisionTransformer` in Flax Linen (NHWC), as InvPT uses it for its multi-task backbone.

InvPT (Ye & Xu 2022) builds timm's `vit_large_patch16_384` at its training size (512x512 PASCAL-Context, 448x576
NYUD-v2) with stochastic depth 0.15, and reads four features off it: the outputs of blocks 6, 12 and 18 (1-based,
before the final LayerNorm) and the final LayerNorm's output, each without the class token and laid out row-major as
an `[H/16, W/16]` map. The pretrained 24x24 position grid is resized to the training grid with bicubic interpolation
without antialiasing, as InvPT's loader does (`resize_pos_embed`; timm's state-dict loader antialiases by default,
which changes the embeddings by ~10 %, upsampling included). The parameter tree mirrors timm's state-dict keys
(`blocks.3.attn.qkv` is `blocks_3/attn/qkv`), so `weights_conversion.timm_vit` converts a timm checkpoint by renaming.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.models.attention import AttentionImpl, dot_product_attention

LAYER_NORM_EPS = 1e-6  # timm's ViT norm layer
_CUBIC_A = -0.75  # PyTorch's bicubic kernel coefficient (PIL and jax.image use -0.5)


@flax.struct.dataclass
class ViTFeatures:
    """What one ViT pass gives a dense head.

    Attributes:
      maps: InvPT's backbone features, NHWC `[B, H/p, W/p, C]`: the output of each of `out_blocks` (before the final
        LayerNorm), then the final LayerNorm's output; the class token dropped.
      tokens: the final LayerNorm's output over all tokens `[B, 1 + H/p * W/p, C]`, class token first (timm's
        `forward_features`).
    """

    maps: tuple[jax.Array, ...]
    tokens: jax.Array


class VisionTransformer(nn.Module):
    """timm `VisionTransformer` with a class token, learned absolute position embeddings, pre-LayerNorm blocks with
    qkv bias and exact-GELU MLPs, stochastic depth and no classifier; images `[B, H, W, C]` -> `ViTFeatures`.

    The defaults are InvPT's ViT-L/16 at PASCAL-Context's 512x512 (NYUD-v2: `img_size=(448, 576)`). The input must
    have exactly `img_size`: the position embeddings are learned for that grid.

    Attributes:
      img_size: (H, W) of the input images.
      patch_size: side of the square patches (the feature maps are `img_size // patch_size`).
      in_channels: input channels.
      embed_dim: token width C.
      depth: number of blocks.
      num_heads: attention heads per block.
      mlp_ratio: MLP hidden width over C.
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first (timm's rule); active
        only with `train=True`, drawing from `dropout_key`.
      out_blocks: 1-based indices of the blocks whose outputs become feature maps (InvPT: 6, 12, 18).
      attention_impl: `dot_product_attention` kernel (`"xla"`, `"cudnn"`, `"auto"`).
    """

    img_size: tuple[int, int] = (512, 512)
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.15
    out_blocks: tuple[int, ...] = (6, 12, 18)
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
                 ) -> ViTFeatures:
        expected = (*self.img_size, self.in_channels)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"ViT built for {expected} (H, W, C) images got {tuple(images.shape[1:])}")
        if not all(1 <= i <= self.depth for i in self.out_blocks):
            raise ValueError(f"out_blocks {self.out_blocks} must lie in 1..{self.depth}")
        rows, cols = self.grid_size
        c = self.embed_dim
        x = _PatchEmbed(c, self.patch_size, self.dtype, self.param_dtype, name="patch_embed")(images)
        x = x.reshape(x.shape[0], rows * cols, c)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c), self.param_dtype)
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + rows * cols, c), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, c)).astype(x.dtype), x], axis=1)
        x = x + pos_embed.astype(x.dtype)
        to_map = lambda t: t[:, 1:].reshape(t.shape[0], rows, cols, c)
        maps = []
        for i, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth)):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x = _Block(self.num_heads, self.mlp_ratio, float(rate), self.attention_impl, self.dtype, self.param_dtype,
                       name=f"blocks_{i}")(x, train=train, dropout_key=key)
            if i + 1 in self.out_blocks:
                maps.append(to_map(x))
        tokens = _layer_norm("norm", self.dtype, self.param_dtype)(x)
        return ViTFeatures(maps=(*maps, to_map(tokens)), tokens=tokens)


def _layer_norm(name: str, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        name=name)


class _PatchEmbed(nn.Module):
    """Non-overlapping `patch_size` patches -> tokens, one strided conv (`proj`)."""

    embed_dim: int
    patch_size: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        window = (self.patch_size, self.patch_size)
        return nn.Conv(self.embed_dim, window, strides=window, padding="VALID", dtype=self.dtype,
                       param_dtype=self.param_dtype, name="proj")(images)


class _Block(nn.Module):
    """Pre-LayerNorm self-attention and MLP, each residual branch dropped per sample at `drop_path` in training."""

    num_heads: int
    mlp_ratio: float
    drop_path: float
    attention_impl: AttentionImpl
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        rngs = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        # a Dropout mask broadcast over tokens and channels keeps or drops whole samples, scaled by 1 / keep: DropPath
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        attn = _Attention(self.num_heads, self.attention_impl, self.dtype, self.param_dtype, name="attn")
        x = x + drop_path(attn(_layer_norm("norm1", self.dtype, self.param_dtype)(x)), rng=rngs[0])
        mlp = _Mlp(self.mlp_ratio, self.dtype, self.param_dtype, name="mlp")
        return x + drop_path(mlp(_layer_norm("norm2", self.dtype, self.param_dtype)(x)), rng=rngs[1])


class _Attention(nn.Module):
    """Multi-head self-attention with one fused `qkv` projection (output laid out q | k | v, heads-major each)."""

    num_heads: int
    attention_impl: AttentionImpl
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = dot_product_attention(q, k, v, num_heads=self.num_heads, implementation=self.attention_impl)
        return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)


class _Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    mlp_ratio: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = jax.nn.gelu(dense(int(x.shape[-1] * self.mlp_ratio), "fc1")(x), approximate=False)
        return dense(x.shape[-1], "fc2")(h)


def _bicubic_matrix(old: int, new: int) -> np.ndarray:
    """`[new, old]` weights of PyTorch's 1-D bicubic resampling (`align_corners=False`, no antialiasing): source
    coordinate `(i + 0.5) * old / new - 0.5`, Keys' kernel with a = -0.75, taps past the edges clamped to it."""
    src = (np.arange(new) + 0.5) * (old / new) - 0.5
    base = np.floor(src)
    t = src - base
    a = _CUBIC_A
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, old - 1)
    matrix = np.zeros((new, old))
    np.add.at(matrix, (np.repeat(np.arange(new), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_pos_embed(
    pos_embed: jax.Array,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> jax.Array:
    """Resamples learned position embeddings to another patch grid, as InvPT and timm do when loading a checkpoint
    trained at another image size: the grid part bicubically (PyTorch's `F.interpolate(mode="bicubic",
    align_corners=False)` without antialiasing, in fp32), the prefix (class) tokens kept.

    Args:
      pos_embed: `[1, num_prefix_tokens + rows * cols, C]`, the grid part row-major.
      new_grid: (rows, columns) to resample to.
      old_grid: (rows, columns) of `pos_embed`; default: square.
      num_prefix_tokens: leading tokens that are not on the grid (1: the class token).

    Returns:
      `[1, num_prefix_tokens + new_grid[0] * new_grid[1], C]` in the dtype of `pos_embed`.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} grid tokens, not a square grid: pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"pos_embed has {n} grid tokens, old_grid {tuple(old_grid)} has {old_grid[0] * old_grid[1]}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    grid = jnp.asarray(grid, jnp.float32).reshape(*old_grid, -1)
    rows, cols = (jnp.asarray(_bicubic_matrix(o, m), jnp.float32) for o, m in zip(old_grid, new_grid, strict=True))
    grid = jnp.einsum("yh,xw,hwc->yxc", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    grid = grid.reshape(1, -1, grid.shape[-1]).astype(pos_embed.dtype)
    return jnp.concatenate([jnp.asarray(prefix), grid], axis=1)
