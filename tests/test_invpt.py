"""InvPT's decoder (`d2i_jax.perception.invpt`) against a PyTorch re-statement with the public names
(`tests/torch_invpt.py`): a tiny random reference (norm statistics and affines perturbed), its state dict converted
by `weights_conversion.invpt`, the same non-square inputs, fp32: every task's final and intermediate predictions,
in eval and in train mode (BatchNorm batch statistics and their running updates), within 1e-4 of the reference's
largest magnitude; the converter's errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from d2i_jax.perception.invpt import InvPTDecoder
from tests.torch_invpt import InvPTReference
from weights_conversion.invpt import invpt_decoder_params
from weights_conversion.torch_to_flax import ConversionError

TASKS = {"semseg": 5, "normals": 3, "edge": 1}  # three tasks: a task-order or task-slicing mistake shows
CHANNELS = (6, 10, 7, 12)  # backbone maps 0..3 (InvPT: 1024 each)
SIDE = (8, 12)  # the maps' side: stages at 4x6, 8x12, 16x24, predictions at 32x48
SIZES = {"embed_dim": 8, "pred_channels": 8}
RTOL = 1e-4


def reference() -> InvPTReference:
    torch.manual_seed(0)
    ref = InvPTReference(TASKS, CHANNELS, **SIZES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or (t.ndim == 1 and not name.endswith("bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith(("proj_q.weight", "proj_k.weight", "fuse_attn.weight")):
                t.mul_(6.0)  # peaked attention: near-uniform weights would hide the queries, keys and messages
    return ref


def state_of(ref: torch.nn.Module) -> dict[str, np.ndarray]:
    """As an InvPT checkpoint's `model`: DDP's prefix and backbone keys the converter must leave alone."""
    state = {f"module.{k}": v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    state["module.backbone.pos_embed"] = np.zeros((1, 3, 4), np.float32)
    return state


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(2, *SIDE, c)).astype(np.float32) for c in CHANNELS]
    decoder = InvPTDecoder(TASKS, **SIZES)
    return reference(), decoder, maps


def run_torch(ref: InvPTReference, maps: list[np.ndarray], train: bool) -> tuple[dict, dict]:
    ref.train(train)
    with torch.no_grad():
        preds, inter = ref([torch.from_numpy(m).permute(0, 3, 1, 2).contiguous() for m in maps])
    return ({t: p.permute(0, 2, 3, 1).numpy() for t, p in preds.items()},
            {t: p.permute(0, 2, 3, 1).numpy() for t, p in inter.items()})


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def compare(ours: tuple[dict, dict], want: tuple[dict, dict], what: str) -> None:
    for kind, o, w in zip(("final", "intermediate"), ours, want, strict=True):
        assert sorted(o) == sorted(TASKS)
        for t in TASKS:
            err = rel_error(o[t], w[t])
            print(f"{what} {kind} {t}: max rel error {err:.1e}")
            assert err <= RTOL, f"{what} {kind} {t}: max |delta| / max |ref| = {err:.2e}"


def test_eval_matches_reference(setup):
    ref, decoder, maps = setup
    variables = invpt_decoder_params(state_of(ref), decoder)
    shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), maps, train=False))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, shapes)  # nothing missing or extra
    preds, inter = jax.jit(lambda v, f: decoder.apply(v, f, train=False))(variables, maps)
    assert preds["semseg"].shape == (2, 32, 48, 5) and inter["normals"].shape == (2, 4, 6, 3)
    compare((preds, inter), run_torch(ref, maps, train=False), "eval")


def test_train_matches_reference(setup):
    ref, decoder, maps = setup
    variables = invpt_decoder_params(state_of(ref), decoder)
    fn = jax.jit(lambda v, f: decoder.apply(v, f, train=True, mutable=["batch_stats"]))
    out, updates = fn(variables, maps)
    compare(out, run_torch(ref, maps, train=True), "train")
    after = invpt_decoder_params(state_of(ref), decoder)["batch_stats"]
    errs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), updates["batch_stats"],
                                        after))
    print(f"running statistics: max |delta| {max(errs):.1e}")
    assert max(errs) <= 1e-5, f"running statistics: max |delta| {max(errs):.1e}"


def test_drop_path_needs_a_key_in_training(setup):
    ref, decoder, maps = setup
    dropping = decoder.clone(drop_path_rate=0.5)
    variables = invpt_decoder_params(state_of(ref), decoder)
    with pytest.raises(ValueError, match="dropout_key"):
        jax.eval_shape(lambda v, f: dropping.apply(v, f, train=True, mutable=["batch_stats"]), variables, maps)
    fn = jax.jit(lambda v, f, k: dropping.apply(v, f, train=True, dropout_key=k, mutable=["batch_stats"])[0][0])
    first, again, other = (fn(variables, maps, jax.random.key(k)) for k in (0, 0, 1))
    want = run_torch(ref, maps, train=True)[0]
    for t in TASKS:
        np.testing.assert_array_equal(first[t], again[t])
        assert np.isfinite(first[t]).all()
        assert rel_error(first[t], want[t]) > 1e-2 and rel_error(first[t], other[t]) > 1e-2


def test_converter_names_missing_unexpected_and_misshaped_keys(setup):
    ref, decoder, _ = setup
    state = state_of(ref)
    gone = "module.multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn.fuse_attn.weight"
    bad = "module.multi_task_decoder.invpt.mix_proj.normals.0.weight"
    del state[gone]
    state[bad] = state[bad][:, :-1]
    state["module.heads.depth.linear_pred.weight"] = np.zeros((1, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        invpt_decoder_params(state, decoder)
    message = str(err.value)
    assert "1 missing" in message and gone.removeprefix("module.") in message
    assert "1 unexpected" in message and "heads.depth.linear_pred.weight (1, 16, 1, 1)" in message
    assert f"{bad.removeprefix('module.')}: checkpoint (16, 10, 1, 1)" in message and "(1, 1, 11, 16)" in message
