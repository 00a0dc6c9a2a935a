"""InvPT's decoder in PyTorch, the reference of `tests/test_invpt.py`, written from the architecture of the public
code (prismformore/Multi-Task-Transformer: `InvPT/models/transformers/transformer_decoder.py`, `invpt.py`, the heads
of `InvPT/models/transformer_net.py`) with its module and parameter names: `InvPTReference(...).state_dict()` has the
keys of an InvPT checkpoint's `model` without `backbone.` (and DDP's `module.`), including the parameters InvPT
creates but never uses (`scale_embed.2`, stage 0's `fuse_attn`, `redu_chan.0`, `norm_mt`).

Fixed to the public spec (3 stages, `dw_bn` queries, `avg` keys / values, query stride 2); maps NCHW, tokens
task-major `[B, T*h*w, C]` as InvPT lays them out. `BatchNorm2d` stands for InvPT's `SyncBatchNorm` (same state dict,
single-process statistics). No dropout or drop path: the parity tests run with rate 0. Importing needs torch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def to_tokens(maps: list[torch.Tensor]) -> torch.Tensor:
    """T maps `[B, C, h, w]` -> `[B, T*h*w, C]`."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def to_maps(tokens: torch.Tensor, t: int, h: int, w: int) -> list[torch.Tensor]:
    return [s.transpose(1, 2).reshape(s.shape[0], -1, h, w) for s in tokens.chunk(t, dim=1)]


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv(x)))


