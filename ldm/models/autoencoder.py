"""The KL-regularised autoencoder that maps images to Stable Diffusion's latent space and back."""

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

_ENCODER_ONLY = ("double_z", "in_channels")  # ddconfig keys the decoder does not take
_DECODER_ONLY = ("out_ch",)  # and the one the encoder does not take


class AutoencoderKL(nn.Module):
    """x (B, 3, H, W) in [−1, 1] → posterior over z (B, embed_dim, H/f, W/f) → reconstruction.

    ``ddconfig`` is the original's shared encoder/decoder description; ``lossconfig`` the training loss
    (``torch.nn.Identity`` for inference configs, so it adds no weights).
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, lossconfig: Mapping[str, Any] | None = None,
                 image_key: str = "image", monitor: str | None = None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z: true (its encoder predicts mean and log-variance)")
        self.encoder = Encoder(**{k: v for k, v in ddconfig.items() if k not in _DECODER_ONLY})
        self.decoder = Decoder(**{k: v for k, v in ddconfig.items() if k not in _ENCODER_ONLY})
        self.loss = instantiate_from_config(lossconfig) if lossconfig is not None else nn.Identity()
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.image_key = image_key
        self.monitor = monitor
        self.tiling: tuple[int, int] | None = None  # (tile, overlap) in latent pixels: decode large latents by tiles
        self.decode_engine = None

    def set_decode_engine(self, engine: Callable | None) -> None:
        """Decode through ``engine``, a converted form of :class:`Decoding` that reads these weights (None: plainly).
        Not a submodule, so the state dict keeps its names."""
        object.__setattr__(self, "decode_engine", engine)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        decode = self._decode_whole
        if self.tiling is not None and max(z.shape[-2:]) > self.tiling[0]:
            return tiled_decode(decode, z, *self.tiling)
        return decode(z)

    def _decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        if self.decode_engine is not None:
            return self.decode_engine(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class Decoding(nn.Module):
    """``AutoencoderKL.decode`` as a module of its own (the same post-quantisation convolution and decoder), the
    form an engine converts."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start so that they cover ``size``, neighbours overlapping by at least
    ``overlap``; the last one ends at the edge, so every tile has the same size (one compiled shape per engine)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def blend_ramp(length: int, fade: int, fade_in: bool, fade_out: bool, like: torch.Tensor) -> torch.Tensor:
    """One tile's 1-D weights: 1 inside, rising linearly over ``fade`` pixels from an edge shared with a
    neighbour (``fade_in`` at the start, ``fade_out`` at the end); never 0, so normalising is defined."""
    weights = torch.ones(length, dtype=like.dtype, device=like.device)
    ramp = torch.arange(1, fade + 1, dtype=like.dtype, device=like.device) / (fade + 1)
    if fade_in:
        weights[:fade] = torch.minimum(weights[:fade], ramp)
    if fade_out:
        weights[length - fade:] = torch.minimum(weights[length - fade:], ramp.flip(0))
    return weights


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int
                 ) -> torch.Tensor:
    """``decode(z)`` tile by tile, for images whose decoder activations would not fit at once (memory grows
    with the tile, not the image).

    Tiles of ``tile``×``tile`` latents overlap by at least ``overlap``; each decoded tile is weighted by ramps that
    rise across the overlaps, and the sum is divided by the summed weights, so seams are cross-fades, not edges.
    The result is not the whole decode: the decoder's convolutions see no context beyond a tile, and its
    GroupNorms normalise each tile by its own statistics (the same trade as diffusers' ``enable_vae_tiling``).
    """
    height, width = z.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    image = weight = None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            piece = decode(z[..., top:top + tile_h, left:left + tile_w])
            factor = piece.shape[-1] // tile_w
            if image is None:
                image = piece.new_zeros(*piece.shape[:2], height * factor, width * factor)
                weight = piece.new_zeros(height * factor, width * factor)
            fade = overlap * factor
            rows = blend_ramp(tile_h * factor, fade, top > 0, top + tile_h < height, piece)
            cols = blend_ramp(tile_w * factor, fade, left > 0, left + tile_w < width, piece)
            window = (slice(top * factor, (top + tile_h) * factor), slice(left * factor, (left + tile_w) * factor))
            image[(..., *window)] += piece * (rows[:, None] * cols[None, :])
            weight[window] += rows[:, None] * cols[None, :]
    return image / weight
