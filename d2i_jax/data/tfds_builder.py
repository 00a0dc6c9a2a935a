"""The TFDS builder of the project's datasets, writing `array_record` files that `d2i_jax.data.tfds_source` reads
without TensorFlow; `python -m d2i_jax.data.tfds_build` runs it for the datasets of a config.

One builder, `D2iJaxData`, with one builder config per `config.data.name`. Its examples are what that dataset's folder
reader (`d2i_jax.data.<name>.make_source`) reads at the size on disk, with every label the reader offers for every
split built: the image as its uint8 RGB (the reader's float image is exactly x / 127.5 - 1 of it), the caption, and
each label as decoded (exact dtype, any H x W). A reader of the NYUv2 layout resizes the encoded normal map, not the
decoded normals, so its PNG pixels are stored instead of normal and mask. The metadata records the build's
`config.data` settings and how the reader resizes, which the source follows and checks.

`tfds build` cannot run it: TFDS's command line imports TensorFlow (4.9.10), and the builder needs the config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from d2i_jax import plugins
from d2i_jax.data import keys
from d2i_jax.data.files import load_image
from d2i_jax.data.nyu import NyuNormals
from d2i_jax.data.pipeline import RandomAccessSource
from d2i_jax.data.tfds_source import BUILDER, NORMAL_MAP, VERSION, content_settings

LABELS = (keys.NORMAL, keys.DEPTH, keys.SEMSEG, keys.PARTS, keys.SALIENCY)  # each tried: stored where offered
STORED_LABELS = (keys.NORMAL, keys.MASK, *LABELS[1:])  # `keys.MASK` comes with `keys.NORMAL`


def stored_example(reader: RandomAccessSource, index: int) -> dict[str, Any]:
    """Example `index` of the folder `reader` (at the size on disk) as stored."""
    ex = reader[index]
    image = np.round((ex[keys.IMAGE] + 1.0) * 127.5).astype(np.uint8)
    if not np.array_equal(image.astype(np.float32) / 127.5 - 1.0, ex[keys.IMAGE]):
        raise ValueError(f"example {index} of {reader!r}: its image is not x / 127.5 - 1 of 8-bit RGB")
    out = {keys.IMAGE: image, keys.CAPTION: ex[keys.CAPTION], **{k: ex[k] for k in STORED_LABELS if k in ex}}
    if isinstance(reader, NyuNormals):  # it resizes the encoded map: store that
        del out[keys.NORMAL], out[keys.MASK]
        out[NORMAL_MAP] = np.asarray(load_image(reader.records[index].normal, "normal", ("RGB",)))
    return out


def feature(value: Any) -> tfds.features.FeatureConnector:
    """The TFDS feature of a stored value: text, or a tensor of its dtype with any height and width, stored as its
    bytes: array_record compresses each record already (zlib on top saved 7 % of 480 x 640 NYUv2-layout data
    and read it 40 % slower)."""
    if isinstance(value, str):
        return tfds.features.Text()
    return tfds.features.Tensor(shape=(None, None, *value.shape[2:]), dtype=value.dtype,
                                encoding=tfds.features.Encoding.BYTES)


class D2iJaxData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The splits `splits` of dataset `data.name` as its folder reader reads them (see the module docstring).

    Args:
      data: the `config.data` section (`name`, `root` and the reader's settings).
      splits: the splits to build.
      workdir: where a dataset that is made rather than read (the procedural scenes) is written first.
      seed: the run's seed (the scenes' seed when `data.scenes.seed` is absent).
      **kwargs: `tfds.core.GeneratorBasedBuilder`'s (`data_dir`, `file_format`).
    """

    name = BUILDER
    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, data: ml_collections.ConfigDict, splits: tuple[str, ...], workdir: str | Path,
                 seed: int = 0, **kwargs: Any):
        self.data, self.splits, self.workdir, self.seed = data, tuple(splits), Path(workdir), seed
        super().__init__(config=tfds.core.BuilderConfig(name=data.name), **kwargs)

    def _reader(self, split: str, label_keys: tuple[str, ...]) -> RandomAccessSource:
        make: Callable[..., RandomAccessSource] = plugins.load("d2i_jax.data", self.data.name, "make_source",
                                                               what="config.data.name")
        return make(self.data, split, size=None, label_keys=label_keys, workdir=self.workdir, seed=self.seed)

    def _offers(self, split: str, key: str) -> bool:
        """Whether the reader reads label `key` of `split` (its first example has it)."""
        try:
            return key in self._reader(split, (key,))[0]
        except (ValueError, FileNotFoundError):  # not one of the reader's labels / not in this copy of the dataset
            return False

    @functools.cached_property
    def readers(self) -> dict[str, RandomAccessSource]:
        """Each split's folder reader, with the labels every split offers."""
        labels = tuple(k for k in LABELS if all(self._offers(split, k) for split in self.splits))
        return {split: self._reader(split, labels) for split in self.splits}

    def _info(self) -> tfds.core.DatasetInfo:
        reader = next(iter(self.readers.values()))
        example = reader[0]
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"config.data.name={self.data.name!r} as its folder reader reads it, at the size on disk",
            features=tfds.features.FeaturesDict({k: feature(v) for k, v in stored_example(reader, 0).items()}),
            metadata=tfds.core.MetadataDict(
                settings=content_settings(self.data),
                labels=[k for k in STORED_LABELS if k in example],
                nyu_layout=isinstance(reader, NyuNormals),
                resize="config" if hasattr(reader, "resize") else "pil",  # ADE20K's reader has no resize setting
            ),
            disable_shuffling=True,  # stored in index order: example i is the reader's example i
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[tuple[int, Any]]]:
        del dl_manager  # nothing to download: the reader reads the files in place
        return {split: self._generate_examples(split) for split in self.readers}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        reader = self.readers[split]
        for index in tqdm(range(len(reader)), desc=f"{self.data.name}/{split}", unit="example"):
            yield index, stored_example(reader, index)
