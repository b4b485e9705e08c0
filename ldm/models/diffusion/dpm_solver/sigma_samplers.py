"""The samplers people pick by name (k-diffusion's family, as AUTOMATIC1111 and ComfyUI offer them), on the
DPM-Solver core.

Conventions (k-diffusion's and A1111's):

* x is the variance-exploding latent x_σ = x_0 + σ·ε (Karras et al. 2022). The network sees x_σ/√(1 + σ²) at the
  time t(σ) of :class:`~.sigmas.DiscreteSigmas`; the denoiser is D(x, σ) = x − σ·ε_θ and the ODE dx/dσ = (x − D)/σ.
* n steps follow a grid σ_0 > … > σ_n = 0 from a schedule (:mod:`.sigmas`). txt2img starts from σ_0·x_T for the
  CompVis start code x_T ~ N(0, I); img2img from x_0 + σ·noise at the σ its strength picks (A1111's rule).
* Callbacks and intermediates get the VP latent x_σ/√(1 + σ²), as from the CompVis samplers.
* Ancestral steps split σ → σ' into a deterministic step to σ_down and fresh noise of σ_up, with
  σ_up = min(σ', η·√(σ'²(σ² − σ'²)/σ²)) and σ_down = √(σ'² − σ_up²) (k-diffusion's ``get_ancestral_step``).
* A step to σ = 0 is first order: it returns the data prediction.

Where an algorithm is one the DPM-Solver core already has, it runs the core's update rules on the σ grid
(:class:`~.dpm_solver.NoiseScheduleVE`): Euler is DPM-Solver++(1) (≡ DDIM), DPM++ 2M is DPM-Solver++(2M), DPM++ 2S
its singlestep second-order update, DPM++ 2M/3M SDE and DDPM are SDE-DPM-Solver++ of order 2, 3 and 1 (η = 1 is
exactly the DDPM posterior step), and UniPC (Zhao et al. 2023, arXiv 2302.04867) adds its B(h) terms to the core's
first-order step. Heun, DPM2 and LMS are classical integrators in σ (Karras et al. 2022, Alg. 1 and §3; k-diffusion).
"""

import math
from bisect import bisect_left
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
from numpy.polynomial import Polynomial
from tqdm.auto import tqdm

from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVE
from ldm.models.diffusion.dpm_solver.sampler import LatentCorrection
from ldm.models.diffusion.dpm_solver.sigmas import SCHEDULE_LABELS, SCHEDULES, DiscreteSigmas, discard_next_to_last
from ldm.models.diffusion.sampling_util import (Intermediates, StepCallback, check_batch_size, classifier_free_guidance,
                                                randn)
from ldm.util import ParameterError

NoiseSource = Callable[[float, float], torch.Tensor]
"""``noise(σ, σ')``: standard normal noise for the step σ → σ', shaped like the latents."""


class BrownianNoise:
    """Increments of one Brownian path W(σ), sampled where the solver asks: (W(σ') − W(σ))/√|σ' − σ| ~ N(0, I).

    A point beyond the known ones extends the path by an independent increment; a point between two known ones is
    drawn from the Brownian bridge between them. Everything returned has the joint law of one Brownian path, which
    is what the SDE solvers need (DPM++ SDE asks for two overlapping increments per step). k-diffusion gets the same
    law from torchsde's Brownian tree, which also keeps one path per seed whatever the grid; this draws its normals
    from the run's generator instead, in the order the solver asks, and needs no extra dependency.
    """

    def __init__(self, like: torch.Tensor, generator: torch.Generator | None):
        self.like, self.generator = like, generator
        self.points: list[float] = []
        self.values: list[torch.Tensor] = []

    def _normal(self) -> torch.Tensor:
        return randn(self.like.shape, self.generator, self.like.device, self.like.dtype)

    def _value(self, point: float) -> torch.Tensor:
        i = bisect_left(self.points, point)
        if i < len(self.points) and self.points[i] == point:
            return self.values[i]
        if not self.points:
            value = torch.zeros_like(self.like)
        elif i == 0:
            value = self.values[0] + math.sqrt(self.points[0] - point) * self._normal()
        elif i == len(self.points):
            value = self.values[-1] + math.sqrt(point - self.points[-1]) * self._normal()
        else:
            (a, w_a), (b, w_b) = (self.points[i - 1], self.values[i - 1]), (self.points[i], self.values[i])
            mean = w_a + (point - a) / (b - a) * (w_b - w_a)
            value = mean + math.sqrt((point - a) * (b - point) / (b - a)) * self._normal()
        self.points.insert(i, point)
        self.values.insert(i, value)
        return value

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        start = self._value(sigma)
        return (self._value(sigma_next) - start) / math.sqrt(abs(sigma_next - sigma))


