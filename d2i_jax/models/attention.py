"""Multi-head attention shared by the UNet, the VAE and the CLIP text encoder.

Every attention in the project goes through `dot_product_attention`, so switching the kernel
(`xla` reference einsums or cuDNN flash attention) is one argument. Softmax always runs in fp32.
"""

from __future__ import annotations

from typing import Literal

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn"]
ATTENTION_IMPLS = ("xla", "cudnn")


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
      implementation: `"xla"` (portable, fp32 softmax) or `"cudnn"` (fused flash attention on
        NVIDIA GPUs; needs bf16/fp16 inputs).
      is_causal: mask out keys after each query (CLIP's text transformer).

    Returns:
      `[B, T, H*D]` attention output in the dtype of `q`.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    split = lambda x: einops.rearrange(x, "b l (h d) -> b l h d", h=num_heads)
    out = jax.nn.dot_product_attention(
        split(q), split(k), split(v), is_causal=is_causal, implementation=implementation
    )
    return einops.rearrange(out, "b l h d -> b l (h d)")


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
) -> jax.Array:
    """diffusers `Attention` projections (to_q / to_k / to_v / to_out_0) around `dot_product_attention`.

    Call it inside a compact method: the Dense layers become children of the calling module, which is how
    the VAE keeps them beside its own `group_norm` as in the diffusers state dict.
    """
    context = x if context is None else context
    dense = lambda features, name, bias: nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name
    )
    q = dense(inner_dim, "to_q", qkv_bias)(x)
    k = dense(inner_dim, "to_k", qkv_bias)(context)
    v = dense(inner_dim, "to_v", qkv_bias)(context)
    out = dot_product_attention(q, k, v, num_heads=num_heads, implementation=implementation)
    return dense(out_dim, "to_out_0", True)(out)


class Attention(nn.Module):
    """Self- or cross-attention with diffusers parameter names (`to_out.0` becomes `to_out_0`)."""

    inner_dim: int
    out_dim: int
    num_heads: int
    qkv_bias: bool = False
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        return projected_attention(
            x, context, inner_dim=self.inner_dim, out_dim=self.out_dim, num_heads=self.num_heads,
            qkv_bias=self.qkv_bias, implementation=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
