"""Scalar logging to a JSONL file (one line per logged step) and TensorBoard event files, in the workdir; the run's
summary figures (`metrics.json`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Writes `{"stage", "step", "time", **scalars}` lines to `metrics.jsonl` and the same scalars to TensorBoard.

    Only process 0 writes; other processes' calls are no-ops.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

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
        stage writes its own: `prior`, `create`, evaluate's model names), values stored as `jsonable`. Written under
        a temporary name and renamed, so an interrupted write never leaves a broken file."""
        path = self.workdir / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(jax.tree.map(jsonable, dict(updates)))
        if self._enabled:
            tmp = path.with_name("metrics.json.tmp")
            tmp.write_text(json.dumps(current, indent=2))
            os.replace(tmp, path)
        return current

    def flush(self) -> None:
        if self._enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tb.close()


def jsonable(value: Any) -> Any:
    """A number or array for JSON: arrays (e.g. per-class IoU) as lists, NaN as null; strings kept."""
    if isinstance(value, str):
        return value
    value = np.asarray(value, np.float64)
    if value.ndim:
        return [None if np.isnan(v) else float(v) for v in value]
    return None if np.isnan(value) else float(value)
