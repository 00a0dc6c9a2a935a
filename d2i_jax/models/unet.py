"""diffusers `UNet2DConditionModel` in Flax Linen (NHWC), for SD 1.x and SD 2.x configs.

Besides the noise prediction the UNet can return every block output (REFERENCE §1.1): the 12 down-path
tensors a diffusers UNet keeps as skip connections, the middle block's output and the outputs of every
up-block layer (the last one upsampled where the block has an upsampler) - 25 tensors for SD1.5.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp

from d2i_jax.models.attention import Attention, AttentionImpl
from d2i_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

# `remat_policy` names -> what each rematerialised resnet / spatial transformer keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no remat: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer inputs; everything else recomputed
    "dots": jax.checkpoint_policies.checkpoint_dots,  # matmul and conv outputs kept, elementwise ops recomputed
    # only matmuls without batch dims (the linear projections) kept: convs and attention scores recomputed
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> str:
    """Returns `name` if it is one of `REMAT_POLICIES`, else raises a ValueError listing them."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {name!r} is not one of {list(REMAT_POLICIES)}")
    return name


@functools.cache
def _layer_class(cls: type[nn.Module], remat_policy: str) -> type[nn.Module]:
    """`cls`, or `cls` under `nn.remat` with the named policy (one class per pair; names and params unchanged)."""
    if check_remat_policy(remat_policy) == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[remat_policy])


