"""PLMS: pseudo linear multistep sampling (Liu et al. 2022, arXiv 2202.09778) on the DDIM grid.

Each step is a DDIM step (η = 0) taken with a combined noise estimate ε′:
the first step averages ε at both ends of the step (a pseudo improved-Euler step, one extra model call),
later steps use Adams–Bashforth weights over the last 2, 3, then 4 noise predictions.
S steps therefore cost S + 1 model calls and, as in the original, S + 1 noise draws (each DDIM update draws).
"""

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import ParameterError

# ε′ = Σ_k w_k·ε_{n−k}, most recent first, by the number of earlier predictions available.
ADAMS_BASHFORTH_WEIGHTS = {
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class PLMSSampler(DDIMSampler):
    """PLMS for a LatentDiffusion ``model``; same interface as :class:`DDIMSampler`, deterministic only."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0, verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ParameterError("eta", "must be 0 with PLMS (it is deterministic)")
        super().make_schedule(ddim_num_steps, ddim_eta, verbose)

    def _step(self, x: torch.Tensor, index: int, eps_at, history: list[torch.Tensor],
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        eps = eps_at(x, index)
        if history:
            weights = ADAMS_BASHFORTH_WEIGHTS[len(history)]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(history)]))
        else:
            x_euler, _ = self._update(x, eps, index, generator)
            eps_prime = (eps + eps_at(x_euler, max(index - 1, 0))) / 2
        history.append(eps)
        del history[:-3]
        return self._update(x, eps_prime, index, generator)
