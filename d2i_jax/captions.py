"""Captions for training images, written where the project's readers read them: one UTF-8 `.txt` per image.

The create stage of Diff-2-in-1 conditions the generator on each training image's caption (the public code made
them with ClipCap, the paper with BLIP-2). This tool makes them with an image-to-text model that transformers loads
with `AutoProcessor` + `AutoModelForImageTextToText` (BLIP, BLIP-2, GIT, ...), greedy decoding:

    python -m d2i_jax.captions --images DIR --model Salesforce/blip2-opt-2.7b [--out DIR] [--batch_size 8]
        [--max_new_tokens 30] [--prompt TEXT] [--dtype float16] [--dataset nyu|nyud_mt|pascal_context]

Where the captions go:
- a plain folder of images (`*.png`, `*.jpg`, `*.jpeg`): `caption/<stem>.txt` in a folder beside it (`root/img/` ->
  `root/caption/`, the `CaptionedImages` layout of the prior stage's pool), or `<--out>/<stem>.txt`.
- `--dataset nyu`, the Bae / public-code NYUv2 root: `<split>/caption/<stem>.txt` beside each `<split>/img/` image
  (`NyuRecord.sibling`, what `NyuNormals` reads), for the splits train and test.
- `--dataset nyud_mt` / `pascal_context`, the dataset root: `caption/<id>.txt` (`IdListSource._caption_path`, what
  `NyudMT` / `PascalContext` read), for the splits train and val.
Folders may be `gs://` URLs (read and written through etils.epath). A split that cannot be listed (e.g. its split file
is missing) is named and left out. ADE20K and the Marigold depth layouts are not offered: their readers read no
caption files (every example gets `data.fallback_caption`).

A caption file that exists is kept, so a rerun captions only what is missing (and loads no model when nothing is);
each file is written atomically. An unreadable image is named on one line and skipped, and the closing summary lists
it. With `--prompt` the model continues that text, and the prompt is cut from the caption where the model echoes it
(BLIP and decoder-only BLIP-2 do). The model runs on CUDA when torch sees a GPU, else on the CPU. Exit status 1 when
no image has a caption at the end, or for a user error (a missing folder, an unknown dataset, a model that cannot be
loaded): one line naming it, `--traceback` for the trace.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

import torch
import transformers
from etils import epath
from PIL import Image, ImageOps
from tqdm import tqdm

from d2i_jax.data import keys
from d2i_jax.data.atomic import write_atomically
from d2i_jax.data.files import IMAGE_SUFFIXES, DatasetFileError, as_path, is_url, readable
from d2i_jax.data.id_list import IdListSource
from d2i_jax.data.nyu import list_examples
from d2i_jax.data.nyud_mt import NyudMT
from d2i_jax.data.pascal_context import PascalContext

USER_ERRORS = (OSError, ValueError)  # missing / unreadable files and folders, bad values: one line (as `main.py`)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Pairs = list[tuple[epath.Path, epath.Path]]  # (an image, its caption file)


# ------------------------------------------------------------------------------------------ the model


class Captioner:
    """A transformers image-to-text model as `captioner(images) -> captions`: one `generate` call per batch, greedy
    decoding of at most `max_new_tokens` tokens, special tokens and an echoed `prompt` removed, stripped."""

    def __init__(self, model: transformers.PreTrainedModel, processor: transformers.ProcessorMixin, *,
                 prompt: str = "", max_new_tokens: int = 30):
        self.model, self.processor, self.prompt, self.max_new_tokens = model.eval(), processor, prompt, max_new_tokens
        tokenizer = processor.tokenizer  # the prompt as the decoded output spells it (lower-cased by BLIP's, ...)
        self.echo = tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True).strip() if prompt else ""

    @classmethod
    def load(cls, name: str, *, dtype: str | None = None, prompt: str = "", max_new_tokens: int = 30) -> Captioner:
        """The model `name` (a Hugging Face id or a local folder) in `dtype` (a `DTYPES` name; None: transformers'
        default), on CUDA when torch sees a GPU, else on the CPU. Failing to load it is a `ValueError` naming it."""
        try:
            processor = transformers.AutoProcessor.from_pretrained(name)
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                name, **({"dtype": DTYPES[dtype]} if dtype else {}))
        except (OSError, ValueError, ImportError) as e:
            reason = next(iter(str(e).strip().splitlines()), type(e).__name__)
            raise ValueError(f"cannot load captioning model {name!r} (transformers AutoProcessor + "
                             f"AutoModelForImageTextToText): {reason}") from e
        if not hasattr(processor, "tokenizer"):  # e.g. an image processor alone: nothing to decode captions with
            raise ValueError(f"cannot caption with {name!r}: its AutoProcessor is a {type(processor).__name__}, "
                             "without a tokenizer")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device), processor, prompt=prompt, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=list(images), text=text, return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # dtype: the floating inputs (pixels) only
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [t.strip().removeprefix(self.echo).strip() for t in texts]


# ------------------------------------------------------------------------------------------ captioning files


def read_image(path: epath.Path) -> Image.Image:
    """An image file as upright RGB (EXIF orientation applied, as viewers show it); errors name the file."""
    try:
        with Image.open(readable(path)) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL's decoders raise
        raise DatasetFileError(f"cannot read image {path}: {e}", path) from e


@dataclasses.dataclass
class Report:
    """What `caption_images` did: the caption files written, how many existed already (kept), and (image, message)
    of each unreadable image skipped."""

    written: list[epath.Path] = dataclasses.field(default_factory=list)
    existing: int = 0
    failed: list[tuple[epath.Path, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        line = f"[captions] {len(self.written)} written, {self.existing} existed already"
        if self.failed:
            line += f", {len(self.failed)} unreadable images skipped: " + ", ".join(str(p) for p, _ in self.failed)
        return line if self.written or self.failed else f"{line} (nothing to do)"


def caption_images(images: Sequence[epath.Path], outputs: Sequence[epath.Path],
                   captioner: Callable[[list[Image.Image]], list[str]], *, batch_size: int = 8,
                   progress: bool = True) -> Report:
    """Captions each `images[i]` into the UTF-8 file `outputs[i]` (folders made as needed), `batch_size` images a
    `captioner` call. An output that exists is kept (a rerun resumes); each is written atomically; an unreadable
    image is named on one line and skipped. Prints the report's summary and returns the report."""
    if len(images) != len(outputs):
        raise ValueError(f"{len(images)} images but {len(outputs)} caption files")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    shared = [o for o, n in collections.Counter(outputs).items() if n > 1]
    if shared:
        clash = [str(i) for i, o in zip(images, outputs, strict=True) if o == shared[0]]
        raise ValueError(f"images {', '.join(clash)} would share the caption file {shared[0]}")
    todo = [(i, o) for i, o in zip(images, outputs, strict=True) if not o.exists()]
    report = Report(existing=len(images) - len(todo))
    with tqdm(total=len(todo), desc="captions", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            pixels, targets = [], []
            for image, output in batch:
                try:
                    pixels.append(read_image(image))
                except DatasetFileError as e:
                    report.failed.append((image, str(e)))
                    tqdm.write(f"[captions] skipped: {e}", file=sys.stderr)
                    continue
                targets.append(output)
            if pixels:
                for output, caption in zip(targets, captioner(pixels), strict=True):
                    output.parent.mkdir(parents=True, exist_ok=True)
                    write_atomically(output, caption.encode("utf-8"))
                    report.written.append(output)
            bar.update(len(batch))
    print(report.summary())
    return report


# ------------------------------------------------------------------------------------------ layouts


def folder_files(folder: epath.Path, out: epath.Path | None = None) -> Pairs:
    """The images (`IMAGE_SUFFIXES`, any case) of `folder`, sorted, not recursive, each with `<out>/<stem>.txt`;
    `out` defaults to `caption/` beside `folder` (the `CaptionedImages` layout: `root/img/` -> `root/caption/`)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    # abspath: `.` and `..` have a folder beside them
    out = out or (folder if is_url(folder) else as_path(os.path.abspath(folder))).parent / "caption"
    return [(p, out / f"{p.stem}.txt") for p in images]


def _nyu(root: epath.Path, split: str) -> Pairs:
    return [(r.image, r.sibling("caption", ".txt")) for r in list_examples(root, split)]


def _id_list(source: IdListSource) -> Pairs:
    return [(files[keys.IMAGE], source._caption_path(i)) for i, files in enumerate(source.files)]


# `--dataset` (a `config.data.name`) -> (its splits, (root, split) -> the split's images with the caption files its
# reader reads); the multi-task readers are built without labels, so only the images need to exist
LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[epath.Path, str], Pairs]]] = {
    "nyu": (("train", "test"), _nyu),
    "nyud_mt": (("train", "val"), lambda root, split: _id_list(NyudMT(root, split, label_keys=()))),
    "pascal_context": (("train", "val"), lambda root, split: _id_list(PascalContext(root, split, label_keys=()))),
}


def dataset_files(root: epath.Path, name: str) -> Pairs:
    """Every image of every split of dataset `name` (a `LAYOUTS` key) at `root`, each with the caption file its
    reader reads; a split that cannot be listed is named on one line and left out, none at all is an error."""
    if name not in LAYOUTS:
        raise ValueError(f"--dataset {name!r}: choose from {', '.join(LAYOUTS)}, the readers that read caption files "
                         "(ade20k and the Marigold depth readers give every example data.fallback_caption)")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    splits, listing = LAYOUTS[name]
    pairs: dict[tuple[epath.Path, epath.Path], None] = {}  # ordered, an image listed by two splits once
    for split in splits:
        try:
            found = listing(root, split)
        except FileNotFoundError as e:
            print(f"[captions] {name} split {split!r} left out: {e}")
            continue
        print(f"[captions] {name} split {split!r}: {len(found)} images")
        pairs.update(dict.fromkeys(found))
    if not pairs:
        raise FileNotFoundError(f"no images of the {name} splits {', '.join(splits)} under {root}")
    return list(pairs)


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d2i_jax.captions", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=as_path, required=True, help="A folder of images, or with --dataset its root.")
    p.add_argument("--model", required=True, help="Hugging Face id or local folder of an image-to-text model.")
    p.add_argument("--dataset", help=f"The dataset layout at --images (config.data.name): {', '.join(LAYOUTS)}.")
    p.add_argument("--out", type=as_path, help="Caption folder for a plain image folder (default: caption/ beside it).")
    p.add_argument("--batch_size", type=int, default=8, help="Images per generate call.")
    p.add_argument("--max_new_tokens", type=int, default=30, help="Longest caption, in tokens.")
    p.add_argument("--prompt", default="", help="Text the model continues (e.g. 'a photography of').")
    p.add_argument("--dtype", choices=list(DTYPES), help="The model's dtype (default: transformers').")
    p.add_argument("--traceback", action="store_true", help="Show the full traceback of errors, not one line.")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The command line's work; returns the exit status: 1 when no image has a caption at the end, else 0."""
    if args.dataset and args.out:
        raise ValueError("--out is for a plain image folder; with --dataset the captions go where its reader reads")
    pairs = dataset_files(args.images, args.dataset) if args.dataset else folder_files(args.images, args.out)
    images, outputs = [i for i, _ in pairs], [o for _, o in pairs]
    print(f"[captions] {len(images)} images; captions under {args.images if args.dataset else outputs[0].parent}")
    if all(o.exists() for o in outputs):
        report = Report(existing=len(outputs))  # no model to load
        print(report.summary())
    else:
        captioner = Captioner.load(args.model, dtype=args.dtype, prompt=args.prompt,
                                   max_new_tokens=args.max_new_tokens)
        report = caption_images(images, outputs, captioner, batch_size=args.batch_size)
    return 0 if report.written or report.existing else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m d2i_jax.captions ...` (module docstring); returns the exit status."""
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.traceback:
            raise
        print(f"error: {type(e).__name__}: {e}\n(rerun with --traceback for the full trace)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
