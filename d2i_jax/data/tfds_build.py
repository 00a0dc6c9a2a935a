"""Build the TFDS `array_record` datasets a config reads, for `config.data.source = "tfds"` (no TensorFlow needed):

    python -m d2i_jax.data.tfds_build --config configs/nyu.py --out /data/tfds --config.data.root=/data/nyu

then train with `--config.data.source=tfds --config.data.tfds_dir=/data/tfds` (the root is not read any more).
Every dataset the config reads (`config.data`, each `config.data.mix` dataset, `config.evaluate.data`) is built
with the splits the stages read, in `<out>/d2i_jax_data/<name>/1.0.0` (`d2i_jax.data.tfds_builder`). A built dataset
is kept; `--overwrite` builds it again (after changing its files or settings). The procedural scenes
(`data.name = "scenes"`) are rendered into `--workdir` first (a temporary folder by default).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from d2i_jax.data.files import PathLike, is_url
from d2i_jax.data.tfds_builder import D2iJaxData
from d2i_jax.data.tfds_source import content_settings, dataset_dir
from d2i_jax.remote import upload


def _with(data: ml_collections.ConfigDict, overrides: dict, **changes: Any) -> ml_collections.ConfigDict:
    """A copy of `data` updated with `overrides` (merged into sections), then `changes` (set), as the runner does."""
    cfg = data.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.update(overrides)
        for key, value in changes.items():
            cfg[key] = value
    return cfg


def used_datasets(config: ml_collections.ConfigDict) -> dict[str, tuple[ml_collections.ConfigDict, list[str]]]:
    """Each dataset name the config reads -> (its `config.data` section, the splits read), as `d2i_jax.runner` reads
    them: `data.train_split` of `config.data` and of each `data.mix` dataset; `data.test_split` of
    `config.evaluate.data` (`config.data` with its overrides), and of `config.data` when that is evaluated or the
    `prior` stage holds it out. One name read with two different settings is an error."""
    data = config.data
    uses = [(data, data.train_split)]
    for name, entry in (data.get("mix") or {}).items():
        cfg = _with(data, {k: v for k, v in entry.items() if k != "prob"}, name=name, mix=None)
        uses.append((cfg, cfg.train_split))
    overrides = config.evaluate.get("data")
    if overrides:
        evaluated = _with(data, overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides)
        uses.append((evaluated, evaluated.test_split))
    if not overrides or "prior" in config.stages:
        uses.append((data, data.test_split))
    datasets: dict[str, tuple[ml_collections.ConfigDict, list[str]]] = {}
    for cfg, split in uses:
        first, splits = datasets.setdefault(cfg.name, (cfg, []))
        if (content_settings(cfg), cfg.get("root")) != (content_settings(first), first.get("root")):
            raise ValueError(f"the config reads dataset {cfg.name!r} with two different settings (root or reader "
                             "settings of config.data, its mix entry or config.evaluate.data), and a TFDS data dir "
                             "holds one dataset of a name")
        if split not in splits:
            splits.append(split)
    return datasets


def build(config: ml_collections.ConfigDict, out: PathLike, *, workdir: PathLike | None = None,
          overwrite: bool = False) -> dict[str, epath.Path]:
    """Build (or keep) each dataset of `used_datasets(config)` under the TFDS data dir `out`; returns name -> its
    folder. A kept dataset without a split the config reads is an error (rebuild it with `overwrite`). A `gs://`
    `out` is built in a local folder and each dataset uploaded when complete (its `dataset_info.json`, which marks
    it built, last)."""
    built = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, splits) in used_datasets(config).items():
            folder = dataset_dir(out, name)
            if overwrite or not (folder / "dataset_info.json").is_file():
                data_dir = Path(tmp) / "tfds" if is_url(out) else out
                print(f"[tfds] building {name} {splits} from {data.get('root') or workdir or tmp} into {folder}")
                builder = D2iJaxData(data=data, splits=tuple(splits), workdir=workdir or tmp, seed=config.seed,
                                     data_dir=str(data_dir), file_format="array_record")
                mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # writes the dataset afresh
                builder.download_and_prepare(download_dir=str(Path(tmp) / "downloads"),  # none: keep out clean
                                             download_config=tfds.download.DownloadConfig(download_mode=mode))
                if is_url(out):
                    _upload_dataset(dataset_dir(data_dir, name), folder)
            info = json.loads((folder / "dataset_info.json").read_text())
            missing = sorted(set(splits) - {s["name"] for s in info.get("splits", [])})
            if missing:
                raise ValueError(f"TFDS dataset {name!r} in {folder} was built without the splits {missing} the "
                                 "config reads: rebuild it with --overwrite")
            print(f"[tfds] {name}: {folder}")
            built[name] = folder
    return built


def _upload_dataset(local: Path, remote: epath.Path) -> None:
    """A dataset built locally to its remote folder: an earlier build there removed, `dataset_info.json` last."""
    if remote.exists():
        remote.rmtree()
    info = local / "dataset_info.json"
    for path in sorted(local.iterdir()):
        if path != info:
            upload(path, remote / path.name)
    upload(info, remote / info.name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tfds.disable_progress_bar()  # the builder shows one per split, with its length
    build(flags.FLAGS.config, flags.FLAGS.out, workdir=flags.FLAGS.workdir or None, overwrite=flags.FLAGS.overwrite)


def define_flags() -> None:
    """The command line's flags, defined only when run as a program (`d2i_jax.main` has a `--config` of its own and
    `d2i_jax.plugins.available` imports every module of the package)."""
    config_flags.DEFINE_config_file("config", None, "Python config file returning get_config().", lock_config=True)
    flags.DEFINE_string("out", None, "The TFDS data dir to build into, local or gs:// (config.data.tfds_dir when "
                        "reading).")
    flags.DEFINE_string("workdir", "", "Where the procedural scenes are rendered first (default: a temporary folder).")
    flags.DEFINE_bool("overwrite", False, "Build datasets that are already built again.")
    flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