@dataclass
class SigmaRun:
    """What an algorithm needs from one run: the core solver (with the guided model), the noise, η and s_noise,
    and ``after_step(step, x, σ)``, called after every step with the latent at the step's end."""

    solver: DPM_Solver
    noise: NoiseSource
    eta: float
    s_noise: float
    after_step: Callable[[int, torch.Tensor, float], torch.Tensor]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x, σ): one (guided) model call."""
        return self.solver.evaluate(x, sigma)

    def add_noise(self, x: torch.Tensor, std: float, sigma: float, sigma_next: float) -> torch.Tensor:
        return x if std == 0 else x + self.noise(sigma, sigma_next) * (self.s_noise * std)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ → σ' (module docstring)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def _steps(grid: Sequence[float]):
    return enumerate(zip(grid[:-1], grid[1:]))


def euler(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """x' = x + (σ' − σ)·(x − D)/σ, which is DPM-Solver++(1): (σ'/σ)·x + (1 − σ'/σ)·D."""
    for i, (s, t) in _steps(grid):
        x = run.after_step(i, run.solver.first_update(x, s, t, run.denoise(x, s)), t)
    return x


def euler_ancestral(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Euler to σ_down, then noise of σ_up."""
    for i, (s, t) in _steps(grid):
        down, up = ancestral_split(s, t, run.eta)
        x = run.solver.first_update(x, s, down, run.denoise(x, s))
        x = run.after_step(i, run.add_noise(x, up, s, t), t)
    return x


