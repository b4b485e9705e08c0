"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427) with DPM-Solver++, as the seed's notebook does it.

1. Mask: noise the image's latent to a middle time several times, predict the noise under the source and the
   target prompt (no guidance), and mark where the predictions differ most.
2. Encode: noise the latent to ``t_start = ratio_to_time(encode_ratio)``, either in one jump (``stochastic``)
   or by solving the ODE forwards under the guided source prompt (``deterministic``, DDIM-style inversion).
3. Decode: sample from ``t_start`` with the target prompt; after every step (the first and the last included)
   the latent outside the mask is replaced by the input's own latent at that time, so only the masked
   region changes.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.generation import decode_images, encode_images
from ldm.models.diffusion.dpm_solver import DPMSolverSampler

ENCODE_TYPES = ("stochastic", "deterministic")


@dataclass
class DiffEditResult:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    mask: torch.Tensor  # (h, w) at latent resolution, 1 = edited
    latents: torch.Tensor  # (B, C, h, w), the edited latents


def mask_from_difference(difference: torch.Tensor, clamp_rate: float = 3.5, threshold: float = 0.5) -> torch.Tensor:
    """The seed's rule: cap the map at ``clamp_rate`` × its mean, divide by the cap, keep what exceeds
    ``threshold`` (so 1 where the difference is above clamp_rate·threshold = 1.75 × its mean)."""
    cap = difference.mean() * clamp_rate
    return (difference.clamp(max=cap) / cap > threshold).to(difference.dtype)


@torch.no_grad()
def estimate_mask(model, sampler: DPMSolverSampler, init_latent: torch.Tensor, src_cond: torch.Tensor,
                  dst_cond: torch.Tensor, noised_samples: int = 3, encode_ratio: float = 0.5, clamp_rate: float = 3.5,
                  threshold: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary edit mask (h, w) at latent resolution for a (1, C, h, w) latent.

    The latent is noised ``noised_samples`` times to ratio_to_time(encode_ratio); |ε(x, src) − ε(x, dst)| is
    averaged over the noisings and the channels, then thresholded by :func:`mask_from_difference`.
    """
    latents = init_latent.expand(noised_samples, *init_latent.shape[1:])
    noised = sampler.stochastic_encode(latents, encode_ratio, generator=generator)
    t = torch.full((noised_samples,), sampler.ratio_to_time(encode_ratio), device=noised.device)
    eps_src = sampler.model_fn(_repeat(src_cond, noised_samples))(noised, t)
    eps_dst = sampler.model_fn(_repeat(dst_cond, noised_samples))(noised, t)
    difference = (eps_src - eps_dst).abs().float().mean(dim=(0, 1))
    return mask_from_difference(difference, clamp_rate, threshold)


def _repeat(cond: Any, n: int) -> Any:
    return None if cond is None else cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond


@torch.no_grad()
def edit_latent(sampler: DPMSolverSampler, init_latent: torch.Tensor, mask: torch.Tensor, src_cond: torch.Tensor,
                dst_cond: torch.Tensor, uncond: torch.Tensor | None, encode_ratio: float = 0.6, steps: int = 20,
                encode_type: str = "stochastic", scale: float = 7.5, generator: torch.Generator | None = None,
                verbose: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Steps 2 and 3 on latents: (B, C, h, w) in, edited latents and the latent after every step out.

    ``stochastic``: the background is the input re-noised to the current time t at every step,
    stochastic_encode(x_0, time_to_ratio(t)). ``deterministic``: it is the ODE-encoded trajectory of the input
    (encoded with ``steps`` steps under the guided source prompt), read backwards, point for point.
    """
    if encode_type not in ENCODE_TYPES:
        raise ValueError(f"encode_type must be one of {', '.join(ENCODE_TYPES)}, got {encode_type!r}")
    if not 0.0 < encode_ratio <= 1.0:
        raise ValueError(f"encode_ratio must be in (0, 1], got {encode_ratio}")
    batch = init_latent.shape[0]
    mask = mask.to(init_latent.device, init_latent.dtype)
    if encode_type == "stochastic":
        x_T = sampler.stochastic_encode(init_latent, encode_ratio, generator=generator)

        def background(t: float, step: int) -> torch.Tensor:
            return sampler.stochastic_encode(init_latent, sampler.time_to_ratio(t), generator=generator)
    else:
        _, trajectory = sampler.encode(steps, init_latent, encode_ratio, conditioning=_repeat(src_cond, batch),
                                       unconditional_guidance_scale=scale,
                                       unconditional_conditioning=_repeat(uncond, batch), lower_order_final=False)
        trajectory = trajectory[::-1]
        x_T = trajectory[0]

        def background(t: float, step: int) -> torch.Tensor:
            return trajectory[step]

    def keep_background(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        return x * mask + (1.0 - mask) * background(t, step)

    return sampler.sample(steps, batch, tuple(init_latent.shape[1:]), conditioning=_repeat(dst_cond, batch),
                          unconditional_guidance_scale=scale, unconditional_conditioning=_repeat(uncond, batch),
                          x_T=x_T, t_start=sampler.ratio_to_time(encode_ratio), lower_order_final=False,
                          correcting_xt_fn=keep_background, verbose=verbose)


def resize_mask(mask: Image.Image | torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (any size; white or 1 = edit) as a binary (h, w) tensor at ``size`` = (h, w)."""
    if not isinstance(mask, Image.Image):
        array = torch.as_tensor(mask, dtype=torch.float32).squeeze().cpu().numpy()
        mask = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    resized = mask.convert("L").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy((np.asarray(resized, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))


@torch.no_grad()
def diffedit(model, sampler: DPMSolverSampler, init_image: torch.Tensor, src_prompt: str, dst_prompt: str,
             encode_ratio: float = 0.6, steps: int = 20, encode_type: str = "stochastic", scale: float = 7.5,
             seed: int | None = 42, mask: Image.Image | torch.Tensor | np.ndarray | None = None,
             negative_prompt: str = "", n_samples: int = 1, verbose: bool = False) -> DiffEditResult:
    """Edit ``init_image`` (1, 3, H, W) in [−1, 1] from ``src_prompt`` to ``dst_prompt``.

    ``mask=None`` estimates the mask (DiffEdit); a user mask makes this plain mask inpainting. Randomness comes
    from a generator seeded with ``seed`` (None: a random seed); the global RNG is left alone.
    """
    device = model.device
    seed = int(torch.randint(0, 2 ** 32 - 1, ())) if seed is None else seed
    generator = torch.Generator(device).manual_seed(seed)
    uncond = model.get_learned_conditioning([negative_prompt]) if scale != 1.0 else None
    src_cond = model.get_learned_conditioning([src_prompt])
    dst_cond = model.get_learned_conditioning([dst_prompt])
    init_latent = encode_images(model, init_image, generator)
    if mask is None:
        latent_mask = estimate_mask(model, sampler, init_latent, src_cond, dst_cond, generator=generator)
    else:
        latent_mask = resize_mask(mask, tuple(init_latent.shape[-2:]))
    latents, _ = edit_latent(sampler, init_latent.expand(n_samples, *init_latent.shape[1:]), latent_mask, src_cond,
                             dst_cond, uncond, encode_ratio, steps, encode_type, scale, generator, verbose)
    return DiffEditResult(decode_images(model, latents), latent_mask.cpu(), latents)


def mask_image(mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The latent mask upsampled (nearest) to ``size`` = (H, W) as a black-and-white image, white = edited."""
    image = Image.fromarray((mask.cpu().numpy() * 255).astype(np.uint8))
    return image.resize((size[1], size[0]), Image.NEAREST).convert("RGB")

