"""DPM-Solver behind the CompVis sampler interface, configured as the seed's ``--dpm_solver``.

Discrete schedule from the model's ``alphas_cumprod``; noise (or v) prediction with classifier-free guidance;
DPM-Solver++ multistep, order 2, time-uniform from t = 1 to 1/N, lower-order final steps below 10 steps,
no thresholding. S steps are S guided model calls and no noise draws beyond the start code.

Callers speak in noise ratios ("strength") r ∈ [0, 1], which map linearly onto the solver's continuous times
[1/N, 1]: t = (1 − 1/N)·r + 1/N. Continuous times stay inside this class.
"""

from typing import Any, Callable

import torch

from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper, singlestep_orders
from ldm.models.diffusion.sampling_util import Intermediates, StepCallback, check_batch_size, randn
from ldm.util import ParameterError

MODEL_TYPES = {"eps": "noise", "v": "v", "x0": "x_start"}

LatentCorrection = Callable[[torch.Tensor, float, int], torch.Tensor]
"""``correct_latent(x, strength, step)`` → x: may change the latent at noise ratio ``strength`` after every step
(step 0 is the start), e.g. to pin the region outside an inpainting mask."""


class DPMSolverSampler:
    """DPM-Solver++ for a LatentDiffusion ``model`` (``apply_model``, ``alphas_cumprod``, ``parameterization``)."""

    name = "DPM-Solver"

    def __init__(self, model):
        self.model = model
        self.noise_schedule = NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod.detach().cpu())
        self.total_N = self.noise_schedule.total_N

    def _ratio_to_time(self, ratio: float) -> float:
        """t = (1 − 1/N)·r + 1/N: ratio 0 is the data end of the schedule, ratio 1 pure noise."""
        return (1.0 - 1.0 / self.total_N) * ratio + 1.0 / self.total_N

    def _time_to_ratio(self, t: float) -> float:
        """The inverse of :meth:`_ratio_to_time`, r = (t − 1/N)/(1 − 1/N) (the seed divides by 1 − N instead)."""
        return (t - 1.0 / self.total_N) / (1.0 - 1.0 / self.total_N)

    def _model_fn(self, conditioning: Any, unconditional_conditioning: Any = None, scale: float = 1.0
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
        return DPM_Solver(self._model_fn(conditioning, unconditional_conditioning, scale), self.noise_schedule,
                          algorithm_type="dpmsolver++", correcting_xt_fn=correcting_xt_fn)

    @torch.no_grad()
    def predict_noise(self, x: torch.Tensor, strength: float, conditioning: Any,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None
                      ) -> torch.Tensor:
        """The (guided) noise prediction for latents x at noise ratio ``strength`` (DiffEdit's mask uses it)."""
        t = torch.full((x.shape[0],), self._ratio_to_time(strength), device=x.device)
        return self._model_fn(conditioning, unconditional_conditioning, unconditional_guidance_scale)(x, t)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: StepCallback | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None,
               strength: float = 1.0, correct_latent: LatentCorrection | None = None,
               skip_type: str = "time_uniform", method: str = "multistep", order: int = 2,
               lower_order_final: bool = True) -> tuple[torch.Tensor, Intermediates]:
        """Sample ``batch_size`` latents of ``shape`` in S steps from x_T (fresh noise when None).

        ``strength`` < 1 starts from an x_T noised only to that ratio (img2img, DiffEdit: see
        :meth:`stochastic_encode`) and solves from there.
        """
        if eta != 0:
            raise ParameterError("eta", "must be 0 with DPM-Solver (it is deterministic)")
        check_batch_size(conditioning, batch_size)
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, self.model.device)
        hook = _StepHook(self, _outer_steps(S, order, method), Intermediates(log_every_t=log_every_t), callback,
                         correct_latent)
        # The adaptive solver has no fixed steps to hook into: it takes no hook unless asked to (then it refuses).
        wants_hook = method != "adaptive" or callback is not None or correct_latent is not None
        solver = self._solver(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                              hook if wants_hook else None)
        hook.solver = solver
        samples = solver.sample(x_T, steps=_checked_steps(S, order, method), t_start=self._ratio_to_time(strength),
                                order=order, skip_type=skip_type, method=method, lower_order_final=lower_order_final,
                                progress=verbose)
        return samples, hook.intermediates

    @torch.no_grad()
    def img2img(self, init_latent: torch.Tensor, strength: float, S: int, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = True) -> torch.Tensor:
        """Noise x_0 to ratio ``strength`` in one jump, then DPM-Solver++ down from there in int(strength·S)
        steps (as many model calls as DDIM's img2img)."""
        if not 0.0 <= strength <= 1.0:
            raise ParameterError("strength", f"must be between 0 and 1, got {strength}")
        steps = int(strength * S)
        noised = self.stochastic_encode(init_latent, strength, noise=noise, generator=generator)
        if steps == 0:
            return noised
        samples, _ = self.sample(steps, init_latent.shape[0], tuple(init_latent.shape[1:]), conditioning, eta=eta,
                                 verbose=verbose, x_T=noised, unconditional_guidance_scale=unconditional_guidance_scale,
                                 unconditional_conditioning=unconditional_conditioning, generator=generator,
                                 order=min(2, steps), strength=strength, callback=callback)
        return samples

    def stochastic_encode(self, x0: torch.Tensor, strength: float, noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x = α·x_0 + σ·ε at noise ratio ``strength`` (one forward-SDE jump)."""
        solver = DPM_Solver(None, self.noise_schedule)
        return solver.add_noise(x0, torch.tensor([self._ratio_to_time(strength)]), noise, generator)

    @torch.no_grad()
    def encode(self, S: int, x: torch.Tensor, strength: float, conditioning: Any = None,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               skip_type: str = "time_uniform", method: str = "multistep", order: int = 2,
               lower_order_final: bool = False, log_every_t: int = 1, verbose: bool = False
               ) -> tuple[torch.Tensor, Intermediates]:
        """Deterministic encoding: solve the ODE forwards in S steps from the data (ratio 0) to ratio ``strength``.

        Returns the encoded latent and, by default, the latent at every grid point (start included), in
        encoding order.
        """
        hook = _StepHook(self, _outer_steps(S, order, method), Intermediates(log_every_t=log_every_t), None, None)
        solver = self._solver(conditioning, unconditional_conditioning, unconditional_guidance_scale, hook)
        hook.solver = solver
        encoded = solver.inverse(x, steps=_checked_steps(S, order, method), t_end=self._ratio_to_time(strength),
                                 order=order, skip_type=skip_type, method=method, lower_order_final=lower_order_final,
                                 progress=verbose)
        return encoded, hook.intermediates


def _checked_steps(steps: int, order: int, method: str) -> int:
    if method == "multistep" and steps < order:
        raise ParameterError("steps", f"must be at least {order} for DPM-Solver++({order}M), got {steps}")
    return steps


def _outer_steps(steps: int, order: int, method: str) -> int:
    """How many steps the solver takes (singlestep methods spend several model calls on one step)."""
    if method == "singlestep":
        return len(singlestep_orders(steps, order))
    return steps // order if method == "singlestep_fixed" else steps


class _StepHook:
    """The solver's after-step hook: corrects the latent, records intermediates, calls the step callback."""

    def __init__(self, sampler: DPMSolverSampler, steps: int, intermediates: Intermediates,
                 callback: StepCallback | None, correct_latent: LatentCorrection | None):
        self.sampler, self.steps, self.intermediates = sampler, steps, intermediates
        self.callback, self.correct_latent = callback, correct_latent
        self.solver: DPM_Solver | None = None

    def __call__(self, x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        if self.correct_latent is not None:
            x = self.correct_latent(x, self.sampler._time_to_ratio(t), step)
        if step == 0:
            self.intermediates.start(x)
            return x
        pred_x0 = self.solver.latest_data_prediction()
        if self.callback is not None:
            self.callback(step - 1, x, pred_x0)
        self.intermediates.step(self.steps - step, self.steps, x, pred_x0)
        return x
