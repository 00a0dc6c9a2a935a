"""The command line: a user mistake ends with one line naming it (the trace behind --traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _main(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "d2i_jax.main", "--config", "configs/demo.py", "--workdir",
                           str(workdir), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_bad_config_value_is_one_line_and_the_trace_is_opt_in(tmp_path):
    bad = _main("--config.stages=('warmup', 'nope')", workdir=tmp_path)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[0].startswith("error: ValueError: unknown stages ['nope']") and "--traceback" in lines[-1]
    assert "Traceback" not in bad.stderr and len(lines) == 2
    traced = _main("--config.stages=('nope',)", "--traceback", workdir=tmp_path)
    assert traced.returncode != 0 and "Traceback" in traced.stderr and "unknown stages ['nope']" in traced.stderr
