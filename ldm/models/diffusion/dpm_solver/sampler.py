"""DPM-Solver behind the CompVis sampler interface, configured as the seed's ``--dpm_solver``.

Discrete schedule from the model's ``alphas_cumprod``; noise (or v) prediction with classifier-free guidance;
DPM-Solver++ multistep, order 2, time-uniform from t = 1 to 1/N, lower-order final steps below 10 steps,
no thresholding. S steps are S guided model calls.

Encode ratios r ∈ [0, 1] map linearly onto continuous times [1/N, 1]: t = (1 − 1/N)·r + 1/N.
"""

from typing import Any, Callable

import torch

from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper
from ldm.models.diffusion.sampling_util import StepCallback, check_batch_size, randn

MODEL_TYPES = {"eps": "noise", "v": "v", "x0": "x_start"}


class DPMSolverSampler:
    """DPM-Solver++ for a LatentDiffusion ``model`` (``apply_model``, ``alphas_cumprod``, ``parameterization``)."""

    name = "DPM-Solver"

    def __init__(self, model):
        self.model = model
        self.noise_schedule = NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod.detach().cpu())
        self.total_N = self.noise_schedule.total_N

    def ratio_to_time(self, ratio: float) -> float:
        """t = (1 − 1/N)·r + 1/N: ratio 0 is the data end of the schedule, ratio 1 pure noise."""
        return (1.0 - 1.0 / self.total_N) * ratio + 1.0 / self.total_N

    def time_to_ratio(self, t: float) -> float:
        """The inverse of :meth:`ratio_to_time`, r = (t − 1/N)/(1 − 1/N) (the seed divides by 1 − N instead)."""
        return (t - 1.0 / self.total_N) / (1.0 - 1.0 / self.total_N)

    def time_discrete_to_continuous(self, n: float) -> float:
        return (n + 1.0) / self.total_N

    def time_continuous_to_discrete(self, t: float) -> float:
        return t * self.total_N - 1.0

    def model_fn(self, conditioning: Any, unconditional_conditioning: Any = None, scale: float = 1.0
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The (guided) noise prediction ε(x, t) at continuous times t: (B,), whatever the parameterization."""
        if self.model.parameterization not in MODEL_TYPES:
            raise ValueError(f"unsupported parameterization {self.model.parameterization!r}")
        return model_wrapper(lambda x, t, c: self.model.apply_model(x, t, c), self.noise_schedule,
                             model_type=MODEL_TYPES[self.model.parameterization], guidance_type="classifier-free",
                             condition=conditioning, unconditional_condition=unconditional_conditioning,
                             guidance_scale=scale)

    def _solver(self, conditioning: Any, unconditional_conditioning: Any, scale: float,
                correcting_xt_fn: Callable | None = None) -> DPM_Solver:
        return DPM_Solver(self.model_fn(conditioning, unconditional_conditioning, scale), self.noise_schedule,
                          algorithm_type="dpmsolver++", correcting_xt_fn=correcting_xt_fn)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: StepCallback | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None,
               skip_type: str = "time_uniform", method: str = "multistep", order: int = 2,
               lower_order_final: bool = True, correcting_xt_fn: Callable | None = None,
               t_start: float | None = None, t_end: float | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample ``batch_size`` latents of ``shape`` in S steps; returns them and the latent after every step.

        ``t_start`` < 1 starts from a partly noised x_T (img2img, DiffEdit: see :meth:`stochastic_encode`);
        ``correcting_xt_fn(x, t, step)`` may change the latent after every step (step 0 is the start).
        """
        if eta != 0:
            raise ValueError("DPM-Solver is deterministic: eta must be 0")
        check_batch_size(conditioning, batch_size)
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, self.model.device)

        def after_step(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
            if correcting_xt_fn is not None:
                x = correcting_xt_fn(x, t, step)
            if callback is not None and step > 0:
                callback(step - 1, x, None)
            return x

        hook = after_step if correcting_xt_fn is not None or callback is not None else None
        solver = self._solver(conditioning, unconditional_conditioning, unconditional_guidance_scale, hook)
        return solver.sample(x_T, steps=S, t_start=t_start, t_end=t_end, order=order, skip_type=skip_type,
                             method=method, lower_order_final=lower_order_final, return_intermediate=True,
                             progress=verbose)

    @torch.no_grad()
    def img2img(self, init_latent: torch.Tensor, strength: float, S: int, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None, verbose: bool = True
                ) -> torch.Tensor:
        """Noise x_0 to t = ratio_to_time(strength) in one jump, then DPM-Solver++ down from there in
        int(strength·S) steps (as many model calls as DDIM's img2img)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        steps = int(strength * S)
        noised = self.stochastic_encode(init_latent, strength, noise=noise, generator=generator)
        if steps == 0:
            return noised
        samples, _ = self.sample(steps, init_latent.shape[0], tuple(init_latent.shape[1:]), conditioning, eta=eta,
                                 verbose=verbose, x_T=noised, unconditional_guidance_scale=unconditional_guidance_scale,
                                 unconditional_conditioning=unconditional_conditioning, generator=generator,
                                 order=min(2, steps), t_start=self.ratio_to_time(strength))
        return samples

    def stochastic_encode(self, x0: torch.Tensor, encode_ratio: float, noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = α_t·x_0 + σ_t·ε at t = ratio_to_time(encode_ratio) (one forward-SDE jump)."""
        solver = DPM_Solver(None, self.noise_schedule)
        return solver.add_noise(x0, torch.tensor([self.ratio_to_time(encode_ratio)]), noise, generator)

    @torch.no_grad()
    def encode(self, S: int, x: torch.Tensor, encode_ratio: float, conditioning: Any = None,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               skip_type: str = "time_uniform", method: str = "multistep", order: int = 2,
               lower_order_final: bool = False, verbose: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Deterministic encoding: solve the ODE forwards in S steps from t = 1/N to ratio_to_time(encode_ratio).

        Returns the encoded latent and the latent at every grid point (start included), in encoding order.
        """
        solver = self._solver(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        return solver.inverse(x, steps=S, t_end=self.ratio_to_time(encode_ratio), order=order, skip_type=skip_type,
                              method=method, lower_order_final=lower_order_final, return_intermediate=True,
                              progress=verbose)
