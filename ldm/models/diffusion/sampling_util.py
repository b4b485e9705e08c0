"""What every sampler shares: the DDIM time grid and coefficients, classifier-free guidance, the noise draw,
the step callback and the record of intermediate latents (the protocol itself: :mod:`.samplers`)."""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ldm.util import ParameterError

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(step, x, pred_x0)`` after each step: the step index (0-based, in sampling order), the latent after
the step and the x̂_0 the step was taken with."""


@dataclass
class Intermediates:
    """Latents on the way, as the original's DDIM records them: the start, then the latent after each step whose
    countdown index (steps − 1 … 0) is a multiple of ``log_every_t``, and after the first step.

    ``x_inter[k]`` is the latent, ``pred_x0[k]`` the x̂_0 its step was taken with (the start's is the start).
    ``intermediates["x_inter"]`` works too, as with the original's dict.
    """

    x_inter: list[torch.Tensor] = field(default_factory=list)
    pred_x0: list[torch.Tensor] = field(default_factory=list)
    log_every_t: int = 100

    def start(self, x: torch.Tensor) -> None:
        self.x_inter.append(x)
        self.pred_x0.append(x)

    def step(self, index: int, total: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        """Record the latent after the step at countdown ``index`` of ``total`` if the rule above picks it."""
        if index % self.log_every_t == 0 or index == total - 1:
            self.x_inter.append(x)
            self.pred_x0.append(pred_x0)

    def __getitem__(self, key: str) -> list[torch.Tensor]:
        if key not in ("x_inter", "pred_x0"):
            raise KeyError(key)
        return getattr(self, key)


def make_ddim_timesteps(num_steps: int, num_ddpm_timesteps: int = 1000) -> np.ndarray:
    """The original's "uniform" DDIM grid: 0, c, 2c, … below ``num_ddpm_timesteps`` with stride c = T // S, plus 1.

    When S does not divide T the grid has more than S points (S = 7 gives 8, S = 150 gives 167), as the
    original. Where the original indexes past the schedule (S = 3, 9, 27, … would reach timestep T), the
    timestep T is dropped, so those S give exactly S steps instead of an index error (and S = T gives T − 1).
    """
    if not 1 <= num_steps <= num_ddpm_timesteps:
        raise ParameterError("steps", f"must be between 1 and {num_ddpm_timesteps}, got {num_steps}")
    timesteps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_steps) + 1
    return timesteps[timesteps < num_ddpm_timesteps]


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ᾱ_t, ᾱ_prev and σ_t at each grid point (float64), DDIM eq. 16 (Song et al. 2021):

    σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev); the first point's ᾱ_prev is ᾱ at DDPM step 0.
    """
    alphas_cumprod = alphas_cumprod.detach().double().cpu().numpy()
    alphas = alphas_cumprod[timesteps]
    alphas_prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return alphas, alphas_prev, sigmas


def concat_conditioning(uncond: Any, cond: Any) -> Any:
    """Join the unconditional and conditional inputs along the batch: tensors, lists of tensors, or dicts of them."""
    if isinstance(cond, dict):
        return {key: concat_conditioning(uncond[key], cond[key]) for key in cond}
    if isinstance(cond, (list, tuple)):
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def classifier_free_guidance(model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], x: torch.Tensor,
                             t: torch.Tensor, cond: Any, uncond: Any, scale: float) -> torch.Tensor:
    """ε = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)) from one forward pass on the doubled batch [uncond, cond].

    With ``uncond`` None or s = 1 this is a single conditional call (Ho & Salimans 2022); conditionings of
    different lengths take two calls.
    """
    if uncond is None or scale == 1.0:
        return model(x, t, cond)
    context, uncond_context = _text_context(cond), _text_context(uncond)
    if (isinstance(context, torch.Tensor) and isinstance(uncond_context, torch.Tensor)
            and context.shape[1:] != uncond_context.shape[1:]):
        # prompt and negative prompt of different lengths (chunks of 77): two calls, as AUTOMATIC1111 does by default
        out_uncond, out_cond = model(x, t, uncond), model(x, t, cond)
    else:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(uncond, cond)).chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


def _text_context(conditioning: Any) -> Any:
    """The cross-attention part of a conditioning: the tensor itself, or a hybrid dict's ``c_crossattn``."""
    if isinstance(conditioning, dict):
        conditioning = conditioning.get("c_crossattn")
    if isinstance(conditioning, (list, tuple)) and len(conditioning) == 1:
        conditioning = conditioning[0]
    return conditioning


def guided_noise_prediction(model, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
                            scale: float) -> torch.Tensor:
    """The guided ε of a LatentDiffusion model at integer timesteps t: (B,); v-prediction is converted to ε."""
    out = classifier_free_guidance(model.apply_model, x, t, cond, uncond, scale)
    if model.parameterization == "v":
        return model.predict_eps_from_z_and_v(x, t, out)
    if model.parameterization != "eps":
        raise ValueError(f"DDIM and PLMS need an eps- or v-prediction model, not {model.parameterization!r}")
    return out


class ImageGenerators:
    """One generator per image of a batch, so that an image's noise depends on its own seed only, not on the batch
    it is drawn in: the same picture with any batch size, order or number of processes.

    Noise shaped like latents, ``(…, B, C, H, W)``, takes image b's values from generator b; generators live on
    ``device`` (the CPU by default: the same numbers for any GPU or CPU, as diffusers recommends and AUTOMATIC1111
    and ComfyUI offer), and the noise is then moved where it is used.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.seeds = list(seeds)
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        batch_dim = len(shape) - 4
        if batch_dim < 0 or shape[batch_dim] != len(self):
            raise ValueError(f"per-image noise needs latent-shaped (…, {len(self)}, C, H, W) noise, not {tuple(shape)}")
        one = (*shape[:batch_dim], 1, *shape[batch_dim + 1:])
        pieces = [torch.randn(one, generator=generator, device=generator.device) for generator in self.generators]
        return torch.cat(pieces, dim=batch_dim).to(device, dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator | ImageGenerators | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise from ``generator`` (the global RNG of ``device`` when None, as the original; one
    generator per image with :class:`ImageGenerators`)."""
    if isinstance(generator, ImageGenerators):
        return generator.randn(shape, device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def batch_size_of(conditioning: Any) -> int | None:
    """Batch size of a conditioning tensor, list or dict (None when it has none)."""
    if isinstance(conditioning, dict):
        conditioning = next(iter(conditioning.values()), None)
    if isinstance(conditioning, (list, tuple)):
        conditioning = conditioning[0] if conditioning else None
    return conditioning.shape[0] if isinstance(conditioning, torch.Tensor) else None


def check_batch_size(conditioning: Any, batch_size: int) -> None:
    size = batch_size_of(conditioning)
    if size is not None and size != batch_size:
        raise ValueError(f"conditioning has batch size {size} but {batch_size} samples were asked for")
