"""Content fingerprints of random-access sources: what caches of derived data (the VAE latent cache) are keyed on.

A source states its content with a `fingerprint()` method returning a digest of its settings and of the path,
size and modification time of every file its examples are read from (`digest`), so rewriting its files, e.g.
`create/` regenerated with another T at the same count, changes it. Wrappers combine their sources' fingerprints
(`combined`). A source without the method has an unknown content: `source_fingerprint` gives None for it.

Files on an object store (`gs://...`) count by their size and modification time in seconds (`epath`'s `stat`),
looked up in parallel, as each is a request; local files by `os.stat` as ever, so local digests do not change.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

from etils import epath

from d2i_jax.data.files import is_url

REMOTE_STAT_THREADS = 32  # concurrent stat requests for object-store files


def file_state(path: str | os.PathLike) -> str:
    """`path`'s entry in a digest: its path, size and modification time (ns locally, s on an object store), or
    "missing"."""
    name = os.fspath(path)
    try:
        if is_url(name):
            st = epath.Path(name).stat()
            return f"\n{name}\0{st.length}\0{st.mtime}"
        st = os.stat(name)
        return f"\n{name}\0{st.st_size}\0{st.st_mtime_ns}"
    except FileNotFoundError:
        return f"\n{name}\0missing"


def digest(*parts: Any, files: Iterable[str | os.PathLike] = ()) -> str:
    """sha256 hex digest of `parts` (by `repr`: settings, other fingerprints) and of each of `files`' path, size
    and modification time (`file_state`; a missing file counts as missing)."""
    h = hashlib.sha256(repr(parts).encode())
    files = list(files)
    if any(is_url(os.fspath(f)) for f in files):
        with concurrent.futures.ThreadPoolExecutor(REMOTE_STAT_THREADS) as pool:
            states = list(pool.map(file_state, files))  # in order
    else:
        states = map(file_state, files)
    for state in states:
        h.update(state.encode())
    return h.hexdigest()


def source_fingerprint(source: Any) -> str | None:
    """`source.fingerprint()`, or None for a source that does not state its content."""
    fingerprint = getattr(source, "fingerprint", None)
    return None if fingerprint is None else fingerprint()


def combined(*parts: Any, sources: Sequence[Any]) -> str | None:
    """The fingerprint of a wrapper: `digest` of its settings `parts` and of its `sources`' fingerprints; None when
    one of those is unknown."""
    inner = [source_fingerprint(s) for s in sources]
    return None if None in inner else digest(*parts, *inner)
