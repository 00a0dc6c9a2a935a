"""Test scaffolding: a local Google Cloud Storage emulator (gcp-storage-emulator, in memory, no network), so readers
can be tested on `gs://bucket/...` roots through `etils.epath` and gcsfs exactly as on a bucket.

Import the fixture into a test module (`from tests.gcs_emulator import gcs`); `gcs` is the bucket's URL prefix
"gs://bucket", and `upload(local_folder, name)` copies a folder tree to `gs://bucket/<name>/`. Both need
`pip install gcsfs gcp-storage-emulator` (the `test` extra); tests skip without them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import pytest

BUCKET = "bucket"
QUIET_LOGGERS = ("gcp_storage_emulator", "gcsfs", "google", "urllib3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs():
    """A running in-memory emulator with bucket "bucket"; gcsfs (epath's gs:// backend without TensorFlow) and
    tensorstore point at it. Yields "gs://bucket"."""
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _send_generations(server_module)
    port = free_port()
    server = server_module.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    server._api._httpd.handle_error = lambda request, client_address: None  # not a traceback per hang-up
    url = f"http://localhost:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ["STORAGE_EMULATOR_HOST"] = url  # gcsfs reads it whenever it makes a request URL
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url  # orbax / tensorstore (not needed by the readers)
    _forget_filesystems()
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_filesystems()


def _send_generations(server_module) -> None:
    """Object downloads answer with `x-goog-generation` / `x-goog-metageneration` headers, as Cloud Storage does (the
    emulator leaves them out): tensorstore, orbax's storage layer, reads an object's generation from them and
    conditions its later writes (OCDBT manifests) on it."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "sends_generations", False):
        return

    def with_generations(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    with_generations.sends_generations = True
    objects.download = with_generations  # `objects.get` with alt=media calls it by name
    for _, methods in server_module.HANDLERS:
        for method, handler in methods.items():
            if handler is download:
                methods[method] = with_generations


def _forget_filesystems() -> None:
    """Drop gcsfs filesystems made before the emulator's address was set (or after it stops)."""
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


def upload(local: str | Path, prefix: str) -> str:
    """Copy the files under `local` to `<prefix>/` (e.g. "gs://bucket/nyu"), keeping relative paths; returns it."""
    from etils import epath

    local = Path(local)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            target = epath.Path(f"{prefix}/{path.relative_to(local).as_posix()}")
            target.write_bytes(path.read_bytes())
    return prefix
