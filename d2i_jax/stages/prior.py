"""Stage `prior`: trains an SD-shaped generative prior from scratch on unlabelled images (the embedded demo's
stand-in for SD1.5's pretraining), then writes it as a diffusers folder that every later stage loads as SD.

Skipped when `config.sd_path` names a checkpoint. Otherwise, in `workdir/prior/`:
1. **pool**: `prior.pool_root` (any folder of `img/*.png` + `caption/*.txt`: train on your own domain) or
   `prior.pool_size` procedural scenes rendered into `pool/`, drawn apart from the labelled train / test scenes
   (`d2i_jax.data.scenes.write_image_pool`), at `data.image_size`.
2. **autoencoder** (`vae/`): the random-weight SD's VAE trained on random `prior.vae.crop` crops (fully
   convolutional, as LDM trains on crops) with L1 + KL (`d2i_jax.training.prior_steps.AutoencoderSteps`).
3. **latents**: the pool's posteriors cached once; the latent scaling factor set to 1 / std of the pool's latents
   (LDM's `scale_by_std`; SD1.5's 0.18215 was found the same way) and written into the VAE config.
4. **denoiser** (`unet/`): the UNet trained from random weights for ε-prediction on the SD scheduler config's DDPM
   schedule, caption-conditioned through the (frozen) text encoder, captions dropped for classifier-free guidance
   (`DenoiserSteps`); its EMA (theta_C of the train state) is the UNet kept.
5. **export** (`sd/`): the diffusers layout (safetensors, configs, tokenizer, scheduler), read back through the
   converter, so the later stages run SD1.5's exact code path on it.
6. **quality**, in the log, `metrics.json["prior"]` and `samples.png`, each next to the random-weight prior's:
   the VAE's reconstruction PSNR on held-out images (the labelled test split: never in the pool) and the PSNR of
   partial-noise creations (`prior.T`, DDIM, caption-conditioned) against their source image. The `generate` stage
   shows pure-noise generations with their labels.
Each phase trains with the shared loop (`d2i_jax.training.loop.fit`): jitted, sharded, checkpointed, resumable.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.files import as_path
from d2i_jax.data.fingerprint import digest
from d2i_jax.data.latent_cache import WithMoments, encode_moments, load_moments
from d2i_jax.data.scenes import write_image_pool
from d2i_jax.data.synthetic import CaptionedImages
from d2i_jax.diffusion.sampling import ddim_sample
from d2i_jax.diffusion.schedule import NoiseSchedule, ddim_timesteps, q_sample
from d2i_jax.distributed import process_zero_writes
from d2i_jax.models.clip import CaptionContexts, embed_prompts
from d2i_jax.models.export import write_diffusers_folder
from d2i_jax.models.loading import StableDiffusion, load_stable_diffusion, param_shapes, restore_params, save_params
from d2i_jax.remote import list_files, local_copy
from d2i_jax.training.inference import sharded_call
from d2i_jax.training.loop import FitOptions, fit
from d2i_jax.training.prior_steps import AutoencoderSteps, DenoiserSteps, psnr_from_mse
from d2i_jax.training.steps import make_optimizer

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def run(r: Run) -> None:
    if r.config.sd_path:
        print(f"[prior] config.sd_path={r.config.sd_path} is the prior: nothing to train")
        return
    from d2i_jax.runner import compute_dtype

    cfg = r.config.prior
    out = r.stage_dir("prior")
    init = load_stable_diffusion(r.random_sd_path(), dtype=compute_dtype(r.config.model.dtype))
    size = tuple(r.config.data.image_size)
    pool = CaptionedImages(_pool_root(r, cfg, size), size)
    print(f"[prior] {len(pool)} unlabelled images at {size[0]}x{size[1]}")

    vae_params = _autoencoder(r, cfg.vae, init, pool)
    moments = encode_moments(pool, init.vae, r.shard(vae_params), r.mesh, out / "unet" / "moments.npy",
                             batch_size=cfg.unet.batch_size, fingerprint=_model_digest(out / "vae" / "model"),
                             desc="prior: latents of the pool")
    scaling_factor = latent_scaling_factor(load_moments(moments))
    print(f"[prior] latent scaling factor 1 / std = {scaling_factor:.5f} (SD1.5: 0.18215)")
    unet_params = _denoiser(r, cfg.unet, init, WithMoments(pool, moments), scaling_factor)

    configs = {**init.configs, "vae": {**init.configs["vae"], "scaling_factor": scaling_factor}}
    process_zero_writes("prior SD", lambda: write_diffusers_folder(
        out / "sd", {"unet": unet_params, "vae": vae_params, "text_encoder": init.params["text_encoder"]}, configs,
        scheduler=init.scheduler_config, tokenizer_from=init.config_folder / "tokenizer",
        note="the prior stage of d2i_jax: trained from scratch on unlabelled images"))
    trained = load_stable_diffusion(local_copy(out / "sd", "the prior's SD"),  # the converter's path
                                    dtype=compute_dtype(r.config.model.dtype))
    quality = _quality(r, cfg, init, trained)
    r.writer.summary({"prior": {**quality, "scaling_factor": scaling_factor, "pool_size": len(pool)}})


def _pool_root(r: Run, cfg: ml_collections.ConfigDict, size: tuple[int, int]) -> epath.Path:
    if cfg.pool_root:
        return as_path(cfg.pool_root)
    if r.config.data.name != "scenes":
        raise ValueError(f"config.prior.pool_root is empty: the prior renders procedural scenes, which are not "
                         f"config.data.name={r.config.data.name!r}'s domain; give a folder of img/*.png and "
                         "caption/*.txt")
    root = r.workdir / "prior" / "pool"
    seed = r.config.data.scenes.get("seed", r.config.seed)
    process_zero_writes("pool", lambda: write_image_pool(root, cfg.pool_size, size, seed))
    return root


def _model_digest(model_dir: epath.Path) -> str:
    """What a cache computed from a saved model depends on: its files (paths, sizes, times)."""
    return digest("prior-model", files=list_files(model_dir))


def latent_scaling_factor(moments: np.ndarray) -> float:
    """1 / std of latents sampled from the cached posteriors `[N, h, w, 2c]`, in closed form over all elements:
    Var z = E[mean² + exp(logvar)] - E[mean]² (LDM's `scale_by_std` computes it from one sampled batch)."""
    mean, logvar = np.split(np.asarray(moments, np.float64), 2, axis=-1)
    variance = np.mean(mean**2 + np.exp(np.clip(logvar, -30, 20))) - np.mean(mean) ** 2
    return float(1.0 / np.sqrt(variance))


def _options(r: Run, section: ml_collections.ConfigDict) -> FitOptions:
    return dataclasses.replace(FitOptions.from_config(r.config), batch_size=section.batch_size,
                               checkpoint_every=r.config.prior.checkpoint_every)


def _optimizer(section: ml_collections.ConfigDict) -> Any:
    return make_optimizer("adam", section.lr, grad_clip=section.grad_clip)


def _no_context(captions: list[str]) -> np.ndarray:
    return np.zeros((len(captions), 1, 1), np.float32)


def _trained(r: Run, phase: str, component: str, module: Any, train: Any) -> Any:
    """`component`'s params saved by `phase` (`prior/<phase>/model`), trained by `train()` first when missing."""
    directory = r.stage_dir(f"prior/{phase}") / "model"
    if not directory.exists():
        params = train()
        process_zero_writes(f"prior {phase}", lambda: save_params(directory, params))
    return restore_params(directory, param_shapes(component, module), jnp.float32)


def _autoencoder(r: Run, cfg: ml_collections.ConfigDict, init: StableDiffusion, pool: CaptionedImages) -> Any:
    def train() -> Any:
        tx = _optimizer(cfg)
        state = r.train_state(init.params["vae"], {}, tx, seed_offset=10)
        crop = _random_crop(cfg.crop) if cfg.crop else None
        print(f"[prior] autoencoder: {cfg.epochs} epochs, batch {cfg.batch_size}, "
              f"{f'{cfg.crop}x{cfg.crop} crops' if cfg.crop else 'whole images'}, KL weight {cfg.kl_weight}")
        state = fit("prior/vae", AutoencoderSteps(init.vae, tx, cfg.kl_weight), state, pool, frozen={}, mesh=r.mesh,
                    contexts=_no_context, checkpoint_dir=r.stage_dir("prior/vae") / "checkpoints", writer=r.writer,
                    options=_options(r, cfg), epochs=cfg.epochs, random_map=crop)
        return state.params

    return _trained(r, "vae", "vae", init.vae, train)


def _denoiser(r: Run, cfg: ml_collections.ConfigDict, init: StableDiffusion, pool: WithMoments,
              scaling_factor: float) -> Any:
    def train() -> Any:
        tx = _optimizer(cfg)
        state = r.train_state(init.params["unet"], {}, tx, seed_offset=11)
        embed = lambda prompts: embed_prompts(init.text_encoder, init.params["text_encoder"], init.tokenizer, prompts)
        steps = DenoiserSteps(init.unet, NoiseSchedule.from_config(init.scheduler_config), tx, scaling_factor,
                              caption_dropout=cfg.caption_dropout, ema_decay=cfg.ema_decay, ema_every=1)
        print(f"[prior] denoiser: {cfg.epochs} epochs, batch {cfg.batch_size}, caption dropout {cfg.caption_dropout}"
              f", EMA {cfg.ema_decay}")
        contexts = CaptionContexts(embed)
        captions = pool.source.captions()
        for start in range(0, len(captions), 512):  # all embedded up front, in one compiled shape
            contexts(captions[start:start + 512])
        state = fit("prior/unet", steps, state, pool, frozen=r.shard({"uncond": embed([""])}), mesh=r.mesh,
                    contexts=contexts, checkpoint_dir=r.stage_dir("prior/unet") / "checkpoints",
                    writer=r.writer, options=_options(r, cfg), epochs=cfg.epochs)
        return state.ema_params

    return _trained(r, "unet", "unet", init.unet, train)


def _random_crop(size: int) -> Any:
    def crop(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = example[keys.IMAGE]
        y, x = (int(rng.integers(0, d - size + 1)) for d in image.shape[:2])
        return {**example, keys.IMAGE: image[y:y + size, x:x + size]}

    return crop


def _quality(r: Run, cfg: ml_collections.ConfigDict, init: StableDiffusion, trained: StableDiffusion
             ) -> dict[str, Any]:
    """PSNRs of the trained and the random-weight prior on the held-out split, and `prior/samples.png`."""
    vae, unet, schedule = init.vae, init.unet, NoiseSchedule.from_config(trained.scheduler_config)
    timesteps = jnp.asarray(ddim_timesteps(schedule.num_train_timesteps, cfg.num_steps, start_t=cfg.T,
                                           steps_offset=schedule.steps_offset))

    def sample(params: Any, scaling: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = batch[keys.IMAGE]
        decode = lambda z: jnp.clip(vae.apply({"params": params["vae"]}, z, method="decode"), -1, 1)
        denoise = lambda x, t, c: unet.apply({"params": params["unet"]}, x, t, c)
        mean = vae.apply({"params": params["vae"]}, images, method="encode").mean
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(cfg.seed), batch[keys.ID][0]), mean.shape)
        start = q_sample(schedule, mean * scaling, noise, jnp.full((mean.shape[0],), cfg.T, jnp.int32))
        out = {"recon": decode(mean), "created": decode(ddim_sample(denoise, schedule, start, timesteps,
                                                                     context=batch["context"]) / scaling)}
        return {**out, **{f"{k}_psnr": psnr_from_mse(jnp.mean((v - images) ** 2, axis=(1, 2, 3)))
                          for k, v in out.items()}}

    sample = jax.jit(sample)
    priors = {"trained": trained, "random": init}
    held_out = r.source(r.config.data.test_split)
    n = len(held_out)
    sums = {name: {"recon_psnr": 0.0, "created_psnr": 0.0} for name in priors}
    rows = []
    for start in range(0, n, cfg.batch_size):
        examples = [held_out[i] for i in range(start, min(start + cfg.batch_size, n))]
        captions = [e[keys.CAPTION] for e in examples]
        outs = {}
        for name, sd in priors.items():
            batch = {keys.IMAGE: np.stack([e[keys.IMAGE] for e in examples]), keys.ID: np.full(len(examples), start),
                     "context": np.asarray(embed_prompts(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer,
                                                         captions))}
            params = r.shard({"vae": sd.params["vae"], "unet": sd.params["unet"]})
            outs[name] = sharded_call(sample, (params, jnp.float32(sd.vae.scaling_factor)), batch, r.mesh,
                                      rows=cfg.batch_size)
            for k in sums[name]:
                sums[name][k] += float(np.sum(outs[name][k]))
        for k, e in enumerate(examples[: max(cfg.num_pictures - len(rows), 0)]):
            rows.append([viz.image_to_uint8(e[keys.IMAGE]), *(viz.image_to_uint8(outs[name][what][k])
                                                            for what in ("recon", "created") for name in priors)])
    quality = {f"{k}_db": {name: sums[name][k] / n for name in priors} for k in ("recon_psnr", "created_psnr")}
    labels = ["held-out", *(f"{what}, {name}" for what in ("VAE", f"T={cfg.T}") for name in priors)]
    if jax.process_index() == 0:
        viz.save_grid(r.stage_dir("prior") / "samples.png", rows, labels)
    print(f"[prior] on {n} held-out images: VAE reconstruction PSNR {quality['recon_psnr_db']['trained']:.2f} dB "
          f"(random-weight prior {quality['recon_psnr_db']['random']:.2f}); T={cfg.T} creation against its source "
          f"{quality['created_psnr_db']['trained']:.2f} dB (random {quality['created_psnr_db']['random']:.2f}); "
          f"pictures in {r.stage_dir('prior') / 'samples.png'}")
    return quality
