"""Scalar logging to a JSONL file (one line per logged step) and TensorBoard event files, in the workdir (local or
`gs://`); the run's summary figures (`metrics.json`).

On an object store `metrics.jsonl` is uploaded whole at most every 30 s and at `flush()` / `close()`
(`d2i_jax.data.atomic.AppendLog`), and the TensorBoard event files, written to a local folder, are uploaded at
`flush()` / `close()`; the training loop flushes before every checkpoint, so the logs hold every step a checkpoint
holds."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from d2i_jax.data.atomic import AppendLog, write_atomically
from d2i_jax.data.files import PathLike, as_path, is_url
from d2i_jax.remote import cache_root, upload


class MetricWriter:
    """Writes `{"stage", "step", "time", **scalars}` lines to `metrics.jsonl` and the same scalars to TensorBoard.

    Only process 0 writes; other processes' calls are no-ops.
    """

    def __init__(self, workdir: PathLike):
        self.workdir = as_path(workdir)
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = AppendLog(self.workdir / "metrics.jsonl")
        self._tb_staging = None  # a remote workdir's event files: written here, uploaded at `flush`
        if is_url(self.workdir):
            cache_root().mkdir(parents=True, exist_ok=True)
            self._tb_staging = tempfile.mkdtemp(prefix="tensorboard-", dir=cache_root())
        self._tb = SummaryWriter(self._tb_staging or str(self.workdir / "tensorboard"))

    def write(self, stage: str, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"stage": stage, "step": int(step), "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{stage}/{k}", v, int(step))

    def event(self, stage: str, kind: str, **fields: str | int | float) -> None:
        """A non-scalar record (e.g. a skipped bad file: `kind="bad_file"`, its path and error) in `metrics.jsonl`."""
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"stage": stage, "event": kind, "time": time.time(), **fields}) + "\n")
        self._jsonl.flush()

    def summary(self, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Merges `updates` into `metrics.json` and returns the whole summary: top-level keys are replaced (each
        stage writes its own: `prior`, `create`, evaluate's model names), values stored as `jsonable`. Written
        atomically (`d2i_jax.data.atomic`), so an interrupted write never leaves a broken file."""
        path = self.workdir / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(jax.tree.map(jsonable, dict(updates)))
        if self._enabled:
            write_atomically(path, json.dumps(current, indent=2).encode())
        return current

    def flush(self) -> None:
        """Makes everything logged so far durable (on an object store: uploaded)."""
        if self._enabled:
            self._jsonl.flush(force=True)
            self._tb.flush()
            self._upload_events()

    def _upload_events(self) -> None:
        if self._tb_staging is not None:
            upload(self._tb_staging, self.workdir / "tensorboard")

    def close(self) -> None:
        """Flushes and closes the logs; further writes are dropped."""
        if self._enabled:
            self._enabled = False
            self._jsonl.close()
            self._tb.close()
            self._upload_events()
            if self._tb_staging is not None:
                shutil.rmtree(self._tb_staging, ignore_errors=True)


def jsonable(value: Any) -> Any:
    """A number or array for JSON: arrays (e.g. per-class IoU) as lists, NaN as null; strings kept."""
    if isinstance(value, str):
        return value
    value = np.asarray(value, np.float64)
    if value.ndim:
        return [None if np.isnan(v) else float(v) for v in value]
    return None if np.isnan(value) else float(value)
