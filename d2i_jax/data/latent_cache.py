"""VAE posteriors encoded once per run and read back with every example (`keys.MOMENTS`).

With a frozen VAE and no augmentation, an example feeds the same image to the VAE every epoch, so its posterior
can be computed once: at 512² the VAE encoder costs more FLOPs than the UNet pass, and the public code re-encodes
every step. The latent is still *sampled* from the cached posterior every step (`Backbone.image_features`), so
training sees the same random draws as without the cache.

`encode_moments` encodes every example of a random-access source in global batches on the mesh (every process
takes part) and writes the moments to an `.npy` file per process; `WithMoments` adds them to the source's examples.
In a `gs://` workdir the file is built locally and uploaded, and read through a local copy
(`d2i_jax.remote.local_copy`): a memory map needs a local file.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from d2i_jax.data import keys
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.data.fingerprint import source_fingerprint
from d2i_jax.data.pipeline import RandomAccessSource
from d2i_jax.remote import local_copy, staged
from d2i_jax.training.sharding import global_batch, local_rows, round_up_to_shards

if TYPE_CHECKING:
    from d2i_jax.models.vae import AutoencoderKL

_INDEX = "index"  # example index of a batch row; -1 marks the padding of the last batch


def cache_file(directory: PathLike, name: str) -> epath.Path:
    """`<directory>/<name>.moments.p<process>.npy`: one file per process, so processes sharing a filesystem never
    write the same file."""
    return as_path(directory) / f"{name}.moments.p{jax.process_index()}.npy"


def _meta_file(path: epath.Path) -> epath.Path:
    return path.with_suffix(".json")


def load_moments(path: PathLike) -> np.ndarray:
    """The moments file `encode_moments` wrote, memory-mapped (a remote one through its local copy)."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"no cached VAE moments at {path}; write them with encode_moments")
    return np.load(local_copy(path, "cached VAE moments"), mmap_mode="r")


def _stored_rows(path: epath.Path) -> int:
    """The number of rows of a `.npy` file, from its header (one small read, also on an object store)."""
    with path.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return header(f)[0][0]


def _is_current(path: epath.Path, meta: dict[str, Any]) -> bool:
    """Whether `path` holds moments written for `meta` (the source's content, its length and the caller's
    fingerprint); never for a source whose content is unknown."""
    if meta["content"] is None:
        return False
    try:
        if json.loads(_meta_file(path).read_text()) != meta:
            return False
        return _stored_rows(path) == meta["count"]
    except (OSError, ValueError):
        return False


