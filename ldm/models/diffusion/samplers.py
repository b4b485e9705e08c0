"""The sampler protocol and the registry: callers pick a sampler by name and speak to it in one vocabulary.

Names: the original's ``ddim``, ``plms`` and ``dpm_solver`` (the seed's DPM-Solver++ configuration), and the σ-space
samplers of :mod:`~ldm.models.diffusion.dpm_solver.sigma_samplers` under A1111's labels or ComfyUI's keys ("Euler a",
"euler_ancestral", "DPM++ 2M", "dpmpp_2m", …), case-, space- and underscore-insensitive; a schedule may follow the
name ("DPM++ 2M Karras") or be given apart.

Every sampler takes:

* ``S``: the number of steps; ``unconditional_guidance_scale`` s and ``unconditional_conditioning`` for
  classifier-free guidance ε = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)); ``eta`` (DDIM's η; 0 for the others);
* ``strength`` in [0, 1] wherever a latent starts part-way: the noise ratio of the start (1: pure noise);
* ``x_T`` / ``noise``: the start code / the noise added to an init latent, drawn when None from ``generator``
  (when None, from the global RNG of the model's device, as the original: see :mod:`ldm.generation`);
* ``callback(step, x, pred_x0)`` after every step, with the x̂_0 that the step was taken with.

and returns from ``sample`` the latents and :class:`~ldm.models.diffusion.sampling_util.Intermediates`.
Grid indices, DDPM timesteps and continuous solver times stay inside each sampler.
"""

from typing import Any, Protocol, Sequence

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.dpm_solver.sigma_samplers import SIGMA_METHODS, SigmaSampler, noise_level
from ldm.models.diffusion.dpm_solver.sigmas import SCHEDULE_ALIASES, SCHEDULE_LABELS, SCHEDULES
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
SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM-Solver",
                  **{key: method.label for key, method in SIGMA_METHODS.items()}}


def _spelling(name: str) -> str:
    """What two spellings of one name share: lower case, "++" as "pp", no spaces, underscores or hyphens."""
    return "".join(name.lower().replace("++", "pp").replace("+", "p").split()).replace("_", "").replace("-", "")


_SAMPLER_SPELLINGS = {_spelling(spelling): key for key, label in SAMPLER_LABELS.items() for spelling in (key, label)}
_SCHEDULE_SPELLINGS = {**{_spelling(spelling): key for key, label in SCHEDULE_LABELS.items()
                          for spelling in (key, label)},
                       **{_spelling(alias): key for alias, key in SCHEDULE_ALIASES.items()}}


def resolve_schedule(name: str | None) -> str | None:
    """A schedule key from any spelling; None and "Automatic" mean the sampler's default."""
    if name is None or _spelling(name) == "automatic":
        return None
    if _spelling(name) not in _SCHEDULE_SPELLINGS:
        raise ParameterError("schedule", f"must be one of {', '.join(SCHEDULE_LABELS.values())}, got {name!r}")
    return _SCHEDULE_SPELLINGS[_spelling(name)]


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(sampler key, schedule key or None) from a name such as "DPM++ 2M Karras", "euler_ancestral" or "k_lms"."""
    spelling = _spelling(name)
    for candidate in (spelling, spelling.removeprefix("k")):
        if candidate in _SAMPLER_SPELLINGS:
            return _SAMPLER_SPELLINGS[candidate], None
        for schedule_spelling, schedule in _SCHEDULE_SPELLINGS.items():
            head = candidate.removesuffix(schedule_spelling)
            if head != candidate and head in _SAMPLER_SPELLINGS and _SAMPLER_SPELLINGS[head] in SIGMA_METHODS:
                return _SAMPLER_SPELLINGS[head], schedule
    raise ParameterError("sampler", f"must be one of {', '.join(SAMPLER_LABELS.values())} (a schedule may follow "
                                    f"the name: 'DPM++ 2M Karras'), got {name!r}")


def check_sampler(name: str, schedule: str | Sequence[float] | None = None, *, eta_ancestral: float | None = None,
                  s_noise: float = 1.0) -> tuple[str, str | Sequence[float] | None]:
    """The sampler key and schedule that :func:`make_sampler` would use, all its arguments checked without a model."""
    key, named_schedule = resolve_sampler(name)
    if isinstance(schedule, str) or schedule is None:
        schedule = resolve_schedule(schedule)
    if schedule is not None and named_schedule is not None and schedule != named_schedule:
        raise ParameterError("schedule", f"{name!r} names the schedule {SCHEDULE_LABELS[named_schedule]}, "
                                         f"not {schedule!r}")
    schedule = named_schedule if schedule is None else schedule
    if key in SAMPLERS and schedule is not None:
        raise ParameterError("schedule", f"{SAMPLER_LABELS[key]} has its own time grid; schedules are for "
                                         f"{', '.join(method.label for method in SIGMA_METHODS.values())}")
    if key in SAMPLERS and (eta_ancestral is not None or s_noise != 1.0):
        raise ParameterError("eta_ancestral" if eta_ancestral is not None else "s_noise",
                             f"is for ancestral and SDE samplers, not {SAMPLER_LABELS[key]}")
    if key in SIGMA_METHODS:
        noise_level(SIGMA_METHODS[key], eta_ancestral, s_noise)
    return key, schedule


def make_sampler(name: str, model, schedule: str | Sequence[float] | None = None, *,
                 eta_ancestral: float | None = None, s_noise: float = 1.0) -> Sampler:
    """A sampler for ``model`` by name (module docstring), on ``schedule`` (a :data:`SCHEDULES` name or an explicit
    σ grid ending in 0; default: A1111's for that sampler). ``eta_ancestral`` and ``s_noise``: the noise level and
    scale of ancestral and SDE samplers (default 1; :class:`SigmaSampler`)."""
    key, schedule = check_sampler(name, schedule, eta_ancestral=eta_ancestral, s_noise=s_noise)
    if key in SAMPLERS:
        return SAMPLERS[key](model)
    return SigmaSampler(model, key, schedule, eta_ancestral=eta_ancestral, s_noise=s_noise)


__all__ = ["SAMPLERS", "SAMPLER_LABELS", "SCHEDULES", "SIGMA_METHODS", "Sampler", "check_sampler", "make_sampler",
           "resolve_sampler", "resolve_schedule"]
