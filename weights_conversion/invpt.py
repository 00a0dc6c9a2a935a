"""InvPT public PyTorch state dicts -> the variables of `d2i_jax.perception.invpt.InvPTDecoder`.

Takes an InvPT checkpoint's `model` (DDP's `module.` prefix dropped) and reads the keys under `multi_task_decoder.`
and `heads.` (the backbone's are left alone). Layouts: conv OIHW -> HWIO, transposed conv IOHW -> HWIO flipped in
space, Linear [out, in] -> [in, out], LayerNorm / BatchNorm weight -> scale, running statistics -> batch_stats.
Names (d = `multi_task_decoder.`, i the stage, k the task's index, t its name):
- `d.scale_embed.{0,1}` -> `scale_embed{0,1}`; `d.preliminary_decoder.t.j.{conv,bn1}` -> `preliminary_t_j/{conv,bn}`;
  `d.intermediate_head.t` -> `intermediate_head_t`; `d.invpt.mix_proj.t.0` -> `mix_proj_t`;
- `d.invpt.invpt_stages.i.patch_embed.k.proj.{1,2,4,5}` -> `stagei_patch_embedk/conv{0,1}/{conv,bn}`;
- `d.invpt.invpt_stages.i.blocks.0.{norm1,norm2,mlp.fc1,mlp.fc2}` -> `stagei/{norm1,norm2,fc1,fc2}`; its
  `attn.conv_proj_q.k.{conv,bn}` -> `stagei/attn/conv_proj_qk{,_bn}`, `attn.{proj_q,proj_k,proj_v,proj,fuse_attn}` ->
  `stagei/attn/...`;
- `d.invpt.norm_mts.i` -> `norm_mti`; `d.invpt.redu_chan.i.k` -> `redu_chani_k`; `d.invpt.mt_proj.t.{0,1}` ->
  `mt_proj_t/{conv,bn}`; `heads.t.linear_pred` -> `head_t`.
Ignored by name: what InvPT creates but never uses (`d.scale_embed.2`, stage 0's `fuse_attn`, `d.invpt.redu_chan.0`,
`d.invpt.norm_mt`) and `num_batches_tracked`. Anything else missing, unexpected or shaped unlike the decoder's
variables: one `ConversionError` listing all of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d2i_jax.perception.invpt import InvPTDecoder
from weights_conversion.key_maps import KeyMap, deconv, linear, norm_keys, unwrap, weight_keys
from weights_conversion.torch_to_flax import raise_if_mismatched

DECODER = "multi_task_decoder."
PREFIXES = (DECODER, "heads.")
UNUSED = (f"{DECODER}scale_embed.2.", f"{DECODER}invpt.invpt_stages.0.blocks.0.attn.fuse_attn.",
          f"{DECODER}invpt.redu_chan.0.", f"{DECODER}invpt.norm_mt.")


def _conv_bn(conv: str, bn: str, path: tuple[str, ...], *, bias: bool = False) -> KeyMap:
    return {**weight_keys(conv, (*path, "conv"), bias=bias), **norm_keys(bn, (*path, "bn"), running=True)}


def key_map(tasks: tuple[str, ...], num_stages: int = 3) -> KeyMap:
    """PyTorch key -> (Flax variable path, layout) for every variable of an `InvPTDecoder` with these tasks."""
    d, v = DECODER, f"{DECODER}invpt."
    m: KeyMap = {**weight_keys(f"{d}scale_embed.0", ("scale_embed0",), layout=deconv),
                 **weight_keys(f"{d}scale_embed.1", ("scale_embed1",))}
    for i in range(num_stages):
        s, blk = (f"stage{i}",), f"{v}invpt_stages.{i}.blocks.0."
        m |= norm_keys(f"{v}norm_mts.{i}", (f"norm_mt{i}",))
        m |= norm_keys(f"{blk}norm1", (*s, "norm1")) | norm_keys(f"{blk}norm2", (*s, "norm2"))
        m |= weight_keys(f"{blk}mlp.fc1", (*s, "fc1"), layout=linear)
        m |= weight_keys(f"{blk}mlp.fc2", (*s, "fc2"), layout=linear)
        for name in ("proj_q", "proj_k", "proj_v", "proj"):
            m |= weight_keys(f"{blk}attn.{name}", (*s, "attn", name), layout=linear)
        if i:
            m |= weight_keys(f"{blk}attn.fuse_attn", (*s, "attn", "fuse_attn"))
        for k in range(len(tasks)):
            q = f"{blk}attn.conv_proj_q.{k}."
            m |= weight_keys(f"{q}conv", (*s, "attn", f"conv_proj_q{k}"), bias=False)
            m |= norm_keys(f"{q}bn", (*s, "attn", f"conv_proj_q{k}_bn"), running=True)
            if i:
                e, path = f"{v}invpt_stages.{i}.patch_embed.{k}.proj.", f"stage{i}_patch_embed{k}"
                m |= _conv_bn(f"{e}1", f"{e}2", (path, "conv0")) | _conv_bn(f"{e}4", f"{e}5", (path, "conv1"))
                m |= weight_keys(f"{v}redu_chan.{i}.{k}", (f"redu_chan{i}_{k}",))
    for t in tasks:
        for j in (0, 1):
            p = f"{d}preliminary_decoder.{t}.{j}."
            m |= _conv_bn(f"{p}conv", f"{p}bn1", (f"preliminary_{t}_{j}",))
        m |= weight_keys(f"{d}intermediate_head.{t}", (f"intermediate_head_{t}",))
        m |= weight_keys(f"{v}mix_proj.{t}.0", (f"mix_proj_{t}",))
        m |= _conv_bn(f"{v}mt_proj.{t}.0", f"{v}mt_proj.{t}.1", (f"mt_proj_{t}",), bias=True)
        m |= weight_keys(f"heads.{t}.linear_pred", (f"head_{t}",))
    return m


def decoder_shapes(decoder: InvPTDecoder, backbone_channels: tuple[int, int, int]) -> dict[tuple[str, ...], tuple]:
    """Flat variable path -> shape of `decoder` on maps 0, 1 and 3 of these widths (nothing computed)."""
    h0 = math.lcm(2, *decoder.kv_strides)
    side = (2 * h0, 2 * h0, 1, h0 * decoder.mtt_downsample_rate)
    widths = (backbone_channels[0], backbone_channels[1], 1, backbone_channels[2])
    maps = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for s, c in zip(side, widths, strict=True)]
    variables = jax.eval_shape(lambda m: decoder.init(jax.random.key(0), m, train=False), maps)
    return {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(variables).items()}


def invpt_decoder_params(state: Mapping[str, Any], decoder: InvPTDecoder) -> dict[str, Any]:
    """`{"params", "batch_stats"}` of `decoder` from an InvPT checkpoint's `model` state dict.

    `decoder` gives the task order (InvPT indexes some per-task modules by position) and the expected shapes; the
    widths of the backbone maps are read from the checkpoint (1 where its key is missing: reported as such).
    """
    state = unwrap(state)
    tasks = tuple(name for name, _ in decoder.task_channels)

    def in_width(key: str, axis: int) -> int:
        return np.shape(state[key])[axis] if key in state else 1

    shapes = decoder_shapes(decoder, (in_width(f"{DECODER}scale_embed.0.weight", 0),
                                      in_width(f"{DECODER}scale_embed.1.weight", 1),
                                      in_width(f"{DECODER}preliminary_decoder.{tasks[0]}.0.conv.weight", 1)))
    mapping = key_map(tasks)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        if not key.startswith(PREFIXES) or key.startswith(UNUSED) or key.endswith(".num_batches_tracked"):
            continue
        if key not in mapping:
            unexpected.append(f"{key} {tuple(np.shape(value))}")
            continue
        path, layout = mapping[key]
        converted = layout(np.asarray(value, np.float32))
        if converted.shape != shapes.get(path):
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(value))} -> {converted.shape}, decoder expects "
                              f"{shapes.get(path)} at {'/'.join(path)}")
            continue
        out[path] = converted
    missing = [key for key in mapping if key not in state]
    missing += ["/".join(p) for p in shapes if p not in {path for path, _ in mapping.values()}]
    raise_if_mismatched("InvPT decoder", missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(out)
