"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427) with DPM-Solver++, as the seed's notebook does it.

1. Mask: noise the image's latent to a middle time several times, predict the noise under the source and the
   target prompt (no guidance), and mark where the predictions differ most.
2. Encode: noise the latent to the noise ratio ``encode_ratio``, either in one jump (``stochastic``) or by
   solving the ODE forwards under the guided source prompt (``deterministic``, DDIM-style inversion).
3. Decode: sample from there with the target prompt; after every step (the first and the last included)
   the latent outside the mask is replaced by the input's own latent at that noise level, so only the masked
   region changes.

These work on latents and conditionings; :meth:`ldm.generation.Pipeline.diffedit` runs them on images and prompts.
"""

from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.dpm_solver.sigma_samplers import SigmaSampler
from ldm.models.diffusion.sampling_util import randn
from ldm.util import ParameterError

ENCODE_TYPES = ("stochastic", "deterministic")


def mask_from_difference(difference: torch.Tensor, clamp_rate: float = 3.5, threshold: float = 0.5) -> torch.Tensor:
    """The seed's rule: cap the map at ``clamp_rate`` × its mean, divide by the cap, keep what exceeds
    ``threshold`` (so 1 where the difference is above clamp_rate·threshold = 1.75 × its mean)."""
    cap = difference.mean() * clamp_rate
    return (difference.clamp(max=cap) / cap > threshold).to(difference.dtype)


@torch.no_grad()
def estimate_mask(sampler: DPMSolverSampler, init_latent: torch.Tensor, src_cond: torch.Tensor,
                  dst_cond: torch.Tensor, noised_samples: int = 3, encode_ratio: float = 0.5, clamp_rate: float = 3.5,
                  threshold: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary edit mask (h, w) at latent resolution for a (1, C, h, w) latent.

    The latent is noised ``noised_samples`` times to the ratio ``encode_ratio``; |ε(x, src) − ε(x, dst)| is
    averaged over the noisings and the channels, then thresholded by :func:`mask_from_difference`.
    """
    latents = init_latent.expand(noised_samples, *init_latent.shape[1:])
    noised = sampler.stochastic_encode(latents, encode_ratio, generator=generator)
    eps_src = sampler.predict_noise(noised, encode_ratio, _repeat(src_cond, noised_samples))
    eps_dst = sampler.predict_noise(noised, encode_ratio, _repeat(dst_cond, noised_samples))
    difference = (eps_src - eps_dst).abs().float().mean(dim=(0, 1))
    return mask_from_difference(difference, clamp_rate, threshold)


def _repeat(cond: Any, n: int) -> Any:
    """A conditioning of batch 1 (a tensor, or an inpainting model's dict of lists of them) as batch n."""
    if isinstance(cond, dict):
        return {key: [_repeat(part, n) for part in parts] for key, parts in cond.items()}
    return None if cond is None else cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond


