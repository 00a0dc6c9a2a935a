"""GenPercept's DPT head (`d2i_jax.perception.dpt_head`) against the PyTorch modules it is made of: transformers'
`DPTNeck` (reassemble stage removed, as GenPercept does) and `DPTDepthEstimationHead`, diffusers' `Upsample2D` on the
finest level, with the same random weights, fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from transformers import DPTConfig
from transformers.models.dpt.modeling_dpt import DPTDepthEstimationHead, DPTNeck

from d2i_jax.perception.dpt_head import DPTDepth, DPTHead
from d2i_jax.tasks.relative_depth import RelativeDepthTask

CHANNELS = (8, 16, 32, 32)  # fine to coarse, as SD2.1's 320 / 640 / 1280 / 1280
SIDES = (8, 8, 4, 2)  # the finest two at the latent size, then 1/2 and 1/4


def torch_reference(activation: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    config = DPTConfig(neck_hidden_sizes=list(CHANNELS), fusion_hidden_size=256, add_projection=True, head_in_index=-1,
                       use_batch_norm_in_fusion_residual=False, use_bias_in_fusion_residual=False,
                       reassemble_factors=[4, 2, 1, 0.5])
    neck = DPTNeck(config)
    neck.reassemble_stage = None
    head = DPTDepthEstimationHead(config)
    if activation == "identity":
        head.head[-1] = torch.nn.Identity()
    upsample = Upsample2D(CHANNELS[0], use_conv=True)
    for module in (neck, head, upsample):
        for p in module.parameters():  # away from the default init, so a swapped or transposed weight shows
            torch.nn.init.normal_(p, std=0.05)
    return upsample.eval(), neck.eval(), head.eval()


def to_flax(upsample: torch.nn.Module, neck: torch.nn.Module, head: torch.nn.Module) -> dict:
    def conv(m: torch.nn.Conv2d) -> dict:
        out = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0))}
        if m.bias is not None:
            out["bias"] = jnp.asarray(m.bias.detach().numpy())
        return out

    def unit(r: torch.nn.Module) -> dict:
        return {"conv1": conv(r.convolution1), "conv2": conv(r.convolution2)}

    params = {"upsample0_conv": conv(upsample.conv), "head_projection": conv(head.projection),
              "head_conv1": conv(head.head[0]), "head_conv2": conv(head.head[2]), "head_conv3": conv(head.head[4])}
    params.update({f"neck_conv{i}": conv(c) for i, c in enumerate(neck.convs)})
    for i, layer in enumerate(neck.fusion_stage.layers):
        params[f"fusion{i}_projection"] = conv(layer.projection)
        params[f"fusion{i}_unit2"] = unit(layer.residual_layer2)
        if i:  # the coarsest layer has no residual input: its unit1 is never called
            params[f"fusion{i}_unit1"] = unit(layer.residual_layer1)
    return params


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_dpt_head_matches_transformers_and_diffusers_modules(activation):
    upsample, neck, head = torch_reference(activation)
    rng = np.random.default_rng(0)
    fine_to_coarse = [rng.standard_normal((2, s, s, c)).astype(np.float32) for c, s in zip(CHANNELS, SIDES,
                                                                                          strict=True)]
    with torch.no_grad():
        nchw = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in fine_to_coarse]
        nchw[0] = upsample(nchw[0])
        want = head(neck(nchw)).numpy()  # [B, H, W]
    module = DPTHead(activation=activation)
    got = module.apply({"params": to_flax(upsample, neck, head)}, [jnp.asarray(x) for x in fine_to_coarse[::-1]])
    assert got.shape == (2, 64, 64, 1)
    np.testing.assert_allclose(np.asarray(got)[..., 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    shapes = jax.tree.map(np.shape, module.init(jax.random.key(0), [jnp.asarray(x) for x in fine_to_coarse[::-1]]))
    assert shapes["params"] == jax.tree.map(np.shape, to_flax(upsample, neck, head))  # no param missing or extra


def test_relative_depth_task_builds_the_dpt_read_out_on_the_up_blocks():
    task = RelativeDepthTask(head={"type": "dpt", "fusion_channels": 16})
    head = task.make_head()
    assert isinstance(head, DPTDepth) and head.fusion_channels == 16
    rng = np.random.default_rng(1)
    up = [jnp.asarray(rng.standard_normal((1, s, s, c)), jnp.float32) for c, s in zip(CHANNELS[::-1], SIDES[::-1],
                                                                                     strict=True)]
    pixels, latent = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 8, 8, 4))
    out, _ = head.init_with_output(jax.random.key(0), [pixels, latent, *up])
    assert out.shape == (1, 64, 64, 1)
    with pytest.raises(ValueError, match=r"unknown task\.head\.type"):
        RelativeDepthTask(head={"type": "upernet"})
