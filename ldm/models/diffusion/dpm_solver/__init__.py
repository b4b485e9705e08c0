from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler", "DPM_Solver", "NoiseScheduleVP", "model_wrapper"]
