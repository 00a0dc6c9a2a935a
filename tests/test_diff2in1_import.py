"""Importing the public Diff-2-in-1 checkpoints: a PyTorch re-statement with the public names (tests/public_diff2in1),
randomly initialised and perturbed, saved as state dicts, converted; fusion and decoder outputs (every level, test
mode) and the train-mode statistics updates must match in fp32 (max|delta| <= 1e-4 * max|ref|)."""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from etils import epath

from d2i_jax.perception.fusion import FeatureFusion, group_by_stride
from d2i_jax.perception.normal_head import NormalHead
from tests import public_diff2in1 as public
from tests.gcs_emulator import upload
from weights_conversion import diff2in1
from weights_conversion.torch_to_flax import ConversionError

RTOL = 1e-4
TINY = {"group_channels": (24, 20, 16, 12), "reduce": (32, 12, 8, 8), "deconv": (8, 8),
        "decoder": (16, 16, 16, 8), "hidden": 16}


def close(ours, ref, what: str) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
    print(f"{what}: max relative error {err:.2e}")  # shown with `pytest -s`
    assert err <= RTOL, f"{what}: max relative error {err:.2e}"


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm / GroupNorm statistics and affine parameters, spectral-norm vectors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("var", "var1", "var2")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("mean", "mean1", "mean2", "u0")) or (t.ndim == 1 and "bias" not in name):
                t.copy_(torch.randn(t.shape, generator=g) * (0.3 if "mean" in name else 1.0) + (
                    1.0 if name.endswith("weight") else 0.0))


def build(widths: dict, seed: int = 0) -> tuple[public.SNmodule, public.Decoder]:
    torch.manual_seed(seed)
    sn = public.SNmodule(widths["group_channels"], widths["reduce"], widths["deconv"])
    skips = (*widths["reduce"][:3], *widths["deconv"])
    bae = public.Decoder(skips, widths["decoder"], widths["hidden"])
    perturb(sn, seed + 1)
    perturb(bae, seed + 2)
    return sn, bae


