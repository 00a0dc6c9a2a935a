"""Bad files at scale: a few unreadable images among 20,000 should cost a log line, not a crashed run.

Two ways, both deterministic so a resumed run reads the same stream:
- `SkipBadFiles(source, on_bad_file="skip")` replaces an example that fails to decode by the next readable index,
  found lazily during training;
- `check_files` decodes everything once up front and `Without` then removes the failures from the source.
A bad file is one whose read raises an `OSError` (`DatasetFileError`, `FileNotFoundError`, PIL / NumPy I/O errors);
other exceptions are bugs and always propagate.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from d2i_jax.data.files import DatasetFileError
from d2i_jax.data.fingerprint import combined, source_fingerprint
from d2i_jax.data.pipeline import RandomAccessSource

BAD_FILE_ERRORS = (OSError,)  # DatasetFileError and FileNotFoundError are OSErrors
ON_BAD_FILE = ("raise", "skip")


def _check_policy(on_bad_file: str) -> None:
    if on_bad_file not in ON_BAD_FILE:
        raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE}, got {on_bad_file!r}")


def describe(error: BaseException) -> str:
    """One line for a bad-file error: its type and message (which names the file)."""
    return f"{type(error).__name__}: {error}"


class SkipBadFiles:
    """A source whose unreadable examples are replaced by the next readable index (wrapping around).

    With `on_bad_file="raise"` it reads `source` unchanged. With "skip", each bad file is logged once through `log`
    and recorded in `skipped` (its path, or the index where the error names no file -> the error line); indices
    found bad are not decoded again.
    """

    def __init__(self, source: RandomAccessSource, on_bad_file: str = "raise", log: Callable[[str], Any] = print):
        _check_policy(on_bad_file)
        self.source, self.on_bad_file, self.log = source, on_bad_file, log
        self.skipped: dict[str, str] = {}
        self._bad: set[int] = set()
        self._lock = threading.Lock()  # grain reads in threads

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"SkipBadFiles({self.source!r}, on_bad_file={self.on_bad_file!r})"

    def fingerprint(self) -> str | None:
        """The source's fingerprint (the files it reads are the same ones)."""
        return source_fingerprint(self.source)

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain's worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __getitem__(self, index: int) -> Any:
        if self.on_bad_file == "raise":
            return self.source[index]
        n = len(self.source)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return self.source[i]
            except BAD_FILE_ERRORS as e:
                self._record(i, e)
        raise DatasetFileError(f"no readable example left in {self.source!r}: all {n} are bad")

    def _record(self, index: int, error: OSError) -> None:
        key = getattr(error, "path", None) or error.filename or str(index)  # ours carry .path, the OS's .filename
        with self._lock:
            self._bad.add(index)
            if key in self.skipped:
                return
            self.skipped[key] = describe(error)
        self.log(f"skipping example {index} of {self.source!r}: {describe(error)}")


def check_files(
    source: RandomAccessSource, desc: str = "checking files", *, on_bad_file: str = "raise", threads: int = 4,
    show_first: int = 5,
) -> list[tuple[int, str]]:
    """Decode every example of `source` once (a progress bar, `threads` readers) and return its failures as sorted
    (index, error line) pairs; with `on_bad_file="raise"` raise one `DatasetFileError` listing the first
    `show_first` of them and their count instead. Pass the indices to `Without` to leave them out."""
    _check_policy(on_bad_file)

    def read(index: int) -> tuple[int, str] | None:
        try:
            source[index]
        except BAD_FILE_ERRORS as e:
            return index, describe(e)
        return None

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(tqdm(pool.map(read, range(len(source))), total=len(source), desc=desc))
    bad = [r for r in results if r is not None]  # pool.map keeps index order
    if bad and on_bad_file == "raise":
        lines = "\n".join(f"  {i}: {message}" for i, message in bad[:show_first])
        raise DatasetFileError(f"{len(bad)} of {len(source)} examples of {source!r} cannot be read; first:\n{lines}")
    return bad


class Without:
    """`source` with the examples at `indices` removed (the rest in order), e.g. those `check_files` found bad."""

    def __init__(self, source: RandomAccessSource, indices: Iterable[int]):
        self.source, self.removed = source, sorted(set(indices))
        out_of_range = [i for i in self.removed if not 0 <= i < len(source)]
        if out_of_range:
            raise IndexError(f"indices {out_of_range[:5]} out of range for {len(source)} examples")
        removed = set(self.removed)
        self.kept = [i for i in range(len(source)) if i not in removed]

    def __len__(self) -> int:
        return len(self.kept)

    def __repr__(self) -> str:
        return f"Without({self.source!r}, removed={len(self.removed)})"

    def fingerprint(self) -> str | None:
        """The source's fingerprint combined with the removed indices; None if the source's is unknown."""
        return combined("Without", self.removed, sources=[self.source])

    def __getitem__(self, index: int) -> Any:
        return self.source[self.kept[index]]
