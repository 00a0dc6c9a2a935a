"""transformers `CLIPTextModel` in Flax Linen, and the prompt -> embedding helper.

SD1 uses CLIP ViT-L/14's text tower (quick-GELU, 768 wide); SD2 uses OpenCLIP-H as diffusers saves it
(exact GELU, 1024 wide, the layer count SD2 uses already in its config). Both return the last hidden
state after the final LayerNorm, with a causal mask and no padding mask (as SD pipelines call it); `eos_pooled`
reads transformers' `pooler_output` (the EOS token's state) from it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.models.attention import AttentionImpl, dot_product_attention

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of the text tower (the fields of transformers' `text_encoder/config.json`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a transformers config dict, refusing activations this port does not implement."""
        if config.get("architectures", ["CLIPTextModel"])[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ValueError(f"text_encoder/config.json describes {config['architectures']}, expected CLIPTextModel")
        if config.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act={config['hidden_act']!r} (supported: {list(_ACTIVATIONS)})")
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


class CLIPTextModel(nn.Module):
    """Token ids `[B, L]` -> last hidden state `[B, L, hidden_size]` (after the final LayerNorm).

    The parameter tree mirrors transformers' keys: `text_model/embeddings/...`, `text_model/encoder/layers_i/...`,
    `text_model/final_layer_norm`.
    """

    config: CLIPTextConfig = CLIPTextConfig()
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[-1]} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        return _TextTransformer(c, self.attention_impl, self.dtype, self.param_dtype, name="text_model")(input_ids)


class _Layer(nn.Module):
    """Base of the CLIP submodules: holds the config and builds its Dense and LayerNorm layers."""

    config: CLIPTextConfig
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                            use_fast_variance=False, name=name)

    def child(self, cls: type[_Layer], name: str) -> _Layer:
        return cls(self.config, self.attention_impl, self.dtype, self.param_dtype, name=name)


class _TextTransformer(_Layer):
    """The `text_model` level: embeddings, encoder, final LayerNorm."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = self.child(_Embeddings, "embeddings")(input_ids)
        x = self.child(_Encoder, "encoder")(x)
        return self.layer_norm("final_layer_norm")(x)


class _Embeddings(_Layer):
    """Token plus learned absolute position embeddings."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return embed(c.vocab_size, "token_embedding")(input_ids) + embed(
            c.max_position_embeddings, "position_embedding")(positions)


class _Encoder(_Layer):
    """The stack of `layers_i`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = self.child(_EncoderLayer, f"layers_{i}")(x)
        return x


class _EncoderLayer(_Layer):
    """Pre-LayerNorm causal self-attention and MLP, each with a residual."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.child(_SelfAttention, "self_attn")(self.layer_norm("layer_norm1")(x))
        return x + self.child(_MLP, "mlp")(self.layer_norm("layer_norm2")(x))


class _SelfAttention(_Layer):
    """Causal multi-head self-attention with q_proj / k_proj / v_proj / out_proj."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        q, k, v = (self.dense(c.hidden_size, name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, num_heads=c.num_attention_heads, implementation=self.attention_impl,
                                    is_causal=True)
        return self.dense(c.hidden_size, "out_proj")(out)


class _MLP(_Layer):
    """fc1 -> activation -> fc2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _ACTIVATIONS[c.hidden_act](self.dense(c.intermediate_size, "fc1")(x))
        return self.dense(c.hidden_size, "fc2")(h)


def eos_pooled(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """transformers' `CLIPTextModel.pooler_output`: the last hidden state `[B, L, D]` at each sequence's first EOS
    token -> `[B, D]`. (transformers picks `argmax(input_ids)` when the config's `eos_token_id` is the legacy 2, as
    SD1.5's is; with CLIP's tokenizer, whose EOS has the largest id, that is the same token.)"""
    first = jnp.argmax(jnp.asarray(input_ids) == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]


def clip_from_config(
    config: Mapping[str, Any],
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
) -> CLIPTextModel:
    """Builds the Flax text encoder from a transformers `text_encoder/config.json` dict."""
    return CLIPTextModel(CLIPTextConfig.from_dict(config), attention_impl, dtype, param_dtype)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids `[len(prompts), max_length]` (default `model_max_length`, 77 for SD), padded and truncated as SD
    pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="np",
    ).input_ids


def embed_prompts(
    text_encoder: CLIPTextModel, params: Any, tokenizer: Any, prompts: Sequence[str]
) -> jax.Array:
    """Prompts -> text context `[len(prompts), 77, hidden]` for the UNet (e.g. `[""]` for the empty prompt)."""
    return _jitted_apply(text_encoder)({"params": params}, jnp.asarray(tokenize(tokenizer, prompts)))


def embed_pooled(
    text_encoder: CLIPTextModel, params: Any, tokenizer: Any, prompts: Sequence[str], max_length: int | None = None
) -> jax.Array:
    """Prompts -> pooled text embeddings `[len(prompts), hidden]` (`eos_pooled`), tokenised to `max_length`."""
    ids = jnp.asarray(tokenize(tokenizer, prompts, max_length))
    return eos_pooled(_jitted_apply(text_encoder)({"params": params}, ids), ids, tokenizer.eos_token_id)


@functools.cache
def _jitted_apply(module: nn.Module) -> Any:
    """One jitted `apply` per (hashable, immutable) module, so repeated calls reuse its compilations."""
    return jax.jit(module.apply)


class CaptionContexts:
    """`captions -> [len(captions), 77, width]` text contexts, each distinct caption embedded once (host memory:
    ~240 KB each for SD1.5, so ~380 MB for NYUv2's 795 real + 795 synthetic captions). Unseen captions go through
    `embed` in one call padded to a power of two, so that few batch shapes are ever compiled."""

    def __init__(self, embed: Callable[[list[str]], jax.Array]):
        self.embed = embed
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        unseen = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if unseen:
            padded = unseen + unseen[-1:] * ((1 << (len(unseen) - 1).bit_length()) - len(unseen))
            for caption, e in zip(unseen, np.asarray(self.embed(padded)), strict=False):
                self.cache[caption] = e.copy()  # not a view: the padded batch is freed
        return np.stack([self.cache[c] for c in captions])
