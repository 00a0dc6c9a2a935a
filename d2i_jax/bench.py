"""Speed of d2i_jax and a PyTorch / diffusers peer, measured side by side in one run (REFERENCE §5).

    python -m d2i_jax.bench                                  # every row, full size (an H100 / H200)
    python -m d2i_jax.bench --rows a,e --json /tmp/bench.json
    python -m d2i_jax.bench --tiny --repeats 1 --warmup 0    # CPU smoke mode (CI): same code, tiny models

Rows: (a) UNet forward, (b) full fine-tune step, (c) Diff-2-in-1 frozen-backbone train step, (d) data creation,
(e) GenPercept-style one-step perception latency, (f) VPD segmentation fine-tune step (configs/ade20k.py), (g)
GenPercept's fine-tune micro-step with gradient accumulation (configs/genpercept_normals.py's batch and size). Each
figure is the median of `--repeats` timed calls after `--warmup` calls, each call synchronised with the device
(`block_until_ready` / `torch.cuda.synchronize`). FLOPs are counted by XLA's cost analysis of the lowered HLO with
reference (einsum) attention, because fused kernels such as cuDNN flash attention are opaque custom calls to the
counter; the peer doing the same work is credited the same FLOPs. MFU = FLOPs / time / `--peak-tflops`; n/a on CPU.
All weights are random.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import ade20k
from d2i_jax.data import keys
from d2i_jax.diffusion.schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule
from d2i_jax.models.loading import build_module, param_shapes
from d2i_jax.models.random_sd import TINY_UNET, TINY_VAE, random_fill
from d2i_jax.models.unet import REMAT_POLICIES
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.fusion import FeatureFusion
from d2i_jax.perception.generation import PairGenerator
from d2i_jax.perception.model import DensePredictor, Perceiver
from d2i_jax.runner import make_backbone, make_perceiver
from d2i_jax.stages.warmup import optimizer
from d2i_jax.tasks import get_task
from d2i_jax.tasks.normals import NormalsTask
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import Steps, make_optimizer

# ----------------------------------------------------------------------------------------------- model shapes

SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8, "cross_attention_dim": 768,
}
SD21_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20],
                             "cross_attention_dim": 1024, "use_linear_projection": True}
SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
}
# The demo's tiny SD with one layer per block and cross-attention at the finest level only (every block type still
# runs): CPU smoke runs are dominated by XLA compile time, which grows with the number of layers, not their width.
BENCH_TINY_UNET: dict[str, Any] = {
    **TINY_UNET, "layers_per_block": 1, "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["CrossAttnDownBlock2D"] + ["DownBlock2D"] * 3,
    "up_block_types": ["UpBlock2D"] * 3 + ["CrossAttnUpBlock2D"],
}
BENCH_TINY_SD21_UNET: dict[str, Any] = {**BENCH_TINY_UNET, "attention_head_dim": [2, 4, 4, 4],
                                        "cross_attention_dim": 96, "use_linear_projection": True}
# Cheapest XLA CPU backend settings, used by --tiny on CPU only (its timings are not performance results).
TINY_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                             "xla_cpu_use_fusion_emitters": False}
# REFERENCE §5 per-image TFLOP at 512² (64² latent): the fallback when XLA's cost analysis is unavailable.
REFERENCE_TFLOP = {"unet": 0.803, "vae_encoder": 1.117, "vae_decoder": 2.515}
DEFAULT_PEAK_TFLOPS = 790.0  # dense bf16 measured on the H100 of REFERENCE §5
PEER_VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")
ADE20K_TRAIN_IMAGES = 20_210  # with configs/ade20k.py's epochs and batch: the length of row (f)'s poly schedule


@dataclasses.dataclass(frozen=True)
class Suite:
    """Model configs, batch sizes and resolutions of one benchmark mode.

    Attributes:
      name: "full" (REFERENCE §5 shapes) or "tiny" (CPU smoke mode).
      unet / unet_sd21 / vae: diffusers config dicts (SD1.5-shaped, SD2.1-shaped UNet; SD VAE).
      context_len: text-context tokens (77).
      latent_side: latent side of rows (a) and (b).
      batches_a / batch_b / batch_c / batch_d: batch sizes per row.
      image_side: image side of rows (c) and (d).
      one_step_sides: image sides of row (e) (batch 1).
      ddim_steps / start_t: row (d)'s DDIM steps and partial-noise level.
      head / fusion: `NormalHead` and `FeatureFusion` fields (empty: the public-code sizes, their defaults).
      seg_head: row (f)'s `SemanticFPN` fields over configs/ade20k.py's (empty: VPD's).
      one_step_train: row (g)'s (batch, image side, gradient-accumulation micro-steps): GenPercept's recipe
        (configs/genpercept_normals.py: 4 x 768², 8 micro-steps per update, effective batch 32).
      reference: REFERENCE §5's per-image FLOPs apply (fallback counts).
    """

    name: str
    unet: dict[str, Any]
    unet_sd21: dict[str, Any]
    vae: dict[str, Any]
    context_len: int
    latent_side: int
    batches_a: tuple[int, ...]
    batch_b: int
    batch_c: int
    batch_d: int
    image_side: int
    one_step_sides: tuple[int, ...]
    ddim_steps: int
    start_t: int
    head: dict[str, Any] = dataclasses.field(default_factory=dict)
    fusion: dict[str, Any] = dataclasses.field(default_factory=dict)
    seg_head: dict[str, Any] = dataclasses.field(default_factory=dict)
    one_step_train: tuple[int, int, int] = (4, 768, 8)
    reference: bool = False


FULL = Suite("full", SD15_UNET, SD21_UNET, SD_VAE, 77, 64, (8, 32), 16, 8, 8, 512, (512, 768), 50, 600,
             reference=True)
TINY = Suite("tiny", BENCH_TINY_UNET, BENCH_TINY_SD21_UNET, TINY_VAE, 77, 8, (2,), 2, 2, 2, 64, (64,), 4, 600,
             head={"decoder_channels": (64, 32, 32, 16), "mlp_hidden": 32},
             fusion={"reduce_channels": (128, 64, 32, 32), "deconv_channels": (16, 8)},
             seg_head={"out_channels": 32, "channels": 32}, one_step_train=(2, 64, 2))

# ----------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class Measurement:
    """One side of a row: median seconds per call, counted FLOPs per call, optional peak memory."""

    seconds: float
    flops: float | None
    peak_bytes: int | None = None
    variant: str = ""  # the peer's fastest variant
    tried: dict[str, float | str] = dataclasses.field(default_factory=dict)  # peer: seconds or error per variant


@dataclasses.dataclass
class Row:
    """One table row. `unit` "ms" rows are latencies (lower is better), the others throughputs."""

    key: str
    label: str
    unit: str
    items: int
    jax: Measurement
    peer: Measurement | None
    notes: str = ""
    flops_source: str = ""

    def value(self, m: Measurement | None) -> float | None:
        if m is None:
            return None
        return m.seconds * 1e3 if self.unit == "ms" else self.items / m.seconds

    @property
    def ratio(self) -> float | None:
        """JAX / peer in the row's unit (throughput: higher is better; latency: lower is better)."""
        return None if self.peer is None else self.value(self.jax) / self.value(self.peer)


def mfu(m: Measurement | None, peak_tflops: float | None) -> float | None:
    if m is None or m.flops is None or peak_tflops is None:
        return None
    return m.flops / m.seconds / (peak_tflops * 1e12)


def _num(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.3g}")


def _bytes(m: Measurement | None) -> str:
    if m is None or m.peak_bytes is None:
        return "n/a"
    return f"{m.peak_bytes / 2**30:.2f} GiB" if m.peak_bytes >= 2**30 else f"{m.peak_bytes / 2**20:.1f} MiB"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_table(rows: Sequence[Row], jax_peak: float | None, peer_peak: float | None) -> str:
    """The result table: row | JAX | peer | ratio | JAX MFU | peer MFU | notes."""
    header = ("row", "JAX", "peer", "ratio", "JAX MFU", "peer MFU", "notes")
    body = [(f"{r.label} [{r.unit}]", _num(r.value(r.jax)), _num(r.value(r.peer)),
             "n/a" if r.ratio is None else f"{r.ratio:.3g}x", _pct(mfu(r.jax, jax_peak)), _pct(mfu(r.peer, peer_peak)),
             r.notes or "-") for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header) - 1)]
    fmt = lambda line: " | ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
    return "\n".join([fmt(header), "-+-".join("-" * w for w in [*widths, 5]), *(fmt(line) for line in body)])


