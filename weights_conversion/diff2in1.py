"""Import the released Diff-2-in-1 PyTorch checkpoints (fusion `SNmodule` + Bae GN `Decoder`) as a d2i_jax model.

    python -m weights_conversion.diff2in1 --sn checkpoint_50.pth --bae checkpoint_bae_50.pth --out /ckpt/d2i_released

The public code saves the two state dicts separately (`sn_module_c` / `bae_module_c` after self-improving). The output
folder holds `model/` (an orbax checkpoint of `{"params", "batch_stats"}` exactly as a run's stage writes it) and
`d2i_jax_model.json` (widths, sources); `--config.init_from=<out>` makes every stage use it as theta_W.

Mapping (PyTorch name -> Flax path, layouts: conv OIHW -> HWIO, transposed conv IOHW -> HWIO flipped in space,
Conv1d [out, in, 1] -> dense [in, out], BatchNorm weight -> scale):
- `{low,mid,high,highest}_feature_conv.0` -> `fusion/reduce{0..3}`;
- `{mid,high,highest}_feature_mix_conv` -> `fusion/merge{1..3}`: `conv1`, `conv2`, `conv_sc` -> `shortcut` (spectral-
  norm `u0` -> batch_stats `u`), `stored_{mean,var}{1,2}` -> batch_stats `norm{1,2}`;
- `bn_up{0,1,2}` -> `fusion/out_norm{0,1,2}` (running stats -> batch_stats), `conv_up{1,2}` -> `fusion/deconv{1,2}`;
- decoder `conv2` -> `head/conv_bottleneck`, `up{i}._net.{0,1,3,4}` -> `head/up{i}/{conv0,norm0,conv1,norm1}`,
  `out_conv_res8` -> `head/out_res8`, `out_conv_res{4,2,1}.{0,2,4,6}` -> `head/refine{0,1,2}/dense{0..3}`.
Ignored by name: the never-called `transfromer_decoder.*`, `mlp.*`, `to_k.*`, `to_q.*`, the logging-only spectral-
norm `sv0` and `num_batches_tracked`. Anything else missing, unexpected or mis-shaped: one error listing all of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from d2i_jax.data.files import PathLike, absolute, as_path
from d2i_jax.perception.fusion import FeatureFusion
from d2i_jax.perception.model import DensePredictor
from d2i_jax.perception.normal_head import NormalHead
from d2i_jax.remote import local_copy
from weights_conversion.torch_to_flax import ConversionError, raise_if_mismatched, read_weights_file

GROUPS = ("low", "mid", "high", "highest")
IGNORED_PREFIXES = ("transfromer_decoder.", "mlp.", "to_k.", "to_q.")
IGNORED_SUFFIXES = (".sv0", ".num_batches_tracked")
MODEL_INFO = "d2i_jax_model.json"
_TEMPLATE_SIDE = 256  # any multiple of 64: the fusion and head params do not depend on the image size


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict (a Lightning `state_dict` wrapper unwrapped) as NumPy arrays, read with
    `torch.load(weights_only=True)`: a pickle holding more than tensors is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return read_weights_file(path)


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _deconv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])


def _conv1d(w: np.ndarray) -> np.ndarray:
    return w[..., 0].T


def _vector(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def _sn_conv(torch_name: str, flax_name: str, prefix: str) -> dict[str, tuple[tuple[str, ...], Any]]:
    p, b = ("params", "fusion", prefix, flax_name), ("batch_stats", "fusion", prefix, flax_name)
    return {f"{torch_name}.weight": ((*p, "kernel"), _conv), f"{torch_name}.bias": ((*p, "bias"), _vector),
            f"{torch_name}.u0": ((*b, "u"), _vector)}


def _batch_norm(torch_name: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], Any]]:
    """An affine `nn.BatchNorm2d`: weight / bias -> params, running statistics -> batch_stats."""
    return {f"{torch_name}.weight": (("params", *path, "scale"), _vector),
            f"{torch_name}.bias": (("params", *path, "bias"), _vector),
            f"{torch_name}.running_mean": (("batch_stats", *path, "mean"), _vector),
            f"{torch_name}.running_var": (("batch_stats", *path, "var"), _vector)}


def fusion_mapping(num_deconvs: int = 2) -> dict[str, tuple[tuple[str, ...], Any]]:
    """PyTorch `SNmodule` key -> (Flax path in `{"params", "batch_stats"}`, layout function)."""
    m: dict[str, tuple[tuple[str, ...], Any]] = {}
    for i, group in enumerate(GROUPS):
        m[f"{group}_feature_conv.0.weight"] = (("params", "fusion", f"reduce{i}", "kernel"), _conv)
        if i == 0:
            continue
        block, merge = f"{group}_feature_mix_conv", f"merge{i}"
        for torch_name, flax_name in (("conv1", "conv1"), ("conv2", "conv2"), ("conv_sc", "shortcut")):
            m.update(_sn_conv(f"{block}.{torch_name}", flax_name, merge))
        for j in (1, 2):
            m.update({f"{block}.stored_mean{j}": (("batch_stats", "fusion", merge, f"norm{j}", "mean"), _vector),
                      f"{block}.stored_var{j}": (("batch_stats", "fusion", merge, f"norm{j}", "var"), _vector)})
    for j in range(num_deconvs + 1):
        m.update(_batch_norm(f"bn_up{j}", ("fusion", f"out_norm{j}")))
        if j:
            m[f"conv_up{j}.weight"] = (("params", "fusion", f"deconv{j}", "kernel"), _deconv)
            m[f"conv_up{j}.bias"] = (("params", "fusion", f"deconv{j}", "bias"), _vector)
    return m


def decoder_mapping(num_up: int = 4, mlp_layers: int = 3) -> dict[str, tuple[tuple[str, ...], Any]]:
    """PyTorch Bae GN `Decoder` key -> (Flax path in `{"params", ...}`, layout function)."""
    m: dict[str, tuple[tuple[str, ...], Any]] = {}

    def conv(torch_name: str, path: tuple[str, ...], layout: Any = _conv) -> None:
        m[f"{torch_name}.weight"] = (("params", "head", *path, "kernel"), layout)
        m[f"{torch_name}.bias"] = (("params", "head", *path, "bias"), _vector)

    conv("conv2", ("conv_bottleneck",))
    for i in range(1, num_up + 1):
        for k, name in enumerate(("conv0", "conv1")):
            conv(f"up{i}._net.{3 * k}", (f"up{i}", name))
            m[f"up{i}._net.{3 * k + 1}.weight"] = (("params", "head", f"up{i}", f"norm{k}", "scale"), _vector)
            m[f"up{i}._net.{3 * k + 1}.bias"] = (("params", "head", f"up{i}", f"norm{k}", "bias"), _vector)
    conv("out_conv_res8", ("out_res8",))
    for level, res in enumerate((4, 2, 1)):
        for k in range(mlp_layers + 1):
            conv(f"out_conv_res{res}.{2 * k}", (f"refine{level}", f"dense{k}"), _conv1d)
    return m


def infer_widths(sn: Mapping[str, np.ndarray], bae: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Fusion / head widths read off the checkpoint shapes (the public values where a key is absent, so that the
    full list of problems is reported by the conversion itself)."""
    def out_dim(state: Mapping[str, np.ndarray], key: str, default: int, axis: int = 0) -> int:
        return int(state[key].shape[axis]) if key in state else default

    in_channels = (7680, 7040, 4160, 2560)
    return {
        "group_channels": [out_dim(sn, f"{g}_feature_conv.0.weight", c, 1) for g, c in zip(GROUPS, in_channels,
                                                                                            strict=True)],
        "fusion": {"reduce_channels": [out_dim(sn, f"{g}_feature_conv.0.weight", c)
                                       for g, c in zip(GROUPS, (2048, 176, 64, 64), strict=True)],
                   "deconv_channels": [out_dim(sn, f"conv_up{j}.weight", c, 1) for j, c in ((1, 40), (2, 24))]},
        "head": {"decoder_channels": [out_dim(bae, f"up{i}._net.0.weight", c)
                                      for i, c in zip(range(1, 5), (1024, 512, 256, 128), strict=True)],
                 "mlp_hidden": out_dim(bae, "out_conv_res4.0.weight", 128)},
    }


