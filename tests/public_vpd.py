"""A compact PyTorch re-statement of VPD's trainable heads (see VPD_FACTS / `d2i_jax.perception.vpd`), with the public
module names, so their state dicts carry the public checkpoints' keys: `VPDSegHead` (`text_adapter`, `gamma`, mmseg
0.x `neck` FPN + `decode_head` FPNHead; in the package, `d2i_jax.torch_vpd`, as the benchmark's peer uses it) and
`VPDDepthHead` (`encoder.{layer1,layer2,out_layer,text_adapter,gamma}`, `decoder`, `last_layer_depth`). Widths are
arguments; features come in NCHW, finest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2i_jax.torch_vpd import TextAdapter, VPDSegHead

__all__ = ["Decoder", "DepthEncoder", "VPDDepthHead", "VPDSegHead", "silog"]


class DepthEncoder(nn.Module):
    """The trainable layers of `VPDDepthEncoder` (its SD parts left out)."""

    def __init__(self, ldm_prior=(320, 640, 2560), out_dim=1536, text_dim=768, groups=16):
        super().__init__()
        c0, c1 = ldm_prior[:2]
        self.layer1 = nn.Sequential(nn.Conv2d(c0, c0, 3, stride=2, padding=1), nn.GroupNorm(groups, c0), nn.ReLU(),
                                    nn.Conv2d(c0, c0, 3, stride=2, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(c1, c1, 3, stride=2, padding=1))
        self.out_layer = nn.Sequential(nn.Conv2d(sum(ldm_prior), out_dim, 1), nn.GroupNorm(groups, out_dim),
                                       nn.ReLU())
        self.text_adapter = TextAdapter(text_dim)
        self.gamma = nn.Parameter(torch.ones(text_dim) * 1e-4)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f8, f16, f32, f64 = feats
        coarse = torch.cat([f32, F.interpolate(f64, scale_factor=2)], dim=1)
        return self.out_layer(torch.cat([self.layer1(f8), self.layer2(f16), coarse], dim=1))


class Decoder(nn.Module):
    """Simple-Baseline deconv decoder as VPD configures it."""

    def __init__(self, c_in: int, c_out: int, filters=(32, 32, 32), kernels=(2, 2, 2)):
        super().__init__()
        layers: list[nn.Module] = []
        for planes, k in zip(filters, kernels, strict=True):
            padding, output_padding = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[k]
            layers += [nn.ConvTranspose2d(c_in, planes, k, stride=2, padding=padding, output_padding=output_padding,
                                          bias=False), nn.BatchNorm2d(planes), nn.ReLU()]
            c_in = planes
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.up(self.conv_layers(self.deconv_layers(x))))


class VPDDepthHead(nn.Module):
    """`VPDDepth` without the SD parts; `forward(feats, crop)` as VPD with `crop` for its padded 480 / 352 inputs."""

    def __init__(self, ldm_prior=(320, 640, 2560), encoder_channels=1536, decoder_channels=192,
                 filters=(32, 32, 32), kernels=(2, 2, 2), text_dim=768, groups=16, max_depth=10.0):
        super().__init__()
        self.max_depth = max_depth
        self.encoder = DepthEncoder(ldm_prior, encoder_channels, text_dim, groups)
        self.decoder = Decoder(encoder_channels, decoder_channels, filters, kernels)
        self.last_layer_depth = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(decoder_channels, 1, 3, padding=1))

    def forward(self, feats: list[torch.Tensor], crop: bool = False) -> torch.Tensor:
        x = self.encoder(feats)
        if crop:
            x = x[:, :, :-1, :-1]
        return torch.sigmoid(self.last_layer_depth(self.decoder(x))) * self.max_depth


def silog(pred: torch.Tensor, target: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    """VPD's `SiLogLoss.forward`."""
    valid = target > 0
    d = torch.log(target[valid]) - torch.log(pred[valid])
    return torch.sqrt(torch.pow(d, 2).mean() - lambd * torch.pow(d.mean(), 2))
