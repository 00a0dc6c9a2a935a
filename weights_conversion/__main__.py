"""Convert a diffusers Stable Diffusion folder or single-file checkpoint into d2i_jax Flax params.

    python -m weights_conversion --src <diffusers SD folder> --out <dir> [--dtype float32|bfloat16]
    python -m weights_conversion --src <model.ckpt | model.safetensors> --config-from <diffusers folder> --out <dir>

Writes `<dir>/{unet,vae,text_encoder}/config.json` + `params/` (orbax checkpoints), copies `tokenizer/` and
`scheduler/`, and `<dir>/d2i_jax.json`. `d2i_jax.models.load_stable_diffusion(<dir>)` loads the result.
A single file (CompVis / LDM layout, SD 1.x / 2.x) takes its configs, tokenizer and scheduler from `--config-from`
(a diffusers folder; weights not needed), or else from diffusers' default repo in the local Hugging Face cache.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from d2i_jax.models.loading import COMPONENTS, convert_folder
from d2i_jax.remote import local_copy, staged
from weights_conversion.torch_to_flax import ConversionError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion", description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or "
                        "single-file LDM checkpoint (.ckpt / .safetensors); a gs:// URL is copied locally first")
    parser.add_argument("--out", required=True, help="output folder for the Flax params (local or gs://)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype of the params")
    parser.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated subset to convert")
    parser.add_argument("--config-from", help="single files: diffusers folder with the component configs and "
                        "tokenizer/ (weights not needed)")
    parser.add_argument("--allow-pickle", action="store_true", help="single .ckpt files: unpickle fully when "
                        "torch.load(weights_only=True) refuses the file. UNSAFE: runs whatever code the file names")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        config_from = args.config_from and local_copy(args.config_from, "--config-from")
        with staged(args.out) as out:  # a gs:// --out: converted locally, uploaded when complete
            convert_folder(local_copy(args.src, "--src"), out, dtype=DTYPES[args.dtype],
                           components=args.components.split(","), config_from=config_from,
                           allow_pickle=args.allow_pickle)
    except (ConversionError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"conversion failed: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.out} ({args.dtype}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