def features(widths: dict, image: int, batch: int = 2, seed: int = 3) -> list[np.ndarray]:
    """Two block outputs per stride group (strides 64, 32, 16, 8; channels split unevenly), NHWC, in block order."""
    rng = np.random.default_rng(seed)
    out = []
    for stride, c in zip((64, 32, 16, 8), widths["group_channels"], strict=True):
        side = image // stride
        for part in (c // 3, c - c // 3):
            out.append(rng.normal(size=(batch, side, side, part)).astype(np.float32))
    return out


def torch_features(feats: list[np.ndarray]) -> dict[str, list[torch.Tensor]]:
    t = [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous() for f in feats]
    return {g: t[2 * i:2 * i + 2] for i, g in enumerate(public.GROUPS)}


def to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def fusion(widths: dict) -> FeatureFusion:
    return FeatureFusion(**{k: tuple(v) for k, v in widths["fusion"].items()})


def saved_and_read(tmp_path, sn, bae) -> tuple[dict, dict]:
    torch.save(sn.state_dict(), tmp_path / "sn.pth")
    torch.save(bae.state_dict(), tmp_path / "bae.pth")
    return diff2in1.read_checkpoint(tmp_path / "sn.pth"), diff2in1.read_checkpoint(tmp_path / "bae.pth")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d2i")
    sn, bae = build(TINY)
    sn_state, bae_state = saved_and_read(tmp, sn, bae)
    model, widths = diff2in1.convert(sn_state, bae_state)
    return sn, bae, model, widths


def test_widths_read_off_the_checkpoint(tiny):
    _, _, _, widths = tiny
    assert widths["fusion"] == {"reduce_channels": [32, 12, 8, 8], "deconv_channels": [8, 8]}
    assert widths["head"] == {"decoder_channels": [16, 16, 16, 8], "mlp_hidden": 16}
    assert widths["group_channels"] == [24, 20, 16, 12]
    assert "--config.fusion.reduce_channels='(32, 12, 8, 8)'" in diff2in1.config_overrides(widths)


def apply_test_mode(model: dict, widths: dict, feats: list[np.ndarray], image: int) -> tuple[tuple, tuple]:
    """(fusion outputs, decoder maps) of the converted model in test mode, in one jitted call."""
    head = widths["head"]
    head = NormalHead(decoder_channels=tuple(head["decoder_channels"]), mlp_hidden=head["mlp_hidden"])
    size = (image, image)

    def run(params, stats, f):
        skips = fusion(widths).apply({"params": params["fusion"], "batch_stats": stats["fusion"]},
                                     group_by_stride(f, size), size, train=False)
        return skips, head.apply({"params": params["head"]}, skips, train=False).maps

    return jax.jit(run)(model["params"]["head"], model["batch_stats"], feats)


def test_test_mode_parity(tiny):
    sn, bae, model, widths = tiny
    sn.eval()
    image = 128
    feats = features(TINY, image)
    with torch.no_grad():
        ref_fusion = sn(torch_features(feats), image)
        ref_maps = bae(*ref_fusion)
    skips, maps = apply_test_mode(model, widths, feats, image)
    for i, (ours, ref) in enumerate(zip(skips, ref_fusion, strict=True)):
        close(ours, nhwc(ref), f"fusion output {i}")
    assert len(maps) == 4
    for level, (ours, ref) in enumerate(zip(maps, ref_maps, strict=True)):
        close(ours, nhwc(ref), f"decoder level {level}")


def test_train_mode_statistics_updates(tiny):
    """One train-mode fusion pass: same outputs (batch statistics) and the same BatchNorm running statistics and
    spectral-norm u afterwards (PyTorch's unbiased running variance)."""
    original, bae, model, widths = tiny
    sn = public.SNmodule(TINY["group_channels"], TINY["reduce"], TINY["deconv"])
    sn.load_state_dict(original.state_dict())
    sn.train()
    image = 128
    feats = features(TINY, image, seed=7)
    ref = sn(torch_features(feats), image)
    updated, _ = diff2in1.convert(to_numpy(sn), to_numpy(bae))

    size = (image, image)
    out, new = jax.jit(lambda v, f: fusion(widths).apply(v, group_by_stride(f, size), size, train=True,
                                                         mutable=["batch_stats"]))(
        {"params": model["params"]["head"]["fusion"], "batch_stats": model["batch_stats"]["fusion"]}, feats)
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        close(o, nhwc(r), f"train-mode fusion output {i}")
    flat_ours = jax.tree_util.tree_flatten_with_path(new["batch_stats"])[0]
    expected = updated["batch_stats"]["fusion"]
    for path, value in flat_ours:
        want = functools.reduce(lambda t, k: t[k.key], path, expected)
        before = functools.reduce(lambda t, k: t[k.key], path, model["batch_stats"]["fusion"])
        assert not np.allclose(want, before), f"{jax.tree_util.keystr(path)} did not move in PyTorch"
        close(value, want, f"updated {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_full_width_parity_at_64px(tmp_path):
    """The public widths (converted without any config override), test mode, at the smallest valid image."""
    sn, bae = build({"group_channels": (7680, 7040, 4160, 2560), "reduce": (2048, 176, 64, 64), "deconv": (40, 24),
                     "decoder": (1024, 512, 256, 128), "hidden": 128}, seed=5)
    sn.eval()
    model, widths = diff2in1.convert(*saved_and_read(tmp_path, sn, bae))
    assert diff2in1.config_overrides(widths) == []
    feats = features({"group_channels": (7680, 7040, 4160, 2560)}, 64, batch=1)
    with torch.no_grad():
        ref_fusion = sn(torch_features(feats), 64)
        ref_maps = bae(*ref_fusion)
    skips, maps = apply_test_mode(model, widths, feats, 64)
    for i, (ours, ref) in enumerate(zip(skips, ref_fusion, strict=True)):
        close(ours, nhwc(ref), f"full-width fusion output {i}")
    for level, (ours, ref) in enumerate(zip(maps, ref_maps, strict=True)):
        close(ours, nhwc(ref), f"full-width decoder level {level}")


def test_conversion_errors_list_every_problem(tiny):
    sn, bae, _, _ = tiny
    sn_state, bae_state = to_numpy(sn), to_numpy(bae)
    del sn_state["mid_feature_mix_conv.conv_sc.u0"]
    sn_state["extra_head.weight"] = np.zeros((3, 3), np.float32)
    bae_state["out_conv_res8.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError) as e:
        diff2in1.convert(sn_state, bae_state)
    msg = str(e.value)
    assert "1 missing" in msg and "sn: mid_feature_mix_conv.conv_sc.u0" in msg
    assert "1 unexpected" in msg and "sn: extra_head.weight (3, 3)" in msg
    assert "1 shape mismatches" in msg and "bae: out_conv_res8.bias" in msg
    assert "transfromer_decoder" not in msg and "to_k" not in msg and "sv0" not in msg  # ignored by name


def test_pickles_that_need_more_than_tensors_are_refused(tmp_path):
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, tmp_path / "full.pth")
    with pytest.raises(ConversionError, match=r"full\.pth with torch\.load\(weights_only=True\).*arbitrary code"):
        diff2in1.read_checkpoint(tmp_path / "full.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"cannot read .*broken\.pth"):
        diff2in1.read_checkpoint(tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        diff2in1.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "lightning.pth")
    np.testing.assert_array_equal(diff2in1.read_checkpoint(tmp_path / "lightning.pth")["w"], np.ones(2))


def test_cli_writes_a_model_folder(tiny, tmp_path, capsys):
    sn, bae, model, _ = tiny
    torch.save(sn.state_dict(), tmp_path / "sn.pth")
    torch.save(bae.state_dict(), tmp_path / "bae.pth")
    assert diff2in1.main(["--sn", str(tmp_path / "sn.pth"), "--bae", str(tmp_path / "bae.pth"),
                          "--out", str(tmp_path / "out")]) == 0
    assert "--config.init_from=" in capsys.readouterr().out
    from d2i_jax.models.loading import restore_params

    template = jax.eval_shape(lambda: model)
    restored = restore_params(tmp_path / "out" / "model", template, jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, restored, model)
    assert diff2in1.main(["--sn", str(tmp_path / "nope.pth"), "--bae", str(tmp_path / "bae.pth"),
                          "--out", str(tmp_path / "out2")]) == 1


def test_cli_on_gcs(tiny, gcs, tmp_path, monkeypatch):
    """Checkpoints and the output folder as gs:// URLs (the emulator): the model written there restores exactly."""
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    sn, bae, model, _ = tiny
    (tmp_path / "ckpt").mkdir()
    torch.save(sn.state_dict(), tmp_path / "ckpt" / "sn.pth")
    torch.save(bae.state_dict(), tmp_path / "ckpt" / "bae.pth")
    url = upload(tmp_path / "ckpt", f"{gcs}/diff2in1")
    assert diff2in1.main(["--sn", f"{url}/sn.pth", "--bae", f"{url}/bae.pth", "--out", f"{url}/out"]) == 0
    from d2i_jax.models.loading import restore_params

    restored = restore_params(f"{url}/out/model", jax.eval_shape(lambda: model), jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, restored, model)
    info = json.loads(epath.Path(f"{url}/out/{diff2in1.MODEL_INFO}").read_text())
    assert info["sources"] == {"sn": f"{url}/sn.pth", "bae": f"{url}/bae.pth"}


def import_into_run(tmp_path, stages: tuple[str, ...]):
    """(run, converted model): a public-layout checkpoint with the micro config's widths, converted by the CLI and
    given to a micro run of `stages` as `config.init_from`."""
    from d2i_jax import runner
    from tests.test_pipeline_e2e import micro_config

    config = micro_config()
    config.stages = stages
    workdir = tmp_path / "run"
    shapes = runner.Run(config, workdir).model_template()["params"]["head"]["fusion"]
    groups = [int(shapes[f"reduce{i}"]["kernel"].shape[-2]) for i in range(4)]
    sn, bae = build({"group_channels": groups, "reduce": config.fusion.reduce_channels,
                     "deconv": config.fusion.deconv_channels, "decoder": config.task.head.decoder_channels,
                     "hidden": config.task.head.mlp_hidden})
    torch.save(sn.state_dict(), tmp_path / "sn.pth")
    torch.save(bae.state_dict(), tmp_path / "bae.pth")
    out = tmp_path / "imported"
    assert diff2in1.main(["--sn", str(tmp_path / "sn.pth"), "--bae", str(tmp_path / "bae.pth"), "--out", str(out)]) == 0
    config.init_from = str(out)
    return runner.run(config, workdir), diff2in1.convert(to_numpy(sn), to_numpy(bae))[0]


def test_init_from_replaces_the_warmup(tmp_path):
    """A converted checkpoint given as `config.init_from` is theta_W: nothing is trained, every stage loads it."""
    r, expected = import_into_run(tmp_path, ("warmup",))
    assert (r.workdir / "warmup" / "DONE").exists() and not (r.workdir / "warmup" / "checkpoints").exists()
    params, stats = r.load_model("warmup")
    jax.tree.map(np.testing.assert_array_equal, {"params": params, "batch_stats": stats}, expected)

    r.config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no model/ folder"):
        r.load_model("warmup")


@pytest.mark.slow
def test_init_from_is_evaluated(tmp_path):
    r, _ = import_into_run(tmp_path, ("warmup", "evaluate"))
    metrics = json.loads((r.workdir / "metrics.json").read_text())
    assert set(metrics) == {"untrained", "theta_W"} and np.isfinite(metrics["theta_W"]["mean"])