@torch.no_grad()
def edit_latent(sampler: DPMSolverSampler, init_latent: torch.Tensor, mask: torch.Tensor, src_cond: torch.Tensor,
                dst_cond: torch.Tensor, uncond: torch.Tensor | None, encode_ratio: float = 0.6, steps: int = 20,
                encode_type: str = "stochastic", scale: float = 7.5, generator: torch.Generator | None = None,
                verbose: bool = False, decoder: SigmaSampler | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Steps 2 and 3 on latents: (B, C, h, w) in, edited latents and the latent after every step out.

    ``stochastic``: the background is the input re-noised to the current noise ratio at every step.
    ``deterministic``: it is the ODE-encoded trajectory of the input (encoded with ``steps`` steps under the
    guided source prompt), read backwards, point for point.
    ``decoder``: a σ-space sampler to decode with instead of DPM-Solver++ (stochastic encoding only: the
    deterministic one is DPM-Solver's own trajectory); it runs A1111's img2img grid for ``encode_ratio``.
    """
    if encode_type not in ENCODE_TYPES:
        raise ParameterError("encode_type", f"must be one of {', '.join(ENCODE_TYPES)}, got {encode_type!r}")
    if not 0.0 < encode_ratio <= 1.0:
        raise ParameterError("encode_ratio", f"must be in (0, 1], got {encode_ratio}")
    if decoder is not None and encode_type != "stochastic":
        raise ParameterError("sampler", f"{decoder.name} cannot decode a deterministic DiffEdit encoding, which "
                                        "follows DPM-Solver's own trajectory back: use the stochastic encoding")
    batch = init_latent.shape[0]
    mask = mask.to(init_latent.device, init_latent.dtype)
    if decoder is not None:
        return _decode_with(decoder, sampler, init_latent, mask, _repeat(dst_cond, batch), _repeat(uncond, batch),
                            encode_ratio, steps, scale, generator, verbose)
    if encode_type == "stochastic":
        x_T = sampler.stochastic_encode(init_latent, encode_ratio, generator=generator)

        def background(ratio: float, step: int) -> torch.Tensor:
            return sampler.stochastic_encode(init_latent, ratio, generator=generator)
    else:
        _, encoding = sampler.encode(steps, init_latent, encode_ratio, conditioning=_repeat(src_cond, batch),
                                     unconditional_guidance_scale=scale,
                                     unconditional_conditioning=_repeat(uncond, batch), lower_order_final=False)
        trajectory = encoding.x_inter[::-1]
        x_T = trajectory[0]

        def background(ratio: float, step: int) -> torch.Tensor:
            return trajectory[step]

    def keep_background(x: torch.Tensor, ratio: float, step: int) -> torch.Tensor:
        return x * mask + (1.0 - mask) * background(ratio, step)

    samples, intermediates = sampler.sample(
        steps, batch, tuple(init_latent.shape[1:]), conditioning=_repeat(dst_cond, batch),
        unconditional_guidance_scale=scale, unconditional_conditioning=_repeat(uncond, batch), x_T=x_T,
        strength=encode_ratio, lower_order_final=False, correct_latent=keep_background, log_every_t=1, verbose=verbose)
    return samples, intermediates.x_inter


def _decode_with(decoder: SigmaSampler, sampler: DPMSolverSampler, init_latent: torch.Tensor, mask: torch.Tensor,
                 dst_cond: Any, uncond: Any, encode_ratio: float, steps: int, scale: float,
                 generator: torch.Generator | None, verbose: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Step 3 with a σ-space sampler: x_0 + σ·noise at the start of the img2img grid, the background re-noised
    to every step's ratio."""
    grid = decoder.img2img_grid(steps, encode_ratio)
    start = init_latent + grid[0] * randn(init_latent.shape, generator, init_latent.device, init_latent.dtype)

    def keep_background(x: torch.Tensor, ratio: float, step: int) -> torch.Tensor:
        background = sampler.stochastic_encode(init_latent, ratio, generator=generator) if ratio > 0 else init_latent
        return x * mask + (1.0 - mask) * background

    samples, intermediates = decoder.solve(start, grid, dst_cond, uncond, scale, generator, log_every_t=1,
                                           verbose=verbose, correct_latent=keep_background)
    return samples, intermediates.x_inter


def resize_mask(mask: Image.Image | torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (any size; white or 1 = edit) as a binary (h, w) tensor at ``size`` = (h, w)."""
    if not isinstance(mask, Image.Image):
        array = torch.as_tensor(mask, dtype=torch.float32).squeeze().cpu().numpy()
        mask = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    resized = mask.convert("L").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy((np.asarray(resized, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))


def mask_image(mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The latent mask upsampled (nearest) to ``size`` = (H, W) as a black-and-white image, white = edited."""
    image = Image.fromarray((mask.cpu().numpy() * 255).astype(np.uint8))
    return image.resize((size[1], size[0]), Image.NEAREST).convert("RGB")

