"""Preemption: SIGTERM mid-run saves a checkpoint of the current step and exits; the rerun resumes there and ends
exactly where an uninterrupted run ends (state *and* data position restored)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from d2i_jax.main import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent


def _start(workdir: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.preempt_check", str(workdir), str(sleep)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_there(tmp_path):
    reference = _start(tmp_path / "reference", 0.0)
    preempted = _start(tmp_path / "run", 0.05)
    lines = []
    for line in preempted.stdout:  # wait until training is under way
        lines.append(line)
        if re.search(r"\bstep 5 loss", line):  # the progress bar shares the line
            preempted.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + preempted.stdout.read()
    assert preempted.wait(timeout=120) == EXIT_PREEMPTED, out
    saved = int(re.search(r"saved step (\d+) of 48", out).group(1))
    assert 5 <= saved < 48, out
    assert (tmp_path / "run" / "checkpoints" / str(saved)).is_dir()
    assert not (tmp_path / "run" / "final.npy").exists()

    resumed = _start(tmp_path / "run", 0.0)
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert f"resumed from step {saved}" in out
    assert re.search(rf"\bstep {saved + 1} loss", out) and not re.search(rf"\bstep {saved} loss", out), out
    assert reference.communicate(timeout=120)[1] is None and reference.returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "final.npy"),
                                  np.load(tmp_path / "reference" / "final.npy"))
