"""The perception model: SD backbone features -> fusion -> task head, as pure functions of explicit params.

Trainable params are `{"head": ...}` (plus `"unet"` when the UNet is fine-tuned, `"lora"` when it is tuned through
LoRA factors, and `"adapter"` with a context adapter); the frozen SD params are a separate argument, so the train
state (and theta_C's EMA) holds only what is trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2i_jax.models.lora import Lora
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.fusion import group_by_stride

UNET_TUNINGS = ("frozen", "full", "lora")


class NoNeck(nn.Module):
    """The neck slot of paths whose heads take the selected features as they are (VPD's, the one-step read-out)."""

    def __call__(self, features: Any, image_size: tuple[int, int], *, train: bool) -> Any:
        del image_size, train
        return features


class DensePredictor(nn.Module):
    """The UNet block outputs a feature path selects (`select`), its neck (`fusion`), then a task head.

    Attributes:
      fusion: the neck, `fusion(selected, image_size, train=...) -> skips` (Diff-2-in-1: `FeatureFusion`); its
        params are `params["head"]["fusion"]`.
      head: the task head, `head(skips, train=..., **head_kwargs)`.
      select: `(block_outputs, image_size) -> the neck's input` (default: Diff-2-in-1's stride groups).
    """

    fusion: nn.Module
    head: nn.Module
    select: Callable[[list[jax.Array], tuple[int, int]], Any] = group_by_stride

    def __call__(self, block_outputs: list[jax.Array], image_size: tuple[int, int], *, train: bool,
                 sample: bool | None = None, **head_kwargs: Any) -> Any:
        """`train`: the fusion's training mode (BatchNorm batch statistics, spectral-norm power iteration).
        `sample` (default `train`): the head's training-time forward (`head(..., train=sample)`, e.g. the normal
        head's uncertainty-guided sampled refinement, with `head_kwargs`); the heads hold no BatchNorm."""
        skips = self.fusion(self.select(block_outputs, image_size), image_size, train=train)
        return self.head(skips, train=train if sample is None else sample, **head_kwargs)


@dataclasses.dataclass(frozen=True)
class Perceiver:
    """image -> prediction.

    Attributes:
      backbone / predictor: the SD feature pass and what reads its block outputs.
      unet_tuning: how the UNet is trained: "frozen" (Diff-2-in-1), "full" (every weight is a trainable param: VPD,
        GenPercept) or "lora" (`lora`'s low-rank factors on the frozen UNet).
      lora: the LoRA factors' rank, scale and target layers (`unet_tuning = "lora"`).
      context_adapter: a trainable module mapping the `[B, N, D]` text context before the UNet pass (VPD's
        `TextAdapter`); its params are `params["adapter"]`.
    """

    backbone: Backbone
    predictor: DensePredictor
    unet_tuning: str = "frozen"
    lora: Lora = dataclasses.field(default_factory=Lora)
    context_adapter: nn.Module | None = None

    def __post_init__(self):
        if self.unet_tuning not in UNET_TUNINGS:
            raise ValueError(f"config.model.unet_tuning must be one of {UNET_TUNINGS}, got {self.unet_tuning!r}")

    @property
    def train_unet(self) -> bool:
        """Whether the UNet's weights depend on trainable params (fully or through LoRA)."""
        return self.unet_tuning != "frozen"

    def unet(self, params: Any, frozen: Any) -> Any:
        """The UNet params the model runs with: trained, LoRA-merged or frozen."""
        if self.unet_tuning == "full":
            return params["unet"]
        if self.unet_tuning == "lora":
            return self.lora.merge(frozen["unet"], params["lora"])
        return frozen["unet"]

    @property
    def trainable_features(self) -> bool:
        """Whether the block outputs depend on trainable params (UNet or context adapter): then each model (theta_E,
        theta_C) needs its own backbone pass."""
        return self.train_unet or self.context_adapter is not None

    def features(self, params: Any, frozen: Any, images: jax.Array, context: jax.Array, rng: jax.Array,
                 moments: jax.Array | None = None, *, train: bool = False, targets: Any = None) -> Any:
        """The backbone's features of `images` (frozen or trainable UNet, adapted context); `moments`: their cached
        VAE posterior (`Backbone.image_features`), which skips the VAE encoder; `train`: theta_E's training forward;
        `targets`: the labels as images, for a backbone that `needs_label_latent` or reports a latent error."""
        unet = self.unet(params, frozen)
        if self.context_adapter is not None:
            context = self.context_adapter.apply({"params": params["adapter"]}, context)
        return self.backbone.image_features(frozen["vae"], unet, images, context, rng, moments, train=train,
                                            targets=targets)

    def block_outputs(self, params: Any, frozen: Any, images: jax.Array, context: jax.Array,
                      rng: jax.Array, moments: jax.Array | None = None, *, train: bool = False) -> list[jax.Array]:
        """The UNet block outputs of `features`."""
        return self.features(params, frozen, images, context, rng, moments, train=train).block_outputs()

    def head(self, params: Any, batch_stats: Any, block_outputs: list[jax.Array], image_size: tuple[int, int], *,
             train: bool, sample: bool | None = None, **head_kwargs: Any) -> tuple[Any, Any]:
        """Fusion + head; returns (outputs, updated batch_stats).

        `train` updates the normalisation state (batch statistics, spectral-norm vectors); without it the running
        statistics are used and `batch_stats` comes back unchanged. `sample` (default `train`) selects the head's
        training-time forward (`DensePredictor`): `train=False, sample=True` is the public code's theta_C labelling
        (fusion in eval mode, decoder in `mode='train'`).
        """
        variables = {"params": params["head"], "batch_stats": batch_stats}
        if not train:
            return self.predictor.apply(variables, block_outputs, image_size, train=False, sample=sample,
                                        **head_kwargs), batch_stats
        out, updates = self.predictor.apply(variables, block_outputs, image_size, train=True, sample=sample,
                                            mutable=["batch_stats"], **head_kwargs)
        return out, updates["batch_stats"]

    def _variables_fn(self, frozen: Any, image_size: tuple[int, int], context: jax.Array) -> Any:
        """`rng -> (params, batch_stats)` of fusion + head (and the context adapter) for `image_size` images; the
        block outputs' shapes do not depend on the adapter or on LoRA, so they are read without them."""
        images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
        unet = frozen["unet"] if self.unet_tuning == "frozen" else self.backbone.trainable_unet(frozen["unet"])
        shapes = jax.eval_shape(lambda x, u: self.backbone.image_features(
            frozen["vae"], u, x, context, jax.random.key(0)).block_outputs(), images, unet)
        feats = [jnp.zeros(s.shape, s.dtype) for s in shapes]

        def variables(rng: jax.Array) -> tuple[Any, Any]:
            v = self.predictor.init(rng, feats, image_size, train=False)
            params = {"head": v.get("params", {})}  # a read-out head may have none
            if self.context_adapter is not None:
                params["adapter"] = self.context_adapter.init(jax.random.fold_in(rng, 1), context)["params"]
            return params, v.get("batch_stats", {})

        return variables

    def init(self, rng: jax.Array, frozen: Any, image_size: tuple[int, int], context: jax.Array) -> tuple[Any, Any]:
        """(params, batch_stats) for a model taking `image_size` images and `context` (its raw, unadapted form); the
        UNet copied in when trainable. Call it outside any trace (`init_shapes` gives the shapes)."""
        # runs once: on CPUs XLA's backend optimisations only slow the (PRNG-heavy) compile down, ~4x
        fast_compile = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        params, batch_stats = jax.jit(self._variables_fn(frozen, image_size, context),
                                      compiler_options=fast_compile)(rng)
        if self.unet_tuning == "full":
            params["unet"] = self.backbone.trainable_unet(frozen["unet"])
        elif self.unet_tuning == "lora":
            params["lora"] = jax.jit(self.lora.init)(jax.random.fold_in(rng, 2), frozen["unet"])
        return params, batch_stats

    def init_shapes(self, frozen: Any, image_size: tuple[int, int], context: jax.Array) -> tuple[Any, Any]:
        """`init`'s (params, batch_stats) as `jax.ShapeDtypeStruct`s: nothing compiled or computed."""
        params, batch_stats = jax.eval_shape(self._variables_fn(frozen, image_size, context), jax.random.key(0))
        if self.unet_tuning == "full":
            params["unet"] = jax.eval_shape(self.backbone.trainable_unet, frozen["unet"])
        elif self.unet_tuning == "lora":
            params["lora"] = jax.eval_shape(self.lora.init, jax.random.key(0), frozen["unet"])
        return params, batch_stats
