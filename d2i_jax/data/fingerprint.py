"""Content fingerprints of random-access sources: what caches of derived data (the VAE latent cache) are keyed on.

A source states its content with a `fingerprint()` method returning a digest of its settings and of the path,
size and modification time of every file its examples are read from (`digest`), so rewriting its files, e.g.
`create/` regenerated with another T at the same count, changes it. Wrappers combine their sources' fingerprints
(`combined`). A source without the method has an unknown content: `source_fingerprint` gives None for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def digest(*parts: Any, files: Iterable[str | Path] = ()) -> str:
    """sha256 hex digest of `parts` (by `repr`: settings, other fingerprints) and of each of `files`' path, size
    and modification time in ns (a missing file counts as missing)."""
    h = hashlib.sha256(repr(parts).encode())
    for path in files:
        try:
            st = os.stat(path)
            h.update(f"\n{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"\n{path}\0missing".encode())
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
