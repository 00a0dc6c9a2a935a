"""VPD (Zhao et al. 2023) modules on Stable Diffusion UNet features, NHWC: text adapter, semantic FPN, depth decoder.

VPD feeds the UNet (t = 1, unscaled VAE latent) and takes output blocks 11, 7, 4 and 1, fine to coarse: at 512 px
320 channels at 64², 640 at 32², 1280 at 16², 1280 at 8² (segmentation appends the 150 head- and layer-averaged class
cross-attention maps to the 32² and 16² levels: 320, 790, 1430, 1280 channels). These modules are the trainable
parts on top, with the public code's semantics: mmseg 0.x `FPN` + `FPNHead` as VPD's ADE20K config sets them, and
VPD's NYUv2 depth decoder. Parameters use `layers.INITS` initialisers (PyTorch's defaults by default; VPD's own inits
are listed in each docstring). `weights_conversion.vpd` maps the public state dicts onto these trees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.perception.fusion import resize_bilinear
from d2i_jax.perception.layers import TorchBatchNorm, bias_init, kernel_init, torch_conv

__all__ = [
    "ConvBNReLU",
    "FPNHead",
    "FPNNeck",
    "SemanticFPN",
    "TextAdapter",
    "VPDDepthDecoder",
    "VPDTaskHead",
    "channel_dropout",
    "resize_nearest",
]


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='nearest')` on `[B, h, w, C]`: source index floor(i * in / out)."""
    rows, cols = (np.minimum(np.floor(np.arange(o) * np.float32(i / o)).astype(np.int32), i - 1)
                  for i, o in zip(x.shape[1:3], size, strict=True))
    return x[:, rows][:, :, cols]


def channel_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """`nn.Dropout2d(rate)` in training, `[B, H, W, C]`: whole channels of a sample zeroed, the rest / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _group_norm(x: jax.Array, groups: int, name: str) -> jax.Array:
    return nn.GroupNorm(groups, epsilon=1e-5, use_fast_variance=False, name=name)(x)


class TextAdapter(nn.Module):
    """VPD's text adapter: texts + gamma * fc2(GELU(fc1(texts))), gamma a learned per-channel gate.

    The gate starts at `gamma_init` (VPD: 1e-4), so the adapted class embeddings start as the frozen CLIP ones. In VPD
    the MLP keeps PyTorch's default init (`param_init="pytorch"`).

    Attributes:
      hidden_dim: fc1 width (None: the text width, as VPD).
      gamma_init: initial value of every gamma entry.
      param_init: `layers.INITS` name of the dense initialisers.
    """

    hidden_dim: int | None = None
    gamma_init: float = 1e-4
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, texts: jax.Array) -> jax.Array:
        """`texts`: `[..., N, D]` text embeddings (VPD segmentation: the `[150, D]` ADE20K class embeddings, to be
        broadcast to the batch; depth: `class_embeddings[class_ids][:, None]`, one token per image). Same shape out."""
        d = texts.shape[-1]
        hidden = self.hidden_dim or d
        y = nn.Dense(hidden, kernel_init=kernel_init(self.param_init), bias_init=bias_init(self.param_init, d),
                     name="fc1")(texts)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(d, kernel_init=kernel_init(self.param_init), bias_init=bias_init(self.param_init, hidden),
                     name="fc2")(y)
        gamma = self.param("gamma", nn.initializers.constant(self.gamma_init), (d,))
        return texts + gamma * y


class ConvBNReLU(nn.Module):
    """mmcv `ConvModule(3x3, norm=BN, act=ReLU)`: bias-free conv, PyTorch BatchNorm (SyncBN: the batch the call sees),
    ReLU."""

    features: int
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = torch_conv(x, self.features, 3, "conv", self.param_init, use_bias=False)
        return nn.relu(TorchBatchNorm(name="bn")(x, train=train))


class FPNNeck(nn.Module):
    """mmseg `FPN(num_outs=len(inputs))` with no norm or activation: 1x1 laterals, top-down nearest upsampling and
    addition, a 3x3 conv per level. VPD init: Xavier-uniform kernels, zero biases.

    Attributes:
      out_channels: width of every level (VPD: 256).
      param_init: `layers.INITS` name of the conv initialisers.
    """

    out_channels: int = 256
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        """`features`: `[B, h_i, w_i, C_i]`, fine to coarse. Returns one `[B, h_i, w_i, out_channels]` per level."""
        laterals = [torch_conv(f, self.out_channels, 1, f"lateral{i}", self.param_init) for i, f in enumerate(features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        return [torch_conv(x, self.out_channels, 3, f"fpn{i}", self.param_init) for i, x in enumerate(laterals)]


class FPNHead(nn.Module):
    """mmseg `FPNHead` (Semantic FPN): per level max(1, log2(s_i / s_0)) `ConvBNReLU` blocks, each followed by a
    bilinear x2 upsampling (align_corners=False) on the coarser levels; the levels summed at the finest resolution;
    `Dropout2d`; 1x1 classifier. VPD init: scale-head convs kaiming-normal (fan_out), classifier N(0, 0.01), zero
    bias.

    Attributes:
      num_classes: classifier outputs (ADE20K: 150).
      channels: scale-head width (VPD: 256).
      feature_strides: nominal stride per input level, finest first; only their ratios matter (VPD: (4, 8, 16, 32) on
        features at strides 8 ... 64, so the logits come out at stride 8).
      dropout_ratio: `Dropout2d` rate before the classifier (training only).
      param_init: `layers.INITS` name of the conv initialisers.
    """

    num_classes: int = 150
    channels: int = 256
    feature_strides: tuple[int, ...] = (4, 8, 16, 32)
    dropout_ratio: float = 0.1
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits `[B, h_0, w_0, num_classes]` at the finest level's resolution.

        Args:
          features: one `[B, h_i, w_i, C]` per `feature_strides` entry, finest first.
          train: batch statistics for the BatchNorms (mutable "batch_stats") and channel dropout.
          dropout_key: PRNG key for the dropout; required when `train` and `dropout_ratio > 0`.
        """
        if len(features) != len(self.feature_strides):
            raise ValueError(f"FPNHead has {len(self.feature_strides)} feature_strides, got {len(features)} features")
        dropout = train and self.dropout_ratio > 0
        if dropout and dropout_key is None:
            raise ValueError("FPNHead(train=True) with dropout needs a dropout_key")
        s0 = self.feature_strides[0]
        out = None
        for i, (x, s) in enumerate(zip(features, self.feature_strides, strict=True)):
            for k in range(max(1, int(math.log2(s) - math.log2(s0)))):
                x = ConvBNReLU(self.channels, self.param_init, name=f"scale{i}_{k}")(x, train=train)
                if s != s0:
                    x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            out = x if out is None else out + resize_bilinear(x, out.shape[1:3])
        if dropout:
            out = channel_dropout(out, self.dropout_ratio, dropout_key)
        return torch_conv(out, self.num_classes, 1, "conv_seg", self.param_init)


