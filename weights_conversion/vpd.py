"""VPD public PyTorch state dicts -> the variable trees of `d2i_jax.perception.vpd` modules.

Each converter takes a whole VPD state dict (`VPDSeg` from mmseg's checkpoint `state_dict`, or `VPDDepth`'s `model`;
a DDP `module.` prefix is dropped), reads the keys under its prefixes and returns `{"params": ..., "batch_stats": ...}`
for the module (`batch_stats` only where it has BatchNorms). Layouts: conv OIHW -> HWIO, transposed conv IOHW -> HWIO
flipped in space, Linear [out, in] -> [in, out], norm weight -> scale, BatchNorm running stats -> batch_stats.

- `convert_text_adapter` -> `TextAdapter`: `{prefix}text_adapter.fc.{0,2}` -> `fc1`, `fc2`; `{prefix}gamma` ->
  `gamma` (segmentation: no prefix; depth: `encoder.`).
- `convert_fpn` -> `SemanticFPN`: `neck.lateral_convs.{i}.conv` -> `neck/lateral{i}`, `neck.fpn_convs.{i}.conv` ->
  `neck/fpn{i}`, `decode_head.scale_heads.{i}.{j}.{conv,bn}` -> `decode_head/scale{i}_{k}/{conv,bn}` (k counts the
  ConvModules of scale head i; the Upsample modules between them hold nothing), `decode_head.conv_seg` ->
  `decode_head/conv_seg`.
- `convert_depth_decoder` -> `VPDDepthDecoder`: `encoder.layer1.{0,1,3}` -> `layer1_conv1`, `layer1_norm`,
  `layer1_conv2`; `encoder.layer2.0` -> `layer2_conv`; `encoder.out_layer.{0,1}` -> `out_conv`, `out_norm`;
  `decoder.deconv_layers.{3i,3i+1}` -> `deconv{i}`, `deconv_norm{i}`; `decoder.conv_layers.{0,1}` -> `conv`,
  `conv_norm`; `last_layer_depth.{0,2}` -> `depth_conv1`, `depth_conv2`.

Keys outside a converter's prefixes (UNet, VAE, class embeddings, the other modules) are ignored, as is
`num_batches_tracked`; any missing or unexpected key under them raises one `ConversionError` listing all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from weights_conversion.key_maps import KeyMap, deconv, linear, norm_keys, unwrap, vector, weight_keys
from weights_conversion.torch_to_flax import raise_if_mismatched


def _indices(state: Mapping[str, Any], pattern: str) -> list[tuple[int, ...]]:
    """Sorted integer groups of the keys fully matching `pattern`."""
    found = {tuple(int(g) for g in m.groups()) for k in state if (m := re.fullmatch(pattern, k))}
    return sorted(found)


def _convert(what: str, state: Mapping[str, Any], prefixes: tuple[str, ...], key_map: KeyMap) -> dict[str, Any]:
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        if not key.startswith(prefixes) or key.endswith(".num_batches_tracked"):
            continue
        if key not in key_map:
            unexpected.append(f"{key} {tuple(np.shape(value))}")
            continue
        path, layout = key_map[key]
        out[path] = layout(np.asarray(value, np.float32))
    missing = [key for key in key_map if key not in state]
    raise_if_mismatched(what, missing, unexpected, [])
    return traverse_util.unflatten_dict(out)


def convert_text_adapter(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"params": ...}` of `TextAdapter` (`prefix`: "" for `VPDSeg`, "encoder." for `VPDDepth`)."""
    state = unwrap(state)
    key_map = {**weight_keys(f"{prefix}text_adapter.fc.0", ("fc1",), layout=linear),
               **weight_keys(f"{prefix}text_adapter.fc.2", ("fc2",), layout=linear),
               f"{prefix}gamma": (("params", "gamma"), vector)}
    return _convert("VPD text adapter", state, (f"{prefix}text_adapter.", f"{prefix}gamma"), key_map)


def convert_fpn(state: Mapping[str, Any]) -> dict[str, Any]:
    """`{"params", "batch_stats"}` of `SemanticFPN` from mmseg `FPN` (`neck.`) + `FPNHead` (`decode_head.`) keys."""
    state = unwrap(state)
    key_map: KeyMap = {}
    for (i,) in _indices(state, r"neck\.lateral_convs\.(\d+)\.conv\.weight"):
        key_map.update(weight_keys(f"neck.lateral_convs.{i}.conv", ("neck", f"lateral{i}")))
        key_map.update(weight_keys(f"neck.fpn_convs.{i}.conv", ("neck", f"fpn{i}")))
    scale_heads: dict[int, list[int]] = {}
    for i, j in _indices(state, r"decode_head\.scale_heads\.(\d+)\.(\d+)\.conv\.weight"):
        scale_heads.setdefault(i, []).append(j)
    for i, modules in scale_heads.items():
        for k, j in enumerate(modules):
            name, path = f"decode_head.scale_heads.{i}.{j}", ("decode_head", f"scale{i}_{k}")
            key_map.update(weight_keys(f"{name}.conv", (*path, "conv"), bias=False))
            key_map.update(norm_keys(f"{name}.bn", (*path, "bn"), running=True))
    key_map.update(weight_keys("decode_head.conv_seg", ("decode_head", "conv_seg")))
    return _convert("VPD semantic FPN", state, ("neck.", "decode_head."), key_map)


def convert_depth_decoder(state: Mapping[str, Any]) -> dict[str, Any]:
    """`{"params", "batch_stats"}` of `VPDDepthDecoder` from `VPDDepth`'s `encoder.{layer1,layer2,out_layer}`,
    `decoder.` and `last_layer_depth.` keys."""
    state = unwrap(state)
    key_map: KeyMap = {
        **weight_keys("encoder.layer1.0", ("layer1_conv1",)),
        **norm_keys("encoder.layer1.1", ("layer1_norm",), running=False),
        **weight_keys("encoder.layer1.3", ("layer1_conv2",)),
        **weight_keys("encoder.layer2.0", ("layer2_conv",)),
        **weight_keys("encoder.out_layer.0", ("out_conv",)),
        **norm_keys("encoder.out_layer.1", ("out_norm",), running=False),
        **weight_keys("decoder.conv_layers.0", ("conv",)),
        **norm_keys("decoder.conv_layers.1", ("conv_norm",), running=True),
        **weight_keys("last_layer_depth.0", ("depth_conv1",)),
        **weight_keys("last_layer_depth.2", ("depth_conv2",)),
    }
    for (j,) in _indices(state, r"decoder\.deconv_layers\.(\d+)\.weight"):
        if j % 3 == 0:
            key_map.update(weight_keys(f"decoder.deconv_layers.{j}", (f"deconv{j // 3}",), bias=False,
                                      layout=deconv))
            key_map.update(norm_keys(f"decoder.deconv_layers.{j + 1}", (f"deconv_norm{j // 3}",), running=True))
    prefixes = ("encoder.layer1.", "encoder.layer2.", "encoder.out_layer.", "decoder.", "last_layer_depth.")
    return _convert("VPD depth decoder", state, prefixes, key_map)
