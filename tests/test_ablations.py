"""The ablation driver's configs and table (the runs themselves are the stages' own, tested elsewhere)."""

from __future__ import annotations

from configs import demo_ablations
from d2i_jax.ablations import VARIANTS, Ablations, report
from d2i_jax.tasks import get_task


def test_derived_configs_override_seed_size_and_keys(tmp_path):
    base = demo_ablations.get_config()
    c = Ablations(base, tmp_path).derived(2, 24, **{"create.source": "noise", "stages": ("warmup",)})
    assert (c.seed, c.create.seed, c.data.scenes.num_train) == (2, 2, 24)
    assert c.create.source == "noise" and c.stages == ("warmup",) and "ablations" not in c
    assert c.data.scenes.seed == base.data.scenes.seed  # the same labelled and test scenes for every seed
    assert base.create.source == "partial" and base.seed == 0  # the base is untouched


def test_report_gives_mean_and_sample_std_over_seeds():
    config = demo_ablations.get_config()
    columns = [k for k, _ in get_task(config.task).metric_columns]
    runs = [{k: 1.0 for k in columns}, {k: 3.0 for k in columns}]
    results = {"variants": {v: runs for v in VARIANTS}, "theta_W": runs, "sizes": {24: {"a": runs, "e": runs,
               "theta_W": runs}}, "fidelity": {"learned": [{"synthetic": r, "real": r} for r in runs]},
               "seconds": {"total": 120.0, "e/n48_seed0": 60.0, "prior": 30.0}}
    table = report(results, config)
    rows = [line for line in table.splitlines() if "2.00 ± 1.41" in line]
    assert len(rows) == 7 + 3 + 2  # warm-up and the variants, the sizes, the fidelity
    assert all(line.count("2.00 ± 1.41") == len(columns) for line in rows)
    assert "(f) Diff-2-in-1, random-weight prior" in table and "24, (e)" in table
    assert "e 1.0" in table and "prior 0.5" in table and "Wall time: 2.0 min" in table
