"""Two JAX processes on localhost (CPU, gloo) run the real train step on one global batch, each feeding its half;
both must hold the state a single-process run on the whole batch produces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BASE_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"}


def _run_two_processes(module: str, arg: Path) -> list[str]:
    """Runs `python -m module arg` as processes 0 and 1 of one JAX job; returns their stdouts. Their output goes to
    files, not pipes: a process blocked on a full pipe (progress bars) while the other waits for it in a collective
    would never finish."""
    port = _free_port()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err") for i in range(2)]
        for i, (out, err) in enumerate(logs):
            env = {**BASE_ENV, "D2I_COORDINATOR": f"127.0.0.1:{port}", "D2I_NUM_PROCESSES": "2",
                   "D2I_PROCESS_ID": str(i)}
            with out.open("w") as stdout, err.open("w") as stderr:  # the child keeps its own copies
                procs.append(subprocess.Popen([sys.executable, "-m", module, str(arg)], cwd=ROOT, env=env,
                                              stdout=stdout, stderr=stderr))
        for p, (_, err) in zip(procs, logs, strict=True):
            p.wait(timeout=1800)
            assert p.returncode == 0, err.read_text()[-3000:]
        return [out.read_text() for out, _ in logs]


def test_two_processes_match_one(tmp_path):
    _run_two_processes("tests.multihost_check", tmp_path)
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    one = subprocess.run([sys.executable, "-m", "tests.multihost_check", str(one_dir)], cwd=ROOT, env=BASE_ENV,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    ref = json.loads((one_dir / "process_0.json").read_text())
    assert ref["processes"] == 1 and ref["devices"] == 1
    for i in range(2):
        r = json.loads((tmp_path / f"process_{i}.json").read_text())
        assert r["processes"] == 2 and r["devices"] == 2 and r["batch_split"]
        assert r["state_as_intended"] and r["ema_like_params"] and r["fsdp_split_arrays"] > 0
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["state_sq_norm"] == pytest.approx(ref["state_sq_norm"], rel=1e-5)
        assert r["state_sum"] == pytest.approx(ref["state_sum"], rel=1e-4, abs=1e-3)


@pytest.mark.slow
def test_two_processes_run_the_whole_pipeline(tmp_path):
    """Every stage (warm-up, create, self-improve, evaluate, generate) on 2 processes sharing the workdir."""
    outs = _run_two_processes("tests.multihost_pipeline_check", tmp_path)
    for stage in ("warmup", "create", "self_improve", "evaluate", "generate"):
        assert (tmp_path / stage / "DONE").exists(), stage
    assert len(list((tmp_path / "create" / "img").glob("*.png"))) == 8
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"untrained", "theta_W", "theta_C", "create"}
    tables = [out[out.index("metrics pooled over the"):].splitlines()[1:5] for out in outs]  # header + 3 models
    assert tables[0] == tables[1]  # both processes computed the same metrics from the gathered predictions
