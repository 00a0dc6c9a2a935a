"""The ablation driver's configs and table (the runs themselves are the stages' own, tested elsewhere)."""

from __future__ import annotations

import json

from configs import demo_ablations, demo_tuning
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
               "tuning": {"create.T=300": {"e": runs}, "self_improve.epochs=10": {"e": runs, "a": runs}},
               "seconds": {"total": 120.0, "e/n48_seed0": 60.0, "prior": 30.0}}
    table = report(results, config)
    rows = [line for line in table.splitlines() if "2.00 ± 1.41" in line]
    assert len(rows) == 7 + 3 + 3 + 2  # warm-up and the variants, the sizes, the tuning, the fidelity
    assert all(line.count("2.00 ± 1.41") == len(columns) for line in rows)
    assert "(f) Diff-2-in-1, random-weight prior" in table and "24, (e)" in table
    assert "| self_improve.epochs=10, (a) |" in table
    assert "e 1.0" in table and "prior 0.5" in table and "Wall time: 2.0 min" in table


def test_tuning_runs_each_setting_on_validation_scenes_next_to_a_as_long(tmp_path, monkeypatch):
    """`Ablations.tune` plans (e) per setting (the config's own value is plain (e)), (a) as long as each
    self-improving length, every run on the validation scenes; the runs are recorded, not trained."""
    config = demo_tuning.get_config()
    with config.unlocked():
        config.ablations.tune = (("create.T", (300, 600)), ("self_improve.epochs", (5, 10)),
                                 ("create.num_images", (144,)))
    ran = {}

    def fake_run(self, name, c):
        ran[name] = c
        (self.runs / name).mkdir(parents=True, exist_ok=True)
        figures = {k: float(len(ran)) for k, _ in get_task(c.task).metric_columns}
        (self.runs / name / "metrics.json").write_text(json.dumps({"theta_W": figures, "theta_C": figures}))
        return self.runs / name

    monkeypatch.setattr(Ablations, "run", fake_run)
    rows = Ablations(config, tmp_path).tune({"learned": "/prior", "random": "/random"})
    assert set(rows) == {"create.T=300", "create.T=600", "self_improve.epochs=5", "self_improve.epochs=10",
                         "create.num_images=144"}
    assert set(rows["self_improve.epochs=10"]) == {"e", "a"} and set(rows["create.T=300"]) == {"e"}
    assert all(len(by_seed) == len(config.ablations.seeds) for r in rows.values() for by_seed in r.values())
    assert ran["e@create.T=300/n48_seed1"].create.T == 300 and "e@create.T=600/n48_seed0" not in ran
    assert ran["e/n48_seed0"].create.T == config.create.T  # the config's value: the plain (e) run
    si = ran["e@self_improve.epochs=10/n48_seed0"]
    assert si.self_improve.epochs == 10 and si.init_from.endswith("theta_W/learned_n48_seed0/warmup")
    long_a = ran["a@self_improve.epochs=10/n48_seed0"]
    assert long_a.warmup.epochs == config.warmup.epochs + 2 * 10 and ran["a/n48_seed0"].warmup.epochs == 15 + 2 * 5
    # 3 creations per labelled room: each self-improving epoch is 4 warm-up epochs' worth of steps
    assert ran["a@create.num_images=144/n48_seed0"].warmup.epochs == 15 + 4 * 5
    assert ran["e@create.num_images=144/n48_seed0"].create.num_images == 144
    assert all(c.data.scenes.held_out == "val" and c.sd_path in ("/prior", "") for c in ran.values())