def heun(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Karras et al. Alg. 1 (no churn): the trapezoidal rule, x' = x + (σ' − σ)·(d + d')/2 with d' the slope at the
    Euler prediction; Euler on the last step."""
    for i, (s, t) in _steps(grid):
        denoised = run.denoise(x, s)
        if t == 0:
            x = run.solver.first_update(x, s, t, denoised)
        else:
            slope = (x - denoised) / s
            x_euler = x + slope * (t - s)
            x = x + (slope + (x_euler - run.denoise(x_euler, t)) / t) * ((t - s) / 2)
        x = run.after_step(i, x, t)
    return x


def _dpm2_step(run: SigmaRun, x: torch.Tensor, s: float, t: float, denoised: torch.Tensor) -> torch.Tensor:
    """The midpoint rule at the geometric mean √(σσ'): x' = x + (σ' − σ)·d_mid (k-diffusion's DPM2)."""
    if t == 0:
        return run.solver.first_update(x, s, t, denoised)
    mid = math.sqrt(s * t)
    x_mid = x + (x - denoised) * ((mid - s) / s)
    return x + (x_mid - run.denoise(x_mid, mid)) * ((t - s) / mid)


def dpm2(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    for i, (s, t) in _steps(grid):
        x = run.after_step(i, _dpm2_step(run, x, s, t, run.denoise(x, s)), t)
    return x


def dpm2_ancestral(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    for i, (s, t) in _steps(grid):
        down, up = ancestral_split(s, t, run.eta)
        x = _dpm2_step(run, x, s, down, run.denoise(x, s))
        x = run.after_step(i, run.add_noise(x, up, s, t), t)
    return x


def dpmpp_2s_ancestral(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """DPM-Solver++(2S) (r = 1/2) to σ_down, then noise of σ_up."""
    for i, (s, t) in _steps(grid):
        down, up = ancestral_split(s, t, run.eta)
        denoised = run.denoise(x, s)
        if down == 0:
            x = run.solver.first_update(x, s, down, denoised)
        else:
            x, _ = run.solver.singlestep_second_update(x, s, down, denoised, r1=0.5)
        x = run.after_step(i, run.add_noise(x, up, s, t), t)
    return x


def dpmpp_sde(run: SigmaRun, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """k-diffusion's DPM++ SDE: DPM-Solver++(2S) with r = 1/2 where both stages are ancestral first-order steps,
    σ → √(σσ') with the first data prediction, then σ → σ' with the midpoint's, each with Brownian noise."""
    for i, (s, t) in _steps(grid):
        denoised = run.denoise(x, s)
        if t == 0:
            x = run.solver.first_update(x, s, t, denoised)
        else:
            mid = math.sqrt(s * t)
            down, up = ancestral_split(s, mid, run.eta)
            x_mid = run.add_noise(run.solver.first_update(x, s, down, denoised), up, s, mid)
            down, up = ancestral_split(s, t, run.eta)
            x = run.add_noise(run.solver.first_update(x, s, down, run.denoise(x_mid, mid)), up, s, t)
        x = run.after_step(i, x, t)
    return x


def multistep(run: SigmaRun, x: torch.Tensor, grid: Sequence[float], order: int, solver_type: str) -> torch.Tensor:
    """(SDE-)DPM-Solver++ of ``order`` (the core's multistep updates; η from the solver), warming up with lower
    orders and ending with a first-order step to σ = 0; SDE noise after each step."""
    times: list[float] = []
    outputs: list[torch.Tensor] = []
    for i, (s, t) in _steps(grid):
        times, outputs = [*times, s][-order:], [*outputs, run.denoise(x, s)][-order:]
        x = run.solver.multistep_update(1 if t == 0 else len(outputs), x, outputs, times, t, solver_type)
        x = run.after_step(i, run.add_noise(x, run.solver.noise_std(s, t), s, t), t)
    return x


def lms_coefficients(grid: Sequence[float], step: int, order: int) -> list[float]:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ for the Lagrange basis ℓ_j through σ_i, σ_{i−1}, …, σ_{i−order+1}, integrated
    exactly (k-diffusion and diffusers use numerical quadrature for the same numbers)."""
    nodes = [grid[step - k] for k in range(order)]
    coefficients = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        integral = basis.integ()
        coefficients.append(float(integral(grid[step + 1]) - integral(grid[step])))
    return coefficients


def lms(run: SigmaRun, x: torch.Tensor, grid: Sequence[float], order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth on the σ grid) over the last ``order`` slopes (x − D)/σ."""
    slopes: list[torch.Tensor] = []
    for i, (s, t) in _steps(grid):
        slopes = [*slopes, (x - run.denoise(x, s)) / s][-order:]
        terms = zip(lms_coefficients(grid, i, len(slopes)), reversed(slopes))
        x = run.after_step(i, x + sum(c * slope for c, slope in terms), t)
    return x


def unipc_coefficients(ratios: Sequence[float], hh: float, variant: str, predictor: bool) -> tuple[list[float], float]:
    """UniPC's ρ (Zhao et al. 2023, Alg. 2 and 3; the B(h) forms) and B(h), from r_k = (λ_{s_k} − λ_{s_0})/h.

    With ĥ = −h (data prediction), B(h) = ĥ (bh1) or e^ĥ − 1 (bh2), rows R_k = r^{k−1} over (r_1, …, 1) and
    b_k = k!·φ_{k+1}(ĥ)/B(h), the predictor solves R[:−1, :−1]·ρ = b[:−1] (ρ = ½ at order 2), the corrector
    R·ρ = b (ρ = ½ at order 1).
    """
    order = len(ratios) + 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    phi, factorial, b = math.expm1(hh) / hh - 1.0, 1.0, []
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1.0 / factorial
    rows = np.array([[r ** (k - 1) for r in [*ratios, 1.0]] for k in range(1, order + 1)])
    if predictor:
        rho = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1]).tolist() if order > 2 else []
    else:
        rho = [0.5] if order == 1 else np.linalg.solve(rows, b).tolist()
    return rho, b_h


def _unipc_update(run: SigmaRun, x: torch.Tensor, times: list[float], outputs: list[torch.Tensor], t: float,
                  order: int, variant: str, new_output: torch.Tensor | None = None) -> torch.Tensor:
    """UniP (``new_output`` None) or UniC from x at times[−1] to t: the core's first-order step minus
    α_t·B(h)·Σ ρ_k·D_k, with D_k = (M_k − M_0)/r_k over the earlier outputs (and M(x_t) − M_0 for UniC)."""
    solver, s = run.solver, times[-1]
    lambda_s = solver.lambda_at(s)
    h = solver.lambda_at(t) - lambda_s
    ratios = [(solver.lambda_at(times[-(k + 1)]) - lambda_s) / h for k in range(1, order)]
    rho, b_h = unipc_coefficients(ratios, -h, variant, predictor=new_output is None)
    differences = [(outputs[-(k + 1)] - outputs[-1]) / r for k, r in enumerate(ratios, start=1)]
    if new_output is not None:
        differences.append(new_output - outputs[-1])
    x_t = solver.first_update(x, s, t, outputs[-1])
    if differences:
        alpha_t = math.exp(solver.log_alpha_at(t))
        x_t = x_t - (alpha_t * b_h) * sum(r * d for r, d in zip(rho, differences))
    return x_t


def unipc(run: SigmaRun, x: torch.Tensor, grid: Sequence[float], order: int = 3, variant: str = "bh1"
          ) -> torch.Tensor:
    """UniPC-``order`` with data prediction: every step's new model output first corrects the previous step (UniC,
    no extra call), then predicts the next point (UniP); orders warm up and fall to 1 over the final steps (the
    reference implementation's ``lower_order_final``); no corrector after the last step."""
    times: list[float] = []
    outputs: list[torch.Tensor] = []
    steps = len(grid) - 1
    start = x
    last_order = 0
    for i, (s, t) in _steps(grid):
        denoised = run.denoise(x, s)
        if i > 0:
            x = _unipc_update(run, start, times, outputs, s, last_order, variant, new_output=denoised)
        times, outputs = [*times, s][-order:], [*outputs, denoised][-order:]
        last_order, start = min(order, len(outputs), steps - i), x
        x = run.after_step(i, _unipc_update(run, x, times, outputs, t, last_order, variant), t)
    return x


Algorithm = Callable[[SigmaRun, torch.Tensor, Sequence[float]], torch.Tensor]


@dataclass(frozen=True)
class SigmaMethod:
    """A named sampler: its algorithm, A1111's label and default schedule, and how it draws noise
    (``none``, ``randn``: fresh normals per step, ``brownian``: :class:`BrownianNoise`)."""

    label: str
    algorithm: Algorithm
    schedule: str
    noise: str = "none"
    calls_per_step: int = 1
    sde: bool = False  # η is the SDE's noise level (SDE-DPM-Solver++), not an ancestral split
    discard_next_to_last_sigma: bool = False


# Keys are ComfyUI's (and k-diffusion's) names; labels, default schedules and options are A1111's.
SIGMA_METHODS: dict[str, SigmaMethod] = {
    "euler": SigmaMethod("Euler", euler, "normal"),
    "euler_ancestral": SigmaMethod("Euler a", euler_ancestral, "normal", noise="randn"),
    "heun": SigmaMethod("Heun", heun, "normal", calls_per_step=2),
    "dpm_2": SigmaMethod("DPM2", dpm2, "karras", calls_per_step=2, discard_next_to_last_sigma=True),
    "dpm_2_ancestral": SigmaMethod("DPM2 a", dpm2_ancestral, "karras", noise="randn", calls_per_step=2,
                                   discard_next_to_last_sigma=True),
    "dpmpp_2s_ancestral": SigmaMethod("DPM++ 2S a", dpmpp_2s_ancestral, "karras", noise="randn", calls_per_step=2),
    "dpmpp_2m": SigmaMethod("DPM++ 2M", partial(multistep, order=2, solver_type="dpmsolver"), "karras"),
    "dpmpp_sde": SigmaMethod("DPM++ SDE", dpmpp_sde, "karras", noise="brownian", calls_per_step=2),
    "dpmpp_2m_sde": SigmaMethod("DPM++ 2M SDE", partial(multistep, order=2, solver_type="dpmsolver"),
                                "exponential", noise="brownian", sde=True),
    "dpmpp_2m_sde_heun": SigmaMethod("DPM++ 2M SDE Heun", partial(multistep, order=2, solver_type="taylor"),
                                     "exponential", noise="brownian", sde=True),
    "dpmpp_3m_sde": SigmaMethod("DPM++ 3M SDE", partial(multistep, order=3, solver_type="taylor"), "exponential",
                                noise="brownian", sde=True, discard_next_to_last_sigma=True),
    "lms": SigmaMethod("LMS", lms, "normal"),
    "uni_pc": SigmaMethod("UniPC", partial(unipc, variant="bh1"), "normal"),
    "uni_pc_bh2": SigmaMethod("UniPC bh2", partial(unipc, variant="bh2"), "normal"),
    "ddpm": SigmaMethod("DDPM", partial(multistep, order=1, solver_type="dpmsolver"), "normal", noise="randn",
                        sde=True),
}

MODEL_OUTPUTS = ("eps", "v")


def noise_level(method: SigmaMethod, eta_ancestral: float | None, s_noise: float) -> float:
    """The η a method runs with (1 by default where it adds noise, else 0), after checking both options."""
    if method.noise == "none" and (eta_ancestral or s_noise != 1.0):
        raise ParameterError("eta_ancestral" if eta_ancestral else "s_noise",
                             f"is for samplers that add noise; {method.label} adds none")
    eta = (0.0 if method.noise == "none" else 1.0) if eta_ancestral is None else eta_ancestral
    if not 0 <= eta <= 1:
        raise ParameterError("eta_ancestral", f"must be between 0 and 1, got {eta}")
    if not 0 <= s_noise <= 2:
        raise ParameterError("s_noise", f"must be between 0 and 2, got {s_noise}")
    return eta


class SigmaSampler:
    """A :data:`SIGMA_METHODS` sampler for a LatentDiffusion ``model``, with the CompVis ``sample``/``img2img``
    interface of :mod:`ldm.models.diffusion.samplers`.

    ``schedule``: a :data:`~.sigmas.SCHEDULES` name (default: A1111's for the method) or an explicit grid of
    decreasing noise levels ending in 0 (then S must be its number of steps). ``eta_ancestral`` η (default 1; only for
    samplers that draw noise: the ancestral split, or the SDE's noise level) and ``s_noise`` (a factor on that noise)
    are A1111's; the noise comes from the run's generator. The per-call ``eta`` of the protocol is DDIM's and must
    be 0 here.
    """

    def __init__(self, model, method: str, schedule: str | Sequence[float] | None = None,
                 eta_ancestral: float | None = None, s_noise: float = 1.0):
        if model.parameterization not in MODEL_OUTPUTS:
            raise ParameterError("sampler", f"σ-space samplers need an eps- or v-prediction model, not "
                                            f"{model.parameterization!r}")
        self.model, self.method = model, SIGMA_METHODS[method]
        self.schedule = self.method.schedule if schedule is None else schedule
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES:
            raise ParameterError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        self.eta, self.s_noise = noise_level(self.method, eta_ancestral, s_noise), s_noise
        self.sigmas = DiscreteSigmas(model.alphas_cumprod)
        self.schedule_label = SCHEDULE_LABELS[self.schedule] if isinstance(self.schedule, str) else "custom"
        # A1111's old-style name: the schedule follows unless it is the normal one
        self.name = self.method.label + ("" if self.schedule == "normal" else f" {self.schedule_label}")

    def grid(self, steps: int) -> list[float]:
        """The σ grid of ``steps`` steps, from σ_max to 0."""
        if not isinstance(self.schedule, str):
            grid = [float(sigma) for sigma in self.schedule]
            if steps != len(grid) - 1:
                raise ParameterError("steps", f"must be {len(grid) - 1} for the given grid, got {steps}")
            return grid
        if not 1 <= steps <= len(self.sigmas):
            raise ParameterError("steps", f"must be between 1 and {len(self.sigmas)}, got {steps}")
        discard = self.method.discard_next_to_last_sigma and steps > 1
        grid = SCHEDULES[self.schedule](steps + discard, self.sigmas)
        return discard_next_to_last(grid) if discard else grid

    def img2img_grid(self, steps: int, strength: float) -> list[float]:
        """A1111's img2img grid: the last int(min(strength, 0.999)·S) + 1 steps of the S-step grid."""
        if not 0.0 <= strength <= 1.0:
            raise ParameterError("strength", f"must be between 0 and 1, got {strength}")
        return self.grid(steps)[steps - int(min(strength, 0.999) * steps) - 1:]

    def model_calls(self, steps: int) -> int:
        """Model calls of ``steps`` steps (second-order steps cost two, except a last one to σ = 0)."""
        if self.method.calls_per_step == 1:
            return steps
        return 2 * steps - (self.grid(steps)[-1] == 0)

    def _noise_prediction(self, conditioning: Any, unconditional_conditioning: Any, scale: float
                          ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """ε(x_σ, σ) for σ: (B,), from the network at x_σ/√(1 + σ²) and t(σ) (v-prediction converted)."""
        def noise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            scale_in = (1.0 + sigma ** 2).rsqrt().to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            x_in = x * scale_in
            out = classifier_free_guidance(self.model.apply_model, x_in, self.sigmas.timesteps(sigma), conditioning,
                                           unconditional_conditioning, scale)
            if self.model.parameterization == "v":  # ε = α·v + σ_VP·x_VP with α = scale_in, σ_VP = σ·α
                return scale_in * out + sigma.to(x.dtype).view_as(scale_in) * scale_in * x_in
            return out
        return noise

    def _noise_source(self, x: torch.Tensor, generator: torch.Generator | None) -> NoiseSource:
        if self.method.noise == "brownian":
            return BrownianNoise(x, generator)
        if self.method.noise == "randn":
            return lambda sigma, sigma_next: randn(x.shape, generator, x.device, x.dtype)
        return _no_noise

    def solve(self, x: torch.Tensor, grid: Sequence[float], conditioning: Any = None,
              unconditional_conditioning: Any = None, unconditional_guidance_scale: float = 1.0,
              generator: torch.Generator | None = None, callback: StepCallback | None = None, log_every_t: int = 100,
              verbose: bool = False, noise: NoiseSource | None = None,
              correct_latent: LatentCorrection | None = None) -> tuple[torch.Tensor, Intermediates]:
        """Run the algorithm on the VE latent x at σ = grid[0] down the grid; returns x at grid[−1].

        ``noise``: where ancestral and SDE steps get their noise (default: the method's, from ``generator``).
        ``correct_latent(x, ratio, step)``: as for DPM-Solver, on the VP latent at the noise ratio t(σ)/(N − 1).
        """
        hook = _StepHook(len(grid) - 1, Intermediates(log_every_t=log_every_t), callback, verbose)
        if correct_latent is not None:
            hook.correct = lambda latent, sigma, step: correct_latent(
                latent, self.sigmas.timestep(sigma) / (len(self.sigmas) - 1) if sigma > 0 else 0.0, step)
            x = hook.corrected(x, grid[0], 0)
        solver = DPM_Solver(self._noise_prediction(conditioning, unconditional_conditioning,
                                                   unconditional_guidance_scale),
                            NoiseScheduleVE(), algorithm_type="dpmsolver++", sde_eta=self.eta if self.method.sde else 0)
        run = SigmaRun(solver, noise or self._noise_source(x, generator), 0.0 if self.method.sde else self.eta,
                       self.s_noise, hook)
        hook.solver = run.solver
        hook.intermediates.start(x / math.sqrt(1.0 + grid[0] ** 2))
        with hook.progress:
            return self.method.algorithm(run, x, grid), hook.intermediates

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: StepCallback | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, Intermediates]:
        """``batch_size`` latents from σ_0·x_T (x_T drawn when None) in S steps."""
        _check_ddim_eta(eta)
        check_batch_size(conditioning, batch_size)
        grid = self.grid(S)
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, self.model.device)
        return self.solve(x_T * grid[0], grid, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                          generator, callback, log_every_t, verbose)

    @torch.no_grad()
    def img2img(self, init_latent: torch.Tensor, strength: float, S: int, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = True) -> torch.Tensor:
        """A1111's img2img: the last int(min(strength, 0.999)·S) + 1 steps of the S-step grid, from x_0 + σ·noise."""
        _check_ddim_eta(eta)
        tail = self.img2img_grid(S, strength)
        if noise is None:
            noise = randn(init_latent.shape, generator, init_latent.device, init_latent.dtype)
        samples, _ = self.solve(init_latent + tail[0] * noise, tail, conditioning, unconditional_conditioning,
                                unconditional_guidance_scale, generator, callback, verbose=verbose)
        return samples