class SemanticFPN(nn.Module):
    """VPD's ADE20K segmentation head: `FPNNeck` ("neck") then `FPNHead` ("decode_head"), as mmseg's
    `neck` + `decode_head`. Upsample the logits bilinearly (align_corners=False) to the label size for the loss and
    to the image size for prediction, as mmseg does.

    Attributes: see `FPNNeck` (`out_channels`) and `FPNHead` (the others).
    """

    num_classes: int = 150
    out_channels: int = 256
    channels: int = 256
    feature_strides: tuple[int, ...] = (4, 8, 16, 32)
    dropout_ratio: float = 0.1
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """`features`: UNet levels, finest first (VPD at 512 px: 320@64², 790@32², 1430@16², 1280@8²). Returns logits
        `[B, h_0, w_0, num_classes]` at the finest level's resolution (stride 8 of the image in VPD)."""
        levels = FPNNeck(self.out_channels, self.param_init, name="neck")(features)
        head = FPNHead(self.num_classes, self.channels, self.feature_strides, self.dropout_ratio, self.param_init,
                       name="decode_head")
        return head(levels, train=train, dropout_key=dropout_key)


def _deconv_padding(kernel: int) -> tuple[int, int]:
    """VPD's (padding, output_padding) of a stride-2 transposed conv with this kernel."""
    pads = {4: (1, 0), 3: (1, 1), 2: (0, 0)}
    if kernel not in pads:
        raise ValueError(f"deconv kernel {kernel}: VPD supports 2, 3 or 4")
    return pads[kernel]


