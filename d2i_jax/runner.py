"""Runs the configured stages in order, sharing one lazily-built context (SD weights, backbone, prompts, logs).

Each stage writes into `workdir/<stage>/` and marks completion with `workdir/<stage>/DONE`; a rerun skips
finished stages, and an interrupted stage resumes from its own last checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from d2i_jax import stages
from d2i_jax.diffusion.schedule import NoiseSchedule
from d2i_jax.metric_writer import MetricWriter
from d2i_jax.models.clip import embed_prompts
from d2i_jax.models.loading import StableDiffusion, load_stable_diffusion
from d2i_jax.models.random_sd import write_random_sd
from d2i_jax.perception.backbone import Backbone

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Run:
    """What the stages of one run share. Built once; the expensive parts on first use."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.writer = MetricWriter(self.workdir)

    def stage_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @functools.cached_property
    def sd(self) -> StableDiffusion:
        """The Stable Diffusion checkpoint of `config.sd_path`, or (empty path) a tiny random one for the demo."""
        path = self.config.sd_path
        if not path:
            logging.info("config.sd_path is empty: writing a tiny random-weight SD (demo backbone)")
            path = write_random_sd(self.workdir / "random_sd", seed=self.config.seed)
        model = self.config.model
        return load_stable_diffusion(path, dtype=DTYPES[model.dtype], attention_impl=model.attention_impl)

    @functools.cached_property
    def backbone(self) -> Backbone:
        return Backbone(
            vae=self.sd.vae, unet=self.sd.unet, schedule=NoiseSchedule.from_config(self.sd.scheduler_config),
            t_feat=self.config.model.t_feat, sample_posterior=self.config.model.sample_posterior,
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Run per process; prompts are few
    def prompt_embedding(self, prompt: str) -> jax.Array:
        """`[1, 77, width]` text context of one prompt (the empty prompt is embedded once per run)."""
        return embed_prompts(self.sd.text_encoder, self.sd.params["text_encoder"], self.sd.tokenizer, [prompt])

    def embed(self, prompts: list[str]) -> jax.Array:
        """`[len(prompts), 77, width]` text contexts."""
        return embed_prompts(self.sd.text_encoder, self.sd.params["text_encoder"], self.sd.tokenizer, prompts)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
    """Runs `config.stages` in order in `workdir`, skipping the finished ones."""
    logging.getLogger().setLevel(logging.INFO)
    unknown = [s for s in config.stages if s not in stages.REGISTRY]
    if unknown:
        raise ValueError(f"unknown stages {unknown} in config.stages; available: {sorted(stages.REGISTRY)}")
    r = Run(config, workdir)
    (r.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    for name in config.stages:
        done = r.workdir / name / "DONE"
        if done.exists():
            print(f"[{name}] already done ({done}); skipping")
            continue
        print(f"[{name}] starting")
        start = time.perf_counter()
        stages.REGISTRY[name](r)
        elapsed = time.perf_counter() - start
        if jax.process_index() == 0:
            done.write_text(json.dumps({"seconds": elapsed}))
        print(f"[{name}] done in {elapsed:.1f}s")
    r.writer.close()
    return r


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree (for logging model sizes)."""
    return sum(x.size for x in jax.tree.leaves(tree))
