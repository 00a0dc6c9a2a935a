"""Bae et al. (2021) surface-normal decoder, GroupNorm variant, with uncertainty-guided refinement (REFERENCE §1.2).

The decoder upsamples the 1/32 fusion output through four weight-standardised GroupNorm blocks, predicts
(n, κ) at 1/8 and refines it at 1/4, 1/2 and 1/1 with per-pixel MLPs on [decoder feature, upsampled prediction].
At training time each refinement MLP only sees N = 0.4·H·W pixels per image: 70 % the least confident (lowest κ)
valid pixels, 30 % uniformly random among the rest. All resizes inside the head use align-corners bilinear
interpolation, as Bae's PyTorch code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from d2i_jax.losses import normal_output_activation
from d2i_jax.perception.layers import bias_init, kernel_init

__all__ = [
    "NormalHead",
    "NormalHeadOutput",
    "UpSampleGN",
    "WSConv",
    "bilinear_at_points",
    "gather_gt_at_points",
    "normal_output_activation",
    "normal_training_loss",
    "resize_bilinear_align_corners",
    "uncertainty_guided_sampling",
]

NormalLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------- resizing helpers


def _align_corners_axis(n_in: int, n_out: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lower index, upper index, upper weight) per output position: sources at linspace(0, n_in - 1, n_out)."""
    # Same arithmetic as PyTorch (scale * dst in fp32), so results agree to rounding.
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    pos = jnp.arange(n_out, dtype=jnp.float32) * jnp.float32(scale)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo.astype(jnp.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of `[B, h, w, C]` to `size` with `F.interpolate(..., align_corners=True)` semantics.

    `jax.image.resize` samples at half-pixel centres; Bae's decoder aligns the corner pixels instead.
    """
    (h, w), (out_h, out_w) = x.shape[1:3], size
    if (h, w) == (out_h, out_w):
        return x
    lo, hi, t = _align_corners_axis(h, out_h)
    t = t.astype(x.dtype)[None, :, None, None]
    x = jnp.take(x, lo, axis=1) * (1 - t) + jnp.take(x, hi, axis=1) * t
    lo, hi, t = _align_corners_axis(w, out_w)
    t = t.astype(x.dtype)[None, None, :, None]
    return jnp.take(x, lo, axis=2) * (1 - t) + jnp.take(x, hi, axis=2) * t


def bilinear_at_points(x: jax.Array, indices: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`resize_bilinear_align_corners(x, size)` evaluated only at flat pixel `indices` ([B, N]) -> `[B, N, C]`.

    Reads four neighbours per point instead of materialising the upsampled map (Bae's `grid_sample` of the
    low-resolution feature at align-corners point coordinates).
    """
    b, h, w, c = x.shape
    rows_lo, rows_hi, rows_t = _align_corners_axis(h, size[0])
    cols_lo, cols_hi, cols_t = _align_corners_axis(w, size[1])
    r, col = indices // size[1], indices % size[1]
    r0, r1, tr = rows_lo[r], rows_hi[r], rows_t[r][..., None].astype(x.dtype)
    c0, c1, tc = cols_lo[col], cols_hi[col], cols_t[col][..., None].astype(x.dtype)
    flat = x.reshape(b, h * w, c)
    at = lambda rr, cc: jnp.take_along_axis(flat, (rr * w + cc)[..., None], axis=1)
    left = at(r0, c0) * (1 - tr) + at(r1, c0) * tr
    right = at(r0, c1) * (1 - tr) + at(r1, c1) * tr
    return left * (1 - tc) + right * tc


def _nearest_source(n_level: int, n_full: int, align_corners: bool) -> jax.Array:
    """Full-resolution index nearest to each level pixel: align-corners geometry or half-pixel centres."""
    i = jnp.arange(n_level, dtype=jnp.float32)
    if align_corners:  # Bae: grid_sample(mode="nearest", align_corners=True) at the level's point coordinates
        pos = jnp.round(i * ((n_full - 1) / max(n_level - 1, 1)))
    else:  # centre of level pixel i lies at (i + 0.5) * n_full / n_level; ties go to the next pixel
        pos = jnp.floor((i + 0.5) * (n_full / n_level))
    return jnp.clip(pos.astype(jnp.int32), 0, n_full - 1)


def _as_mask(mask: jax.Array) -> jax.Array:
    """`[B, H, W]` or `[B, H, W, 1]` mask -> `[B, H, W]` bool."""
    if mask.ndim == 4:
        mask = mask[..., 0]
    return jnp.asarray(mask).astype(bool)


def _level_source_indices(level_hw: tuple[int, int], full_hw: tuple[int, int], align_corners: bool) -> jax.Array:
    """`[h * w]` flat full-resolution index nearest to each level pixel."""
    rows = _nearest_source(level_hw[0], full_hw[0], align_corners)
    cols = _nearest_source(level_hw[1], full_hw[1], align_corners)
    return (rows[:, None] * full_hw[1] + cols[None, :]).reshape(-1)


def gather_gt_at_points(
    gt_normal: jax.Array,
    gt_mask: jax.Array,
    indices: jax.Array,
    level_hw: tuple[int, int],
    *,
    align_corners: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Ground truth at sampled level pixels: the full-resolution GT pixel nearest to each.

    Args:
      gt_normal: `[B, H, W, 3]` full-resolution GT normals.
      gt_mask: `[B, H, W]` or `[B, H, W, 1]` validity.
      indices: `[B, N]` flat pixel indices at the level resolution (`NormalHeadOutput.indices`).
      level_hw: `(h, w)` of that level.
      align_corners: nearest in the head's align-corners geometry, level pixel i at full-res i·(H-1)/(h-1) (Bae's
        loss: nearest `grid_sample` with align_corners=True); else nearest to its half-pixel centre (i+½)·H/h.

    Returns:
      `[B, N, 3]` GT normals and `[B, N]` bool validity at the points.
    """
    b, height, width, _ = gt_normal.shape
    src = _level_source_indices(level_hw, (height, width), align_corners)[indices]
    normals = jnp.take_along_axis(gt_normal.reshape(b, height * width, -1), src[..., None], axis=1)
    mask = jnp.take_along_axis(_as_mask(gt_mask).reshape(b, height * width), src, axis=1)
    return normals, mask


def _resize_mask_nearest(mask: jax.Array, level_hw: tuple[int, int], align_corners: bool) -> jax.Array:
    """`[B, H, W]` bool mask -> `[B, h, w]` by the same nearest mapping as `gather_gt_at_points`."""
    b, height, width = mask.shape
    src = _level_source_indices(level_hw, (height, width), align_corners)
    return mask.reshape(b, height * width)[:, src].reshape(b, *level_hw)


# ----------------------------------------------------------------------------------------------- sampling


def uncertainty_guided_sampling(
    kappa: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    sampling_ratio: float = 0.4,
    importance_ratio: float = 0.7,
) -> jax.Array:
    """Bae's training-time point selection: the least confident valid pixels plus uniform coverage.

    Args:
      kappa: `[B, H, W]` concentration of the current (upsampled) prediction; no gradient flows through it.
      valid: `[B, H, W]` bool; invalid pixels rank last (κ = +inf) for the importance part, so they are only
        chosen there when an image has fewer valid pixels than that part needs.
      key: PRNG key for the random part (split per image).
      sampling_ratio: N = int(sampling_ratio · H · W) points per image.
      importance_ratio: the first int(importance_ratio · N) points are the lowest-κ pixels (ascending κ, ties by
        index); the other points are drawn uniformly without replacement from the remaining pixels.

    Returns:
      `[B, N]` int32 distinct flat pixel indices (row · W + col): importance part first, then the random part.
    """
    b, h, w = kappa.shape
    n = int(sampling_ratio * h * w)
    n_importance = int(importance_ratio * n)
    score = jnp.where(valid, jax.lax.stop_gradient(kappa).astype(jnp.float32), jnp.inf).reshape(b, h * w)
    order = jnp.argsort(score, axis=-1, stable=True).astype(jnp.int32)
    importance, remaining = order[:, :n_importance], order[:, n_importance:]
    picks = jax.vmap(lambda k: jax.random.permutation(k, h * w - n_importance)[: n - n_importance])(
        jax.random.split(key, b)
    )
    return jnp.concatenate([importance, jnp.take_along_axis(remaining, picks, axis=1)], axis=1)


# ----------------------------------------------------------------------------------------------- modules


class WSConv(nn.Module):
    """Weight-standardised conv (Bae's `Conv2d`): kernel centred and divided by its unbiased std + eps per output.

    Attributes:
      features: output channels.
      kernel_size: square kernel side; "same" zero padding, stride 1.
      epsilon: added to the std (1e-10 in the public Diff-2-in-1 copy; Bae's own code: 1e-5).
      param_init: `layers.INITS` name of the kernel / bias initialisers.
    """

    features: int
    kernel_size: int = 3
    epsilon: float = 1e-10
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", kernel_init(self.param_init), (k, k, c_in, self.features))
        bias = self.param("bias", bias_init(self.param_init, k * k * c_in), (self.features,))
        kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        kernel = kernel / (jnp.std(kernel, axis=(0, 1, 2), ddof=1, keepdims=True) + self.epsilon)
        pad = (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias.astype(y.dtype)


class UpSampleGN(nn.Module):
    """Align-corners bilinear upsampling to the skip's size, concat skip, [WSConv 3x3 -> GroupNorm -> LeakyReLU] x2.

    Attributes:
      features: output channels.
      num_groups: GroupNorm groups.
      ws_epsilon / param_init: the `WSConv`s' epsilon and initialiser.
    """

    features: int
    num_groups: int = 8
    ws_epsilon: float = 1e-10
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        h = jnp.concatenate([resize_bilinear_align_corners(x, skip.shape[1:3]), skip], axis=-1)
        for i in range(2):
            h = WSConv(self.features, epsilon=self.ws_epsilon, param_init=self.param_init, name=f"conv{i}")(h)
            h = nn.GroupNorm(self.num_groups, epsilon=1e-5, use_fast_variance=False, name=f"norm{i}")(h)
            h = nn.leaky_relu(h, 0.01)
        return h


class RefineMLP(nn.Module):
    """Per-pixel MLP (Bae's 1x1 Conv1d stack): `hidden_layers` ReLU layers of `hidden` units, then 4 raw outputs."""

    hidden: int = 128
    hidden_layers: int = 3
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.hidden_layers + 1):
            width = self.hidden if i < self.hidden_layers else 4
            x = nn.Dense(width, kernel_init=kernel_init(self.param_init),
                         bias_init=bias_init(self.param_init, x.shape[-1]), name=f"dense{i}")(x)
            x = nn.relu(x) if i < self.hidden_layers else x
        return x


@flax.struct.dataclass
class NormalHeadOutput:
    """Predictions of `NormalHead`; every 4-channel tensor is (unit normal, κ).

    Attributes:
      maps: `[B, h, w, 4]` at 1/8, 1/4, 1/2, 1/1 of the image. Test time: the refined maps. Training time: each
        refined map is the previous map upsampled with the sampled pixels replaced by the MLP output (as Bae's code;
        for visualisation, the next level's input, and the shapes of the levels).
      points: training time only: per refinement level, the `[B, N, 4]` MLP predictions at the sampled pixels.
      indices: training time only: per refinement level, the `[B, N]` flat pixel indices of those points at that
        level's resolution (`maps[level + 1]`).
    """

    maps: tuple[jax.Array, ...]
    points: tuple[jax.Array, ...] | None = None
    indices: tuple[jax.Array, ...] | None = None


class NormalHead(nn.Module):
    """Bae et al. GN decoder on the five fusion outputs (1/32 ... 1/2), with uncertainty-guided refinement.

    Attributes:
      decoder_channels: widths of the four `UpSampleGN` blocks (1/16, 1/8, 1/4, 1/2).
      num_groups: GroupNorm groups in the up blocks.
      mlp_hidden / mlp_layers: width and number of hidden layers of the refinement MLPs.
      sampling_ratio: training points per image and level, as a fraction of that level's pixels.
      importance_ratio: fraction of those points taken as the lowest-κ valid pixels.
      gt_align_corners: nearest-pixel mapping from the GT mask to a level when excluding invalid pixels from the
        importance part; keep equal to `normal_training_loss`'s `align_corners` (see `gather_gt_at_points`).
      ws_epsilon: weight-standardisation epsilon (public Diff-2-in-1 code: 1e-10; Bae's: 1e-5).
      param_init: `layers.INITS` name of every conv / dense initialiser (default PyTorch's, as the public recipe).
    """

    decoder_channels: tuple[int, ...] = (1024, 512, 256, 128)
    num_groups: int = 8
    mlp_hidden: int = 128
    mlp_layers: int = 3
    sampling_ratio: float = 0.4
    importance_ratio: float = 0.7
    gt_align_corners: bool = True
    ws_epsilon: float = 1e-10
    param_init: str = "pytorch"

    @nn.compact
    def __call__(
        self,
        skips: Sequence[jax.Array],
        *,
        train: bool,
        gt_mask: jax.Array | None = None,
        sampling_key: jax.Array | None = None,
    ) -> NormalHeadOutput:
        """Predicts surface normals and concentrations.

        Args:
          skips: the five fusion outputs, coarse to fine: `[B, H/32, W/32, C0]` ... `[B, H/2, W/2, C4]`.
          train: sample refinement points (requires `sampling_key`) instead of refining every pixel.
          gt_mask: training only: `[B, H, W]` or `[B, H, W, 1]` GT validity at full resolution; None = all valid.
          sampling_key: training only: PRNG key for the random part of the sampling.

        Returns:
          A `NormalHeadOutput` (points and indices only at training time).
        """
        if len(skips) != len(self.decoder_channels) + 1:
            raise ValueError(f"NormalHead takes {len(self.decoder_channels) + 1} skip features, got {len(skips)}")
        if train and sampling_key is None:
            raise ValueError("NormalHead(train=True) needs a sampling_key")
        def conv(features: int, k: int, name: str, x: jax.Array) -> jax.Array:
            return nn.Conv(features, (k, k), padding="SAME", kernel_init=kernel_init(self.param_init),
                           bias_init=bias_init(self.param_init, k * k * x.shape[-1]), name=name)(x)

        x = conv(skips[0].shape[-1], 1, "conv_bottleneck", skips[0])
        decoded = [x]
        for i, (skip, c) in enumerate(zip(skips[1:], self.decoder_channels, strict=True)):
            x = UpSampleGN(c, self.num_groups, self.ws_epsilon, self.param_init, name=f"up{i + 1}")(x, skip)
            decoded.append(x)

        pred = normal_output_activation(conv(4, 3, "out_res8", decoded[2]))
        maps, points, indices = [pred], [], []
        for level, feature in enumerate(decoded[2:]):
            mlp = RefineMLP(self.mlp_hidden, self.mlp_layers, self.param_init, name=f"refine{level}")
            size = (2 * feature.shape[1], 2 * feature.shape[2])
            prev = resize_bilinear_align_corners(pred, size)
            if not train:
                feature = resize_bilinear_align_corners(feature, size)
                pred = normal_output_activation(mlp(jnp.concatenate([feature, prev], axis=-1)))
                maps.append(pred)
                continue
            b = prev.shape[0]
            full_hw = (2 * decoded[-1].shape[1], 2 * decoded[-1].shape[2])
            if gt_mask is None:
                valid = jnp.ones((b, *size), bool)
            elif gt_mask.shape[1:3] != full_hw:
                raise ValueError(f"gt_mask spatial size {gt_mask.shape[1:3]} != head output size {full_hw}")
            else:
                valid = _resize_mask_nearest(_as_mask(gt_mask), size, self.gt_align_corners)
            idx = uncertainty_guided_sampling(
                prev[..., 3], valid, jax.random.fold_in(sampling_key, level), self.sampling_ratio,
                self.importance_ratio,
            )
            prev_flat = prev.reshape(b, size[0] * size[1], 4)
            inputs = jnp.concatenate(
                [bilinear_at_points(feature, idx, size), jnp.take_along_axis(prev_flat, idx[..., None], axis=1)],
                axis=-1,
            )
            point_pred = normal_output_activation(mlp(inputs))
            pred = prev_flat.at[jnp.arange(b)[:, None], idx].set(point_pred).reshape(prev.shape)
            maps.append(pred)
            points.append(point_pred)
            indices.append(idx)
        if not train:
            return NormalHeadOutput(maps=tuple(maps))
        return NormalHeadOutput(maps=tuple(maps), points=tuple(points), indices=tuple(indices))


# ----------------------------------------------------------------------------------------------- loss


def constant_kappa_normals(xyz: jax.Array, kappa: float) -> NormalHeadOutput:
    """The one-level output of a head that predicts no uncertainty: `[B, H, W, 3]` maps normalised, with a constant
    concentration κ, in the normals task's `[B, H, W, 4]` layout."""
    xyz = xyz.astype(jnp.float32)
    n = xyz / jnp.maximum(jnp.linalg.norm(xyz, axis=-1, keepdims=True), 1e-6)
    return NormalHeadOutput(maps=(jnp.concatenate([n, jnp.full_like(n[..., :1], kappa)], -1),))


class UnitNormalReadout(nn.Module):
    """A dense head with three output maps (`head(skips, train=...)`) read as unit normals with a constant κ: the
    multi-task normal head (InvPT's: normalised output, L1 loss, no uncertainty)."""

    head: nn.Module
    kappa: float = 1.0

    def __call__(self, skips: Any, *, train: bool, **unused: Any) -> NormalHeadOutput:
        return constant_kappa_normals(self.head(skips, train=train), self.kappa)


def renormalise(pred: jax.Array) -> jax.Array:
    """Unit-length normal again after interpolation; κ unchanged."""
    n = pred[..., :3]
    n = n * jax.lax.rsqrt(jnp.maximum(jnp.sum(n * n, axis=-1, keepdims=True), 1e-24))
    return jnp.concatenate([n, pred[..., 3:]], axis=-1)


def normal_training_loss(
    head_outputs: NormalHeadOutput,
    gt_normal: jax.Array,
    gt_mask: jax.Array,
    loss_fn: NormalLoss,
    *,
    align_corners: bool = True,
) -> jax.Array:
    """Bae's uncertainty-guided training loss: the 1/8 map at full size plus the three sampled levels, summed.

    Args:
      head_outputs: training-time `NormalHead` output (with points and indices).
      gt_normal: `[B, H, W, 3]` GT normals at the full output resolution.
      gt_mask: `[B, H, W]` or `[B, H, W, 1]` GT validity.
      loss_fn: `loss(pred[..., 4], gt[..., 3], mask[...]) -> scalar` mean over valid pixels
        (e.g. `d2i_jax.losses.NORMAL_LOSSES["ug_angmf"]`).
      align_corners: GT lookup at the sampled points (see `gather_gt_at_points`).

    Returns:
      The scalar sum of the four terms.
    """
    if head_outputs.points is None or head_outputs.indices is None:
        raise ValueError("normal_training_loss needs training-time NormalHead outputs (train=True)")
    mask = _as_mask(gt_mask)
    coarse = renormalise(resize_bilinear_align_corners(head_outputs.maps[0], gt_normal.shape[1:3]))
    total = loss_fn(coarse, gt_normal, mask)
    levels = zip(head_outputs.maps[1:], head_outputs.points, head_outputs.indices, strict=True)
    for level_map, points, indices in levels:
        gt_points, mask_points = gather_gt_at_points(
            gt_normal, mask, indices, level_map.shape[1:3], align_corners=align_corners
        )
        total = total + loss_fn(points, gt_points, mask_points)
    return total