class VPDDepthDecoder(nn.Module):
    """VPD's NYUv2 depth decoder: the trainable layers of `VPDDepthEncoder` on the UNet features, the Simple-Baseline
    `Decoder` and `last_layer_depth`, ending in sigmoid * max_depth (metres).

    Aggregation at stride 32: `layer1` (3x3 s2 conv, GroupNorm, ReLU, 3x3 s2 conv) on the stride-8 feature, `layer2`
    (3x3 s2 conv) on the stride-16 one, and [stride-32 feature, nearest x2 of the stride-64 one]; concatenated, 1x1
    conv to `encoder_channels`, GroupNorm, ReLU. Decoder: per `deconv_channels` entry a stride-2 transposed conv (no
    bias), BatchNorm, ReLU; 3x3 conv to `decoder_channels`, BatchNorm, ReLU; two bilinear x2 upsamplings
    (align_corners=False); 3x3 conv, ReLU, 3x3 conv to 1 channel. VPD init: aggregation convs trunc-normal(0.02),
    decoder and output convs N(0, 0.001), zero biases.

    Attributes:
      encoder_channels: aggregation width (VPD: 192 * 8 = 1536).
      decoder_channels: width after the deconvs (VPD: 192).
      deconv_channels: transposed-conv widths (VPD: 32, 32, 32).
      deconv_kernels: their kernels, 2, 3 or 4 (VPD: 2, 2, 2).
      num_groups: GroupNorm groups (VPD: 16).
      max_depth: output scale in metres (NYUv2: 10).
      activation: end in sigmoid * max_depth; False returns the map before it (for a task that applies it, as
        `DepthTask.prediction` does).
      param_init: `layers.INITS` name of the conv initialisers.
    """

    encoder_channels: int = 1536
    decoder_channels: int = 192
    deconv_channels: tuple[int, ...] = (32, 32, 32)
    deconv_kernels: tuple[int, ...] = (2, 2, 2)
    num_groups: int = 16
    max_depth: float = 10.0
    activation: bool = True
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool,
                 valid_size: tuple[int, int] | None = None) -> jax.Array:
        """Depth `[B, H, W, 1]` in metres (or its pre-sigmoid map), H x W = 32 x the (cropped) stride-32 map.

        Args:
          features: the four UNet levels at strides 8, 16, 32, 64 of the (padded) image, finest first.
          train: batch statistics for the BatchNorms (mutable "batch_stats").
          valid_size: `(H, W)` of the image before zero padding, multiples of 32; the stride-32 map is cropped to
            `(H / 32, W / 32)` before decoding, as VPD does for 480 px crops padded to 512 (its `[:-1, :-1]`).
        """
        if len(features) != 4:
            raise ValueError(f"VPDDepthDecoder takes 4 feature levels, got {len(features)}")
        if len(self.deconv_channels) != len(self.deconv_kernels):
            raise ValueError("deconv_channels and deconv_kernels must have the same length")
        pi = self.param_init
        f8, f16, f32, f64 = features
        a = torch_conv(f8, f8.shape[-1], 3, "layer1_conv1", pi, stride=2)
        a = torch_conv(nn.relu(_group_norm(a, self.num_groups, "layer1_norm")), f8.shape[-1], 3, "layer1_conv2", pi,
                       stride=2)
        b = torch_conv(f16, f16.shape[-1], 3, "layer2_conv", pi, stride=2)
        c = jnp.concatenate([f32, resize_nearest(f64, (2 * f64.shape[1], 2 * f64.shape[2]))], axis=-1)
        x = torch_conv(jnp.concatenate([a, b, c], axis=-1), self.encoder_channels, 1, "out_conv", pi)
        x = nn.relu(_group_norm(x, self.num_groups, "out_norm"))
        if valid_size is not None:
            if valid_size[0] % 32 or valid_size[1] % 32:
                raise ValueError(f"valid_size {valid_size} must be multiples of 32")
            x = x[:, : valid_size[0] // 32, : valid_size[1] // 32]

        for i, (c_out, k) in enumerate(zip(self.deconv_channels, self.deconv_kernels, strict=True)):
            p, op = _deconv_padding(k)
            x = nn.ConvTranspose(c_out, (k, k), strides=(2, 2), padding=((k - 1 - p, k - 1 - p + op),) * 2,
                                 use_bias=False, kernel_init=kernel_init(pi, transpose=True), name=f"deconv{i}")(x)
            x = nn.relu(TorchBatchNorm(name=f"deconv_norm{i}")(x, train=train))
        x = torch_conv(x, self.decoder_channels, 3, "conv", pi)
        x = nn.relu(TorchBatchNorm(name="conv_norm")(x, train=train))
        for _ in range(2):
            x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
        x = nn.relu(torch_conv(x, self.decoder_channels, 3, "depth_conv1", pi))
        x = torch_conv(x, 1, 3, "depth_conv2", pi)
        return jax.nn.sigmoid(x) * self.max_depth if self.activation else x


class VPDTaskHead(nn.Module):
    """A VPD head (`SemanticFPN`, `VPDDepthDecoder`) in a task's head slot (`DensePredictor.head`).

    Its output is bilinearly upsampled (half-pixel, no antialiasing, as mmseg's `resize`) by `output_stride` to the
    input resolution `Task.prediction` promises. Its BatchNorms use batch statistics only where they may update
    them (theta_E's training step, mutable "batch_stats"): theta_C's sampled labelling (`sample=True` with fixed
    statistics) is then the head's eval forward, as VPD's heads have no sampled training forward of their own.

    Attributes:
      module: the VPD head, `module(features, train=..., **kwargs)`.
      output_stride: stride of its output (`SemanticFPN` on VPD's features: 8; `VPDDepthDecoder`: 1).
    """

    module: nn.Module
    output_stride: int = 1

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool, **kwargs: jax.Array) -> jax.Array:
        out = self.module(features, train=train and self.is_mutable_collection("batch_stats"), **kwargs)
        s = self.output_stride
        return resize_bilinear(out, (s * out.shape[1], s * out.shape[2])).astype(jnp.float32)
