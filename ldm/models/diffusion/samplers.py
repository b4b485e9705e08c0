"""The sampler protocol and the registry: callers pick a sampler by name and speak to it in one vocabulary.

Every sampler (DDIM, PLMS, DPM-Solver) takes:

* ``S``: the number of steps; ``unconditional_guidance_scale`` s and ``unconditional_conditioning`` for
  classifier-free guidance ε = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)); ``eta`` (DDIM's η; 0 for the others);
* ``strength`` in [0, 1] wherever a latent starts part-way: the noise ratio of the start (1: pure noise);
* ``x_T`` / ``noise``: the start code / the noise added to an init latent, drawn when None from ``generator``
  (when None, from the global RNG of the model's device, as the original: see :mod:`ldm.generation`);
* ``callback(step, x, pred_x0)`` after every step, with the x̂_0 that the step was taken with.

and returns from ``sample`` the latents and :class:`~ldm.models.diffusion.sampling_util.Intermediates`.
Grid indices, DDPM timesteps and continuous solver times stay inside each sampler.
"""

from typing import Any, Protocol

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_util import Intermediates, StepCallback
from ldm.util import ParameterError


class Sampler(Protocol):
    name: str

    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: StepCallback | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, Intermediates]:
        """``batch_size`` latents of ``shape`` (C, h, w) in S steps from x_T."""

    def img2img(self, init_latent: torch.Tensor, strength: float, S: int, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = True) -> torch.Tensor:
        """``init_latent`` noised to ratio ``strength``, then denoised in about strength·S steps."""


SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm_solver": DPMSolverSampler}


def make_sampler(name: str, model) -> Sampler:
    """A sampler for ``model`` by name: ``ddim``, ``plms`` or ``dpm_solver``."""
    if name not in SAMPLERS:
        raise ParameterError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](model)
