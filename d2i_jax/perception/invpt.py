"""InvPT's multi-task decoder (Ye & Xu, ECCV 2022, "Inverted Pyramid Multi-task Transformer"), NHWC, with the
semantics of the public PyTorch code (prismformore/Multi-Task-Transformer, `InvPT/models/transformers/`
`transformer_decoder.py` and `invpt.py`, the heads of `InvPT/models/transformer_net.py`).

Inputs: four backbone maps at one stride (InvPT: ViT-L/16 tokens after blocks 6, 12, 18 and the final normed output,
1024 channels at 1/16 of the image; their channels are free here, so Stable Diffusion features can be concatenated).
With E = `embed_dim`, D = E + `pred_channels` (InvPT: 512 + 64), T tasks and h0 = the maps' side /
`mtt_downsample_rate` (InvPT: 2, so 1/32 of the image):
1. Preliminary decoders: the last map bilinearly resized to h0, per task two [3x3 conv (no bias), BatchNorm, ReLU]
   blocks (C -> C -> E) and a 1x1 conv to the task's channels: the intermediate prediction (InvPT supervises it with
   the task's loss and weight, like the final one). [feature, intermediate prediction] -> 1x1 conv to D per task.
2. Three UP-Transformer stages at h0, 2 h0, 4 h0 with per-task widths D, D/2, D/4. Stages 1 and 2 first upsample each
   task's map (bilinear x2, then twice [3x3 conv with dilation 2 (no bias), BatchNorm, ReLU]) and add a backbone
   feature: map 1 by a 3x3 conv (stage 1), map 0 by a 3x3 stride-2 transposed conv (stage 2, at 2x the maps' side).
   Map 2 is unused: InvPT projects it but never adds it (its first stage has no upsampling, where the add sits).
3. One pre-norm transformer block per stage on the tokens of all tasks together (LayerNorm, attention, residual,
   LayerNorm, GELU MLP of ratio `mlp_ratio`, residual). Attention: per-task queries by a depthwise 3x3 stride-2 conv +
   BatchNorm, keys and values by average pooling of stride `kv_strides[i]` (so every stage attends to the same
   number of keys), then linear projections (with bias) into `num_heads` heads; logits scaled by 1 / sqrt(stage
   width), not of the head width. From stage 1 on, the previous stage's logits (queries at a quarter of the current
   side) are upsampled x2 bilinearly per task over the query grid, concatenated with the current ones along heads
   and fused by a 1x1 conv: the fused logits are the next stage's message. The output (at half the side) is
   upsampled x2 bilinearly before the residual.
4. After each stage the concatenated task features are LayerNormed together (over T x width channels); each task's
   slice (1x1 conv to D after stage 0) is bilinearly upsampled to 8 h0 and summed over stages; per task a 3x3 conv
   (with bias) + BatchNorm + ReLU, then the head (InvPT's `heads`, a 1x1 conv) gives the final prediction.

Inside: everything from the backbone maps to the per-task predictions at 8 h0 (1/4 of the image in InvPT) and the
intermediate ones at h0. Outside, as in InvPT's `TransformerNet`: the bilinear upsampling of both to the image size.
All bilinear resizes are half-pixel without antialiasing (`F.interpolate(align_corners=False)`). BatchNorms are
InvPT's SyncBatchNorm: batch statistics of the batch the call sees in training. InvPT's init is not reproduced
(`layers.INITS`); `weights_conversion.invpt` maps a public checkpoint onto these variables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2i_jax.perception.fusion import resize_bilinear
from d2i_jax.perception.layers import TorchBatchNorm, bias_init, kernel_init, torch_conv

NUM_STAGES = 3
QUERY_STRIDE = 2  # InvPT's STRIDE_Q; the attention message's x2 upsampling relies on it


def _dense(x: jax.Array, features: int, name: str, param_init: str) -> jax.Array:
    return nn.Dense(features, kernel_init=kernel_init(param_init), bias_init=bias_init(param_init, x.shape[-1]),
                    name=name)(x)


def _layer_norm(x: jax.Array, name: str) -> jax.Array:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)(x)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _drop(x: jax.Array, rate: float, key: jax.Array | None, *, per_sample: bool = False) -> jax.Array:
    """Dropout (or drop path with `per_sample`: whole samples) at `rate`; the identity without a key (evaluation)."""
    if key is None or rate == 0.0:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if per_sample else x.shape
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _avg_pool(x: jax.Array, s: int) -> jax.Array:
    """`AvgPool2d(s, s)` on `[N, h, w, C]`, h and w multiples of s."""
    n, h, w, c = x.shape
    return x.reshape(n, h // s, s, w // s, s, c).mean(axis=(2, 4))


def _resize_tasks(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of each task's map in `[B, T, h, w, C]`."""
    b, t, _, _, c = x.shape
    return resize_bilinear(x.reshape(b * t, *x.shape[2:]), size).reshape(b, t, *size, c)


