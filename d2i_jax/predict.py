"""Predict on your own photos with any trained run of this project.

    python -m d2i_jax.predict --model /tmp/d2i_demo --images photos/ --out predictions/ [--processing_res 512]
        [--resize auto|aspect|stretch] [--batch_size 8] [--stage self_improve|warmup] [--sd_path DIR]

From Python:

    predictor = Predictor.load("/tmp/d2i_demo")           # the run's latest trained model (theta_C, else theta_W)
    normals = predictor(["a.jpg", pil_image, uint8_array])  # float32 [H, W, C] each, at each input's size

`--model`, `--images` and `--out` may be `gs://` URLs (a run trained in a bucket, photos and predictions there).
The model is the run's own (`workdir/config.json` + `workdir/<stage>/model`, built by `d2i_jax.runner.Run`):
`stage` None takes `self_improve` (theta_C) when it has saved a model, else `warmup` (theta_W, or `config.init_from`).

How an image is resized for the model (`resize`):
- "aspect": Marigold's `processing_res` (prs-eth/Marigold `resize_max_res`, `match_input_res`), steps 1-4 below.
- "stretch": step 1 replaced by what the run's training loader and its evaluate stage ("whole" inference) do: the
  image resized to `data.image_size`, its aspect ratio not kept (then no padding; `processing_res` unused).
- "auto" (default): "aspect" when `processing_res` is given or the run evaluates by sliding windows
  (`evaluate.inference="slide"`, trained on aspect-keeping crops); else "stretch", as the run itself predicts its
  test images. A model trained on images stretched to a square (the public NYUv2 setting, 480 x 640 -> 512 x 512;
  the demos' 96 x 128 rooms -> 128 x 128) does much better so, measured on the demos' test rooms: segmentation mIoU
  0.307 "stretch" / 0.264 "aspect" (the evaluate stage: 0.314), depth abs_rel 0.196 / 0.296 (0.203).

Steps:
1. resized, keeping its aspect ratio, so that its longer side is `processing_res` (the shorter one
   `int(side * processing_res / longer)`; smaller images are enlarged; 0 keeps the native size). Default: the
   longer side of the run's training `data.image_size`. Bilinear, antialiased when shrinking (Marigold: torchvision
   bilinear with `antialias=True`; here PIL's float bilinear, the weights of `jax.image.resize(..., antialias=True)`
   to ~1e-5), in float, before the [-1, 1] scaling.
2. padded on the bottom and right by reflection to the next multiple of `multiple` = the VAE's x the UNet's
   downsampling (64 for SD1.5), which the UNet needs; padding rather than rounding the size keeps the aspect ratio
   and every pixel, and reflection gives the padded border image-like content rather than a hard edge. Images whose
   padded sizes agree are batched together, so a folder compiles the model for a few shapes only (with
   `processing_res` > 0: at most 2 x processing_res / multiple).
3. predicted with `Steps.predict` (eval mode) and the run's seed key, each image as if alone in its batch (`vmap`
   over the batch), so a prediction depends on the image only, not on the images it is batched with; the padding
   cropped off.
4. resized back to the input size (bilinear, antialiased when shrinking, as step 1; Marigold's `match_input_res`),
   then the task's per-pixel finish: its `resize_prediction` at identity size under the "exact" protocol (normals:
   renormalised to unit length). Runs on the host: nothing compiles per input size.

Predictions are the task's format (`d2i_jax.tasks`), float32 `[H, W, C]`: normals `[H, W, 4]` (unit normal, then the
concentration kappa, higher = more certain); depth `[H, W, 1]` in metres; segmentation `[H, W, num_classes]` class
logits (argmax for the class ids; large at full resolution with many classes: 150 x 4 bytes per pixel).

Photos are read upright (`PIL.ImageOps.exif_transpose`, as image viewers show them), in any PIL mode (as RGB).
The CLI writes `<name>.npy` (the prediction), `<name>_<picture>.png` for each of the task's pictures (e.g.
`_normal`, `_uncertainty`; `_depth`; `_segmentation`, `_confidence`) and `legend.png`; a file that cannot be read is
named on one line and skipped, the rest still written, and a summary ends the run. The exit status is 1 only when
nothing could be predicted (or for a user error: one line naming it, `--traceback` for the trace). One process;
the batch is split over all its local devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image, ImageOps
from tqdm import tqdm

from configs import nyu
from d2i_jax.data import keys
from d2i_jax.data.atomic import write_npy_atomically, write_png_atomically
from d2i_jax.data.files import IMAGE_MODES, DatasetFileError, PathLike, as_path, load_image, missing, readable
from d2i_jax.runner import Run
from d2i_jax.training.inference import sharded_call
from d2i_jax.training.steps import Steps

STAGES = ("self_improve", "warmup")  # the stages that save a model (theta_C, theta_W), latest first
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # read from a folder
PHOTO_MODES = (*IMAGE_MODES, "LA", "CMYK", "YCbCr")  # PIL modes read as RGB
FINISH_CHUNK = 1 << 20  # pixels per call of the task's per-pixel finish (bounds its device memory)
RESIZES = ("auto", "aspect", "stretch")  # see the module docstring
PREDICT_MESH = {"data": -1, "fsdp": 1}  # every local device takes a share of the batch, weights replicated
USER_ERRORS = (OSError, ValueError)  # missing / unreadable files, bad values: one line (as `d2i_jax.main`)

Item = np.ndarray | Image.Image | str | os.PathLike


def find_run(path: PathLike, stage: str | None = None) -> tuple[epath.Path, str | None]:
    """(the run's workdir, the stage) of a workdir (its `config.json`), a stage folder `<workdir>/<stage>` or its
    `model/`; a stage named by the path must agree with `stage`."""
    p = as_path(path)
    if (p / "config.json").is_file():
        return p, stage
    workdir, named = (p.parent.parent, p.parent.name) if p.name == "model" else (p.parent, p.name)
    if named in STAGES and (workdir / "config.json").is_file():
        if stage is not None and stage != named:
            raise ValueError(f"{p} is the {named!r} model, but stage={stage!r} was asked for")
        return workdir, named
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    raise FileNotFoundError(f"{p} is neither a run's workdir (no config.json) nor one of its stage folders "
                            f"(<workdir>/<stage>[/model], stage one of {STAGES})")


def load_config(workdir: PathLike) -> ml_collections.ConfigDict:
    """The config a run saved (`workdir/config.json`, written by `d2i_jax.runner.run`). Keys the project gained after
    the run was saved take their defaults from `configs/nyu.py`, which every config extends (new keys default to the
    old behaviour); `task` is the run's own as saved, its fields being the task's."""
    path = as_path(workdir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFileError(f"cannot read the run's config {path}: {e}", path) from e
    base = nyu.get_config().to_dict()
    del base["task"]
    return ml_collections.ConfigDict(_with_defaults(saved, base))


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the keys it lacks taken from `defaults`, recursively."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def processed_size(size: tuple[int, int], processing_res: int) -> tuple[int, int]:
    """Marigold's `resize_max_res`: (H, W) with the longer side `processing_res` and the aspect ratio kept (the
    other side truncated, at least 1); `processing_res` 0: `size` itself."""
    h, w = size
    if not processing_res:
        return h, w
    long = max(h, w)
    return (processing_res, max(1, w * processing_res // long)) if h >= w else \
        (max(1, h * processing_res // long), processing_res)


def resolve_resize(resize: str, config: ml_collections.ConfigDict, processing_res: int | None) -> str:
    """"aspect" or "stretch" (module docstring): "auto" is "aspect" when `processing_res` is given or the run
    evaluates by sliding windows, else "stretch"; "stretch" with a `processing_res` is an error."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    if resize == "auto":
        return "aspect" if processing_res is not None or config.evaluate.inference == "slide" else "stretch"
    if resize == "stretch" and processing_res is not None:
        raise ValueError("processing_res sets the aspect-keeping resize; resize='stretch' resizes to the run's "
                         "data.image_size")
    return resize


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """`size` rounded up to multiples of `multiple` (what the model is compiled for)."""
    return tuple(-(-s // multiple) * multiple for s in size)


def resize_float(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[H, W, C]` float32 to `size`: bilinear, antialiased when shrinking (PIL's float filter: the weights of
    `jax.image.resize(..., "bilinear", antialias=True)`); a no-op at the same size."""
    x = np.asarray(x, np.float32)
    if x.shape[:2] == tuple(size):
        return x
    channels = [Image.fromarray(np.ascontiguousarray(x[..., c]), "F").resize((size[1], size[0]),
                                                                             Image.Resampling.BILINEAR)
                for c in range(x.shape[-1])]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


# ------------------------------------------------------------------------------------------ inputs


def describe(item: Item, index: int) -> str:
    """How errors name an input: its path, else its position."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"


def _file_size(path: epath.Path) -> tuple[int, int]:
    """(H, W) of an image file as `read_rgb` gives it (EXIF orientation applied), from its header only."""
    if not path.is_file():
        raise missing(path, "image")
    try:
        with Image.open(readable(path)) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetFileError(f"cannot decode image file {path}: {e}", path) from e
    return (w, h) if turned else (h, w)


def _array_rgb(array: np.ndarray, index: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"image {index}: expected a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    if array.ndim == 2:
        array = array[..., None]
    return np.repeat(array, 3, -1) if array.shape[-1] == 1 else array[..., :3]


def input_size(item: Item, index: int = 0) -> tuple[int, int]:
    """(H, W) of an input without decoding a file's pixels."""
    if isinstance(item, (str, os.PathLike)):
        return _file_size(as_path(item))
    if isinstance(item, Image.Image):
        return read_rgb(item, index).shape[:2]
    return _array_rgb(np.asarray(item), index).shape[:2]


def read_rgb(item: Item, index: int = 0) -> np.ndarray:
    """An input as uint8 `[H, W, 3]`: a file (upright by its EXIF orientation), a PIL image, or a uint8 array
    (`[H, W]`, `[H, W, 1]` and `[H, W, 4]` too: grey repeated, alpha dropped). Errors name the file / position."""
    if isinstance(item, np.ndarray):
        return _array_rgb(item, index)
    im = load_image(as_path(item), "image", PHOTO_MODES) if isinstance(item, (str, os.PathLike)) else item
    try:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as e:
        raise DatasetFileError(f"cannot convert {describe(item, index)} to RGB: {e}", describe(item, index)) from e


# ------------------------------------------------------------------------------------------ the predictor


class Predictor:
    """A trained run's model as `predictor(images) -> predictions` at each input's size (see the module docstring).

    Attributes:
      run: the run (`d2i_jax.runner.Run`): config, task, SD, perceiver.
      stage: whose model this is (`self_improve`: theta_C; `warmup`: theta_W).
      processing_res: the longer side each image is processed at (0: its native size).
      resize: "aspect" (Marigold's: `processing_res`, aspect ratio kept, padded) or "stretch" (to the run's
        `data.image_size`, as its training and evaluation); "auto" is resolved to one of them (`resolve_resize`).
      batch_size: images per model call.
      multiple: the processed sides are padded to multiples of this (VAE x UNet downsampling).
      compiled_sizes: the padded (H, W) the model has been called at so far (one compile each).
    """

    def __init__(self, run: Run, stage: str, *, processing_res: int | None = None, resize: str = "auto",
                 batch_size: int | None = None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.resize = resolve_resize(resize, run.config, processing_res)
        self.run, self.stage, self.task = run, stage, run.task
        config = run.config
        self.processing_res = max(config.data.image_size) if processing_res is None else int(processing_res)
        if self.processing_res < 0:
            raise ValueError(f"processing_res must be >= 0 (0: native size), got {processing_res}")
        self.batch_size = int(batch_size or config.evaluate.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.multiple = run.sd.vae.downsample_factor * run.sd.unet.downsample_factor
        self.models = run.shard({"model": run.load_model(stage)})
        self.rng = jax.random.key(config.seed)
        self.compiled_sizes: set[tuple[int, int]] = set()
        steps = Steps(run.perceiver, self.task, None)

        @jax.jit
        def predict(models: Any, frozen: Any, rng: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
            def one(image: jax.Array, context: jax.Array) -> jax.Array:  # as a batch of one: no batch-mates' noise
                return steps.predict(models, frozen, image[None], context[None], rng)["model"][0]

            return jax.vmap(one)(batch[keys.IMAGE], batch["context"])

        self._predict = predict
        self._finish = jax.jit(self.task.resize_prediction, static_argnums=(1, 2))

    @classmethod
    def load(cls, path: PathLike, stage: str | None = None, *, processing_res: int | None = None,
             resize: str = "auto", batch_size: int | None = None, sd_path: PathLike | None = None) -> Predictor:
        """The model of a run: `path` its workdir (stage None: `self_improve` if it saved a model, else `warmup`)
        or a stage folder (`<workdir>/<stage>[/model]`). `sd_path` replaces the run's `config.sd_path` (the SD
        checkpoint moved); `batch_size` defaults to the run's `evaluate.batch_size`."""
        workdir, stage = find_run(path, stage)
        config = load_config(workdir)
        config.mesh = PREDICT_MESH
        if sd_path is not None:
            config.sd_path = str(sd_path)
        run = Run(config, workdir)
        if stage is None:
            stage = next((s for s in STAGES if run.model_dir(s).exists()), None)
            if stage is None:
                raise FileNotFoundError(f"{workdir} has no trained model: none of "
                                        f"{[str(run.model_dir(s)) for s in STAGES]} exists")
        return cls(run, stage, processing_res=processing_res, resize=resize, batch_size=batch_size)

    def processed_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) an input of `size` is predicted at, before padding."""
        if self.resize == "stretch":
            return tuple(self.run.config.data.image_size)
        return processed_size(size, self.processing_res)

    def __call__(self, images: Sequence[Item], *, progress: bool = False) -> list[np.ndarray]:
        """Predictions (float32 `[H, W, C]`, the task's format) of `images` (files, PIL images, uint8 arrays; any
        sizes), in order, each at its input's size. An unreadable input raises an `OSError` / `ValueError` naming
        it."""
        out: list[np.ndarray | None] = [None] * len(images)
        for index, result in self.stream(images, progress=progress):
            if isinstance(result, Exception):
                raise result
            out[index] = result
        return out

    def stream(self, images: Sequence[Item], *, progress: bool = False
               ) -> Iterator[tuple[int, np.ndarray | Exception]]:
        """(index, prediction) of every input as its batch finishes, or (index, the error) of an input that cannot
        be read; batches are images of one padded size, in order of first appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        errors: list[tuple[int, Exception]] = []
        for index, item in enumerate(images):
            try:
                size = padded_size(self.processed_size(input_size(item, index)), self.multiple)
            except (OSError, ValueError) as e:
                errors.append((index, e))
                continue
            groups.setdefault(size, []).append(index)
        with tqdm(total=len(images), desc="predict", unit="image", disable=not progress) as bar:
            for index, error in errors:
                bar.update()
                yield index, error
            for size, group in groups.items():
                for start in range(0, len(group), self.batch_size):
                    batch = group[start:start + self.batch_size]
                    yield from self._predict_batch(images, batch, size)
                    bar.update(len(batch))

    def _predict_batch(self, images: Sequence[Item], indices: list[int], padded: tuple[int, int]
                       ) -> Iterator[tuple[int, np.ndarray | Exception]]:
        """Reads, resizes and pads the inputs `indices` (of the padded size `padded`), predicts, crops and resizes
        back."""
        pixels, sizes, read = [], [], []
        for index in indices:
            try:
                rgb = read_rgb(images[index], index)
            except (OSError, ValueError) as e:
                yield index, e
                continue
            size = self.processed_size(rgb.shape[:2])
            if padded_size(size, self.multiple) != padded:  # its header told another size than its pixels
                yield index, DatasetFileError(f"{describe(images[index], index)}: its decoded size {rgb.shape[:2]} "
                                              "differs from the size its header gave", describe(images[index], index))
                continue
            small = resize_float(rgb, size) / np.float32(127.5) - 1
            pixels.append(np.pad(small, ((0, padded[0] - size[0]), (0, padded[1] - size[1]), (0, 0)),
                                 mode="reflect"))
            sizes.append((rgb.shape[:2], size))
            read.append(index)
        if not read:
            return
        batch = {keys.IMAGE: np.stack(pixels), "context": self.run.contexts([""] * len(read))}
        self.compiled_sizes.add(padded)
        preds = sharded_call(self._predict, (self.models, self.run.frozen, self.rng), batch, self.run.mesh,
                             rows=self.batch_size)
        for index, pred, (native, size) in zip(read, preds, sizes, strict=True):
            yield index, self.to_input_size(np.asarray(pred[:size[0], :size[1]], np.float32), native)

    def to_input_size(self, prediction: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A `[h, w, C]` prediction at `size` (H, W): `resize_float`, then the task's per-pixel finish (its
        `resize_prediction` at identity size, "exact" protocol, on rows of at most `FINISH_CHUNK` pixels)."""
        if prediction.shape[:2] == tuple(size):
            return prediction
        resized = resize_float(prediction, size)
        flat = resized.reshape(-1, resized.shape[-1])
        n = len(flat)
        chunk = min(FINISH_CHUNK, 1 << (n - 1).bit_length())  # powers of two: few compiled shapes
        padded = np.concatenate([flat, np.repeat(flat[-1:], -n % chunk, 0)])
        finished = [np.asarray(self._finish(padded[i:i + chunk][None, None], (1, chunk), "exact"))[0, 0]
                    for i in range(0, len(padded), chunk)]
        return np.concatenate(finished)[:n].reshape(resized.shape).astype(np.float32)


# ------------------------------------------------------------------------------------------ command line


@dataclasses.dataclass
class Report:
    """What `predict_files` did: the output names written, and (input, message) of each input skipped."""

    written: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def list_images(paths: Sequence[PathLike]) -> list[epath.Path]:
    """Files given, and the image files (`PHOTO_SUFFIXES`, any case) of folders given, sorted, not recursive. A
    path that does not exist is kept (reported as unreadable later); a folder without images is an error."""
    out = []
    for p in map(as_path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(PHOTO_SUFFIXES)}) in folder {p}")
            out += found
        else:
            out.append(p)
    return out


def output_names(files: Sequence[epath.Path]) -> list[str]:
    """A distinct output name per input: its stem, then `<stem>_2`, `<stem>_3`, ... where stems repeat."""
    names, taken = [], set()
    for f in files:
        name, k = f.stem, 1
        while name in taken:
            k += 1
            name = f"{f.stem}_{k}"
        taken.add(name)
        names.append(name)
    return names


def predict_files(predictor: Predictor, paths: Sequence[PathLike], out: PathLike, *,
                  progress: bool = True) -> Report:
    """Predicts the image files / folders `paths` into `out`: `<name>.npy`, `<name>_<picture>.png`, `legend.png`.
    Each unreadable input is named on one line and skipped; a summary line ends it."""
    files = list_images(paths)
    names = output_names(files)
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    task, report = predictor.task, Report()
    legend = task.legend()
    if legend is not None:
        write_png_atomically(out / "legend.png", np.asarray(legend, np.uint8))
    for index, result in predictor.stream(files, progress=progress):
        if isinstance(result, Exception):
            report.failed.append((str(files[index]), str(result)))
            named = str(files[index]) in str(result)  # the error names the file (`d2i_jax.data.files`' do)
            tqdm.write(f"[predict] skipped{'' if named else ' ' + str(files[index])}: {result}", file=sys.stderr)
            continue
        write_npy_atomically(out / f"{names[index]}.npy", result)
        for picture, pixels in task.pictures(result).items():
            write_png_atomically(out / f"{names[index]}_{picture}.png", pixels)
        report.written.append(names[index])
    summary = f"[predict] {len(report.written)} of {len(files)} images predicted into {out}"
    if report.failed:
        summary += f"; {len(report.failed)} skipped: " + ", ".join(path for path, _ in report.failed)
    print(summary)
    return report


def cli(model: str, images: Sequence[str], out: str, *, processing_res: int | None = None,
        resize: str = "auto", batch_size: int | None = None, stage: str | None = None, sd_path: str | None = None,
        progress: bool = True) -> int:
    """The command line's work; returns the exit status: 1 when nothing could be predicted, else 0."""
    logging.getLogger().setLevel(logging.WARNING)  # as `d2i_jax.runner.run`: no checkpoint-library chatter
    predictor = Predictor.load(model, stage, processing_res=processing_res, resize=resize, batch_size=batch_size,
                               sd_path=sd_path)
    how = (f"stretched to {tuple(predictor.run.config.data.image_size)}" if predictor.resize == "stretch" else
           f"processing_res {predictor.processing_res}, sides padded to multiples of {predictor.multiple}")
    print(f"[predict] {predictor.stage} model of {predictor.run.workdir} ({predictor.task.name}), {how}")
    return 0 if predict_files(predictor, images, out, progress=progress).written else 1


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    try:
        status = cli(f.model, [*f.images, *argv[1:]], f.out, processing_res=f.processing_res, resize=f.resize,
                     batch_size=f.batch_size, stage=f.stage, sd_path=f.sd_path)
    except USER_ERRORS as e:
        if f.traceback:
            raise
        print(f"error: {type(e).__name__}: {e}\n(rerun with --traceback for the full trace)", file=sys.stderr)
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":  # flags defined here only: importing the module must not clash with main.py's
    from absl import app, flags

    flags.DEFINE_string("model", None, "A run's workdir (its latest trained model) or a stage folder of it.")
    flags.DEFINE_multi_string("images", None, "Image files or folders of them; more may follow as arguments.")
    flags.DEFINE_string("out", None, "Where the .npy predictions and PNG pictures go.")
    flags.DEFINE_integer("processing_res", None, "Longer side the images are processed at (0: native size; "
                         "default: the run's training image size).")
    flags.DEFINE_enum("resize", "auto", list(RESIZES), "aspect: Marigold's processing_res (aspect ratio kept, "
                      "padded); stretch: to the run's data.image_size, as its training and evaluate stage; auto: "
                      "aspect if --processing_res is given or the run evaluates by sliding windows, else stretch.")
    flags.DEFINE_integer("batch_size", None, "Images per model call (default: the run's evaluate.batch_size).")
    flags.DEFINE_enum("stage", None, list(STAGES), "Whose model (default: self_improve if it saved one, else warmup).")
    flags.DEFINE_string("sd_path", None, "Replaces the run's config.sd_path (the SD checkpoint moved).")
    flags.DEFINE_bool("traceback", False, "Show the full Python traceback of errors instead of one line.")
    flags.mark_flags_as_required(["model", "images", "out"])
    app.run(_main)
