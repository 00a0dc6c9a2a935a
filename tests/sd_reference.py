"""PyTorch reference side of the parity tests: small random diffusers / transformers models saved in the
real diffusers folder layout, and hooks that capture the UNet block outputs the Flax port must reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flax import traverse_util

from d2i_jax.models.random_sd import SD_SCHEDULER, TINY_TEXT_ENCODER, write_char_tokenizer

# Small configs exercising every code path of the SD1 / SD2 families.
UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
)
UNET_SD2 = dict(
    UNET_SD1, attention_head_dim=(2, 4, 4), cross_attention_dim=48, use_linear_projection=True,
    upcast_attention=True,
)
VAE_SMALL = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=32,
)
CLIP_SD1 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_SD2 = dict(CLIP_SD1, hidden_size=48, num_attention_heads=6, hidden_act="gelu", num_hidden_layers=3)

# SD1.5's real shapes (for the slow full-size checks).
UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=768,
)
VAE_SD15 = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)


def make_sd_folder(folder: Path, *, unet: dict, vae: dict, clip: dict, seed: int = 0,
                   safe_serialization: bool = True) -> dict[str, Any]:
    """Random-initialised diffusers UNet / VAE and transformers CLIP saved with `save_pretrained`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel(**unet),
        "vae": AutoencoderKL(**vae),
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=TINY_TEXT_ENCODER["vocab_size"], bos_token_id=0, eos_token_id=1, pad_token_id=1, **clip)),
    }
    for name, model in models.items():
        _randomize_norms(model)
        model.eval()
        model.save_pretrained(folder / name, safe_serialization=safe_serialization)
    write_char_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    return models


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm layers start at scale 1 / bias 0; perturb them so a wrong scale/bias mapping cannot pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            # zero-initialised output layers (e.g. proj_out) would hide whole branches
            for p in m.parameters(recurse=False):
                if torch.count_nonzero(p) == 0:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))


def assert_trees_equal(a: Any, b: Any) -> None:
    """Two param trees have the same paths and bit-identical leaves."""
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy().transpose(0, 2, 3, 1)


def unet_with_features(unet: torch.nn.Module, sample: np.ndarray, t: np.ndarray, context: np.ndarray):
    """Runs the diffusers UNet on NHWC inputs; returns (NHWC output, down, mid, up) captured with hooks."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            captured[name] = out
        return fn

    handles = [unet.conv_in.register_forward_hook(hook("conv_in")), unet.mid_block.register_forward_hook(hook("mid"))]
    for path in ("down", "up"):
        for i, block in enumerate(getattr(unet, f"{path}_blocks")):
            for j, resnet in enumerate(block.resnets):
                layer = block.attentions[j] if getattr(block, "attentions", None) else resnet
                handles.append(layer.register_forward_hook(hook(f"{path}{i}.{j}")))
            for s in (block.downsamplers if path == "down" else block.upsamplers) or []:
                handles.append(s.register_forward_hook(hook(f"{path}{i}.resample")))
    try:
        with torch.no_grad():
            out = unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                       torch.from_numpy(context)).sample
    finally:
        for h in handles:
            h.remove()
    down = [captured["conv_in"]]
    up = []
    for i, block in enumerate(unet.down_blocks):
        down += [captured[f"down{i}.{j}"] for j in range(len(block.resnets))]
        if block.downsamplers:
            down.append(captured[f"down{i}.resample"])
    for i, block in enumerate(unet.up_blocks):
        layers = [captured[f"up{i}.{j}"] for j in range(len(block.resnets))]
        if block.upsamplers:
            layers[-1] = captured[f"up{i}.resample"]
        up.append([nhwc(x) for x in layers])
    return nhwc(out), [nhwc(x) for x in down], nhwc(captured["mid"]), up
