"""DDIM sampling (Song et al. 2021, arXiv 2010.02502) on the original's time grid.

With ᾱ_t at the current grid point and ᾱ_prev at the next one (eq. 12):
x̂_0 = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t,  x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ_t²)·ε + σ_t·z.
η = 0 gives the deterministic sampler (a first-order solver of the probability-flow ODE).
"""

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling_util import (Intermediates, StepCallback, check_batch_size, ddim_coefficients,
                                                guided_noise_prediction, make_ddim_timesteps, randn)
from ldm.util import ParameterError

logger = logging.getLogger(__name__)


class DDIMSampler:
    """DDIM for a LatentDiffusion ``model`` (anything with ``apply_model``, ``alphas_cumprod``, ``parameterization``)."""

    name = "DDIM"

    def __init__(self, model):
        self.model = model
        self.ddim_timesteps: np.ndarray | None = None

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0, verbose: bool = True) -> None:
        """Grid (see ``make_ddim_timesteps``) and per-step coefficients as Python floats (no device syncs later)."""
        if not ddim_eta >= 0:  # also refuses NaN
            raise ParameterError("eta", f"must be non-negative, got {ddim_eta}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.model.num_timesteps)
        alphas, alphas_prev, sigmas = ddim_coefficients(self.model.alphas_cumprod, self.ddim_timesteps, ddim_eta)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = alphas, alphas_prev, sigmas
        self.ddim_sqrt_one_minus_alphas = np.sqrt(1.0 - alphas)
        self.ddim_eta = ddim_eta
        if verbose:
            logger.debug("DDIM grid: %d steps, timesteps %s … %s, eta %g", len(self.ddim_timesteps),
                        self.ddim_timesteps[0], self.ddim_timesteps[-1], ddim_eta)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: StepCallback | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, Intermediates]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in S steps from x_T (fresh noise when None)."""
        check_batch_size(conditioning, batch_size)
        self.make_schedule(S, eta, verbose=verbose)
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, self.model.device)
        return self._loop(x_T, conditioning, len(self.ddim_timesteps), unconditional_guidance_scale,
                          unconditional_conditioning, callback, verbose, Intermediates(log_every_t=log_every_t),
                          generator)

    @torch.no_grad()
    def img2img(self, init_latent: torch.Tensor, strength: float, S: int, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = True) -> torch.Tensor:
        """The original img2img: noise x_0 to grid index t_enc = int(strength·S), denoise from index t_enc − 1.

        strength 1 makes the original index past its grid; here t_enc stops at the last grid index.
        """
        if not 0.0 <= strength <= 1.0:
            raise ParameterError("strength", f"must be between 0 and 1, got {strength}")
        self.make_schedule(S, eta, verbose=False)
        t_enc = min(int(strength * S), len(self.ddim_timesteps) - 1)
        noised = self._noise_to_index(init_latent, t_enc, noise, generator)
        samples, _ = self._loop(noised, conditioning, t_enc, unconditional_guidance_scale, unconditional_conditioning,
                                callback, verbose, Intermediates(log_every_t=t_enc + 1), generator)
        return samples

    def _noise_to_index(self, x0: torch.Tensor, index: int, noise: torch.Tensor | None,
                        generator: torch.Generator | None) -> torch.Tensor:
        """√ᾱ·x_0 + √(1 − ᾱ)·ε at grid point ``index`` (the original's ``stochastic_encode``)."""
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        sqrt_alpha = torch.as_tensor(np.sqrt(self.ddim_alphas[index]), dtype=x0.dtype, device=x0.device)
        sqrt_one_minus = torch.as_tensor(self.ddim_sqrt_one_minus_alphas[index], dtype=x0.dtype, device=x0.device)
        return sqrt_alpha * x0 + sqrt_one_minus * noise

    def _loop(self, x: torch.Tensor, cond: Any, num_steps: int, scale: float, uncond: Any,
              callback: StepCallback | None, verbose: bool, intermediates: Intermediates,
              generator: torch.Generator | None) -> tuple[torch.Tensor, Intermediates]:
        """Steps at grid indices num_steps − 1, …, 0."""

        def eps_at(sample: torch.Tensor, index: int) -> torch.Tensor:
            t = torch.full((x.shape[0],), int(self.ddim_timesteps[index]), device=x.device, dtype=torch.long)
            return guided_noise_prediction(self.model, sample, t, cond, uncond, scale)

        intermediates.start(x)
        history: list[torch.Tensor] = []  # earlier noise predictions, for multistep subclasses
        indices = range(num_steps - 1, -1, -1)
        steps = tqdm(indices, desc=f"{self.name} Sampler", disable=not verbose, leave=False, unit="step")
        for step, index in enumerate(steps):
            x, pred_x0 = self._step(x, index, eps_at, history, generator)
            if callback is not None:
                callback(step, x, pred_x0)
            intermediates.step(index, num_steps, x, pred_x0)
        return x, intermediates

    def _step(self, x: torch.Tensor, index: int, eps_at, history: list[torch.Tensor],
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._update(x, eps_at(x, index), index, generator)

    def _update(self, x: torch.Tensor, eps: torch.Tensor, index: int, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (eq. 12) from grid index ``index`` to the next lower one; returns (x_prev, x̂_0).

        The noise z is drawn even when σ = 0, as the original does, so that a seed gives the original's noise in
        every later draw of the run (later batches, later iterations); it is added only when σ > 0.
        """
        alpha, alpha_prev = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index])
        sigma = float(self.ddim_sigmas[index])
        pred_x0 = (x - (1.0 - alpha) ** 0.5 * eps) / alpha ** 0.5
        x_prev = alpha_prev ** 0.5 * pred_x0 + (1.0 - alpha_prev - sigma ** 2) ** 0.5 * eps
        noise = randn(x.shape, generator, x.device, x.dtype)
        if sigma > 0:
            x_prev = x_prev + sigma * noise
        return x_prev, pred_x0