def _no_noise(sigma: float, sigma_next: float) -> torch.Tensor:
    raise AssertionError("a deterministic sampler asked for noise")


def _check_ddim_eta(eta: float) -> None:
    if eta:
        raise ParameterError("eta", "is DDIM's η; σ-space samplers take their noise level as eta_ancestral")


class _StepHook:
    """After each step: the VP latent and the latest x̂_0 to the callback and the intermediates; the progress bar."""

    def __init__(self, steps: int, intermediates: Intermediates, callback: StepCallback | None, verbose: bool):
        self.steps, self.intermediates, self.callback = steps, intermediates, callback
        self.progress = tqdm(total=steps, desc="Sampling", disable=not verbose, leave=False, unit="step")
        self.solver: DPM_Solver | None = None

    correct: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None

    def corrected(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        """x after ``correct`` (on the VP latent), back in VE form."""
        scale = math.sqrt(1.0 + sigma ** 2)
        return self.correct(x / scale, sigma, step) * scale

    def __call__(self, step: int, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.correct is not None:
            x = self.corrected(x, sigma, step + 1)
        latent = x / math.sqrt(1.0 + sigma ** 2)
        pred_x0 = self.solver.latest_data_prediction()
        if self.callback is not None:
            self.callback(step, latent, pred_x0)
        self.intermediates.step(self.steps - 1 - step, self.steps, latent, pred_x0)
        self.progress.update()
        return x
