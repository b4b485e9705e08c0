"""Encoder and decoder of the KL autoencoder (the first stage of latent diffusion, Esser et al. 2021 layout).

Module names equal the original checkpoint's (``down.{i}.block.{j}``, ``mid.attn_1``, ``up.{i}.upsample``…).
Every normalisation here is GroupNorm (32 groups unless ``norm_num_groups`` says otherwise, eps 1e-6); the
activation is SiLU.
"""

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.winograd import Conv3x3

logger = logging.getLogger(__name__)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = Conv3x3(in_channels, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """3×3 convolution with stride 2 after zero padding of one pixel on the right and bottom only."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """h = conv2(dropout(SiLU(norm2(conv1(SiLU(norm1 x)))))); return shortcut(x) + h (1×1 shortcut if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = Normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1 convolutions for q, k, v and the output."""

    def __init__(self, in_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(in_channels, num_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


def _mid_block(channels: int, dropout: float, num_groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
    mid.attn_1 = AttnBlock(channels, num_groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, num_groups)
    return mid


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → (B, 2·z_channels or z_channels, H/f, W/f), f = 2^(len(ch_mult)−1).

    ``attn_resolutions`` lists the feature-map sizes (relative to ``resolution``) that get self-attention.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, dropout: float = 0.0,
                 norm_num_groups: int = 32):
        super().__init__()
        self.conv_in = Conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        block_in, curr_res = ch, resolution
        for i_level, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout, norm_num_groups))
                block_in = ch * mult
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = _level(blocks, attns)
            if i_level != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _mid_block(block_in, dropout, norm_num_groups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = Conv3x3(block_in, 2 * z_channels if double_z else z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i_block](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_ch, h·f, w·f); ``num_res_blocks + 1`` blocks per level."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, dropout: float = 0.0,
                 norm_num_groups: int = 32):
        super().__init__()
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        logger.debug("Working with z of shape (1, %d, %d, %d)", z_channels, curr_res, curr_res)
        self.conv_in = Conv3x3(z_channels, block_in)
        self.mid = _mid_block(block_in, dropout, norm_num_groups)
        self.up = nn.ModuleList()
        for i_level, mult in reversed(list(enumerate(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout, norm_num_groups))
                block_in = ch * mult
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = _level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = Conv3x3(block_in, out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i_block](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