# ----------------------------------------------------------------------------------------------- helpers


def median_seconds(call: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, repeats: int) -> float:
    """Median wall time of `sync(call())` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(lowered: jax.stages.Lowered) -> float | None:
    """FLOPs of a lowered computation by XLA's cost analysis (pre-optimisation HLO); None if unavailable.

    A `lax.scan` body is counted once, so loops are counted from their parts (see `row_d`).
    """
    try:
        cost = lowered.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per executable
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def device_bytes_in_use() -> int:
    """Bytes JAX holds on the default device now (0 where it keeps no statistics)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_in_use", 0) if stats else 0


def host_random(seed: int, *shape: int, kind: str = "normal") -> jax.Array:
    """Random inputs made on the host (no per-shape RNG program to compile): "normal", "image" (uniform in
    [-1, 1]), "timestep" (int32 in [0, 1000)) or "unit" (unit vectors along the last axis)."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        return jnp.asarray(rng.uniform(-1.0, 1.0, shape).astype(np.float32))
    if kind == "timestep":
        return jnp.asarray(rng.integers(0, 1000, shape, dtype=np.int32))
    x = rng.standard_normal(shape, np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True) if kind == "unit" else x)


# ----------------------------------------------------------------------------------------------- the peer


class Peer:
    """diffusers models with random weights, bf16 autocast, on cuda if available; each row's call is timed in
    every variant (eager / channels-last / torch.compile, mode default) and the fastest is reported."""

    def __init__(self, suite: Suite, variants: Sequence[str], warmup: int, repeats: int):
        import torch

        self.torch, self.suite, self.variants = torch, suite, tuple(variants)
        self.warmup, self.repeats = warmup, repeats
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = self.device == "cuda"
        if not self.cuda and suite.name == "tiny":
            # Smoke runs on small shared CPUs: OpenMP workers spin-waiting against XLA's thread pool made single
            # eager calls up to 100x slower (seconds instead of milliseconds); one thread keeps CI predictable.
            torch.set_num_threads(1)
        self._models: dict[str, Any] = {}
        warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # dynamo on diffusers' version checks

    def sync(self, _: Any) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def autocast(self) -> Any:
        return self.torch.autocast(self.device, dtype=self.torch.bfloat16)

    def build(self, component: str, config: dict[str, Any], seed: int = 0) -> Any:
        """A fresh fp32 diffusers model on the device."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        self.torch.manual_seed(seed)
        with self.torch.device(self.device):
            return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    def model(self, name: str, component: str, config: dict[str, Any]) -> Any:
        """A cached eval-mode model (inference rows)."""
        if name not in self._models:
            self._models[name] = self.build(component, config).eval()
        return self._models[name]

    def formatted(self, module: Any, variant: str) -> Any:
        fmt = self.torch.channels_last if "channels_last" in variant else self.torch.contiguous_format
        return module.to(memory_format=fmt)

    def randn(self, *shape: int, variant: str = "eager") -> Any:
        x = self.torch.randn(*shape, device=self.device)
        return x.contiguous(memory_format=self.torch.channels_last) if x.ndim == 4 and "channels_last" in variant else x

    def compiled(self, fn: Callable[..., Any], variant: str) -> Callable[..., Any]:
        return self.torch.compile(fn, dynamic=False) if "compile" in variant else fn

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def best(self, make: Callable[[str], Callable[[], Any]], flops: float | None, *, memory: bool = False
             ) -> Measurement | None:
        """Times `make(variant)()` for every variant; the fastest as a Measurement (None if all failed)."""
        fastest, tried = None, {}
        for variant in self.variants:
            if "compile" in variant:
                self.torch._dynamo.reset()  # each compiled variant starts from empty caches
            self.free()
            base = self.torch.cuda.memory_allocated() if self.cuda else 0
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            try:
                seconds = median_seconds(make(variant), self.sync, warmup=self.warmup, repeats=self.repeats)
            except Exception as e:  # a failing variant (e.g. an inductor error) must not end the run
                tried[variant] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"  peer {variant}: {tried[variant]}", flush=True)
                continue
            tried[variant] = seconds
            peak = self.torch.cuda.max_memory_allocated() - base if (memory and self.cuda) else None
            if fastest is None or seconds < fastest.seconds:
                fastest = Measurement(seconds, flops, peak_bytes=peak, variant=variant)
        self.free()
        if fastest is not None:
            fastest.tried = tried
        return fastest