def model_template(widths: Mapping[str, Any]) -> dict[str, Any]:
    """`{"params", "batch_stats"}` shapes of `DensePredictor(FeatureFusion, NormalHead)` with these widths."""
    fusion = FeatureFusion(**{k: tuple(v) for k, v in widths["fusion"].items()})
    head = NormalHead(decoder_channels=tuple(widths["head"]["decoder_channels"]),
                      mlp_hidden=widths["head"]["mlp_hidden"])
    predictor = DensePredictor(fusion, head)
    size = (_TEMPLATE_SIDE, _TEMPLATE_SIDE)
    feats = [jax.ShapeDtypeStruct((1, _TEMPLATE_SIDE // s, _TEMPLATE_SIDE // s, c), jnp.float32)
             for s, c in zip((64, 32, 16, 8), widths["group_channels"], strict=True)]
    return jax.eval_shape(lambda f: predictor.init(jax.random.key(0), f, size, train=False), feats)


def convert(sn: Mapping[str, np.ndarray], bae: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`{"params": {"head": ...}, "batch_stats": ...}` as a stage saves its model, the inferred widths).

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped tensor of both checkpoints.
    """
    widths = infer_widths(sn, bae)
    flat_template = traverse_util.flatten_dict(model_template(widths))
    out: dict[tuple[str, ...], np.ndarray] = {}
    missing, unexpected, mismatched = [], [], []
    for what, state, mapping in (("sn", sn, fusion_mapping()), ("bae", bae, decoder_mapping())):
        for key, value in state.items():
            if key not in mapping:
                if not key.startswith(IGNORED_PREFIXES) and not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(f"{what}: {key} {tuple(value.shape)}")
                continue
            path, layout = mapping[key]
            converted, target = layout(value), tuple(flat_template[path].shape)
            if converted.shape != target:
                mismatched.append(f"{what}: {key}: checkpoint {tuple(value.shape)} -> {converted.shape}, model "
                                  f"expects {target}")
            out[path] = converted.astype(np.float32)
        missing += [f"{what}: {key}" for key in mapping if key not in state]
    raise_if_mismatched("Diff-2-in-1 checkpoint", missing, unexpected, mismatched)
    tree = traverse_util.unflatten_dict(out)
    return {"params": {"head": tree["params"]}, "batch_stats": tree["batch_stats"]}, widths


def write_model(out: PathLike, model: Mapping[str, Any], info: Mapping[str, Any]) -> epath.Path:
    """Writes `<out>/model` (orbax) and `<out>/d2i_jax_model.json` (local or `gs://`): the folder `config.init_from`
    takes."""
    from d2i_jax.models.loading import save_params

    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "model", jax.tree.map(jnp.asarray, dict(model)))
    (out / MODEL_INFO).write_text(json.dumps(info, indent=2))
    return out


def config_overrides(widths: Mapping[str, Any]) -> list[str]:
    """The `--config.` flags a run needs to use this model (empty for the public widths)."""
    defaults = infer_widths({}, {})
    flags = [f"--config.fusion.{k}='{tuple(v)}'" for k, v in widths["fusion"].items() if v != defaults["fusion"][k]]
    for k, v in widths["head"].items():
        if v != defaults["head"][k]:
            flags.append(f"--config.task.head.{k}='{tuple(v) if isinstance(v, list) else v}'")
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion.diff2in1", description=__doc__.splitlines()[0])
    parser.add_argument("--sn", required=True, help="the fusion state dict (public code: checkpoint_<epoch>.pth)")
    parser.add_argument("--bae", required=True, help="the decoder state dict (checkpoint_bae_<epoch>.pth)")
    parser.add_argument("--out", required=True, help="output model folder, local or gs:// (use with "
                        "--config.init_from)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        model, widths = convert(read_checkpoint(local_copy(args.sn, "--sn")),
                                read_checkpoint(local_copy(args.bae, "--bae")))
        info = {"format": "d2i_jax perception model (orbax {params, batch_stats})", "task": "normals",
                "sources": {"sn": str(absolute(args.sn)), "bae": str(absolute(args.bae))},
                **widths, "config_overrides": config_overrides(widths)}
        out = write_model(args.out, model, info)
    except (ConversionError, FileNotFoundError, ImportError) as e:
        print(f"conversion failed: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.sn} + {args.bae} -> {out} in {time.perf_counter() - start:.1f}s")
    print(f"use it with: --config.init_from={out} {' '.join(info['config_overrides'])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
