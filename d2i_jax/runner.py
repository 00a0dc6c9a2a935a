"""Runs the configured stages in order, sharing one lazily-built context (SD weights, backbone, prompts, logs).

Each stage writes into `workdir/<stage>/` and marks completion with `workdir/<stage>/DONE`; a rerun skips
finished stages, and an interrupted stage resumes from its own last checkpoint. The workdir is a local folder or an
object-store URL (`gs://bucket/run`, read and written through etils.epath; orbax writes checkpoints there
directly). On several hosts every process runs every stage in the same workdir (a bucket, or a shared filesystem:
NFS, Filestore); process 0 writes the shared files, and the others wait for it where they read them
(`process_zero_writes`). Every file appears whole (`d2i_jax.data.atomic`), and a DONE marker is written only after
its stage's files, so a file a rerun finds is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from d2i_jax import stages
from d2i_jax.data import get_source, mt_augment, seg_augment
from d2i_jax.data.atomic import write_atomically
from d2i_jax.data.files import PathLike, as_path, is_url
from d2i_jax.data.mixture import Mixture
from d2i_jax.data.nyu import Augment, augment
from d2i_jax.data.pipeline import RandomAccessSource
from d2i_jax.data.robust import ON_BAD_FILE, SkipBadFiles, Without, check_files
from d2i_jax.diffusion.schedule import NoiseSchedule
from d2i_jax.distributed import process_zero_writes
from d2i_jax.metric_writer import MetricWriter
from d2i_jax.models.class_embeddings import class_embeddings, load_class_embeddings
from d2i_jax.models.clip import CaptionContexts, embed_prompts
from d2i_jax.models.loading import StableDiffusion, load_stable_diffusion, restore_params, save_params
from d2i_jax.models.lora import Lora
from d2i_jax.models.random_sd import TINY_UNET, write_random_sd
from d2i_jax.models.unet import UNet2DConditionModel
from d2i_jax.models.vae import AutoencoderKL
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.feature_paths import backbone_factory, load_pretrained, make_predictor
from d2i_jax.perception.model import Perceiver
from d2i_jax.perception.vpd import TextAdapter
from d2i_jax.remote import local_copy
from d2i_jax.tasks import Task, get_task
from d2i_jax.training.loop import FitOptions, fit
from d2i_jax.training.sharding import fsdp_shardings, make_mesh, put_sharded
from d2i_jax.training.state import TrainState, create_sharded
from d2i_jax.training.steps import Steps
from weights_conversion.diff2in1 import MODEL_INFO

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
AUGMENTATIONS = ("bae", "mmseg_seg", "invpt_mt")  # `config.data.augment.kind`, see `Run.augmentation`
CROPPING = ("mmseg_seg", "invpt_mt")  # augmentations that bring the stored images to the input size themselves
CONTEXTS = ("prompt", "class_embeddings")  # `config.model.context`


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
    """`config.model.dtype`: `float32`, `bfloat16`, or `auto` (bfloat16 on GPUs / TPUs, float32 on CPUs)."""
    if name == "auto":
        name = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {[*DTYPES, 'auto']}, got {name!r}")
    return DTYPES[name]


def make_backbone(model: ml_collections.ConfigDict, vae: AutoencoderKL, unet: UNet2DConditionModel,
                  scheduler_config: dict[str, Any] | None = None) -> Backbone:
    """The feature pass `config.model` sets (`t_feat`, posterior sample or mean, scaling, noising, VPD's attention
    maps; the feature path's own backbone where it has one) over these SD modules; `scheduler_config`: the
    checkpoint's diffusers scheduler config (None: SD1.5's), with `model.scheduler_overrides` applied."""
    if model.attention_maps and model.features != "vpd":
        raise ValueError(f"config.model.attention_maps is VPD's: it needs model.features='vpd', not "
                         f"{model.features!r}")
    schedule = NoiseSchedule.from_config(scheduler_config, **model.get("scheduler_overrides", {}))
    factory = backbone_factory(model.features)
    if factory is not None:
        return factory(model, vae, unet, schedule)
    return Backbone.from_config(model, vae, unet, schedule)


def make_perceiver(config: ml_collections.ConfigDict, backbone: Backbone, task: Task) -> Perceiver:
    """`backbone` -> the feature path `config.model.features` -> `task`'s head; with `model.context_adapter`, VPD's
    `TextAdapter` on the context; `model.unet_tuning` trains the UNet (fully, or LoRA factors of `model.lora`)."""
    lora = config.model.lora
    return Perceiver(backbone, make_predictor(config, task.make_head()), unet_tuning=config.model.unet_tuning,
                     lora=Lora(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets)),
                     context_adapter=TextAdapter() if config.model.context_adapter else None)


# config keys that may name an object store (besides the workdir): dataset roots, split lists and the prior's image
# pool (the readers read through etils.epath), TFDS data dirs, weights and class embeddings (copied once to a local
# cache, `d2i_jax.remote`)
REMOTE_KEYS = re.compile(r"^((data|evaluate\.data)(\.mix\.[^.]+)?\.(root|list_dir|tfds_dir)|prior\.pool_root|sd_path"
                         r"|init_from|model\.(vit_checkpoint|class_embeddings_file))$")


def refuse_urls(config: ml_collections.ConfigDict) -> None:
    """Object-store paths (gs://, s3://, ...) are taken only where the code reads them through etils.epath or a local
    copy (`REMOTE_KEYS`); anywhere else (e.g. a plug-in's own path key) `pathlib` could turn `gs://bucket/x` into a
    local folder `gs:/bucket/x`. Raises naming the config key."""

    def scan(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                scan(value, f"{prefix}{key}.")
            elif isinstance(value, str) and is_url(value) and not REMOTE_KEYS.match(f"{prefix}{key}"):
                raise ValueError(f"config.{prefix}{key}={value!r} is a URL: object stores are read as the workdir and "
                                 "as data.root / list_dir / tfds_dir, prior.pool_root, sd_path, init_from, "
                                 "model.vit_checkpoint, model.class_embeddings_file; give a local path here (or a "
                                 "gcsfuse mount)")

    scan(config, "")


class Run:
    """What the stages of one run share. Built once; the expensive parts on first use."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: PathLike):
        refuse_urls(config)
        self.config = config
        self.workdir = as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # every caption `contexts` has seen this run (`embed` looked up at each call)
        self.caption_contexts = CaptionContexts(lambda prompts: self.embed(prompts))

    @functools.cached_property
    def writer(self) -> MetricWriter:
        """`metrics.jsonl` / TensorBoard logs in the workdir, opened on first use (so a `Run` that only reads a
        trained model, e.g. `d2i_jax.predict`'s, leaves the workdir as it was)."""
        return MetricWriter(self.workdir)

    def stage_dir(self, name: str) -> epath.Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def random_sd_path(self) -> Path:
        """A tiny random-weight SD (`d2i_jax.models.random_sd`, seeded by `config.seed`) in `workdir/random_sd`,
        written on first use: the `prior` stage's initialisation, and the backbone when there is no prior. A local
        path (a remote workdir's copy, `d2i_jax.remote.local_copy`)."""
        remote = self.workdir / "random_sd"
        unet = random_sd_unet(self.config)
        process_zero_writes("random SD", lambda: write_random_sd(remote, unet=unet, seed=self.config.seed))
        path = local_copy(remote, "the workdir's random SD")
        written = json.loads((path / "unet" / "config.json").read_text())["layers_per_block"]
        if written != unet["layers_per_block"]:
            print(f"[random SD] {remote} was written with unet layers_per_block={written}: it is kept (as everything "
                  f"trained from it), config.random_sd.unet_layers_per_block={unet['layers_per_block']} is not used")
        return path

    @property
    def sd_path(self) -> Path:
        """`config.sd_path`; else the `prior` stage's SD when it is one of `config.stages` (`workdir/prior/sd`);
        else the tiny random-weight SD."""
        if self.config.sd_path:
            return local_copy(self.config.sd_path, "config.sd_path")
        if "prior" in self.config.stages:
            path = self.workdir / "prior" / "sd"
            if not (path / "model_index.json").exists():
                raise FileNotFoundError(f"{path} is missing: the 'prior' stage has not finished (run it first)")
            return local_copy(path, "the prior stage's SD")
        print("config.sd_path is empty and there is no 'prior' stage: a tiny random-weight SD (demo backbone)")
        return self.random_sd_path()

    @functools.cached_property
    def sd(self) -> StableDiffusion:
        """The Stable Diffusion checkpoint of `sd_path`."""
        model = self.config.model
        return load_stable_diffusion(self.sd_path, dtype=compute_dtype(model.dtype),
                                     attention_impl=model.attention_impl, remat_policy=model.remat_policy)

    @functools.cached_property
    def backbone(self) -> Backbone:
        return make_backbone(self.config.model, self.sd.vae, self.sd.unet, self.sd.scheduler_config)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Run per process; prompts are few
    def prompt_embedding(self, prompt: str) -> jax.Array:
        """`[1, 77, width]` text context of one prompt (the empty prompt is embedded once per run)."""
        return self.embed([prompt])

    def embed(self, prompts: list[str]) -> jax.Array:
        """`[len(prompts), 77, width]` text contexts."""
        return embed_prompts(self.sd.text_encoder, self.sd.params["text_encoder"], self.sd.tokenizer, prompts)

    def contexts(self, captions: list[str]) -> np.ndarray:
        """Per-example UNet context for the perception path, by `model.context`: "class_embeddings" gives
        `class_embeddings` to every example (VPD); "prompt" the captions' embeddings with `model.use_captions` (each
        distinct caption embedded once per run, `CaptionContexts`), else `model.prompt`'s (the public code:
        the empty prompt) for every example."""
        mode = self.config.model.context
        if mode not in CONTEXTS:
            raise ValueError(f"config.model.context must be one of {CONTEXTS}, got {mode!r}")
        if mode == "class_embeddings":
            return np.broadcast_to(self.class_embeddings, (len(captions), *self.class_embeddings.shape))
        if self.config.model.use_captions:
            return self.caption_contexts([c or self.config.data.fallback_caption for c in captions])
        one = np.asarray(self.prompt_embedding(self.config.model.prompt))
        return np.broadcast_to(one, (len(captions), *one.shape[1:]))

    @functools.cached_property
    def class_embeddings(self) -> np.ndarray:
        """`[N, D]` text context of `model.context = "class_embeddings"`: `model.class_embeddings_file`, else computed
        once per run from the SD text encoder for `task.class_names` (VPD's recipe, `d2i_jax.models.class_embeddings`).
        """
        model = self.config.model
        if model.class_embeddings_file:
            table = load_class_embeddings(local_copy(model.class_embeddings_file, "config.model.class_embeddings_file"))
        else:
            names = self.config.task.get("class_names", ())
            if not names:
                raise ValueError("config.model.context='class_embeddings' needs config.task.class_names or "
                                 "config.model.class_embeddings_file")
            table = class_embeddings(self.sd.text_encoder, self.sd.params["text_encoder"], self.sd.tokenizer, names)
        if table.shape[1] != self.sd.unet.cross_attention_dim:
            raise ValueError(f"class embeddings of width {table.shape[1]}: the UNet's context width is "
                             f"{self.sd.unet.cross_attention_dim}")
        return table

    # ------------------------------------------------------------------------------------------ model

    @functools.cached_property
    def mesh(self) -> Mesh:
        return make_mesh(dict(self.config.mesh))

    @functools.cached_property
    def frozen(self) -> dict[str, Any]:
        """The SD params the perception path reads without training them, on the mesh (large ones fsdp-split)."""
        return self.shard({"vae": self.sd.params["vae"], "unet": self.sd.params["unet"]})

    def shard(self, tree: Any) -> Any:
        """`tree` on the mesh by the fsdp rule (`config.fsdp_min_size`)."""
        return put_sharded(tree, fsdp_shardings(tree, self.mesh, self.config.fsdp_min_size))

    def steps(self, tx: Any, **kwargs: Any) -> Steps:
        """The training stages' pure steps with the config's loss weights (`model.pixel_loss_weight`,
        `model.latent_loss_weight`: the one-step path's latent loss) and `kwargs` (theta_C's EMA, label mode)."""
        m = self.config.model
        return Steps(self.perceiver, self.task, tx, pixel_loss_weight=m.get("pixel_loss_weight", 1.0),
                     latent_loss_weight=m.get("latent_loss_weight", 0.0), **kwargs)

    def train_state(self, params: Any, batch_stats: Any, tx: Any, seed_offset: int) -> TrainState:
        """A stage's initial train state, created sharded on the mesh (theta_C = theta_E)."""
        return create_sharded(params, batch_stats, tx, jax.random.key(self.config.seed + seed_offset), self.mesh,
                              self.config.fsdp_min_size)

    @functools.cached_property
    def task(self) -> Task:
        """The task plug-in `config.task.name` (`d2i_jax.tasks`)."""
        return get_task(self.config.task)

    @functools.cached_property
    def perceiver(self) -> Perceiver:
        """`make_perceiver` on this run's backbone and task."""
        return make_perceiver(self.config, self.backbone, self.task)

    def save_model(self, stage: str, params: Any, batch_stats: Any) -> None:
        """Writes a stage's final model (params + norm state) to `workdir/<stage>/model`."""
        save_params(self.stage_dir(stage) / "model", {"params": params, "batch_stats": batch_stats})

    def model_dir(self, stage: str) -> epath.Path:
        """Where `stage`'s final model is: `workdir/<stage>/model`; theta_W's (`warmup`) is `config.init_from`'s
        `model/` when that is set (an imported checkpoint, see `weights_conversion.diff2in1`, or another run's
        stage folder)."""
        if stage == "warmup" and self.config.init_from:
            return local_copy(f"{self.config.init_from}/model", "config.init_from")
        return self.workdir / stage / "model"

    def load_model(self, stage: str) -> tuple[Any, Any]:
        """(params, batch_stats) a previous stage saved (or `config.init_from` for theta_W); errors name the fix."""
        directory = self.model_dir(stage)
        if not directory.exists():
            if stage == "warmup" and self.config.init_from:
                raise FileNotFoundError(f"config.init_from={self.config.init_from} has no model/ folder: give the "
                                        "output of `python -m weights_conversion.diff2in1` or a run's stage folder")
            raise FileNotFoundError(f"{directory} is missing: run the {stage!r} stage first (add it to config.stages)")
        try:
            tree = restore_params(directory, self.model_template(), jnp.float32)
        except ValueError as e:
            info = directory.parent / MODEL_INFO
            hint = f"; it was converted with {info.read_text()}" if info.exists() else ""
            raise ValueError(f"{directory} does not fit config.fusion / config.task.head{hint}\n{e}") from e
        return tree["params"], tree["batch_stats"]

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one Run per process; several stages restore models
    def model_template(self) -> dict[str, Any]:
        """`{"params", "batch_stats"}` of the configured model as shapes (nothing compiled or computed; traced once
        per run)."""
        params, batch_stats = self.perceiver.init_shapes(*self._init_args())
        return {"params": params, "batch_stats": batch_stats}

    def init_model(self) -> tuple[Any, Any]:
        """Untrained (params, batch_stats) for `config.data.image_size` inputs, drawn once per run (warm-up starts
        from them, evaluation measures them): host arrays, with the SD UNet when it is trained."""
        params, batch_stats = self._initial_head
        if self.perceiver.unet_tuning == "full":
            params = {**params, "unet": self.perceiver.backbone.trainable_unet(self.frozen["unet"])}
        return params, batch_stats

    @functools.cached_property
    def _initial_head(self) -> tuple[Any, Any]:
        params, batch_stats = self.perceiver.init(jax.random.key(self.config.seed), *self._init_args())
        params = load_pretrained(self.config, params)
        params.pop("unet", None)  # the SD UNet, put back by `init_model`: not copied to the host
        return jax.device_get((params, batch_stats))

    def _init_args(self) -> tuple[Any, tuple[int, int], jax.Array]:
        return self.frozen, tuple(self.config.data.image_size), jnp.asarray(self.contexts([""]))

    # ------------------------------------------------------------------------------------------ data

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one Run per process; a few (split, size) pairs
    def source(self, split: str, *, native_size: bool = False, training: bool = False,
               evaluation: bool = False) -> RandomAccessSource:
        """The dataset plug-in `config.data.name`'s split, with the task's labels, at the training resolution (or as
        stored, for evaluation), guarded against bad files by `config.data.on_bad_file` / `check_files`.
        `training`: the examples `fit` augments (`augmentation`), as stored when the augmentation crops them to the
        input size itself (`data.augment.kind` in `CROPPING`). `evaluation`: `config.data` with the overrides of
        `config.evaluate.data` (e.g. train on Hypersim, evaluate on NYUv2)."""
        return self._data_source(self.data_config(evaluation), split, native_size=native_size, training=training)

    def _data_source(self, cfg: ml_collections.ConfigDict, split: str, *, native_size: bool = False,
                     training: bool = False) -> RandomAccessSource:
        native_size = native_size or (training and cfg.augment.kind in CROPPING)
        source = get_source(cfg, split, size=None if native_size else tuple(cfg.image_size),
                            label_keys=self.task.label_keys, workdir=self.workdir, seed=self.config.seed)
        return self._guarded(source, f"{cfg.name}/{split}")

    def training_source(self) -> RandomAccessSource | Mixture:
        """The warm-up's training examples: `source(data.train_split, training=True)`, or with `config.data.mix`
        (`{name: {prob, overrides of config.data}}`) a `Mixture` of those datasets, each batch drawn from one of
        them (GenPercept / Marigold: Hypersim 0.9, Virtual KITTI 0.1); a dataset without its own `root` reads
        `data.root`."""
        mix = self.config.data.get("mix")
        if not mix:
            return self.source(self.config.data.train_split, training=True)
        sources, probs = [], []
        for name, entry in mix.items():
            cfg = self.config.data.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.update({k: v for k, v in entry.items() if k != "prob"}, name=name)
                cfg.mix = None
            if not cfg.get("root"):
                raise ValueError(f"config.data.mix.{name}.root is empty (nor is config.data.root set): give the folder "
                                 f"holding the {name} data")
            sources.append(self._data_source(cfg, cfg.train_split, training=True))
            probs.append(float(entry.get("prob", 0.0)))
        mixture = Mixture(tuple(sources), tuple(probs), tuple(mix))
        print(f"[data] training mixture: {mixture}")
        return mixture

    def data_config(self, evaluation: bool = False) -> ml_collections.ConfigDict:
        """`config.data`, or for evaluation with `config.evaluate.data`'s keys (when set) replacing its own."""
        overrides = self.config.evaluate.get("data") if evaluation else None
        if not overrides:
            return self.config.data
        cfg = self.config.data.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.update(overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides))
        return cfg

    def _guarded(self, source: RandomAccessSource, name: str) -> RandomAccessSource:
        """`config.data.check_files`: decode every file once up front (progress bar), so a broken dataset fails in
        minutes rather than hours into training; `on_bad_file = "skip"`: leave bad files out (those found up front)
        or replace them by the next readable example (those found later), each logged and recorded in
        `metrics.jsonl`; "raise": the first bad file ends the run with its name."""
        cfg = self.config.data
        if cfg.on_bad_file not in ON_BAD_FILE:
            raise ValueError(f"config.data.on_bad_file must be one of {ON_BAD_FILE}, got {cfg.on_bad_file!r}")

        def record(message: str) -> None:
            print(f"[data] {name}: {message}")
            self.writer.event("data", "bad_file", source=name, error=message)

        if cfg.check_files:
            bad = check_files(source, f"checking {name}", on_bad_file=cfg.on_bad_file)
            for index, message in bad:
                record(f"example {index} left out: {message}")
            if bad:
                source = Without(source, [index for index, _ in bad])
        return SkipBadFiles(source, "skip", log=record) if cfg.on_bad_file == "skip" else source

    def augmentation(self) -> Any:
        """`fn(example, rng)` for the loader by `config.data.augment.kind`: "bae" (hflip with n_x negated, colour
        jitter; None when both are off, as the public code), "mmseg_seg" (`d2i_jax.data.seg_augment`: VPD's
        ADE20K training pipeline) or "invpt_mt" (`d2i_jax.data.mt_augment`: InvPT's multi-task pipeline)."""
        aug = self.config.data.augment
        if aug.kind not in AUGMENTATIONS:
            raise ValueError(f"config.data.augment.kind must be one of {AUGMENTATIONS}, got {aug.kind!r}")
        if aug.kind == "mmseg_seg":
            config = seg_augment.SegAugment(scale=tuple(aug.scale), ratio_range=tuple(aug.ratio_range),
                                            crop_size=tuple(aug.crop_size), cat_max_ratio=aug.cat_max_ratio)
            return functools.partial(seg_augment.augment, config=config)
        if aug.kind == "invpt_mt":
            config = mt_augment.MultiTaskAugment(scale_range=tuple(aug.ratio_range), crop_size=tuple(aug.crop_size),
                                                 cat_max_ratio=aug.cat_max_ratio)
            return functools.partial(mt_augment.augment, config=config)
        if not (aug.hflip or aug.color_jitter):
            return None
        j = aug.color_jitter
        return functools.partial(augment, config=Augment(hflip=aug.hflip, brightness=j, contrast=j, saturation=j))

    def fit(self, stage: str, steps: Any, state: TrainState, source: RandomAccessSource, *, epochs: int,
            shuffle: bool = True, max_steps: int = 0, batch_size: int | None = None) -> TrainState:
        """`d2i_jax.training.loop.fit` with this run's mesh, frozen params, contexts, logs and settings (the global
        batch `batch_size`, default `train.batch_size`); checkpoints in `workdir/<stage>/checkpoints`."""
        options = FitOptions.from_config(self.config)
        if batch_size:
            options = dataclasses.replace(options, batch_size=batch_size)
        return fit(stage, steps, state, source, frozen=self.frozen, mesh=self.mesh, contexts=self.contexts,
                   checkpoint_dir=self.stage_dir(stage) / "checkpoints", writer=self.writer,
                   options=options, epochs=epochs, shuffle=shuffle,
                   random_map=self.augmentation(), max_steps=max_steps)


def random_sd_unet(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The tiny random-weight SD's UNet config: `TINY_UNET` with `config.random_sd`'s settings."""
    return {**TINY_UNET, "layers_per_block": config.random_sd.unet_layers_per_block}


def run(config: ml_collections.ConfigDict, workdir: PathLike) -> Run:
    """Runs `config.stages` in order in `workdir`, skipping the finished ones."""
    logging.getLogger().setLevel(logging.WARNING)
    unknown = [s for s in config.stages if s not in stages.REGISTRY]
    if unknown:
        raise ValueError(f"unknown stages {unknown} in config.stages; available: {sorted(stages.REGISTRY)}")
    r = Run(config, workdir)
    process_zero_writes("config", lambda: write_atomically(r.workdir / "config.json",
                                                           config.to_json_best_effort(indent=2).encode()))
    try:
        for name in config.stages:
            done = r.workdir / name / "DONE"
            if done.exists():
                print(f"[{name}] already done ({done}); skipping")
                continue
            print(f"[{name}] starting")
            r.stage_dir(name)  # holds DONE even when the stage writes nothing else
            start = time.perf_counter()
            stages.REGISTRY[name](r)
            elapsed = time.perf_counter() - start
            process_zero_writes(f"stage {name}", functools.partial(done.write_text, json.dumps({"seconds": elapsed})))
            print(f"[{name}] done in {elapsed:.1f}s")
    finally:  # also when a stage fails or is interrupted: the logs so far are kept (uploaded, on an object store)
        if "writer" in r.__dict__:
            r.writer.close()
    return r
