"""Files on an object store (`gs://...`) for code that only reads or writes local files.

`local_copy`: weights (and a remote workdir's caches and SD folders) copied once to a local cache: safetensors,
the tokenizer and memory maps read local files, and on a pod each host then reads its own disk. `staged`: a local
path that writers needing one (safetensors, `np.memmap`, diffusers) write, uploaded to the object store when done.

The cache folder is named by the URL and by the listing of what is under it (names, sizes, modification times), so
a changed checkpoint gets a fresh copy; a copy is written under a temporary name and renamed when complete, so a
killed download is never taken for a checkpoint, and processes sharing a host may copy at once. `D2I_CACHE` sets
the cache root (default `~/.cache/d2i_jax`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath
from tqdm import tqdm

from d2i_jax.data.files import PathLike, as_path, is_url
from d2i_jax.data.fingerprint import digest


def cache_root() -> Path:
    return Path(os.environ.get("D2I_CACHE", Path.home() / ".cache" / "d2i_jax"))


def local_copy(path: str | os.PathLike, what: str) -> Path:
    """`path` as a local path: itself when it is one, else the cached copy of the remote file or folder (made now
    when missing). `what` names the config value in errors."""
    if not is_url(path):
        return Path(path)
    remote = epath.Path(path)
    if not remote.exists():
        raise FileNotFoundError(f"{what}={path} does not exist")
    files = list_files(remote)
    local = cache_root() / f"{digest(str(path), files=files)[:16]}-{remote.name}"  # the files' sizes and times
    if local.exists():
        return local
    cache_root().mkdir(parents=True, exist_ok=True)
    # a folder per copy: several processes of one host (one per GPU) may copy the same URL at once
    partial = Path(tempfile.mkdtemp(dir=cache_root(), prefix=f"{local.name}.partial-"))
    try:
        staging = partial / remote.name
        for p in tqdm(files, desc=f"copying {what} to {local.parent}", unit="file", disable=len(files) < 2):
            target = staging if p == remote else staging / str(p)[len(str(remote)):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
        try:
            staging.rename(local)
        except OSError:  # another process's copy got there first
            if not local.exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return local


def list_files(folder: PathLike) -> list[epath.Path]:
    """The files under `folder` (or the file itself), local or remote, by full path, sorted (gcsfs's walk yields
    folders without the `gs://` scheme, so each is rebuilt from its part below `folder`; epath refuses `**` globs
    there)."""
    remote = as_path(folder)
    if not remote.is_dir():
        return [remote]
    if not is_url(folder):
        return sorted((p for p in remote.rglob("*") if p.is_file()), key=str)
    base = str(remote).split("://", 1)[-1].rstrip("/")
    files = []
    for folder, _, names in remote.walk():
        below = str(folder).split("://", 1)[-1][len(base):].strip("/")
        files += [(remote / below if below else remote) / name for name in names]
    return sorted(files, key=str)


def upload(local: PathLike, target: PathLike) -> None:
    """Copies the local file or folder tree `local` to `target` (local or remote), replacing files of the same name;
    each file is streamed (checkpoints and caches may be gigabytes) and appears whole (`d2i_jax.data.atomic`)."""
    local = Path(local)
    if not is_url(target):
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)
        return
    files = sorted(local.rglob("*")) if local.is_dir() else [local]
    for path in files:
        if path.is_file():
            dst = as_path(target) / path.relative_to(local).as_posix() if local.is_dir() else as_path(target)
            with path.open("rb") as src, dst.open("wb") as out:
                shutil.copyfileobj(src, out, 16 << 20)


@contextlib.contextmanager
def staged(target: PathLike) -> Iterator[Path]:
    """A local path to write `target` through: `target` itself when it is local; else a fresh path in a temporary
    folder (under the cache root) whose file or folder is uploaded to `target` when the block ends without error."""
    if not is_url(target):
        yield Path(target)
        return
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix="staged-") as tmp:
        local = Path(tmp) / as_path(target).name
        yield local
        upload(local, target)
