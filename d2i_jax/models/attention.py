"""Multi-head attention shared by the UNet, the VAE and the CLIP text encoder.

Every attention in the project goes through `dot_product_attention`, so switching the kernel
(`xla` reference einsums or cuDNN flash attention) is one argument. Softmax always runs in fp32.
The requested kernel is resolved per call from static shapes and dtypes (`resolve_attention_impl`): a layer
cuDNN cannot run (the VAE's 512-wide head, fp32 inputs) falls back to XLA on its own, the others keep cuDNN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

AttentionImpl = Literal["auto", "xla", "cudnn"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# Input dtypes of cuDNN flash attention (jax 0.10 `fused_attention_stablehlo`; fp8 is not used here).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_max_head_dim() -> int:
    """cuDNN flash attention's head-dim limit on the default device: 256 from Hopper (sm90) on, 128 on older NVIDIA
    GPUs, 0 (nothing runs on cuDNN) on a device without a CUDA compute capability, e.g. a ROCm GPU."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(capability).split(".")[0])
    except ValueError:
        return 0
    return 256 if major >= 9 else 128


def resolve_attention_impl(
    requested: str,
    head_dim: int,
    dtype: jnp.dtype,
    *,
    backend: str | None = None,
    max_head_dim: int | None = None,
) -> Literal["xla", "cudnn"]:
    """The kernel one attention call runs with, decided statically from its head dim and dtype.

    Args:
      requested: `"auto"` (cuDNN on a GPU backend, XLA elsewhere), `"xla"` or `"cudnn"`.
      head_dim: per-head width of the queries (and values).
      dtype: the dtype of q / k / v.
      backend: the JAX backend (`"gpu"`, `"cpu"`, `"tpu"`); default `jax.default_backend()`.
      max_head_dim: cuDNN's head-dim limit; default `cudnn_max_head_dim()` (from the default device).

    Returns:
      `"cudnn"` when cuDNN is requested (or `"auto"` on a GPU) and flash attention supports the call - head dim a
      multiple of 8 and at most `max_head_dim`, bf16 / fp16 inputs - else `"xla"`.

    Raises:
      ValueError: `requested` is not one of `ATTENTION_IMPLS`, or is `"cudnn"` on a backend other than GPU (a
        misconfiguration, not a per-layer limitation: use `"auto"` for configs that also run elsewhere).
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {requested!r}")
    backend = backend or jax.default_backend()
    if requested == "xla" or (requested == "auto" and backend != "gpu"):
        return "xla"
    if backend != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs a GPU backend, this JAX runs on {backend!r}; "
                         "use 'auto' (cudnn on GPUs, else xla) or 'xla'")
    if max_head_dim is None:
        max_head_dim = cudnn_max_head_dim()
    supported = head_dim % 8 == 0 and head_dim <= max_head_dim and np.dtype(dtype) in CUDNN_DTYPES
    return "cudnn" if supported else "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    implementation: AttentionImpl = "xla",
    is_causal: bool = False,
) -> jax.Array:
    """Scaled dot-product attention over `[batch, length, heads * head_dim]` tensors.

    Args:
      q: queries `[B, T, H*D]`.
      k: keys `[B, S, H*D]`.
      v: values `[B, S, H*D]`.
      num_heads: number of heads H the last axis is split into.
      implementation: `"xla"` (portable, fp32 softmax), `"cudnn"` (fused flash attention on NVIDIA GPUs; calls
        it does not support fall back to XLA, see `resolve_attention_impl`) or `"auto"` (cuDNN on a GPU).
      is_causal: mask out keys after each query (CLIP's text transformer).

    Returns:
      `[B, T, H*D]` attention output in the dtype of `q`.
    """
    implementation = resolve_attention_impl(implementation, q.shape[-1] // num_heads, q.dtype)
    split = lambda x: einops.rearrange(x, "b l (h d) -> b l h d", h=num_heads)
    out = jax.nn.dot_product_attention(
        split(q), split(k), split(v), is_causal=is_causal, implementation=implementation
    )
    return einops.rearrange(out, "b l h d -> b l (h d)")


def head_mean_probs(q: jax.Array, k: jax.Array, *, num_heads: int) -> jax.Array:
    """`softmax(q k^T / sqrt(head_dim))` in fp32, averaged over heads: `[B, T, S]` from `[B, T, H*D]`, `[B, S, H*D]`.

    The probabilities the fused kernels never materialise, computed on their own (VPD's cross-attention maps).
    """
    split = lambda x: einops.rearrange(x.astype(jnp.float32), "b l (h d) -> b h l d", h=num_heads)
    logits = jnp.einsum("bhtd,bhsd->bhts", split(q), split(k)) * (q.shape[-1] // num_heads) ** -0.5
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


def projected_attention(
    x: jax.Array,
    context: jax.Array | None,
    *,
    inner_dim: int,
    out_dim: int,
    num_heads: int,
    qkv_bias: bool,
    implementation: AttentionImpl,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    record_probs: Callable[[jax.Array], None] | None = None,
) -> jax.Array:
    """diffusers `Attention` projections (to_q / to_k / to_v / to_out_0) around `dot_product_attention`.

    Call it inside a compact method: the Dense layers become children of the calling module, which is how
    the VAE keeps them beside its own `group_norm` as in the diffusers state dict. `record_probs`, if given, receives
    the head-averaged attention probabilities (`head_mean_probs`), whatever kernel computes the output.
    """
    context = x if context is None else context
    dense = lambda features, name, bias: nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name
    )
    q = dense(inner_dim, "to_q", qkv_bias)(x)
    k = dense(inner_dim, "to_k", qkv_bias)(context)
    v = dense(inner_dim, "to_v", qkv_bias)(context)
    if record_probs is not None:
        record_probs(head_mean_probs(q, k, num_heads=num_heads))
    out = dot_product_attention(q, k, v, num_heads=num_heads, implementation=implementation)
    return dense(out_dim, "to_out_0", True)(out)


class Attention(nn.Module):
    """Self- or cross-attention with diffusers parameter names (`to_out.0` becomes `to_out_0`).

    With `record_probs` a cross-attention call (context given) sows its head-averaged probabilities `[B, T, S]`
    (fp32) as `intermediates/<path>/probs`, when applied with `mutable=["intermediates"]` (VPD's attention maps).
    """

    inner_dim: int
    out_dim: int
    num_heads: int
    qkv_bias: bool = False
    attention_impl: AttentionImpl = "xla"
    record_probs: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        record = self.record_probs and context is not None and self.is_mutable_collection("intermediates")
        return projected_attention(
            x, context, inner_dim=self.inner_dim, out_dim=self.out_dim, num_heads=self.num_heads,
            qkv_bias=self.qkv_bias, implementation=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype,
            record_probs=(lambda p: self.sow("intermediates", "probs", p)) if record else None,
        )