class UpEmbed(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c_in, c_out, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, tasks: int, dim: int, heads: int, kv_stride: int):
        super().__init__()
        self.tasks, self.heads, self.kv_stride = tasks, heads, kv_stride
        self.conv_proj_q = nn.ModuleList(nn.Sequential(OrderedDict(
            conv=nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim, bias=False), bn=nn.BatchNorm2d(dim)))
            for _ in range(tasks))
        self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fuse_attn = nn.Conv2d(2 * heads, heads, 1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int,
                message: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`x`: `[B, T*h*w, C]`; `message`: the previous logits `[B, heads, T*(h/4)*(w/4), K]`. Returns the output
        `[B, T*(h/2)*(w/2), C]` and the logits `[B, heads, T*(h/2)*(w/2), K]`."""
        b, _, c = x.shape
        maps = to_maps(x, self.tasks, h, w)
        q = to_tokens([proj(m) for proj, m in zip(self.conv_proj_q, maps, strict=True)])
        kv = to_tokens([F.avg_pool2d(m, self.kv_stride, self.kv_stride, ceil_mode=True) for m in maps])
        q, k, v = self.split_heads(self.proj_q(q)), self.split_heads(self.proj_k(kv)), self.split_heads(self.proj_v(kv))
        logits = q @ k.transpose(-2, -1) * c**-0.5
        if message is not None:
            keys = message.shape[-1]
            prev = []
            for part in message.chunk(self.tasks, dim=2):  # [B, heads, (h/4)*(w/4), K] per task
                grid = part.permute(0, 1, 3, 2).reshape(b * self.heads, keys, h // 4, w // 4)
                grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
                prev.append(grid.reshape(b, self.heads, keys, -1).permute(0, 1, 3, 2))
            logits = self.fuse_attn(torch.cat([logits, torch.cat(prev, dim=2)], dim=1))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)
        return self.proj(out), logits


class InvPTBlock(nn.Module):
    def __init__(self, tasks: int, dim: int, heads: int, kv_stride: int, mlp_ratio: float):
        super().__init__()
        self.tasks = tasks
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = SelfAttention(tasks, dim, heads, kv_stride)

    def forward(self, maps: list[torch.Tensor],
                message: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = maps[0].shape[2:]
        x = to_tokens(maps)
        y, logits = self.attn(self.norm1(x), h, w, message)
        y = to_tokens([up(m, (h, w)) for m in to_maps(y, self.tasks, h // 2, w // 2)])
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return to_maps(x, self.tasks, h, w), logits


class InvPTStage(nn.Module):
    def __init__(self, tasks: int, c_in: int, dim: int, heads: int, kv_stride: int, mlp_ratio: float,
                 upsample: bool):
        super().__init__()
        if upsample:
            self.patch_embed = nn.ModuleList(UpEmbed(c_in, dim) for _ in range(tasks))
        self.blocks = nn.ModuleList([InvPTBlock(tasks, dim, heads, kv_stride, mlp_ratio)])

    def forward(self, maps: list[torch.Tensor], skip: torch.Tensor | None,
                message: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        if hasattr(self, "patch_embed"):
            maps = [embed(m) + skip for embed, m in zip(self.patch_embed, maps, strict=True)]
        return self.blocks[0](maps, message)


class InvPT(nn.Module):
    def __init__(self, tasks: dict[str, int], embed_dim: int, dim: int, heads: int, kv_strides: tuple[int, ...],
                 mlp_ratio: float):
        super().__init__()
        self.task_names = list(tasks)
        t, widths = len(tasks), (dim, dim // 2, dim // 4)
        self.invpt_stages = nn.ModuleList(
            InvPTStage(t, widths[max(i - 1, 0)], widths[i], heads, kv_strides[i], mlp_ratio, upsample=i > 0)
            for i in range(3))
        self.norm_mts = nn.ModuleList(nn.LayerNorm(c * t) for c in widths)
        self.redu_chan = nn.ModuleList(nn.ModuleList(nn.Conv2d(c, dim, 1) for _ in range(t)) for c in widths)
        self.norm_mt = nn.LayerNorm(widths[-1] * t)  # never called, as in InvPT
        self.mt_proj = nn.ModuleDict({name: nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim),
                                                          nn.ReLU()) for name in tasks})
        self.mix_proj = nn.ModuleDict({name: nn.Sequential(nn.Conv2d(embed_dim + n, dim, 1))
                                       for name, n in tasks.items()})

    def forward(self, feats: dict[str, torch.Tensor], inter: dict[str, torch.Tensor],
                skips: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = [self.mix_proj[n](torch.cat([feats[n], inter[n]], dim=1)) for n in self.task_names]
        h0, w0 = maps[0].shape[2:]
        summed = [0.0] * len(maps)
        message = None
        for i, stage in enumerate(self.invpt_stages):
            maps, message = stage(maps, skips.get(i), message)
            h, w = maps[0].shape[2:]
            x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=2)  # [B, h*w, T*C]: tasks side by side
            normed = self.norm_mts[i](x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            for k, y in enumerate(normed.chunk(len(maps), dim=1)):
                if i:
                    y = self.redu_chan[i][k](y)
                summed[k] = summed[k] + up(y, (8 * h0, 8 * w0))
        return {n: self.mt_proj[n](s) for n, s in zip(self.task_names, summed, strict=True)}


class TransformerDecoder(nn.Module):
    def __init__(self, tasks: dict[str, int], backbone_channels: tuple[int, ...], embed_dim: int, pred_channels: int,
                 heads: int, kv_strides: tuple[int, ...], mlp_ratio: float, downsample_rate: int):
        super().__init__()
        dim = embed_dim + pred_channels
        self.downsample_rate = downsample_rate
        self.intermediate_head = nn.ModuleDict({n: nn.Conv2d(embed_dim, c, 1) for n, c in tasks.items()})
        self.invpt = InvPT(tasks, embed_dim, dim, heads, kv_strides, mlp_ratio)
        c_last = backbone_channels[-1]
        self.preliminary_decoder = nn.ModuleDict({n: nn.Sequential(ConvBlock(c_last, c_last),
                                                                   ConvBlock(c_last, embed_dim)) for n in tasks})
        self.scale_embed = nn.ModuleList([
            nn.ConvTranspose2d(backbone_channels[0], dim // 4, 3, stride=2, padding=1, output_padding=1),
            nn.Conv2d(backbone_channels[1], dim // 2, 3, padding=1),
            nn.Conv2d(backbone_channels[2], dim, 3, padding=1),  # its output is never used, as in InvPT
        ])

    def forward(self, maps: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        skips = {2: self.scale_embed[0](maps[0]), 1: self.scale_embed[1](maps[1])}
        x = maps[3]
        x = up(x, (x.shape[2] // self.downsample_rate, x.shape[3] // self.downsample_rate))
        feats = {n: dec(x) for n, dec in self.preliminary_decoder.items()}
        inter = {n: self.intermediate_head[n](f) for n, f in feats.items()}
        return self.invpt(feats, inter, skips), inter


class MLPHead(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear_pred = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_pred(x)


class InvPTReference(nn.Module):
    """InvPT's `TransformerNet` without the backbone and the final upsampling: four NCHW backbone maps ->
    (per-task predictions at 8 h0, intermediate predictions at h0), h0 = the maps' side / `downsample_rate`."""

    def __init__(self, tasks: dict[str, int], backbone_channels: tuple[int, ...], embed_dim: int = 512,
                 pred_channels: int = 64, heads: int = 2, kv_strides: tuple[int, ...] = (2, 4, 8),
                 mlp_ratio: float = 4.0, downsample_rate: int = 2):
        super().__init__()
        self.multi_task_decoder = TransformerDecoder(tasks, backbone_channels, embed_dim, pred_channels, heads,
                                                     kv_strides, mlp_ratio, downsample_rate)
        self.heads = nn.ModuleDict({n: MLPHead(embed_dim + pred_channels, c) for n, c in tasks.items()})

    def forward(self, maps: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats, inter = self.multi_task_decoder(maps)
        return {n: self.heads[n](f) for n, f in feats.items()}, inter
