"""Layers whose PyTorch semantics the public Diff-2-in-1 checkpoint depends on, and PyTorch's default initialisers.

- `TorchBatchNorm`: `nn.BatchNorm2d` / `F.batch_norm` exactly, including the running variance PyTorch updates with
  the *unbiased* batch variance (flax's `nn.BatchNorm` uses the biased one, so its train-mode statistics drift from
  a PyTorch-trained checkpoint's).
- `SNConv`: BigGAN's spectral-norm conv (the public fusion's `SNConv2d`): one power iteration per call from the stored
  `u`, run in training *and* evaluation, `u` written back only in training, W / sigma with gradient through sigma.
  flax's `nn.SpectralNorm` reuses a stored sigma in evaluation instead.
- `kernel_init` / `bias_init`: PyTorch's defaults (kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(fan_in)), for
  weights and biases) or flax's (lecun-normal kernels, zero biases), by name (`INITS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

INITS = ("pytorch", "flax")
Initializer = Callable[..., jax.Array]


def _check_init(scheme: str) -> None:
    if scheme not in INITS:
        raise ValueError(f"unknown initialiser {scheme!r}; choose from {INITS}")


def kernel_init(scheme: str, *, transpose: bool = False) -> Initializer:
    """Kernel initialiser; `transpose`: a `nn.ConvTranspose` kernel, whose PyTorch fan-in is its *output* channels
    times the kernel area (PyTorch reads fan-in from dim 1 of `[in, out, kh, kw]`)."""
    _check_init(scheme)
    if scheme == "flax":
        return nn.initializers.lecun_normal()
    axes = {"in_axis": -1, "out_axis": -2} if transpose else {}
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", **axes)


def bias_init(scheme: str, fan_in: int) -> Initializer:
    """Bias initialiser: PyTorch's U(±1/sqrt(fan_in)) or flax's zeros."""
    _check_init(scheme)
    if scheme == "flax":
        return nn.initializers.zeros
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_conv(x: jax.Array, features: int, k: int, name: str, param_init: str = "pytorch", *, stride: int = 1,
               dilation: int = 1, groups: int = 1, use_bias: bool = True) -> jax.Array:
    """PyTorch `Conv2d(k, stride, padding=dilation * (k // 2), dilation, groups)` on `[B, H, W, C]`, called inside a
    compact method, initialised by `param_init` (`INITS`)."""
    p = dilation * (k // 2)
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                   kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=use_bias,
                   kernel_init=kernel_init(param_init), bias_init=bias_init(param_init, k * k * x.shape[-1] // groups),
                   name=name)(x)


class TorchBatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's semantics (see the module docstring).

    Attributes:
      affine: learn a scale and a bias (`nn.BatchNorm2d`); False: `F.batch_norm` without weight (BigGAN `SegBlock`).
      momentum: PyTorch convention: running = (1 - momentum) * running + momentum * batch.
      epsilon: added to the variance.
    """

    affine: bool = True
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # biased: normalises the batch
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (c,)) + self.param("bias", nn.initializers.zeros, (c,))
        return y.astype(x.dtype)


def _normalize(v: jax.Array, eps: float) -> jax.Array:
    """`F.normalize(v, eps=eps)`: v / max(||v||, eps)."""
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SNConv(nn.Module):
    """Square stride-1 "same" conv with BigGAN spectral normalisation (one power iteration, see module docstring).

    Attributes:
      features: output channels.
      kernel_size: kernel side (1 or 3 in the fusion).
      epsilon: F.normalize's eps in the power iteration (1e-4 in the public fusion).
      param_init: `INITS` name for the kernel and bias.
    """

    features: int
    kernel_size: int = 3
    epsilon: float = 1e-4
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", kernel_init(self.param_init), (k, k, c_in, self.features))
        bias = self.param("bias", bias_init(self.param_init, k * k * c_in), (self.features,))
        u_var = self.variable("batch_stats", "u",
                              lambda: jax.random.normal(self.make_rng("params"), (self.features,), jnp.float32))
        w = kernel.reshape(-1, self.features).T  # [out, k*k*in]: the rows PyTorch's weight.view(out, -1) holds
        v = jax.lax.stop_gradient(_normalize(u_var.value @ w, self.epsilon))
        u = jax.lax.stop_gradient(_normalize(w @ v, self.epsilon))
        sigma = jnp.dot(w @ v, u)  # gradient flows through W here only, as in BigGAN
        if train and not self.is_initializing():
            u_var.value = u
        pad = (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x, (kernel / sigma).astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(y.dtype)
