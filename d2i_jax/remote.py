"""Weights on an object store (`gs://...`), copied once to a local cache: safetensors, orbax restores of converted
weights and the tokenizer read local files, and on a pod each host then reads its own disk.

The cache folder is named by the URL and by the listing of what is under it (names, sizes, modification times), so
a changed checkpoint gets a fresh copy; a copy is written under a temporary name and renamed when complete, so a
killed download is never taken for a checkpoint. `D2I_CACHE` sets the cache root (default `~/.cache/d2i_jax`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from etils import epath
from tqdm import tqdm

from d2i_jax.data.files import is_url
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
    files = _files(remote)
    local = cache_root() / f"{digest(str(path), files=files)[:16]}-{remote.name}"  # the files' sizes and times
    if local.exists():
        return local
    partial = local.with_name(local.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    else:
        partial.unlink(missing_ok=True)
    for p in tqdm(files, desc=f"copying {what} to {local.parent}", unit="file", disable=len(files) < 2):
        target = partial if p == remote else partial / str(p)[len(str(remote)):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    partial.rename(local)
    return local


def _files(remote: epath.Path) -> list[epath.Path]:
    """The files of a remote folder (or the remote file itself), by full URL, sorted (gcsfs's walk yields folders
    without the `gs://` scheme, so each is rebuilt from its part below `remote`)."""
    if not remote.is_dir():
        return [remote]
    base = str(remote).split("://", 1)[-1].rstrip("/")
    files = []
    for folder, _, names in remote.walk():
        below = str(folder).split("://", 1)[-1][len(base):].strip("/")
        files += [(remote / below if below else remote) / name for name in names]
    return sorted(files, key=str)
