"""The KL-regularised autoencoder that maps images to Stable Diffusion's latent space and back."""

from typing import Any, Mapping

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

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
