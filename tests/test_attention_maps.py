"""VPD's cross-attention maps: the probabilities the UNet records vs a diffusers processor doing the same (fp32), the
per-resolution averages and channel counts of VPD's features, and that recording changes no output."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2i_jax.models.loading import load_stable_diffusion
from d2i_jax.models.unet import cross_attention_probs
from d2i_jax.perception.feature_paths import vpd
from tests.sd_reference import UNET_SD1, UNET_SD15
from tests.tiny_pipeline import FAST_COMPILE

ATOL = 1e-5
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


class RecordingProcessor:
    """diffusers' attention with the head-averaged `softmax(q k^T * scale)` recorded under `name`."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        self.name, self.store, self.inner = name, store, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # [(B heads), T, S]
        self.store[self.name] = probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """(diffusers SD1-style tiny UNet, its Flax port and params)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**UNET_SD1).eval()
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder / "unet")
    sd = load_stable_diffusion(folder, components=("unet",), load_tokenizer=False)
    return ref, sd.unet, sd.params["unet"]


def test_recorded_maps_match_diffusers_and_change_no_output(unets):
    ref, unet, params = unets
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([1, 500])
    ctx = rng.standard_normal((2, 7, UNET_SD1["cross_attention_dim"])).astype(np.float32)

    store: dict[str, torch.Tensor] = {}
    recorded = lambda key: key.startswith(("down_blocks", "up_blocks")) and key.endswith("attn2.processor")
    ref.set_attn_processor({
        k: RecordingProcessor(k.removesuffix(".processor"), store) if recorded(k) else v
        for k, v in ref.attn_processors.items()
    })
    with torch.no_grad():
        ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx))

    recording = unet.clone(record_attention=True)

    def both(p):
        plain = unet.apply({"params": p}, x, t, ctx, return_features=True)
        return plain, recording.apply({"params": p}, x, t, ctx, return_features=True, mutable=["intermediates"])

    plain, (with_maps, state) = _jit(both)(params)
    # recording changes no output, and sows nothing without the mutable collection
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_maps), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert plain[1].cross_attention == ()
    _, unsown = jax.eval_shape(lambda p: recording.apply({"params": p}, x, t, ctx, mutable=["batch_stats"]), params)
    assert "intermediates" not in unsown

    ours = cross_attention_probs(state["intermediates"])
    assert list(ours) == list(store)  # same layers (down and up, not mid), same call order
    assert len(ours) == 2 * 2 + 2 * 3  # 2 attention levels: 2 down + 3 up layers each
    for name, p in ours.items():
        assert p.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(p), store[name].numpy(), atol=ATOL, rtol=0, err_msg=name)

    # per resolution (latent 16: only the 8x8 maps are kept), mean of the 5 layers there
    maps = vpd.attention_maps(list(ours.values()), (16, 16))
    assert list(maps) == [(8, 8)]
    expected = np.mean([v.numpy() for v in store.values() if v.shape[1] == 64], 0).reshape(2, 8, 8, 7)
    np.testing.assert_allclose(np.asarray(maps[(8, 8)]), expected, atol=ATOL, rtol=0)


def test_vpd_features_with_maps_at_sd15_size():
    """SD1.5 at 512 px, 150 class tokens (shapes only): 320@64, 640+150@32, 1280+150@16, 1280@8 latent px."""
    from d2i_jax.models.loading import build_module
    from d2i_jax.perception.backbone import Backbone

    unet = build_module("unet", UNET_SD15)
    params = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 64, 64, 4)), 1, jnp.zeros((1, 150, 768)))
    backbone = Backbone(vae=None, unet=unet, schedule=None, t_feat=1, noise_features=False, attention_maps=True)
    feats = jax.eval_shape(lambda p, z, c: backbone.features(p, z, c, jax.random.key(0)), params["params"],
                           jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
                           jax.ShapeDtypeStruct((2, 150, 768), jnp.float32))
    assert len(feats.cross_attention) == 2 * 3 + 3 * 3  # down levels 0-2 (2 layers) and up levels (3 layers)
    selected = jax.eval_shape(lambda f: vpd.select(f, (512, 512)), feats.block_outputs())
    assert [f.shape for f in selected] == [(2, 64, 64, 320), (2, 32, 32, 790), (2, 16, 16, 1430), (2, 8, 8, 1280)]
    plain = jax.eval_shape(lambda f: vpd.select(f, (512, 512)), feats.replace(cross_attention=()).block_outputs())
    assert [f.shape[-1] for f in plain] == [320, 640, 1280, 1280]
