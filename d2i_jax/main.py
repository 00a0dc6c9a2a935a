"""Command-line entry: `python -m d2i_jax.main --config configs/demo.py --workdir W [--config.x=...]`.

Runs the stages listed in `config.stages` in order (see `d2i_jax.runner`); a rerun skips finished stages and
resumes an interrupted one from its last checkpoint.

Mistakes the user can fix (a missing or corrupt file, a bad config value, a missing folder) end the run with one
line naming the file or value (exit status 1; `--traceback` shows the whole trace). A preempted run (SIGTERM, TPU
preemption notice) saves a checkpoint and exits with status 75 (EX_TEMPFAIL: rerun the same command to resume).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from d2i_jax import distributed, runner
from d2i_jax.training.loop import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file returning get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and metrics go.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full Python traceback of errors instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = (OSError, ValueError, FloatingPointError)  # missing / corrupt files, bad config values, diverged runs
EXIT_PREEMPTED = 75


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()  # multi-host jobs (TPU pod, SLURM, D2I_COORDINATOR); no-op on one process
    try:
        runner.run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        print(f"error: {type(e).__name__}: {e}\n(rerun with --traceback for the full trace)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
