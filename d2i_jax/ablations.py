"""The paper's ablations as one command, on the embedded demo's labelled and test scenes:

    python -m d2i_jax.ablations --config configs/demo_ablations.py --workdir /tmp/d2i_ablations

Variants (`config.ablations.variants`), each trained for every seed of `config.ablations.seeds`:
  a  warm-up only, trained for as many steps as warm-up + self-improving
  b  EMA teacher without synthetic data (`create.num_images = 0`)
  c  GNA: creation from pure noise (`create.source = "noise"`)
  d  DA-Fusion style: the synthetic pairs labelled once by theta_W, no theta_C (`self_improve.teacher = "fixed"`)
  e  Diff-2-in-1 (theta_C)
  f  (e) with the random-weight prior instead of the trained one
and, for each labelled-set size of `config.ablations.sizes`, warm-up (theta_W), (a) and (e) again.

The learned prior is `config.sd_path` when given (e.g. a demo run's `prior/sd`), else the `prior` stage is run once
in `workdir/prior`. Variants share what they can: one theta_W per (prior, size, seed) (`init_from`), one
partial-noise creation for (d) and (e). Every run is an ordinary workdir under `workdir/runs/` (its metrics.json,
pictures, logs), so an interrupted ablation resumes where it stopped. XLA compilations are cached on disk
(`workdir/jax_cache`), so the many runs of one shape compile once. Writes `workdir/ablations.md` (mean ± sample std
over seeds, the creations' fidelity, wall times) and `workdir/ablations.json`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from d2i_jax import runner
from d2i_jax.data.files import is_url
from d2i_jax.models.random_sd import write_random_sd
from d2i_jax.tasks import get_task

VARIANTS = {
    "a": "warm-up only, as many steps as warm-up + self-improving",
    "b": "EMA teacher, no synthetic data",
    "c": "GNA (creation from pure noise)",
    "d": "DA-Fusion style (theta_W labels once, no theta_C)",
    "e": "Diff-2-in-1 (theta_C)",
    "f": "Diff-2-in-1, random-weight prior",
}


class Ablations:
    """Runs the variants of `config.ablations` in `workdir` and tabulates them."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        if is_url(workdir):  # variant (d) links (e)'s creations into its workdir: object stores have no links
            raise ValueError(f"--workdir {workdir}: the ablation study runs in a local or shared-filesystem workdir")
        self.config, self.workdir = config, Path(workdir)
        self.runs = self.workdir / "runs"
        self.seconds: dict[str, float] = {}

    def derived(self, seed: int, size: int, **overrides: Any) -> ml_collections.ConfigDict:
        """The base config for `seed` and `size` labelled scenes, with `overrides` (dotted keys)."""
        c = self.config.copy_and_resolve_references()
        with c.unlocked():
            del c["ablations"]
            c.seed, c.create.seed = seed, seed
            c.data.scenes.num_train = size
            for key, value in overrides.items():
                *path, last = key.split(".")
                section = c
                for p in path:
                    section = section[p]
                section[last] = value
        return c

    def run(self, name: str, config: ml_collections.ConfigDict) -> Path:
        """`runner.run` in `runs/<name>` (finished stages are skipped on a rerun); returns the workdir."""
        workdir = self.runs / name
        print(f"\n=== [ablations] {name}: stages {list(config.stages)} ===")
        start = time.perf_counter()
        runner.run(config, workdir)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return workdir

    def learned_prior(self) -> str:
        if self.config.sd_path:
            return self.config.sd_path
        c = self.derived(self.config.seed, self.config.data.scenes.num_train, stages=("prior",))
        return str(self.run("prior", c) / "prior" / "sd")

    def theta_w(self, prior: str, sd_path: str, seed: int, size: int) -> Path:
        c = self.derived(seed, size, sd_path=sd_path, stages=("warmup",))
        return self.run(f"theta_W/{prior}_n{size}_seed{seed}", c)

    def variant(self, v: str, priors: dict[str, str], seed: int, size: int, tag: str = "",
                **overrides: Any) -> Path:
        """One variant's run (in `runs/<v>[@tag]/`, with the method's settings `overrides`); returns its workdir
        (its metrics.json holds the figures)."""
        prior = "random" if v == "f" else "learned"
        init = str(self.theta_w(prior, priors[prior], seed, size) / "warmup")
        stages = ("create", "self_improve", "evaluate")
        name = f"{v}{'@' + tag if tag else ''}/n{size}_seed{seed}"
        if v == "a":
            si_epochs = overrides.get("self_improve.epochs", self.config.self_improve.epochs)
            created = overrides.get("create.num_images", self.config.create.num_images)
            created = size if created < 0 else created
            # as many steps as the self-improving epochs over N real + the created images: N-image warm-up epochs
            extra = si_epochs * (size + created) / size
            if extra != int(extra):
                raise ValueError(f"(a) cannot match {si_epochs} self-improving epochs over {size} + {created} images "
                                 "with whole warm-up epochs")
            c = self.derived(seed, size, sd_path=priors[prior], stages=("warmup", "evaluate"),
                             **{"warmup.epochs": self.config.warmup.epochs + int(extra)})
            return self.run(name, c)
        overrides = {"sd_path": priors[prior], "init_from": init, "stages": stages, **overrides}
        if v == "b":
            overrides["create.num_images"] = 0
        elif v == "c":
            overrides["create.source"] = "noise"
        elif v == "d":
            overrides["self_improve.teacher"] = "fixed"
            shared = self.runs / f"e/n{size}_seed{seed}/create"  # (e)'s creations, labelled by the same theta_W
            self.variant("e", priors, seed, size)
            link = self.runs / name / "create"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(shared.absolute(), target_is_directory=True)
        return self.run(name, self.derived(seed, size, **overrides))

    def tune(self, priors: dict[str, str]) -> dict[str, Any]:
        """`config.ablations.tune`: (e) with one method setting changed at a time, next to (a) trained as long;
        meant for `data.scenes.held_out = "val"` (configs/demo_tuning.py), never the test scenes."""
        cfg, size = self.config.ablations, self.config.data.scenes.num_train
        rows: dict[str, dict[str, list[dict[str, float]]]] = {}
        for key, values in cfg.tune:
            for value in values:
                setting = {} if value == _lookup(self.config, key) else {key: value}  # the base: plain (e), (a)
                tag = f"{key}={value}" if setting else ""
                rows[f"{key}={value}"] = {"e": [_figures(self.variant("e", priors, s, size, tag, **setting), "e")
                                   for s in cfg.seeds]}
                if key in ("self_improve.epochs", "create.num_images"):
                    rows[f"{key}={value}"]["a"] = [_figures(self.variant("a", priors, s, size, tag, **setting), "a")
                                      for s in cfg.seeds]
        return rows

    def __call__(self) -> dict[str, Any]:
        cfg = self.config.ablations
        jax.config.update("jax_compilation_cache_dir", str(self.workdir / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        start = time.perf_counter()
        random_sd = str(write_random_sd(self.workdir / "random_sd", unet=runner.random_sd_unet(self.config),
                                         seed=self.config.seed))
        priors = {"learned": self.learned_prior(), "random": random_sd}
        size = self.config.data.scenes.num_train
        results: dict[str, Any] = {"variants": {}, "sizes": {}, "tuning": self.tune(priors)}
        for v in cfg.variants:
            results["variants"][v] = [_figures(self.variant(v, priors, s, size), v) for s in cfg.seeds]
        results["theta_W"] = [_figures(self.variant("e", priors, s, size), "theta_W") for s in cfg.seeds]
        for n in cfg.sizes:
            results["sizes"][n] = {v: [_figures(self.variant(v, priors, s, n), v) for s in cfg.size_seeds]
                                   for v in ("a", "e")}
            results["sizes"][n]["theta_W"] = [_figures(self.runs / f"e/n{n}_seed{s}", "theta_W")
                                              for s in cfg.size_seeds]
        results["fidelity"] = {prior: [_fidelity(self.runs / f"{v}/n{size}_seed{s}") for s in cfg.seeds]
                               for prior, v in (("learned", "e"), ("random", "f")) if v in cfg.variants}
        results["seconds"] = {"total": time.perf_counter() - start, **self.seconds}
        (self.workdir / "ablations.json").write_text(json.dumps(results, indent=2))
        table = report(results, self.config)
        (self.workdir / "ablations.md").write_text(table)
        print(table)
        return results


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def _figures(workdir: Path, variant: str) -> dict[str, float]:
    """The model a variant is judged by, from its run's metrics.json: theta_W for (a) and the warm-up baseline,
    theta_C (theta_E for (d), which saves it as its final model) otherwise."""
    metrics = json.loads((workdir / "metrics.json").read_text())
    return metrics["theta_W" if variant in ("a", "theta_W") else "theta_C"]


def _fidelity(workdir: Path) -> dict[str, dict[str, float]]:
    return json.loads((workdir / "metrics.json").read_text())["create"]


def _mean_std(rows: list[dict[str, float]], key: str) -> str:
    values = np.asarray([r[key] for r in rows], np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {std:.2f}"


def report(results: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The markdown tables of `results` (see `Ablations.__call__`)."""
    columns = get_task(config.task).metric_columns
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    row = lambda name, rows: f"| {name} | " + " | ".join(_mean_std(rows, k) for k, _ in columns) + " |"
    seeds = config.ablations.seeds
    lines = [f"Labelled scenes: {config.data.scenes.num_train}, test scenes: {config.data.scenes.num_test}, "
             f"seeds {list(seeds)}; mean ± sample std over seeds. Machine: {platform.processor() or platform.machine()}"
             f", {jax.device_count()} {jax.default_backend()} device(s). Wall time: "
             f"{results['seconds']['total'] / 60:.1f} min.", "", "| variant " + head, rule,
             row("warm-up only (theta_W)", results["theta_W"])]
    lines += [row(f"({v}) {VARIANTS[v]}", rows) for v, rows in results["variants"].items()]
    minutes = {v: sum(t for name, t in results["seconds"].items() if name.startswith(f"{v}/")) / 60
               for v in ("theta_W", *results["variants"])}
    lines += ["", "Wall time (min, all seeds and sizes): " + ", ".join(f"{v} {m:.1f}" for v, m in minutes.items())
              + (f", prior {results['seconds']['prior'] / 60:.1f}" if "prior" in results["seconds"] else "")]
    if results["sizes"]:
        lines += ["", "Labelled-set size (seeds " + str(list(config.ablations.size_seeds)) + "):", "",
                  "| scenes, model " + head, rule]
        for n, by_model in results["sizes"].items():
            lines += [row(f"{n}, warm-up (theta_W)", by_model["theta_W"]), row(f"{n}, (a)", by_model["a"]),
                      row(f"{n}, (e)", by_model["e"])]
    if results["tuning"]:
        lines += ["", f"Tuning on the {config.data.scenes.held_out} scenes: (e) with one setting changed from the "
                  "config's, (a) trained as long where the self-improving length changes:", "",
                  "| setting, model " + head, rule]
        for tag, by_model in results["tuning"].items():
            lines += [row(f"{tag}, ({v})", rows) for v, rows in by_model.items()]
    if results["fidelity"]:
        lines += ["", "Fidelity of the partial-noise creations (theta_W on each synthetic image against its source "
                  "image's ground truth, and on the real images):", "", "| prior, images " + head, rule]
        for prior, rows in results["fidelity"].items():
            lines += [row(f"{prior}, synthetic", [r["synthetic"] for r in rows]),
                      row(f"{prior}, real", [r["real"] for r in rows])]
    return "\n".join(lines) + "\n"


def main(argv: list[str], config: ml_collections.ConfigDict, workdir: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    Ablations(config, workdir)()


if __name__ == "__main__":  # the flags are defined here only: importing the module must not clash with main.py's
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/demo_ablations.py or alike.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where every run, the tables and the compilation cache go.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda argv: main(argv, _CONFIG.value, _WORKDIR.value))
