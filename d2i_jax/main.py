"""Command-line entry: `python -m d2i_jax.main --config configs/demo.py --workdir W [--config.x=...]`.

Runs the stages listed in `config.stages` in order (see `d2i_jax.runner`); a rerun skips finished stages and
resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from d2i_jax import distributed, runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file returning get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and metrics go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()  # multi-host jobs (TPU pod, SLURM, D2I_COORDINATOR); no-op on one process
    runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