def encode_moments(
    source: RandomAccessSource,
    vae: AutoencoderKL,
    vae_params: Any,
    mesh: Mesh,
    path: PathLike,
    *,
    batch_size: int,
    fingerprint: str = "",
    desc: str = "VAE cache",
    read_threads: int = 8,
) -> epath.Path:
    """Encodes the image of every example of `source` once and writes the posteriors' moments to `path`.

    Every process must call this with the same source (all processes hold the full result afterwards, each in its
    own file, see `cache_file`). A file written earlier for the same source content (`source.fingerprint()`:
    settings and the sizes and modification times of its files, see `d2i_jax.data.fingerprint`), length and
    `fingerprint` is reused, when it is current on every process; a source without `fingerprint()` is encoded
    again every time.

    Args:
      source: random-access examples with equally sized `keys.IMAGE` in [-1, 1] (e.g. `NyuNormals`,
        `SyntheticImages`, `Flagged`, `Pool`).
      vae: the VAE module; `vae_params` its params (replicated or sharded on `mesh`; they keep their shardings).
      mesh: the device mesh; batches are split over its batch axes.
      path: the `.npy` file to write, local or `gs://` (a `.json` beside it, written last, records what it was
        written for).
      batch_size: global examples per encoder call, rounded up to a multiple of the batch shards; the last batch
        is padded.
      fingerprint: anything else the moments depend on (e.g. the SD checkpoint and dtype); a change re-encodes.
      desc: the progress bar's label.
      read_threads: threads decoding this process's examples of a batch.

    Returns:
      `path`, holding float32 `[len(source), H/8, W/8, 2 * latent_channels]` (`Posterior.moments`).
    """
    path = as_path(path)
    n = len(source)
    meta = {"source": repr(source), "content": source_fingerprint(source), "count": n, "fingerprint": fingerprint}
    if meta["content"] is None:
        print(f"[{desc}] {source!r} has no content fingerprint (d2i_jax.data.fingerprint): encoding it again")
    everywhere = multihost_utils.process_allgather(np.int32(_is_current(path, meta)))
    if np.all(everywhere):
        print(f"[{desc}] reusing {path}")
        return path

    global_size = round_up_to_shards(max(batch_size, 1), mesh)
    rows = np.arange(global_size)[local_rows(mesh, global_size)]
    num_batches = -(-n // global_size)
    encode = jax.jit(lambda params, images: vae.apply({"params": params}, images, method="encode").moments)

    def image(index: int) -> np.ndarray:
        return np.asarray(source[min(index, n - 1)][keys.IMAGE], np.float32)

    def local_batch(pool: ThreadPoolExecutor, b: int) -> dict[str, np.ndarray]:
        # this process's rows of global batch b; the gathered indices say where each row belongs
        index = b * global_size + rows
        images = list(pool.map(image, index.tolist()))
        shapes = {x.shape for x in images}
        if len(shapes) > 1:
            raise ValueError(f"{source!r}: images of different shapes {sorted(shapes)} cannot be encoded in one "
                             "batch; give the source a fixed size")
        return {keys.IMAGE: np.stack(images), _INDEX: np.where(index < n, index, -1).astype(np.int32)}

    path.parent.mkdir(parents=True, exist_ok=True)
    _meta_file(path).unlink(missing_ok=True)  # written last, once the new file is complete
    out, written = None, np.zeros(n, bool)

    def write(pending: tuple[jax.Array, jax.Array]) -> None:
        nonlocal out
        moments, index = multihost_utils.process_allgather(pending, tiled=True)
        keep = index >= 0
        if out is None:
            out = np.lib.format.open_memmap(local.with_name(local.name + ".tmp"), mode="w+", dtype=np.float32,
                                            shape=(n, *moments.shape[1:]))
        out[index[keep]] = moments[keep]
        written[index[keep]] = True
        bar.update(int(keep.sum()))

    bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True, disable=jax.process_index() != 0)
    pending = None
    with staged(path) as local, ThreadPoolExecutor(read_threads) as pool:  # a remote path: uploaded at the end
        for b in range(num_batches):
            batch = global_batch(local_batch(pool, b), mesh)
            encoded = (encode(vae_params, batch[keys.IMAGE]), batch[_INDEX])  # dispatched; runs while we read on
            if pending is not None:
                write(pending)
            pending = encoded
        write(pending)
        bar.close()
        if not written.all():
            raise RuntimeError(f"{desc}: examples {np.flatnonzero(~written)[:10].tolist()} were not encoded")
        out.flush()
        tmp = out.filename
        del out
        os.replace(tmp, local)
    _meta_file(path).write_text(json.dumps(meta))
    return path


class WithMoments:
    """`source` with each example's cached VAE posterior added as `keys.MOMENTS` (see `encode_moments`).

    The file is opened lazily (memory-mapped) by whichever process reads, so grain worker processes receive only
    the path when the source is pickled to them.
    """

    def __init__(self, source: RandomAccessSource, path: PathLike):
        self.source, self.path = source, as_path(path)
        self._moments: np.ndarray | None = None
        moments = self._open()
        if moments.ndim != 4 or moments.shape[0] != len(source):
            raise ValueError(f"cached moments {self.path} have shape {moments.shape}, but {source!r} has "
                             f"{len(source)} examples (expected [{len(source)}, h, w, 2 * latent_channels]); the "
                             "source changed since they were written: delete the file to encode it again")

    def _open(self) -> np.ndarray:
        if self._moments is None:
            self._moments = load_moments(self.path)
        return self._moments

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_moments": None}  # the memory map stays behind; it reopens on first read

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"WithMoments({self.source!r}, path={str(self.path)!r})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], keys.MOMENTS: np.array(self._open()[index])}  # a copy, not a view of the map
