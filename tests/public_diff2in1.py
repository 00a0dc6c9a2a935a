"""A PyTorch re-statement of the public Diff-2-in-1 fusion (`SNmodule`) and Bae GN `Decoder` (test mode), with the
public code's module and parameter names, so their state dicts have the released checkpoints' keys.

Written from the public code's behaviour (REFERENCE §1.1 "Fusion, exactly", §1.2): in-place ReLUs, BigGAN spectral
norm (one power iteration from `u0`, eps 1e-4, `u0` / `sv0` written in training only), affine-free SegBlock
BatchNorms (eps 1e-4) and affine output BatchNorms; widths are arguments (defaults: the public ones), sizes follow
the input (the public code fixes them for 512 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = ("low", "mid", "high", "highest")


class SNConv2d(nn.Conv2d):
    """Conv2d whose weight is divided by its top singular value, estimated by one power iteration per call."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int, eps: float = 1e-4):
        super().__init__(c_in, c_out, kernel_size, padding=padding)
        self.eps = eps
        self.register_buffer("u0", torch.randn(1, c_out))
        self.register_buffer("sv0", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.weight.size(0), -1)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, eps=self.eps)
            u = F.normalize(v @ w.t(), eps=self.eps)
            if self.training:
                self.u0[:] = u
        sv = torch.squeeze((v @ w.t()) @ u.t())
        if self.training:
            with torch.no_grad():
                self.sv0[:] = sv
        return F.conv2d(x, self.weight / sv, self.bias, padding=self.padding)


class SegBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = SNConv2d(c_in, c_out, 3, 1)
        self.conv2 = SNConv2d(c_out, c_out, 3, 1)
        self.learnable_sc = c_in != c_out
        if self.learnable_sc:
            self.conv_sc = SNConv2d(c_in, c_out, 1, 0)
        self.register_buffer("stored_mean1", torch.zeros(c_in))
        self.register_buffer("stored_var1", torch.ones(c_in))
        self.register_buffer("stored_mean2", torch.zeros(c_out))
        self.register_buffer("stored_var2", torch.ones(c_out))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.stored_mean1, self.stored_var1, None, None, self.training, 0.1, 1e-4)
        h = self.activation(x)  # in place: x is now ReLU(BN1(x)) too
        h = self.conv1(h)
        h = F.batch_norm(h, self.stored_mean2, self.stored_var2, None, None, self.training, 0.1, 1e-4)
        h = self.conv2(self.activation(h))
        return h + (self.conv_sc(x) if self.learnable_sc else x)


class _Unused(nn.Module):
    """Stands for the public module's never-called transformer decoder / MLP: parameters with their key prefixes."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


class SNmodule(nn.Module):
    def __init__(self, group_channels=(7680, 7040, 4160, 2560), reduce=(2048, 176, 64, 64), deconv=(40, 24)):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        for g, c_in, c in zip(GROUPS, group_channels, reduce, strict=True):
            setattr(self, f"{g}_feature_conv", nn.Sequential(nn.Conv2d(c_in, c, kernel_size=1, bias=False)))
        for i in (1, 2, 3):
            setattr(self, f"{GROUPS[i]}_feature_mix_conv", SegBlock(reduce[i - 1] + reduce[i], reduce[i]))
        self.transfromer_decoder = _Unused()
        self.mlp = _Unused()
        self.to_k = nn.Linear(8, 4, bias=False)
        self.to_q = nn.Linear(6, 4, bias=False)
        self.bn_up0 = nn.BatchNorm2d(reduce[3])
        self.conv_up1 = nn.ConvTranspose2d(reduce[3], deconv[0], 2, 2, 0)
        self.bn_up1 = nn.BatchNorm2d(deconv[0])
        self.conv_up2 = nn.ConvTranspose2d(reduce[3] + deconv[0], deconv[1], 2, 2, 0)
        self.bn_up2 = nn.BatchNorm2d(deconv[1])

    def forward(self, features: dict[str, list[torch.Tensor]], image_size: int) -> tuple[torch.Tensor, ...]:
        sizes = {"low": image_size // 32, "mid": image_size // 16, "high": image_size // 8}

        def group(name: str) -> torch.Tensor:
            fs = features[name]
            if name in sizes:
                fs = [F.interpolate(f, size=sizes[name], mode="bilinear", align_corners=False) for f in fs]
            return torch.cat(fs, dim=1)

        up = lambda x, name: F.interpolate(x, size=sizes[name], mode="bilinear", align_corners=False)
        low_out = self.low_feature_conv(group("low"))
        mid_out = self.mid_feature_mix_conv(torch.cat([up(low_out, "mid"), self.mid_feature_conv(group("mid"))], 1))
        high = self.high_feature_mix_conv(torch.cat([up(mid_out, "high"), self.high_feature_conv(group("high"))], 1))
        highest = self.highest_feature_mix_conv(torch.cat([high, self.highest_feature_conv(group("highest"))], 1))

        f0 = self.relu(self.bn_up0(highest))
        f1 = self.bn_up1(self.conv_up1(f0))
        f1_relu = self.relu(f1)  # in place: f1 is returned after the ReLU
        direct = F.interpolate(f0, size=2 * f0.shape[-1], mode="bilinear", align_corners=False)
        f2 = self.bn_up2(self.conv_up2(torch.cat((f1_relu, direct), 1)))
        return low_out, mid_out, high, f1, f2


class WSConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-10)
        return F.conv2d(x, w, self.bias, padding=self.padding)


class UpSampleGN(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self._net = nn.Sequential(WSConv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU(),
                                  WSConv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([up, skip], dim=1))


def norm_normalize(out: torch.Tensor) -> torch.Tensor:
    n, kappa = out[:, :3], out[:, 3:]
    n = n / (torch.sqrt(torch.sum(n**2, dim=1, keepdim=True)) + 1e-10)
    return torch.cat([n, F.elu(kappa) + 1.01], dim=1)


class Decoder(nn.Module):
    def __init__(self, skips=(2048, 176, 64, 40, 24), widths=(1024, 512, 256, 128), hidden=128):
        super().__init__()
        self.conv2 = nn.Conv2d(skips[0], skips[0], kernel_size=1)
        c = skips[0]
        for i, (skip, w) in enumerate(zip(skips[1:], widths, strict=True), start=1):
            setattr(self, f"up{i}", UpSampleGN(c + skip, w))
            c = w
        self.out_conv_res8 = nn.Conv2d(widths[1], 4, kernel_size=3, padding=1)
        for res, c_in in ((4, widths[1]), (2, widths[2]), (1, widths[3])):
            setattr(self, f"out_conv_res{res}", nn.Sequential(
                nn.Conv1d(c_in + 4, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, hidden, 1), nn.ReLU(),
                nn.Conv1d(hidden, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, 4, 1)))

    def forward(self, *skips: torch.Tensor) -> list[torch.Tensor]:
        """Test mode: every pixel refined; the 1/8, 1/4, 1/2 and 1/1 maps."""
        x = [self.conv2(skips[0])]
        for i in range(1, 5):
            x.append(getattr(self, f"up{i}")(x[-1], skips[i]))
        outs = [norm_normalize(self.out_conv_res8(x[2]))]
        for res, feat in zip((4, 2, 1), x[2:], strict=True):
            up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
            inp = torch.cat([up(feat), up(outs[-1])], dim=1)
            b, c, h, w = inp.shape
            outs.append(norm_normalize(getattr(self, f"out_conv_res{res}")(inp.view(b, c, -1))).view(b, 4, h, w))
        return outs