# ----------------------------------------------------------------------------------------------- the JAX side


class Bench:
    """Shared state of one run: the suite, JAX modules and params, timing settings and the peer (or None)."""

    def __init__(self, suite: Suite, *, attention: str, warmup: int, repeats: int, peer: Peer | None,
                 compiler_options: dict[str, Any] | None = None, remat_policy: str = "none"):
        self.suite, self.attention, self.warmup, self.repeats, self.peer = suite, attention, warmup, repeats, peer
        self.remat_policy = remat_policy  # row (b)'s UNet only
        self.compiler_options = compiler_options
        self._params: dict[str, Any] = {}
        self._shapes: dict[Any, Any] = {}
        self._flops: dict[tuple[int, int], dict[str, float | None]] = {}

    def module(self, component: str, config: dict[str, Any], attention: str, remat_policy: str = "none"
               ) -> nn.Module:
        """bf16 compute, fp32 params. Attention layers cuDNN cannot run (the VAE's single 512-wide head) fall back
        to XLA by themselves; `remat_policy` applies to the UNet."""
        return build_module(component, config, dtype=jnp.bfloat16, param_dtype=jnp.float32, attention_impl=attention,
                            remat_policy=remat_policy)

    def _shaped(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()` (an `eval_shape` trace) once per key."""
        if key not in self._shapes:
            self._shapes[key] = make()
        return self._shapes[key]

    def params(self, name: str, component: str, config: dict[str, Any], *, fresh: bool = False) -> Any:
        """Random fp32 params of an SD component, shared by the rows under `name`; `fresh`: new, unshared arrays
        (for steps that donate them)."""
        if name in self._params and not fresh:
            return self._params[name]
        shapes = self._shaped((component, repr(sorted(config.items()))),
                              lambda: param_shapes(component, self.module(component, config, "xla")))
        params = random_fill(shapes, len(self._params))
        if not fresh:
            self._params[name] = params
        return params

    def compile(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        if self.compiler_options:
            try:
                return lowered.compile(self.compiler_options)
            except jax.errors.JaxRuntimeError:  # an option this XLA does not know: compile as usual
                self.compiler_options = None
        return lowered.compile()

    def run_once(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` compiled with this run's compiler options: untimed set-up (train states, cached latents)."""
        return self.compile(jax.jit(fn).lower(*args))(*args)

    def flops(self, make: Callable[[str], Callable[..., Any]], args: Sequence[Any]) -> float | None:
        """Counted FLOPs of `make("xla")(*args)` (lowering only, nothing compiled or run)."""
        return count_flops(jax.jit(make("xla")).lower(*args))

    def time_jax(self, make: Callable[[str], Callable[..., Any]], args: Sequence[Any], *, stateful: bool = False,
                 memory_base: int | None = None, memory_estimate: bool = False) -> Measurement:
        """Compiles `make(attention)`, counts its FLOPs and times it.

        Args:
          make: attention implementation -> the function to time.
          args: its arguments.
          stateful: args[0] is a donated state that each call replaces with its first output (train steps).
          memory_base: measure peak memory: the device's peak minus this many bytes (`device_bytes_in_use()`
            before the arguments were built), or XLA's buffer estimate for the step where the device keeps no
            statistics (CPU).
          memory_estimate: measure peak memory as XLA's buffer estimate of the step, on every device.
        """
        lowered = jax.jit(make(self.attention), donate_argnums=(0,) if stateful else ()).lower(*args)
        flops = count_flops(lowered) if self.attention == "xla" else self.flops(make, args)
        compiled = self.compile(lowered)
        carry = list(args)

        def call() -> Any:
            out = compiled(*carry)
            if stateful:
                carry[0] = out[0]
            return out

        seconds = median_seconds(call, jax.block_until_ready, warmup=self.warmup, repeats=self.repeats)
        peak = None
        if memory_base is not None or memory_estimate:
            stats = jax.devices()[0].memory_stats()
            if not memory_estimate and stats and "peak_bytes_in_use" in stats:
                peak = stats["peak_bytes_in_use"] - memory_base
            else:  # asked for, or no device statistics (CPU): XLA's buffer assignment of the step
                m = compiled.memory_analysis()
                peak = getattr(m, "peak_memory_in_bytes", 0) or (
                    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
        return Measurement(seconds, flops, peak_bytes=peak)

    # ------------------------------------------------------------------------------------------ shared parts

    def context(self, batch: int, width: int, seed: int = 0) -> jax.Array:
        return host_random(seed, batch, self.suite.context_len, width)

    def perceiver(self, attention: str) -> Perceiver:
        s = self.suite
        backbone = Backbone(vae=self.module("vae", s.vae, attention), unet=self.module("unet", s.unet, attention),
                            schedule=NoiseSchedule.from_config())
        return Perceiver(backbone, DensePredictor(FeatureFusion(**s.fusion), self.task.make_head()))

    @property
    def task(self) -> NormalsTask:
        return NormalsTask(head=self.suite.head)

    def frozen(self) -> dict[str, Any]:
        s = self.suite
        return {"vae": self.params("vae", "vae", s.vae), "unet": self.params("unet", "unet", s.unet)}

    def head_variables(self, size: tuple[int, int]) -> tuple[Any, Any]:
        """Fresh random (params, batch_stats) of the fusion + head, shapes by `eval_shape` (`Perceiver.init`
        would compile an init program)."""
        def shapes() -> Any:
            p, s = self.perceiver("xla"), self.suite
            spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
            latents = spec(1, size[0] // 8, size[1] // 8, p.backbone.vae.latent_channels)
            unet = lambda u, z, t, c: p.backbone.unet.apply({"params": u}, z, t, c, return_features=True)[1]
            feats = jax.eval_shape(lambda *a: unet(*a).block_outputs(), self.frozen()["unet"], latents,
                                   spec(1, dtype=jnp.int32), spec(1, s.context_len, s.unet["cross_attention_dim"]))
            return jax.eval_shape(lambda f: p.predictor.init(jax.random.key(0), f, size, train=False), feats)

        variables = random_fill(self._shaped(("head", size), shapes), 100)
        return {"head": variables["params"]}, variables.get("batch_stats", {})

    def component_flops(self, batch: int, side: int) -> dict[str, float | None]:
        """Counted FLOPs of the VAE encoder, one UNet pass (with block outputs), the VAE decoder and the eval-mode
        fusion + head, at `batch` images of `side`²."""
        if (batch, side) not in self._flops:
            s, p = self.suite, self.perceiver("xla")
            bb, frozen = p.backbone, self.frozen()
            spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
            images, t = spec(batch, side, side, 3), spec(batch, dtype=jnp.int32)
            latents = spec(batch, side // 8, side // 8, bb.vae.latent_channels)
            ctx = spec(batch, s.context_len, s.unet["cross_attention_dim"])
            unet = lambda u, z, t, c: bb.unet.apply({"params": u}, z, t, c, return_features=True)
            feats = jax.eval_shape(lambda *a: unet(*a)[1].block_outputs(), frozen["unet"], latents, t, ctx)
            params, stats = self.head_variables((side, side))
            # Params are arguments, never closed over: closed-over arrays would be embedded in the HLO.
            lower = lambda fn, *a: count_flops(jax.jit(fn).lower(*a))
            self._flops[batch, side] = {
                "encode": lower(bb.posterior, frozen["vae"], images),
                "unet": lower(unet, frozen["unet"], latents, t, ctx),
                "decode": lower(lambda v, z: bb.vae.apply({"params": v}, z, method="decode"), frozen["vae"], latents),
                "head": lower(lambda hp, hs, f: p.head(hp, hs, f, (side, side), train=False)[0], params, stats, feats),
            }
        return self._flops[batch, side]

    def reference_flops(self, items: int, **per_image: float) -> float | None:
        """REFERENCE §5 fallback: `items` x the sum of `per_image` component counts (TFLOP), full size only."""
        if not self.suite.reference:
            return None
        return items * 1e12 * sum(REFERENCE_TFLOP[k] * n for k, n in per_image.items())


def _sum(parts: dict[str, float | None], weights: dict[str, float]) -> float | None:
    values = [parts[k] for k in weights]
    return None if any(v is None for v in values) else sum(parts[k] * w for k, w in weights.items())


def _flops_or_fallback(counted: float | None, fallback: float | None) -> tuple[float | None, str]:
    if counted is not None:
        return counted, "XLA cost analysis"
    return fallback, "REFERENCE §5 per-image FLOPs" if fallback is not None else "unavailable"


# ----------------------------------------------------------------------------------------------- rows


def row_a(b: Bench) -> list[Row]:
    """UNet forward (SD1.5 shape): img/s at each batch size."""
    s, rows = b.suite, []
    params, width, side = b.params("unet", "unet", s.unet), s.unet["cross_attention_dim"], s.latent_side

    def make(attn: str) -> Callable[..., Any]:
        unet = b.module("unet", s.unet, attn)
        return lambda p, x, t, c: unet.apply({"params": p}, x, t, c)

    for batch in s.batches_a:
        x, t = host_random(1, batch, side, side, 4), host_random(2, batch, kind="timestep")
        jm = b.time_jax(make, (params, x, t, b.context(batch, width)))
        jm.flops, source = _flops_or_fallback(jm.flops, b.reference_flops(batch, unet=1))

        def peer_make(variant: str, batch: int = batch) -> Callable[[], Any]:
            pr = b.peer
            unet = pr.formatted(pr.model("unet", "unet", s.unet), variant)
            x, ctx = pr.randn(batch, 4, side, side, variant=variant), pr.randn(batch, s.context_len, width)
            t = pr.torch.randint(0, 1000, (batch,), device=pr.device)
            fwd = pr.compiled(lambda x, t, c: unet(x, t, c).sample, variant)

            def call() -> Any:
                with pr.torch.inference_mode(), pr.autocast():
                    return fwd(x, t, ctx)
            return call

        pm = b.peer.best(peer_make, jm.flops) if b.peer else None
        rows.append(Row("a", f"(a) UNet forward, batch {batch}", "img/s", batch, jm, pm, flops_source=source))
    return rows


def row_b(b: Bench) -> list[Row]:
    """Full fine-tune step (SD1.5 UNet, noise-prediction MSE, AdamW, fp32 master params, bf16 compute)."""
    s, batch, side = b.suite, b.suite.batch_b, b.suite.latent_side
    width = s.unet["cross_attention_dim"]
    tx = make_optimizer("adamw", 1e-5, weight_decay=1e-2)
    base = device_bytes_in_use()
    params = b.params("unet", "unet", s.unet, fresh=True)  # donated to the step: not shared with other rows
    state = {"params": params, "opt_state": b.run_once(tx.init, params)}  # one compile, not one per leaf shape
    x, noise = host_random(3, batch, side, side, 4), host_random(4, batch, side, side, 4)
    t, ctx = host_random(5, batch, kind="timestep"), b.context(batch, width)

    def make(attn: str, remat_policy: str = b.remat_policy) -> Callable[..., Any]:
        unet = b.module("unet", s.unet, attn, remat_policy)

        def step(state: Any, x: jax.Array, t: jax.Array, ctx: jax.Array, noise: jax.Array) -> tuple[Any, jax.Array]:
            loss_fn = lambda p: jnp.mean((unet.apply({"params": p}, x, t, ctx).astype(jnp.float32) - noise) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss
        return step

    del params
    remat = b.remat_policy != "none"
    # MFU counts the model's FLOPs: remat's recomputation is not useful work (counted before `state` is donated).
    model_flops = b.flops(lambda attn: make(attn, "none"), (state, x, t, ctx, noise)) if remat else None
    jm = b.time_jax(make, (state, x, t, ctx, noise), stateful=True, memory_base=base)
    del state
    if remat:
        jm.flops = model_flops
    jm.flops, source = _flops_or_fallback(jm.flops, b.reference_flops(batch, unet=3))

    def peer_make(variant: str) -> Callable[[], Any]:
        pr, torch = b.peer, b.peer.torch
        unet = pr.formatted(pr.build("unet", s.unet).train(), variant)  # fresh per variant: fair peak memory
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=pr.cuda)
        x, noise = pr.randn(batch, 4, side, side, variant=variant), pr.randn(batch, 4, side, side, variant=variant)
        t, ctx = torch.randint(0, 1000, (batch,), device=pr.device), pr.randn(batch, s.context_len, width)
        fwd = pr.compiled(lambda x, t, c: unet(x, t, c).sample, variant)

        def call() -> Any:
            with pr.autocast():
                pred = fwd(x, t, ctx)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return call

    pm = b.peer.best(peer_make, jm.flops, memory=True) if b.peer else None
    where = "device" if jax.devices()[0].memory_stats() else "XLA buffer estimate"
    notes = f"peak mem JAX {_bytes(jm)} ({where}), peer {_bytes(pm)}"
    notes += f"; JAX remat {b.remat_policy}" if remat else ""
    return [Row("b", f"(b) fine-tune step, batch {batch}", "img/s", batch, jm, pm, notes, source)]


def row_c(b: Bench) -> list[Row]:
    """Diff-2-in-1 frozen-backbone train step (`Steps.train_step`): VAE encode + UNet + fusion + head fwd/bwd."""
    s, batch, side = b.suite, b.suite.batch_c, b.suite.image_side
    width = s.unet["cross_attention_dim"]
    ctx = b.context(1, width)
    params, stats = b.head_variables((side, side))
    tx = make_optimizer("adam", 3.57e-4)  # the public code's optimiser
    new_state = lambda: b.run_once(lambda p, st, k: TrainState.create(p, st, tx, k), params, stats, jax.random.key(4))
    batch_dict = {keys.IMAGE: host_random(6, batch, side, side, 3, kind="image"),
                  keys.NORMAL: host_random(7, batch, side, side, 3, kind="unit"),
                  keys.MASK: jnp.asarray(np.ones((batch, side, side), bool))}
    make = lambda attn: Steps(b.perceiver(attn), b.task, tx).train_step
    jm = b.time_jax(make, (new_state(), b.frozen(), batch_dict, ctx), stateful=True)
    # model.cache_latents: the same step reading each image's VAE posterior, encoded once before training
    bb = b.perceiver("xla").backbone
    cached = {**batch_dict, keys.MOMENTS: b.run_once(lambda p, x: bb.posterior(p, x).moments, b.frozen()["vae"],
                                                     batch_dict[keys.IMAGE])}
    jm_cached = b.time_jax(make, (new_state(), b.frozen(), cached, ctx), stateful=True)
    parts = b.component_flops(batch, side)
    peer_flops = _sum(parts, {"encode": 1, "unet": 1})
    fallback = b.reference_flops(batch, vae_encoder=1, unet=1)
    jm.flops, source = _flops_or_fallback(jm.flops, fallback)
    peer_flops = peer_flops if peer_flops is not None else fallback

    def peer_make(variant: str) -> Callable[[], Any]:
        pr, torch = b.peer, b.peer.torch
        vae = pr.formatted(pr.model("vae", "vae", s.vae), variant)
        unet = pr.formatted(pr.model("unet", "unet", s.unet), variant)
        x, c = pr.randn(batch, 3, side, side, variant=variant), pr.randn(batch, s.context_len, width)
        t = torch.zeros(batch, dtype=torch.long, device=pr.device)
        a0 = NoiseSchedule.from_config().alphas_cumprod[0].item()

        def backbone(x: Any, t: Any, c: Any) -> Any:
            z = vae.encode(x).latent_dist.sample() * s.vae["scaling_factor"]
            return unet(a0**0.5 * z + (1 - a0) ** 0.5 * torch.randn_like(z), t, c).sample
        fwd = pr.compiled(backbone, variant)

        def call() -> Any:
            with torch.inference_mode(), pr.autocast():
                return fwd(x, t, c)
        return call

    pm = b.peer.best(peer_make, peer_flops) if b.peer else None
    notes = "peer: VAE encode + UNet forward only (diffusers has no fusion / head); JAX: + fusion + head fwd/bwd"
    jm_cached.flops, cached_source = _flops_or_fallback(jm_cached.flops, b.reference_flops(batch, unet=1))
    cached_notes = "JAX: cached VAE moments (model.cache_latents), no encoder; peer: re-encodes, as the public code"
    return [Row("c", f"(c) D2I train step, batch {batch}, {side}px", "img/s", batch, jm, pm, notes, source),
            Row("c", f"(c) D2I train step, cached latents, batch {batch}, {side}px", "img/s", batch, jm_cached, pm,
                cached_notes, cached_source)]


def row_d(b: Bench) -> list[Row]:
    """Data creation (`PairGenerator`): VAE encode, q_sample at start_t, DDIM, VAE decode, labelling."""
    s, batch, side = b.suite, b.suite.batch_d, b.suite.image_side
    width = s.unet["cross_attention_dim"]
    ctx, uncond = b.context(batch, width, seed=6), b.context(1, width, seed=7)
    params, stats = b.head_variables((side, side))
    images = host_random(8, batch, side, side, 3, kind="image")
    rngs = jax.random.split(jax.random.key(9), batch)

    def make(attn: str) -> Callable[..., Any]:
        gen = PairGenerator(b.perceiver(attn), b.task, num_steps=s.ddim_steps, start_t=s.start_t)
        return lambda frozen, p, st, c, u, r, x: gen(frozen, p, st, c, u, r, x)

    jm = b.time_jax(make, (b.frozen(), params, stats, ctx, uncond, rngs, images))
    # The DDIM scan body is counted once by XLA: count the parts instead.
    parts = b.component_flops(batch, side)
    fallback = b.reference_flops(batch, vae_encoder=1, unet=s.ddim_steps, vae_decoder=1)
    jm.flops, source = _flops_or_fallback(
        _sum(parts, {"encode": 1, "unet": s.ddim_steps, "decode": 1, "head": 1}), fallback)
    peer_flops = _sum(parts, {"encode": 1, "unet": s.ddim_steps, "decode": 1})
    peer_flops = peer_flops if peer_flops is not None else fallback
    timesteps = PairGenerator(b.perceiver("xla"), b.task, num_steps=s.ddim_steps, start_t=s.start_t).timesteps

    def peer_make(variant: str) -> Callable[[], Any]:
        from diffusers import DDIMScheduler

        pr, torch = b.peer, b.peer.torch
        vae = pr.formatted(pr.model("vae", "vae", s.vae), variant)
        unet = pr.formatted(pr.model("unet", "unet", s.unet), variant)
        scale = s.vae["scaling_factor"]
        alphas = DDIMScheduler(**SD15_SCHEDULER_CONFIG).alphas_cumprod.to(pr.device)
        final = alphas[0]  # set_alpha_to_one=False: the step after t=1 uses alpha_bar_0
        plan = [(torch.full((batch,), int(t), device=pr.device), alphas[int(t)],
                 alphas[int(timesteps[i + 1])] if i + 1 < len(timesteps) else final) for i, t in enumerate(timesteps)]
        x, c = pr.randn(batch, 3, side, side, variant=variant), pr.randn(batch, s.context_len, width)
        a_start = alphas[s.start_t]

        def step(z: Any, t: Any, c: Any, a: Any, a_prev: Any) -> Any:  # diffusers DDIMScheduler.step, eta = 0
            eps = unet(z, t, c).sample.float()
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        encode = pr.compiled(lambda x: vae.encode(x).latent_dist.sample() * scale, variant)
        step = pr.compiled(step, variant)
        decode = pr.compiled(lambda z: vae.decode(z / scale).sample, variant)

        def call() -> Any:
            with torch.inference_mode(), pr.autocast():
                z0 = encode(x).float()
                z = a_start.sqrt() * z0 + (1 - a_start).sqrt() * torch.randn_like(z0)
                for t, a, a_prev in plan:
                    z = step(z, t, c, a, a_prev)
                return decode(z)
        return call

    pm = b.peer.best(peer_make, peer_flops) if b.peer else None
    notes = (f"t={s.start_t}, {s.ddim_steps} DDIM steps {timesteps[0]}..{timesteps[-1]}; peer: same loop in torch "
             "without the labelling head (diffusers has none)")
    return [Row("d", f"(d) data creation, batch {batch}, {side}px", "pairs/s", batch, jm, pm, notes, source)]


def row_e(b: Bench) -> list[Row]:
    """One-step perception latency at batch 1 (SD2.1-shaped UNet): VAE encode + UNet + VAE decode."""
    s, rows = b.suite, []
    width, scale = s.unet_sd21["cross_attention_dim"], s.vae["scaling_factor"]
    params = {"vae": b.params("vae", "vae", s.vae), "unet": b.params("unet_sd21", "unet", s.unet_sd21)}
    ctx = b.context(1, width)

    def make(attn: str) -> Callable[..., Any]:
        vae, unet = b.module("vae", s.vae, attn), b.module("unet", s.unet_sd21, attn)

        def one_step(p: Any, x: jax.Array, c: jax.Array) -> jax.Array:
            z = vae.apply({"params": p["vae"]}, x, method="encode").mean * scale
            out = unet.apply({"params": p["unet"]}, z, jnp.ones((1,), jnp.int32), c)
            return vae.apply({"params": p["vae"]}, out / scale, method="decode")
        return one_step

    for side in s.one_step_sides:
        x = host_random(10, 1, side, side, 3, kind="image")
        jm = b.time_jax(make, (params, x, ctx))
        fallback = b.reference_flops(1, vae_encoder=1, unet=1, vae_decoder=1)
        jm.flops, source = _flops_or_fallback(jm.flops, fallback and fallback * (side / 512) ** 2)

        def peer_make(variant: str, side: int = side) -> Callable[[], Any]:
            pr, torch = b.peer, b.peer.torch
            vae = pr.formatted(pr.model("vae", "vae", s.vae), variant)
            unet = pr.formatted(pr.model("unet_sd21", "unet", s.unet_sd21), variant)
            x, c = pr.randn(1, 3, side, side, variant=variant), pr.randn(1, s.context_len, width)
            t = torch.ones(1, dtype=torch.long, device=pr.device)

            def one_step(x: Any, t: Any, c: Any) -> Any:
                z = vae.encode(x).latent_dist.mode() * scale
                return vae.decode(unet(z, t, c).sample / scale).sample
            fwd = pr.compiled(one_step, variant)

            def call() -> Any:
                with torch.inference_mode(), pr.autocast():
                    return fwd(x, t, c)
            return call

        pm = b.peer.best(peer_make, jm.flops) if b.peer else None
        rows.append(Row("e", f"(e) one-step latency, batch 1, {side}px", "ms", 1, jm, pm,
                        "SD2.1-shaped UNet; lower is better", source))
    return rows


def row_g(b: Bench) -> list[Row]:
    """GenPercept's fine-tune micro-step (`one_step_train`: batch, side, accumulation): the frozen VAE encodes the RGB
    and the label image, the whole SD2.1-shaped UNet runs once on the RGB latent at a random t, its -v is decoded by
    the frozen VAE decoder, loss = pixel MSE + latent MSE, Adam 3e-5 inside gradient accumulation (optax.MultiSteps;
    the peer calls `optimizer.step()` every k-th call). The median call is a micro-step (k - 1 of k calls), on both
    sides. Memory: XLA's buffer estimate of the step (the device's peak statistic cannot be reset between rows)."""
    s, (batch, side, k) = b.suite, b.suite.one_step_train
    width, scale = s.unet_sd21["cross_attention_dim"], s.vae["scaling_factor"]
    tx = make_optimizer("adam", 3e-5, accumulate_steps=k)
    params = b.params("unet_sd21", "unet", s.unet_sd21, fresh=True)  # donated to the step
    state = {"params": params, "opt_state": b.run_once(tx.init, params)}
    vae_params = b.params("vae", "vae", s.vae)
    x, label = host_random(12, batch, side, side, 3, kind="image"), host_random(13, batch, side, side, 3, kind="image")
    t, ctx = host_random(14, batch, kind="timestep"), b.context(batch, width)

    def make(attn: str) -> Callable[..., Any]:
        vae, unet = b.module("vae", s.vae, attn), b.module("unet", s.unet_sd21, attn, b.remat_policy)

        def step(state: Any, vae_p: Any, x: jax.Array, label: jax.Array, t: jax.Array, ctx: jax.Array
                 ) -> tuple[Any, jax.Array]:
            encode = lambda im: vae.apply({"params": vae_p}, im, method="encode").mean * scale
            rgb, target = encode(x), encode(label)

            def loss_fn(p: Any) -> jax.Array:
                v = unet.apply({"params": p}, rgb, t, ctx).astype(jnp.float32)
                pixels = vae.apply({"params": vae_p}, -v / scale, method="decode").astype(jnp.float32)
                return jnp.mean((pixels - label) ** 2) + jnp.mean((v + target) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss
        return step

    del params
    jm = b.time_jax(make, (state, vae_params, x, label, t, ctx), stateful=True, memory_estimate=True)
    del state
    fallback = b.reference_flops(batch, vae_encoder=2, unet=3, vae_decoder=3)
    jm.flops, source = _flops_or_fallback(jm.flops, fallback and fallback * (side / 512) ** 2)

    def peer_make(variant: str) -> Callable[[], Any]:
        pr, torch = b.peer, b.peer.torch
        unet = pr.formatted(pr.build("unet", s.unet_sd21).train(), variant)  # fresh per variant: fair peak memory
        vae = pr.formatted(pr.model("vae", "vae", s.vae), variant).requires_grad_(False)
        opt = torch.optim.Adam(unet.parameters(), lr=3e-5, fused=pr.cuda)
        x, label = pr.randn(batch, 3, side, side, variant=variant), pr.randn(batch, 3, side, side, variant=variant)
        t, c = torch.randint(0, 1000, (batch,), device=pr.device), pr.randn(batch, s.context_len, width)

        def loss_of(x: Any, label: Any, t: Any, c: Any) -> Any:
            with torch.no_grad():
                rgb, target = (vae.encode(im).latent_dist.mode() * scale for im in (x, label))
            v = unet(rgb, t, c).sample.float()
            pixels = vae.decode(-v / scale).sample.float()
            return torch.nn.functional.mse_loss(pixels, label) + torch.nn.functional.mse_loss(v, -target)
        fwd = pr.compiled(loss_of, variant)
        calls = [0]

        def call() -> Any:
            with pr.autocast():
                loss = fwd(x, label, t, c) / k
            loss.backward()
            calls[0] += 1
            if calls[0] % k == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss
        return call

    pm = b.peer.best(peer_make, jm.flops, memory=True) if b.peer else None
    notes = (f"SD2.1-shaped UNet, {k} micro-steps per update; peak mem JAX {_bytes(jm)} (XLA buffer estimate), "
             f"peer {_bytes(pm)}" + (f"; JAX remat {b.remat_policy}" if b.remat_policy != "none" else ""))
    return [Row("g", f"(g) one-step fine-tune micro-step, batch {batch}, {side}px", "img/s", batch, jm, pm, notes,
                source)]


def row_f(b: Bench) -> list[Row]:
    """VPD segmentation fine-tune step (configs/ade20k.py), batch of row (b): `Steps.train_step` of the model the
    runner builds (VAE posterior mode unscaled, UNet at t = 1 without noise and trained at `unet_lr_mult`,
    `TextAdapter` on the class-embedding context, `SemanticFPN`, mmseg cross-entropy, AdamW with the poly schedule)."""
    s, batch, side = b.suite, b.suite.batch_b, b.suite.image_side
    config = ade20k.get_config()
    config.model.attention_maps = False  # the peer reads VPD's four features only (no attention store)
    config.task.head.update(s.seg_head)
    task, tx = get_task(config.task), optimizer(config, ADE20K_TRAIN_IMAGES, config.warmup.epochs)
    width, classes = s.unet["cross_attention_dim"], task.num_classes
    # the runner's context: the [classes, width] class-embedding table for every example
    ctx = jnp.broadcast_to(host_random(11, classes, width), (batch, classes, width))
    rng = np.random.default_rng(12)
    labels = rng.integers(0, classes + 1, (batch, side, side), dtype=np.int32)
    labels[labels == classes] = task.ignore_index  # one value in 151 unlabelled
    images = host_random(13, batch, side, side, 3, kind="image")

    def perceiver(attn: str) -> Perceiver:
        vae, unet = b.module("vae", s.vae, attn), b.module("unet", s.unet, attn)
        return make_perceiver(config, make_backbone(config.model, vae, unet), task)

    # fresh random head, adapter and UNet (donated with the state); shapes by `eval_shape`, nothing compiled
    params, stats = random_fill(perceiver("xla").init_shapes(b.frozen(), (side, side), ctx[:1]), 200)
    state = b.run_once(lambda p, st, k: TrainState.create(p, st, tx, k), params, stats, jax.random.key(14))
    del params, stats
    frozen = {"vae": b.frozen()["vae"]}  # the trained UNet is in the state
    batch_dict = {keys.IMAGE: images, keys.SEMSEG: jnp.asarray(labels)}
    make = lambda attn: Steps(perceiver(attn), task, tx).train_step
    jm = b.time_jax(make, (state, frozen, batch_dict, ctx), stateful=True)
    del state
    jm.flops, source = _flops_or_fallback(jm.flops, b.reference_flops(batch, vae_encoder=1, unet=3))

    def peer_make(variant: str) -> Callable[[], Any]:
        from torch.nn import functional as F

        from d2i_jax.torch_vpd import VPDSegHead, record_up_path

        pr, torch, head_cfg = b.peer, b.peer.torch, task.head
        vae = pr.formatted(pr.model("vae", "vae", s.vae), variant)
        unet = pr.formatted(pr.build("unet", s.unet).train(), variant)  # fresh per variant, as row (b)
        feats = record_up_path(unet)
        with torch.device(pr.device):
            head = VPDSegHead(tuple(s.unet["block_out_channels"]), width, head_cfg["out_channels"],
                              head_cfg["channels"], classes, tuple(head_cfg["feature_strides"]),
                              head_cfg["dropout_ratio"])
        head = pr.formatted(head.train(), variant)
        lr = config.train.lr
        opt = torch.optim.AdamW([{"params": head.parameters()},
                                 {"params": unet.parameters(), "lr": lr * config.model.unet_lr_mult}],
                                lr=lr, weight_decay=config.train.weight_decay, fused=pr.cuda)
        x, texts = pr.randn(batch, 3, side, side, variant=variant), pr.randn(batch, classes, width)
        t = torch.ones(batch, dtype=torch.long, device=pr.device)
        target = torch.as_tensor(labels, dtype=torch.long, device=pr.device)

        def forward(x: Any, t: Any, texts: Any) -> Any:  # VPD's `VPDSeg.extract_feat` + decode head
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            unet(z, t, head.text_adapter(texts, head.gamma))
            logits = head(list(feats))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
        fwd = pr.compiled(forward, variant)

        def call() -> Any:
            with pr.autocast():
                logits = fwd(x, t, texts)
            # mmseg 0.x: mean over all pixels, the ignored ones counting 0
            loss = F.cross_entropy(logits.float(), target, ignore_index=task.ignore_index, reduction="none").mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return call

    pm = b.peer.best(peer_make, jm.flops) if b.peer else None
    notes = (f"{classes} classes, UNet at {config.model.unet_lr_mult:g}x lr; peer: diffusers UNet + VPD's head in "
             "torch, no lr schedule; JAX's head and adapter compute in fp32, the peer's under autocast")
    return [Row("f", f"(f) VPD seg fine-tune step, batch {batch}, {side}px", "img/s", batch, jm, pm, notes, source)]


ROWS: dict[str, Callable[[Bench], list[Row]]] = {"a": row_a, "b": row_b, "c": row_c, "d": row_d, "e": row_e,
                                                 "f": row_f, "g": row_g}

# ----------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d2i_jax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--tiny", action="store_true", help="tiny models and resolutions (CPU smoke mode, CI)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; tiny 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak for MFU (default {DEFAULT_PEAK_TFLOPS:g} on GPU, MFU n/a on CPU)")
    p.add_argument("--attention", choices=("cudnn", "xla"), default=None, help="default: cudnn on GPU, else xla")
    p.add_argument("--remat-policy", "--remat_policy", dest="remat_policy", choices=tuple(REMAT_POLICIES),
                   default="none", help="rows (b), (g): rematerialisation of the JAX UNet's resnets / transformers")
    p.add_argument("--no-peer", action="store_true", help="JAX only")
    p.add_argument("--peer-variants", default=None,
                   help=f"comma-separated subset of {','.join(PEER_VARIANTS)} (default: all; tiny: eager,channels_last "
                        "because a cold torch.compile takes minutes on a CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    if args.peer_variants and set(args.peer_variants.split(",")) - set(PEER_VARIANTS):
        p.error(f"--peer-variants: choose from {','.join(PEER_VARIANTS)}")
    return args


def _peak(device_is_cpu: bool, explicit: float | None) -> float | None:
    return explicit if explicit is not None else (None if device_is_cpu else DEFAULT_PEAK_TFLOPS)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Runs the benchmark, prints the table and returns the rows."""
    args = parse_args(argv)
    # JAX must not take 75 % of the GPU up front: the peer runs in the same process (read at backend start).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    suite = TINY if args.tiny else FULL
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 10)
    on_cpu = jax.default_backend() == "cpu"
    attention = args.attention or ("xla" if on_cpu else "cudnn")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise SystemExit(f"--attention cudnn needs an NVIDIA GPU; this JAX runs on {jax.default_backend()}")
    variants = (args.peer_variants.split(",") if args.peer_variants
                else (PEER_VARIANTS[:2] if args.tiny else PEER_VARIANTS))
    peer = None if args.no_peer else Peer(suite, variants, warmup, repeats)
    options = TINY_CPU_COMPILER_OPTIONS if (args.tiny and on_cpu) else None
    bench = Bench(suite, attention=attention, warmup=warmup, repeats=repeats, peer=peer, compiler_options=options,
                  remat_policy=args.remat_policy)
    jax_peak = _peak(on_cpu, args.peak_tflops)
    peer_peak = None if peer is None else _peak(not peer.cuda, args.peak_tflops)
    device = jax.devices()[0]
    header = [f"d2i_jax bench ({suite.name}): jax {jax.__version__} on {device.platform}:{device.device_kind}, "
              f"bf16 compute, fp32 params, UNet attention={attention}; median of {repeats} after {warmup} warm-up",
              f"MFU: counted FLOPs / time / {jax_peak:g} TFLOP/s" if jax_peak else
              "MFU: n/a (no peak for this device; --peak-tflops sets one)"]
    if peer is not None:
        import diffusers

        name = peer.torch.cuda.get_device_name() if peer.cuda else platform.processor() or "cpu"
        header.append(f"peer: torch {peer.torch.__version__} + diffusers {diffusers.__version__} on {peer.device} "
                      f"({name}), bf16 autocast, variants {','.join(variants)} (best reported)")
    if on_cpu:
        header.append("CPU run: a smoke test of the code paths, not a performance result; MFU n/a")
    print("\n".join(header), flush=True)

    selected = args.rows.split(",")
    # (b) first: the device's peak-memory statistic cannot be reset, so nothing may run before it.
    order = sorted(selected, key=lambda k: (k != "b", k))
    results: dict[str, list[Row]] = {}
    for key in order:
        start = time.perf_counter()
        print(f"[bench] row {key} ...", flush=True)
        results[key] = ROWS[key](bench)
        print(f"[bench] row {key} done in {time.perf_counter() - start:.1f}s", flush=True)
    rows = [r for key in sorted(results) for r in results[key]]
    for r in rows:
        extra = [] if r.flops_source == "XLA cost analysis" else [f"FLOPs: {r.flops_source}"]
        extra += [f"peer best: {r.peer.variant}"] if r.peer is not None else []
        r.notes = "; ".join(x for x in (r.notes, *extra) if x)
    print(format_table(rows, jax_peak, peer_peak), flush=True)
    if args.json:
        payload = {"header": header, "suite": suite.name, "attention": attention, "peak_tflops": jax_peak,
                   "peer_peak_tflops": peer_peak,
                   "rows": [{**dataclasses.asdict(r), "value_jax": r.value(r.jax), "value_peer": r.value(r.peer),
                             "ratio": r.ratio, "jax_mfu": mfu(r.jax, jax_peak), "peer_mfu": mfu(r.peer, peer_peak)}
                            for r in rows]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=float)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
