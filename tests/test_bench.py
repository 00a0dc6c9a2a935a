"""The benchmark's CPU smoke mode: every row runs (JAX and the PyTorch peer) and the table is complete; row (f)'s
peer reads the features the JAX VPD path reads.

Timings are not asserted: this checks the code paths CI can reach, not speed (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from d2i_jax import bench
from d2i_jax.models.loading import build_module, param_shapes
from d2i_jax.perception.feature_paths import vpd
from d2i_jax.torch_vpd import record_up_path
from weights_conversion.torch_to_flax import convert_state_dict


def _expected_labels(suite: bench.Suite) -> list[str]:
    """The row labels `python -m d2i_jax.bench` prints for `suite`, with their units."""
    side = suite.image_side
    return [
        *(f"(a) UNet forward, batch {b} [img/s]" for b in suite.batches_a),
        f"(b) fine-tune step, batch {suite.batch_b} [img/s]",
        f"(c) D2I train step, batch {suite.batch_c}, {side}px [img/s]",
        f"(c) D2I train step, cached latents, batch {suite.batch_c}, {side}px [img/s]",
        f"(d) data creation, batch {suite.batch_d}, {side}px [pairs/s]",
        *(f"(e) one-step latency, batch 1, {s}px [ms]" for s in suite.one_step_sides),
        f"(f) VPD seg fine-tune step, batch {suite.batch_b}, {side}px [img/s]",
        f"(g) one-step fine-tune micro-step, batch {suite.one_step_train[0]}, {suite.one_step_train[1]}px [img/s]",
    ]


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed table's cells by row label (the table is the last thing printed)."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("row "))
    assert [c.strip() for c in lines[start].split(" | ")] == ["row", "JAX", "peer", "ratio", "JAX MFU", "peer MFU",
                                                              "notes"]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split(" | ")] for line in lines[start + 2:])}


def _positive(cell: str) -> float:
    value = float(cell.removesuffix("x"))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_tiny_all_rows_with_peer(capsys, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    table = _table(capsys.readouterr().out)

    assert list(table) == _expected_labels(bench.TINY)
    on_cpu = jax.default_backend() == "cpu"
    for label, (jax_cell, peer_cell, ratio, jax_mfu, peer_mfu, notes) in table.items():
        j, p, r = _positive(jax_cell), _positive(peer_cell), _positive(ratio)
        assert r == pytest.approx(j / p, rel=0.02), label  # three cells of 3 significant digits: ≤ 1.5 %
        if on_cpu:
            assert (jax_mfu, peer_mfu) == ("n/a", "n/a"), label
        assert "peer best:" in notes, label
    assert "peak mem JAX" in table[f"(b) fine-tune step, batch {bench.TINY.batch_b} [img/s]"][-1]

    assert all(r.jax.flops and r.peer.flops for r in rows), "every row's FLOPs are counted"
    payload = json.loads(out.read_text())
    assert [r["label"] for r in payload["rows"]] == [r.label for r in rows]
    assert all(r["value_jax"] > 0 and r["value_peer"] > 0 for r in payload["rows"])


def test_peer_reads_vpds_features():
    """Row (f)'s peer hooks the diffusers UNet where the JAX VPD path picks its features (same weights, fp32)."""
    torch.manual_seed(0)
    config = {k: v for k, v in bench.BENCH_TINY_UNET.items() if not k.startswith("_")}
    peer = UNet2DConditionModel(**config).eval()
    feats = record_up_path(peer)
    unet = build_module("unet", bench.BENCH_TINY_UNET)
    params = convert_state_dict({k: v.numpy() for k, v in peer.state_dict().items()}, param_shapes("unet", unet))
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((2, 8, 8, 4), np.float32), rng.standard_normal((2, 5, 64), np.float32)
    with torch.no_grad():
        peer(torch.from_numpy(x).permute(0, 3, 1, 2), torch.ones(2, dtype=torch.long), torch.from_numpy(ctx))
    features = lambda p, x, c: unet.apply({"params": p}, x, jnp.ones(2, jnp.int32), c, return_features=True)[1]
    outputs = jax.jit(lambda *a: features(*a).block_outputs(),
                      compiler_options=bench.TINY_CPU_COMPILER_OPTIONS)(params, x, ctx)
    ours = vpd.select(outputs, (64, 64))
    assert [f.shape[1:3] for f in ours] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    for level, (a, b) in enumerate(zip(ours, feats, strict=True)):
        np.testing.assert_allclose(np.asarray(a), b.permute(0, 2, 3, 1).numpy(), atol=1e-4, err_msg=f"level {level}")


def test_rows_are_validated():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "a,z"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer-variants", "eager,fast"])


def test_table_without_peer():
    m = bench.Measurement(seconds=0.5, flops=4e12)
    row = bench.Row("a", "(a) UNet forward, batch 8", "img/s", 8, m, None)
    text = bench.format_table([row], jax_peak=790.0, peer_peak=None)
    cells = _table(text)["(a) UNet forward, batch 8 [img/s]"]
    assert cells[:5] == ["16.0", "n/a", "n/a", "1.0%", "n/a"]  # 8 / 0.5 s; 4e12 / 0.5 s / 790e12