class ConvBNReLU(nn.Module):
    """Square conv (PyTorch padding, optional dilation and bias), BatchNorm, ReLU."""

    features: int
    dilation: int = 1
    use_bias: bool = False
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = torch_conv(x, self.features, 3, "conv", self.param_init, dilation=self.dilation, use_bias=self.use_bias)
        return nn.relu(TorchBatchNorm(name="bn")(x, train=train))


class UpEmbed(nn.Module):
    """InvPT's `UpEmbed`: bilinear x2, then two dilated [3x3 conv, BatchNorm, ReLU] to `features`."""

    features: int
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
        x = ConvBNReLU(self.features, dilation=2, param_init=self.param_init, name="conv0")(x, train=train)
        return ConvBNReLU(self.features, dilation=2, param_init=self.param_init, name="conv1")(x, train=train)


class CrossScaleAttention(nn.Module):
    """InvPT's reduced-resolution multi-task attention with the cross-scale message (module docstring, step 3).

    Attributes:
      num_heads: attention heads.
      kv_stride: average-pooling stride of keys and values.
      attn_dropout_rate / dropout_rate: on the attention weights / the output projection (InvPT: 0).
      param_init: `layers.INITS` name.
    """

    num_heads: int
    kv_stride: int
    attn_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, message: jax.Array | None, *, train: bool,
                 dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`x`: `[B, T, h, w, C]` normed tokens; `message`: the previous stage's fused logits `[B, T*(h/4)*(w/4), K,
        heads]` (None in the first stage). Returns the output `[B, T, h/2, w/2, C]` and this stage's logits
        `[B, T*(h/2)*(w/2), K, heads]`, K = T*(h/s)*(w/s)."""
        b, t, h, w, c = x.shape
        pi = self.param_init
        q = jnp.stack([TorchBatchNorm(name=f"conv_proj_q{k}_bn")(
            torch_conv(x[:, k], c, 3, f"conv_proj_q{k}", pi, stride=QUERY_STRIDE, groups=c, use_bias=False),
            train=train) for k in range(t)], axis=1)
        kv = _avg_pool(x.reshape(b * t, h, w, c), self.kv_stride).reshape(b, -1, c)
        d = c // self.num_heads
        q = _dense(q.reshape(b, -1, c), c, "proj_q", pi).reshape(b, -1, self.num_heads, d)
        k_ = _dense(kv, c, "proj_k", pi).reshape(b, -1, self.num_heads, d)
        v = _dense(kv, c, "proj_v", pi).reshape(b, -1, self.num_heads, d)
        logits = jnp.einsum("bqhd,bkhd->bqkh", q, k_) * c**-0.5
        if message is not None:
            qh, qw = h // QUERY_STRIDE, w // QUERY_STRIDE
            prev = message.reshape(b, t, qh // 2, qw // 2, -1)
            prev = _resize_tasks(prev, (qh, qw)).reshape(logits.shape)
            logits = torch_conv(jnp.concatenate([logits, prev], axis=-1), self.num_heads, 1, "fuse_attn", pi)
        attn = _drop(jax.nn.softmax(logits, axis=2), self.attn_dropout_rate, _fold(dropout_key, 0))
        out = jnp.einsum("bqkh,bkhd->bqhd", attn, v).reshape(b, -1, c)
        out = _drop(_dense(out, c, "proj", pi), self.dropout_rate, _fold(dropout_key, 1))
        return out.reshape(b, t, h // QUERY_STRIDE, w // QUERY_STRIDE, c), logits


class UPTransformerBlock(nn.Module):
    """InvPT's `InvPTBlock`: pre-norm attention (output upsampled to the input side) and MLP, each with drop path.

    Attributes: `CrossScaleAttention`'s, and
      mlp_ratio: MLP hidden width / stage width.
      drop_path_rate: stochastic depth of both residual branches.
    """

    num_heads: int
    kv_stride: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, message: jax.Array | None, *, train: bool,
                 dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`[B, T, h, w, C]` -> the same shape, and the attention logits (`CrossScaleAttention`)."""
        c, pi = x.shape[-1], self.param_init
        attn = CrossScaleAttention(self.num_heads, self.kv_stride, self.attn_dropout_rate, self.dropout_rate, pi,
                                   name="attn")
        y, logits = attn(_layer_norm(x, "norm1"), message, train=train, dropout_key=_fold(dropout_key, 0))
        x = x + _drop(_resize_tasks(y, x.shape[2:4]), self.drop_path_rate, _fold(dropout_key, 1), per_sample=True)
        y = nn.gelu(_dense(_layer_norm(x, "norm2"), int(c * self.mlp_ratio), "fc1", pi), approximate=False)
        y = _dense(_drop(y, self.dropout_rate, _fold(dropout_key, 2)), c, "fc2", pi)
        y = _drop(y, self.dropout_rate, _fold(dropout_key, 3))
        return x + _drop(y, self.drop_path_rate, _fold(dropout_key, 4), per_sample=True), logits


class InvPTDecoder(nn.Module):
    """Backbone maps -> per-task predictions and intermediate predictions (module docstring).

    Attributes:
      tasks: task name -> output channels, in InvPT's task order (a mapping or `(name, channels)` pairs); the order
        decides the token and LayerNorm channel layout and the per-index modules' names.
      embed_dim: preliminary decoders' width E (InvPT: 512).
      pred_channels: added to E for the transformer width D (InvPT's PRED_OUT_NUM_CONSTANT: 64).
      mtt_downsample_rate: the first stage's side is the maps' side divided by this (InvPT: 2).
      num_heads: attention heads per stage (InvPT: 2).
      kv_strides: key / value pooling stride per stage (InvPT: 2, 4, 8).
      mlp_ratio: MLP hidden width / stage width (InvPT: 4).
      drop_path_rate: stochastic depth of each block's two residual branches, one draw per sample (InvPT: 0; its
        spec says 0.15, but its per-stage decay rule, linspace(0, rate, depth), gives 0 for its one block per stage).
      attn_dropout_rate / dropout_rate: attention-weight / projection and MLP dropout (InvPT: 0).
      param_init: `layers.INITS` name of the initialisers.
    """

    tasks: Mapping[str, int] | Sequence[tuple[str, int]]
    embed_dim: int = 512
    pred_channels: int = 64
    mtt_downsample_rate: int = 2
    num_heads: int = 2
    kv_strides: tuple[int, ...] = (2, 4, 8)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    param_init: str = "pytorch"

    @property
    def task_channels(self) -> tuple[tuple[str, int], ...]:
        """`(name, output channels)` per task, in order."""
        return tuple(dict(self.tasks).items())

    @property
    def widths(self) -> tuple[int, ...]:
        """Per-task width of each stage: D, D/2, D/4."""
        d = self.embed_dim + self.pred_channels
        return d, d // 2, d // 4

    def _check(self, features: Sequence[jax.Array]) -> tuple[int, int]:
        """The first stage's side `(h0, w0)`, after checking the maps against it."""
        if len(features) != 4:
            raise ValueError(f"InvPTDecoder takes InvPT's 4 backbone maps, got {len(features)}")
        if len(self.kv_strides) != NUM_STAGES:
            raise ValueError(f"kv_strides needs one stride per stage ({NUM_STAGES}), got {self.kv_strides}")
        h0, w0 = (s // self.mtt_downsample_rate for s in features[-1].shape[1:3])
        for i, f in enumerate(features[:2]):
            if tuple(f.shape[1:3]) != (2 * h0, 2 * w0):
                raise ValueError(f"backbone map {i} is {f.shape[1]}x{f.shape[2]}; InvPT needs it at twice the first "
                                 f"stage's side, {2 * h0}x{2 * w0}")
        for i, s in enumerate(self.kv_strides):
            side = (h0 << i, w0 << i)
            if any(n % math.lcm(QUERY_STRIDE, s) for n in side):
                raise ValueError(f"stage {i} at {side[0]}x{side[1]}: its sides must be multiples of the query stride "
                                 f"{QUERY_STRIDE} and the key / value stride {s}")
        return h0, w0

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool,
                 dropout_key: jax.Array | None = None) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Predictions of every task.

        Args:
          features: InvPT's four backbone maps `[B, S, S', C_i]` (C_i free), shallow to deep; map 2 is unused.
          train: batch statistics for the BatchNorms (mutable "batch_stats"), and dropout / drop path.
          dropout_key: PRNG key of the dropout and drop path; required when `train` and a rate is positive.

        Returns:
          `(predictions, intermediate)`: per task `[B, 8 h0, 8 w0, channels]` and `[B, h0, w0, channels]`, h0 = S /
          `mtt_downsample_rate`, both to be upsampled to the image size by the caller.
        """
        h0, w0 = self._check(features)
        rates = (self.drop_path_rate, self.attn_dropout_rate, self.dropout_rate)
        if not train:
            dropout_key = None
        elif dropout_key is None and any(rates):
            raise ValueError("InvPTDecoder(train=True) with dropout or drop path needs a dropout_key")
        pi, tasks, widths = self.param_init, self.task_channels, self.widths
        f0, f1, _, f3 = features
        skips = {
            1: torch_conv(f1, widths[1], 3, "scale_embed1", pi),
            # PyTorch ConvTranspose2d(3, stride 2, padding 1, output_padding 1): x2 exactly
            2: nn.ConvTranspose(widths[2], (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                                kernel_init=kernel_init(pi, transpose=True),
                                bias_init=bias_init(pi, 9 * widths[2]), name="scale_embed0")(f0),
        }

        x = resize_bilinear(f3, (h0, w0))
        intermediate, maps = {}, []
        for name, n in tasks:
            y = ConvBNReLU(x.shape[-1], param_init=pi, name=f"preliminary_{name}_0")(x, train=train)
            y = ConvBNReLU(self.embed_dim, param_init=pi, name=f"preliminary_{name}_1")(y, train=train)
            intermediate[name] = torch_conv(y, n, 1, f"intermediate_head_{name}", pi)
            maps.append(torch_conv(jnp.concatenate([y, intermediate[name]], axis=-1), widths[0], 1, f"mix_proj_{name}",
                              pi))

        out_size = (h0 << NUM_STAGES, w0 << NUM_STAGES)
        message, summed = None, [0.0] * len(tasks)
        for i, (width, kv_stride) in enumerate(zip(widths, self.kv_strides, strict=True)):
            if i:
                maps = [UpEmbed(width, pi, name=f"stage{i}_patch_embed{k}")(m, train=train) + skips[i]
                        for k, m in enumerate(maps)]
            block = UPTransformerBlock(self.num_heads, kv_stride, self.mlp_ratio, self.drop_path_rate,
                                       self.attn_dropout_rate, self.dropout_rate, pi, name=f"stage{i}")
            x, message = block(jnp.stack(maps, axis=1), message, train=train, dropout_key=_fold(dropout_key, i))
            maps = [x[:, k] for k in range(len(tasks))]
            b, t, h, w, c = x.shape
            normed = _layer_norm(x.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * c), f"norm_mt{i}")
            for k in range(t):
                y = normed[..., k * c:(k + 1) * c]
                if i:
                    y = torch_conv(y, widths[0], 1, f"redu_chan{i}_{k}", pi)
                summed[k] = summed[k] + resize_bilinear(y, out_size)

        predictions = {}
        for (name, n), y in zip(tasks, summed, strict=True):
            y = ConvBNReLU(widths[0], use_bias=True, param_init=pi, name=f"mt_proj_{name}")(y, train=train)
            predictions[name] = torch_conv(y, n, 1, f"head_{name}", pi)
        return predictions, intermediate
