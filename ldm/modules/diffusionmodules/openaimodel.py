"""The noise-prediction UNet of latent diffusion (ADM layout, Dhariwal & Nichol 2021, with cross-attention).

Module names equal the original checkpoint's (``input_blocks.N.M``, ``middle_block``, ``output_blocks``,
``time_embed``, ``out``), so ``model.diffusion_model.*`` weights load without renaming.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer, tile_batch
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module
from ldm.modules.winograd import Conv3x3


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to ResBlocks (tiled as x is: a guided batch's x may pass a
    cross-attention here, see :meth:`UNetModel.forward`) and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, tile_batch(emb, x.shape[0]))
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = Conv3x3(channels, out_channels or channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """3×3 convolution with stride 2."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); return skip(x) + h."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_checkpoint: bool = False, num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels, num_groups), nn.SiLU(),
                                       Conv3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, num_groups), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(Conv3x3(out_channels, out_channels)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetModel(nn.Module):
    """UNet ε_θ(x_t, t, context) with SpatialTransformer attention at the ``attention_resolutions``.

    ``attention_resolutions`` are downsampling factors (1 = full latent resolution). Heads: ``num_heads``
    heads of ``channels // num_heads`` each, or, when ``num_head_channels`` is set, heads of that width.
    ``legacy`` is kept for config compatibility: with spatial transformers both settings give the same network.
    ``norm_num_groups`` (default 32, as SD) lets narrow models keep several channels per group.
    SD 2.x: ``use_linear_in_transformer`` (linear projections in and out of the transformers) and
    ``upcast_attention`` (float32 attention for float16 weights where the kernels would form float16 scores;
    :class:`~ldm.modules.attention.CrossAttention`).
    ``use_fp16`` is read and ignored: the original casts activations to float16 with it, while here the weights'
    dtype (``--precision``) decides, as for v1.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int] = (1, 2, 4, 8),
                 num_heads: int = -1, num_head_channels: int = -1, context_dim: int | None = None,
                 transformer_depth: int = 1, dropout: float = 0.0, use_checkpoint: bool = False,
                 use_spatial_transformer: bool = True, image_size: int | None = None, legacy: bool = True,
                 norm_num_groups: int = 32, use_linear_in_transformer: bool = False, upcast_attention: bool = False,
                 use_fp16: bool = False):
        super().__init__()
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("UNetModel here implements the text-conditioned UNet: it needs "
                             "use_spatial_transformer: true and a context_dim")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.image_size = image_size
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        def attention(ch: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth, dropout=dropout,
                                      context_dim=context_dim, use_checkpoint=use_checkpoint,
                                      num_groups=norm_num_groups, use_linear=use_linear_in_transformer,
                                      upcast=upcast_attention)

        def res_block(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, use_checkpoint=use_checkpoint,
                            num_groups=norm_num_groups)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv3x3(in_channels, model_channels))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch, norm_num_groups), nn.SiLU(),
                                 zero_module(Conv3x3(model_channels, out_channels)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy latents; timesteps: (B,) real-valued; context: (B, M, context_dim) → (B, C, H, W).

        Or a guided batch with each distinct x once: x and timesteps of B rows, context of B·n rows ordered as
        ``torch.cat([x] * n)`` pairs them → (B·n, C, H, W), the result of ``torch.cat([x] * n)`` and the same
        timesteps repeated, computed once up to the first cross-attention (see :mod:`ldm.modules.attention`).
        """
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        h = x.to(dtype)
        context = None if context is None else context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, tile_batch(skips.pop(), h.shape[0])], dim=1), emb, context)
        return self.out(h).to(x.dtype)
