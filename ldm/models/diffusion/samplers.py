"""The sampler registry: scripts map their flags to a name and call :func:`make_sampler`."""

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm_solver": DPMSolverSampler}


def make_sampler(name: str, model) -> DDIMSampler | PLMSSampler | DPMSolverSampler:
    """A sampler for ``model`` by name: ``ddim``, ``plms`` or ``dpm_solver``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model)
