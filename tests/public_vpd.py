"""A compact PyTorch re-statement of VPD's trainable heads (see VPD_FACTS / `d2i_jax.perception.vpd`), with the public
module names, so their state dicts carry the public checkpoints' keys: `VPDSegHead` (`text_adapter`, `gamma`, mmseg
0.x `neck` FPN + `decode_head` FPNHead) and `VPDDepthHead` (`encoder.{layer1,layer2,out_layer,text_adapter,gamma}`,
`decoder`, `last_layer_depth`). Widths are arguments; features come in NCHW, finest first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TextAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, dim))

    def forward(self, texts: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return texts + gamma * self.fc(texts)


class ConvModule(nn.Module):
    """mmcv ConvModule: conv (bias only without norm), optional BatchNorm named `bn`, optional ReLU."""

    def __init__(self, c_in: int, c_out: int, k: int, norm: bool = False, act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(c_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.act else x


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]


class FPNHead(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int, strides: tuple[int, ...],
                 dropout: float):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for s in strides:
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(s) - math.log2(strides[0])))):
                layers.append(ConvModule(in_channels if k == 0 else channels, channels, 3, norm=True, act=True))
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](inputs[0])
        for head, x in zip(self.scale_heads[1:], inputs[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


class VPDSegHead(nn.Module):
    """`VPDSeg` without the SD parts: the adapter (`text_adapter`, `gamma`) and the semantic FPN."""

    def __init__(self, in_channels=(320, 790, 1430, 1280), text_dim=768, out_channels=256, channels=256,
                 num_classes=150, strides=(4, 8, 16, 32), dropout=0.1):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(text_dim) * 1e-4)
        self.text_adapter = TextAdapter(text_dim)
        self.neck = FPN(in_channels, out_channels)
        self.decode_head = FPNHead(out_channels, channels, num_classes, strides, dropout)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_head(self.neck(feats))


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
