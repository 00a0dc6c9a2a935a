"""Test scaffolding: diffusers / transformers state dicts -> one CompVis / LDM single-file state dict.

The installed diffusers has no diffusers -> LDM converter (its `convert_diffusers_to_original_stable_diffusion.py`
script is not packaged), so the tests write the LDM layout with this inverse of the script's key tables; the code
under test reads it back with diffusers' own LDM -> diffusers utilities.
"""

from __future__ import annotations

import torch

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel config."""
    per_level = config["layers_per_block"] + 1
    levels = len(config["block_out_channels"])
    prefixes = dict(_UNET_FIXED)
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{per_level * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{per_level * i + j + 1}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{per_level * (i + 1)}.0.op."
            attention = config["up_block_types"][i].startswith("CrossAttn")
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{per_level * (i + 1) - 1}.{1 + attention}."
        for j in range(per_level):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{per_level * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{per_level * i + j}.1."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return prefixes


def _vae_prefixes(config: dict) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    return prefixes


def _rename(key: str, prefixes: dict[str, str]) -> str:
    """Replaces the longest matching module prefix of `key` (keys no prefix matches are kept)."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default="")
    return prefixes.get(match, "") + key[len(match):]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        if ".resnets." in key:
            module, _, leaf = key.rpartition(".")
            head, _, name = module.rpartition(".")
            key = f"{head}.{_UNET_RESNET[name]}.{leaf}"
        out["model.diffusion_model." + _rename(key, prefixes)] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(config)
    out = {}
    for key, value in state.items():
        key = _rename(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in key:
            head, _, tail = key.partition(".attn_1.")
            tail = _rename(tail, _VAE_ATTENTION)
            key = f"{head}.attn_1.{tail}"
            if tail.endswith("weight") and not tail.startswith("norm."):
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + key] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> SD1's `cond_stage_model.transformer.text_model.*`."""
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> SD2's OpenCLIP `cond_stage_model.model.*` (fused qkv, `resblocks`)."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = s["embeddings.token_embedding.weight"].shape[1]
    out = {
        "token_embedding.weight": s["embeddings.token_embedding.weight"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_final.weight": s["final_layer_norm.weight"], "ln_final.bias": s["final_layer_norm.bias"],
        "text_projection": torch.randn(width, width),  # unused by SD; real files carry it
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for name, ldm in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{ldm}.{leaf}"] = s[f"{src}{name}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([s[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    return {"cond_stage_model.model." + k: v for k, v in out.items()}