@flax.struct.dataclass
class UNetFeatures:
    """Block outputs of one UNet pass, NHWC.

    Attributes:
      down: the 12 (SD1.5) down-path tensors: conv_in's output, each resnet(+attention) output and each
        downsampler output, in order - exactly the skip connections.
      mid: the middle block's output.
      up: per up block, the output of each of its layers; a block's last layer is captured after the
        block's upsampler where it has one.
      cross_attention: the head-averaged probabilities `[B, h*w, L]` of the down- and up-block cross-attention
        layers (`record_attention`, `cross_attention_probs`), in call order; empty unless asked for.
    """

    down: tuple[jax.Array, ...]
    mid: jax.Array
    up: tuple[tuple[jax.Array, ...], ...]
    cross_attention: tuple[jax.Array, ...] = ()

    def block_outputs(self) -> list[jax.Array]:
        """All block outputs in REFERENCE §1.1 order: down path, middle, up path (25 for SD1.5), then the
        `cross_attention` maps (rank 3, where recorded)."""
        return [*self.down, self.mid, *(x for block in self.up for x in block), *self.cross_attention]

    def up_block_outputs(self) -> list[jax.Array]:
        """The output of each up block (its last, upsampled layer), coarse to fine (GenPercept). VPD's picks differ
        (the layer before each upsampler): `d2i_jax.perception.feature_paths.vpd`."""
        return [block[-1] for block in self.up]


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_1` -> SiLU -> `linear_2`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense("linear_2")(nn.silu(dense("linear_1")(x)))


class GEGLU(nn.Module):
    """`proj` to twice the width, then value * GELU(gate) with the exact erf GELU (as PyTorch)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.inner_dim * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: `net.0` (GEGLU) and `net.2` (output projection)."""

    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text context, GEGLU feed-forward; pre-LayerNorm residuals."""

    dim: int
    num_heads: int
    attention_impl: AttentionImpl = "xla"
    record_attention: bool = False  # attn2 sows its head-averaged probabilities (`Attention.record_probs`)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, use_fast_variance=False, name=name
        )
        attn = lambda name, record: Attention(
            self.dim, self.dim, self.num_heads, attention_impl=self.attention_impl, record_probs=record,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        x = x + attn("attn1", False)(ln("norm1")(x))
        x = x + attn("attn2", self.record_attention)(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv on SD1, linear on SD2), blocks, proj_out, residual."""

    num_heads: int
    head_dim: int
    num_layers: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    record_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        # diffusers fixes this GroupNorm's eps at 1e-6, whatever the UNet's norm_eps.
        y = group_norm("norm", self.norm_num_groups, 1e-6, self.dtype, self.param_dtype)(x)

        def project(features: int, name: str) -> nn.Module:
            if self.use_linear_projection:
                return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            return conv(features, name, self.dtype, self.param_dtype, kernel=1, padding=0)

        if self.use_linear_projection:
            y = project(inner, "proj_in")(y.reshape(b, h * w, c))
        else:
            y = project(inner, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                inner, self.num_heads, self.attention_impl, self.record_attention, self.dtype, self.param_dtype,
                name=f"transformer_blocks_{i}",
            )(y, context)
        if self.use_linear_projection:
            y = project(c, "proj_out")(y).reshape(b, h, w, c)
        else:
            y = project(c, "proj_out")(y.reshape(b, h, w, inner))
        return y + x


class _BlockCommon(nn.Module):
    """Fields shared by the down, middle and up blocks."""

    out_channels: int
    num_layers: int
    has_attention: bool
    num_heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "xla"
    remat_policy: str = "none"
    record_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def resnet(self, i: int) -> ResnetBlock2D:
        return _layer_class(ResnetBlock2D, self.remat_policy)(
            self.out_channels, self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name=f"resnets_{i}"
        )

    def attention(self, i: int) -> Transformer2DModel:
        return _layer_class(Transformer2DModel, self.remat_policy)(
            self.num_heads, self.out_channels // self.num_heads, self.transformer_layers,
            self.use_linear_projection, self.norm_num_groups, self.attention_impl, self.dtype, self.param_dtype,
            self.record_attention, name=f"attentions_{i}",
        )


class DownBlock(_BlockCommon):
    """`DownBlock2D` / `CrossAttnDownBlock2D`: returns the hidden state and every skip output."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.has_attention:
                x = self.attention(i)(x, context)
            outputs.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, False, self.dtype, self.param_dtype, name="downsamplers_0")(x)
            outputs.append(x)
        return x, tuple(outputs)


class MidBlock(_BlockCommon):
    """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = self.attention(i)(x, context)
            x = self.resnet(i + 1)(x, temb)
        return x


class UpBlock(_BlockCommon):
    """`UpBlock2D` / `CrossAttnUpBlock2D`: consumes skips (last first); returns every layer's output."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs = []
        for i, skip in enumerate(reversed(skips)):
            x = self.resnet(i)(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb)
            if self.has_attention:
                x = self.attention(i)(x, context)
            outputs.append(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
            outputs[-1] = x
        return x, tuple(outputs)


def _per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"UNet config: {name}={list(value)} must have one entry per block ({n})")
    return tuple(int(v) for v in value)


class UNet2DConditionModel(nn.Module):
    """Text-conditioned diffusion UNet (diffusers semantics; parameters named as its state dict).

    Attributes:
      in_channels / out_channels: latent channels (4 for SD).
      block_out_channels: channels per resolution level.
      down_block_types / up_block_types: diffusers block names (`CrossAttnDownBlock2D`, `DownBlock2D`, ...).
      layers_per_block: resnet(+attention) layers per down block (up blocks have one more).
      num_heads: attention heads per level (diffusers calls this `attention_head_dim`; SD2's tuple is heads).
      transformer_layers_per_block: transformer blocks inside each spatial transformer, per level.
      cross_attention_dim: width of the text context (768 for SD1, 1024 for SD2).
      use_linear_projection: linear proj_in/proj_out (SD2) instead of 1x1 convs (SD1).
      flip_sin_to_cos / freq_shift: timestep-embedding convention.
      norm_num_groups / norm_eps: GroupNorm settings of resnets and the output norm.
      attention_impl: `"xla"`, `"cudnn"` (flash attention on NVIDIA GPUs; layers it cannot run fall back to XLA)
        or `"auto"` (cuDNN on a GPU backend, else XLA).
      record_attention: the cross-attention of every down- and up-block transformer (not the middle block's) sows
        its head-averaged probabilities `[B, h*w, L]` (fp32) as `intermediates/.../attn2/probs` when applied with
        `mutable=["intermediates"]` (`cross_attention_probs` reads them; VPD's attention maps). Off, or without the
        mutable collection, nothing is computed; the outputs never change.
      remat_policy: rematerialisation of each resnet and spatial transformer for the backward pass, one of
        `REMAT_POLICIES` (`"none"`, `"full"`, `"dots"`, `"dots_no_batch"`): less activation memory for a full
        fine-tune at the cost of recomputation; the forward pass and the parameter tree are unchanged.
      dtype / param_dtype: compute and parameter dtypes (norms and softmax always run in fp32).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "xla"
    record_attention: bool = False
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between the latent and the coarsest level."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _block_kwargs(self, level: int, block_type: str, *, record_attention: bool) -> dict[str, Any]:
        return dict(
            record_attention=record_attention,
            out_channels=self.block_out_channels[level],
            has_attention=block_type.startswith("CrossAttn"),
            num_heads=self.num_heads[level],
            transformer_layers=self.transformer_layers_per_block[level],
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            attention_impl=self.attention_impl,
            remat_policy=check_remat_policy(self.remat_policy),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        context: jax.Array,
        *,
        return_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, UNetFeatures]:
        """Predicts the diffusion target for NHWC latents.

        Args:
          sample: `[B, h, w, in_channels]` noisy latents; h and w divisible by `downsample_factor`.
          timesteps: a scalar or `[B]` (integer or fractional) timesteps.
          context: `[B, L, cross_attention_dim]` text embeddings.
          return_features: also return the block outputs (`UNetFeatures`).

        Returns:
          The `[B, h, w, out_channels]` prediction, and with `return_features` the block outputs too.
        """
        b, h, w, _ = sample.shape
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(
                f"UNet input latent {h}x{w} must be divisible by {self.downsample_factor} in both sides "
                f"(image side divisible by {8 * self.downsample_factor} for SD)"
            )
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"UNet context width {context.shape[-1]} != cross_attention_dim {self.cross_attention_dim}"
            )
        n_levels = len(self.block_out_channels)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(4 * self.block_out_channels[0], self.dtype, self.param_dtype, name="time_embedding")(
            temb.astype(self.dtype)
        )
        context = context.astype(self.dtype)

        x = conv(self.block_out_channels[0], "conv_in", self.dtype, self.param_dtype)(sample.astype(self.dtype))
        down = [x]
        for level, block_type in enumerate(self.down_block_types):
            x, outs = DownBlock(
                num_layers=self.layers_per_block[level],
                add_downsample=level < n_levels - 1,
                name=f"down_blocks_{level}",
                **self._block_kwargs(level, block_type, record_attention=self.record_attention),
            )(x, temb, context)
            down.extend(outs)

        x = MidBlock(num_layers=1, name="mid_block", **self._block_kwargs(n_levels - 1, "CrossAttn",
                                                                          record_attention=False))(x, temb, context)
        mid = x

        skips = list(down)
        up = []
        for i, block_type in enumerate(self.up_block_types):
            level = n_levels - 1 - i
            n_layers = self.layers_per_block[level] + 1
            block_skips, skips = skips[-n_layers:], skips[:-n_layers]
            x, outs = UpBlock(
                num_layers=n_layers,
                add_upsample=i < n_levels - 1,
                name=f"up_blocks_{i}",
                **self._block_kwargs(level, block_type, record_attention=self.record_attention),
            )(x, block_skips, temb, context)
            up.append(outs)

        x = nn.silu(group_norm("conv_norm_out", self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype)(x))
        out = conv(self.out_channels, "conv_out", self.dtype, self.param_dtype)(x)
        if return_features:
            return out, UNetFeatures(down=tuple(down), mid=mid, up=tuple(up))
        return out


def cross_attention_probs(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The probabilities a `record_attention` UNet sowed, `[B, h*w, L]` per cross-attention layer in call order,
    keyed by the layer's diffusers path (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`)."""
    flat = flax.traverse_util.flatten_dict(dict(intermediates))
    name = lambda path: ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1])
    return {name(path): value[0] for path, value in flat.items() if path[-1] == "probs"}


_SUPPORTED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "time_cond_proj_dim": None,
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def unet_from_config(
    config: Mapping[str, Any],
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat_policy: str = "none",
) -> UNet2DConditionModel:
    """Builds the Flax UNet from a diffusers `unet/config.json` dict, refusing features it does not implement.

    `remat_policy` (one of `REMAT_POLICIES`) rematerialises each resnet / spatial transformer for full fine-tuning.
    """
    check_remat_policy(remat_policy)
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"unet/config.json describes a {config['_class_name']}, expected UNet2DConditionModel")
    bad = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in _SUPPORTED.items() if config.get(k, v) != v]
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    bad += [f"block type {t!r}" for t in down if t not in _DOWN_TYPES]
    bad += [f"block type {t!r}" for t in up if t not in _UP_TYPES]
    if bad:
        raise ValueError("unsupported UNet config entries: " + "; ".join(bad))
    channels = tuple(config["block_out_channels"])
    n = len(channels)
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    return UNet2DConditionModel(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=_per_block(config["layers_per_block"], n, "layers_per_block"),
        num_heads=_per_block(heads, n, "attention_head_dim"),
        transformer_layers_per_block=_per_block(
            config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
        ),
        cross_attention_dim=config.get("cross_attention_dim", 768),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        attention_impl=attention_impl,
        remat_policy=remat_policy,
        dtype=dtype,
        param_dtype=param_dtype,
    )
