"""Noise levels of a discrete diffusion model and the σ grids ("schedules") that samplers step along.

A model trained on N steps with ᾱ_n has the noise levels σ_n = √((1 − ᾱ_n)/ᾱ_n), n = 0 … N − 1. Between them, the
network's time t is found by interpolating log σ linearly (k-diffusion's ``CompVisDenoiser``, which A1111 and
ComfyUI use too), so t(σ) and σ(t) are exact inverses on [σ_min, σ_max] = [σ_0, σ_{N−1}].

A schedule of n steps is n + 1 decreasing noise levels from σ_max (or near it) down to a final 0, the data.
Grids are Python floats computed on the host before sampling starts.
"""

import math
from typing import Callable, Sequence

import numpy as np
import torch

# NVIDIA's "Align Your Steps" 10-step noise levels for SD 1.x (Sabour et al. 2024, arXiv 2404.14507; the values of
# their how-to page, which A1111 and ComfyUI ship).
ALIGN_YOUR_STEPS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
KARRAS_RHO = 7.0
BETA_SCHEDULE_AB = (0.6, 0.6)  # ComfyUI's and A1111's α = β of the "beta" schedule (Lee et al. 2024)


class DiscreteSigmas:
    """σ_n of a model's ``alphas_cumprod`` and the log-σ interpolation between its times (float64, host)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().double().cpu().numpy()
        self.sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        self.log_sigmas = np.log(self.sigmas)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self._log_sigmas_on: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sigmas)

    def timestep(self, sigma: float) -> float:
        """The network time of noise level σ (clamped to [0, N − 1])."""
        return float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.sigmas))))

    def sigma(self, timestep: float) -> float:
        """σ at a real-valued network time."""
        return float(np.exp(np.interp(timestep, np.arange(len(self.sigmas)), self.log_sigmas)))

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """:meth:`timestep` for a tensor of noise levels, on their device (no copy to the host)."""
        key = (sigma.device, sigma.dtype)
        if key not in self._log_sigmas_on:
            self._log_sigmas_on[key] = torch.from_numpy(self.log_sigmas).to(sigma.device, sigma.dtype)
        log_sigmas = self._log_sigmas_on[key]
        log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        upper = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
        low, high = log_sigmas[upper - 1], log_sigmas[upper]
        return (upper - 1).to(sigma.dtype) + (log_sigma - low) / (high - low)


def karras(steps: int, sigmas: DiscreteSigmas, rho: float = KARRAS_RHO) -> list[float]:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^{1/ρ} + i/(n − 1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0."""
    high, low = sigmas.sigma_max ** (1.0 / rho), sigmas.sigma_min ** (1.0 / rho)
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    return [*((high + ramp * (low - high)) ** rho).tolist(), 0.0]


def exponential(steps: int, sigmas: DiscreteSigmas) -> list[float]:
    """Evenly spaced in log σ from σ_max to σ_min, then 0."""
    return [*np.exp(np.linspace(math.log(sigmas.sigma_max), math.log(sigmas.sigma_min), steps)).tolist(), 0.0]


def normal(steps: int, sigmas: DiscreteSigmas) -> list[float]:
    """k-diffusion's ``get_sigmas`` (A1111's "Uniform", its "Normal" for these models): network times evenly spaced
    from N − 1 to 0, mapped to σ, then 0."""
    return [*(sigmas.sigma(t) for t in np.linspace(len(sigmas) - 1, 0, steps)), 0.0]


def sgm_uniform(steps: int, sigmas: DiscreteSigmas) -> list[float]:
    """Stability AI's: n + 1 times evenly spaced from N − 1 to 0, the last dropped, mapped to σ, then 0."""
    return [*(sigmas.sigma(t) for t in np.linspace(len(sigmas) - 1, 0, steps + 1)[:-1]), 0.0]


def simple(steps: int, sigmas: DiscreteSigmas) -> list[float]:
    """ComfyUI's: every (N/n)-th of the model's own noise levels from the top, then 0."""
    stride = len(sigmas) / steps
    return [*(float(sigmas.sigmas[-(1 + int(i * stride))]) for i in range(steps)), 0.0]


def align_your_steps(steps: int, sigmas: DiscreteSigmas) -> list[float]:
    """The published 10-step list; other counts interpolate it log-linearly over n + 1 points. The last point, σ_min,
    becomes 0 (ComfyUI's convention: the final step denoises)."""
    published = np.log(np.array(ALIGN_YOUR_STEPS_SD15[::-1]))
    grid = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(published)), published))[::-1]
    return [*grid[:-1].tolist(), 0.0]


def beta(steps: int, sigmas: DiscreteSigmas, a: float = BETA_SCHEDULE_AB[0], b: float = BETA_SCHEDULE_AB[1]
         ) -> list[float]:
    """Lee et al. (2024), "Beta Sampling is All You Need": network times at the quantiles of Beta(a, b) (more steps
    at both ends), rounded to the model's steps (repeats dropped), mapped to σ, then 0."""
    from scipy.stats import beta as beta_distribution  # scipy is a requirement, but slow to import for every run

    quantiles = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    times = np.rint(beta_distribution.ppf(quantiles, a, b) * (len(sigmas) - 1)).astype(int)
    unique = list(dict.fromkeys(times.tolist()))
    return [*(float(sigmas.sigmas[t]) for t in unique), 0.0]


Schedule = Callable[[int, DiscreteSigmas], list[float]]

SCHEDULES: dict[str, Schedule] = {"normal": normal, "karras": karras, "exponential": exponential,
                                  "sgm_uniform": sgm_uniform, "simple": simple, "align_your_steps": align_your_steps,
                                  "beta": beta}
# A1111's labels (its infotext "Schedule type") and the other spellings users type.
SCHEDULE_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "align_your_steps": "Align Your Steps",
                   "beta": "Beta"}
SCHEDULE_ALIASES = {"uniform": "normal", "ays": "align_your_steps"}


def discard_next_to_last(grid: Sequence[float]) -> list[float]:
    """A1111's option for DPM2 and DPM++ 3M SDE: drop the level before the final 0 (from a grid one step longer)."""
    return [*grid[:-2], grid[-1]]
