"""Dataset files in a folder or in an uncompressed tar of it, read alike: Marigold ships and trains from tars
(prs-eth/Marigold `src/dataset/base_depth_dataset.py` reads member "./" + the listed path when `tarfile.is_tarfile`),
GenPercept evaluates from extracted folders. A tar is indexed once (member -> data offset) and members are read with
`os.pread`, so threads share one descriptor and worker processes reopen it after unpickling. Errors name a member as
`archive.tar:member`. A folder or tar on an object store (`gs://...`, through `etils.epath`) works alike: the tar is
indexed by reading its headers through one file object, and members are read by seek + read on a file object per
thread.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import threading
from collections.abc import Sequence
from typing import Any

from etils import epath

from d2i_jax.data.files import DatasetFileError, is_url, not_found


class DataDir:
    """The files of a dataset folder, or of an uncompressed tar of it (members read by offset, thread-safe)."""

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)
        self.is_tar = self.path.is_file()
        self.damage = ""
        if not self.is_tar and not self.path.is_dir():
            raise not_found(f"dataset folder or tar not found: {self.path}", self.path)
        self._members = self._index() if self.is_tar else {}
        self._open()

    def _index(self) -> dict[str, tuple[int, int]]:
        """Member name (without "./") -> (offset of its data, size). A tar cut short keeps the members before the
        cut (the rest are then missing, the one cut through truncated), and `damage` says so."""
        members = {}
        with contextlib.ExitStack() as stack:
            remote = stack.enter_context(self.path.open("rb")) if is_url(self.path) else None
            try:  # "r:": compressed tars have no data offsets to seek to
                tar = tarfile.open(self.path if remote is None else None, "r:", fileobj=remote)
            except (tarfile.TarError, EOFError) as e:
                raise DatasetFileError(
                    f"{self.path} is not an uncompressed tar ({e}); extract it, or make it with `tar -cf`", self.path
                ) from e
            stack.enter_context(tar)
            try:
                for m in tar:
                    if m.isfile():
                        members[m.name.removeprefix("./")] = (m.offset_data, m.size)
            except (tarfile.TarError, EOFError) as e:
                self.damage = f" (the tar is damaged after {len(members)} files: {e})"
        return members

    def _open(self) -> None:
        local_tar = self.is_tar and not is_url(self.path)
        self._fd = os.open(self.path, os.O_RDONLY) if local_tar else None  # os.pread needs no lock between threads
        self._remote = threading.local()  # a remote tar: each thread's file object, opened on its first read

    def _pread(self, size: int, offset: int) -> bytes:
        """`size` bytes of the tar at `offset` (fewer where it is cut short)."""
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        file = getattr(self._remote, "file", None)
        if file is None:
            file = self._remote.file = self.path.open("rb")
        file.seek(offset)
        return file.read(size)

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain's worker processes: they reopen the tar
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_remote")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
        file = getattr(getattr(self, "_remote", None), "file", None)  # other threads' close as they are collected
        if file is not None:
            file.close()

    def name(self, rel: str) -> str:
        """How errors name the file `rel`: its path, or `archive.tar:member`."""
        return f"{self.path}:{rel.removeprefix('./')}" if self.is_tar else str(self.path / rel)

    def exists(self, rel: str) -> bool:
        return rel.removeprefix("./") in self._members if self.is_tar else (self.path / rel).is_file()

    def files(self, rels: Sequence[str]) -> list[epath.Path]:
        """The files on disk that hold `rels` (for fingerprints): the tar itself, or each file."""
        return [self.path] if self.is_tar else [self.path / rel for rel in rels]

    def read(self, rel: str, what: str) -> epath.Path | bytes:
        """The file `rel`: its path in a folder, its bytes in a tar; raises naming it when missing or truncated."""
        if not self.is_tar:
            path = self.path / rel
            if not path.is_file():
                raise not_found(f"{what} file not found: {path}", path)
            return path
        member = self._members.get(rel.removeprefix("./"))
        if member is None:
            raise not_found(f"{what} file not found: no member {rel!r} in {self.path}{self.damage}", self.name(rel))
        offset, size = member
        data = self._pread(size, offset)
        if len(data) != size:
            raise DatasetFileError(
                f"{what} file {self.name(rel)} is truncated ({len(data)} of {size} bytes)", self.name(rel)
            )
        return data


def find_data(path: epath.Path) -> epath.Path:
    """`path` (a folder or tar), else the folder its tar was extracted to: the same path without `.tar`, or the tar's
    own folder (GenPercept's evaluation configs name `nyuv2/` and `kitti/` where Marigold's name tars inside them).
    Raises naming what was tried."""
    tried = [path]
    if path.suffix == ".tar":
        tried += [path.with_suffix(""), path.parent]
    for candidate in tried:
        if candidate.exists() and (candidate == path or candidate.is_dir()):
            return candidate
    raise not_found(f"dataset not found: {' or '.join(map(str, tried))}", path)
