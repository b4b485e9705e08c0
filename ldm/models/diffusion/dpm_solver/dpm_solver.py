"""DPM-Solver and DPM-Solver++: fast ODE solvers for diffusion models, in one module.

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps"
(arXiv 2206.00927) and "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv 2211.01095).

Notation. A VP diffusion has x_t = α_t·x_0 + σ_t·ε with α_t² + σ_t² = 1, and λ_t = log α_t − log σ_t (half the
log-SNR, decreasing in t). A step goes from s to t; h = λ_t − λ_s (> 0 when sampling, < 0 when inverting).
The network gives a noise prediction ε_θ(x, t) or, for DPM-Solver++, a data prediction
x_θ = (x − σ_t·ε_θ)/α_t. The exact solutions of the probability-flow ODE are

    DPM-Solver   (eq. 3.4):  x_t = (α_t/α_s)·x_s − α_t ∫_{λ_s}^{λ_t} e^{−λ} ε_θ dλ,
    DPM-Solver++ (eq. 9):    x_t = (σ_t/σ_s)·x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} x_θ dλ,

and expanding the prediction M (ε_θ or x_θ) in λ gives the k-th order solvers, with
φ_1(ĥ) = e^ĥ − 1, φ_2(ĥ) = φ_1(ĥ)/ĥ − 1, φ_3(ĥ) = φ_2(ĥ)/ĥ − 1/2. The two algorithms are the same formulas
under (α, σ, h) ↔ (σ, α, −h). With (a, b, ĥ) = (α, σ, h) for DPM-Solver and (σ, α, −h) for DPM-Solver++,
every update here reads

    x_t = (a_t/a_s)·x_s − b_t·φ_1(ĥ)·M_s − b_t·(higher-order terms in the differences of M).

SDE-DPM-Solver++ (DPM-Solver++ §5 and appendix; ``sde_eta`` η = 1 there) solves the reverse SDE with the same
updates under ĥ = −(1 + η)·h and ratio (σ_t/σ_s)·e^{−ηh}, then adds noise of standard deviation σ_t·√(1 − e^{−2ηh})
(:meth:`DPM_Solver.noise_std`); η = 0 is the ODE.

Discrete-time models (N training steps, ᾱ_n) live on t_n = (n + 1)/N with log α_t interpolated linearly between
those points; the network is fed (t − 1/N)·N. The time grid and all step coefficients are Python floats computed
on the CPU in float64, so the sampling loop never waits on the device.
"""

import itertools
import logging
import math
from typing import Any, Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling_util import classifier_free_guidance, randn

logger = logging.getLogger(__name__)

MODEL_TYPES = ("noise", "x_start", "v", "score")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free")
ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")
SOLVER_TYPES = ("dpmsolver", "taylor")

# Multistep sampling with fewer steps than this lowers the order of the final steps (the final one is first
# order), which stabilises very short runs. The seed's rule (its docstrings say 15; CompVis' copy uses 15).
LOWER_ORDER_FINAL_BELOW_STEPS = 10


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def interpolate_fn(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through the points (xp, yp), xp increasing, extended linearly beyond both ends."""
    index = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x_left, x_right, y_left, y_right = xp[index - 1], xp[index], yp[index - 1], yp[index]
    return y_left + (x - x_left) * (y_right - y_left) / (x_right - x_left)


class NoiseScheduleVP:
    """α_t, σ_t and λ_t of a variance-preserving diffusion, for continuous t ∈ (0, T].

    ``discrete``: from ``alphas_cumprod`` (or ``betas``) of an N-step DDPM, T = 1.
    ``linear``: log α_t = −(β_1 − β_0)·t²/4 − β_0·t/2 (the continuous VP-SDE), T = 1.
    ``cosine``: α_t ∝ cos((t + s)/(1 + s)·π/2) with s = 0.008 (Nichol & Dhariwal), T where β_t reaches 999.
    Every method takes a tensor of times and returns a tensor of the same shape, device and dtype.
    """

    cosine_s = 0.008
    cosine_beta_max = 999.0

    def __init__(self, schedule: str = "discrete", betas: torch.Tensor | None = None,
                 alphas_cumprod: torch.Tensor | None = None, continuous_beta_0: float = 0.1,
                 continuous_beta_1: float = 20.0):
        _check_choice("schedule", schedule, ("discrete", "linear", "cosine"))
        self.schedule = schedule
        self.total_N = 1000
        self.T = 1.0
        if schedule == "discrete":
            if betas is not None:
                log_alphas = 0.5 * torch.log1p(-torch.as_tensor(betas, dtype=torch.float64).cpu()).cumsum(0)
            elif alphas_cumprod is not None:
                log_alphas = 0.5 * torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu())
            else:
                raise ValueError("a discrete schedule needs betas or alphas_cumprod")
            self.total_N = len(log_alphas)
            self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=torch.float64)[1:]
            self.log_alpha_array = log_alphas
            self._arrays_on: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        elif schedule == "linear":
            self.beta_0, self.beta_1 = continuous_beta_0, continuous_beta_1
        else:
            self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))
            self.T = (math.atan(self.cosine_beta_max * (1.0 + self.cosine_s) / math.pi) * 2.0
                      * (1.0 + self.cosine_s) / math.pi - self.cosine_s)

    def _arrays(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The discrete keypoints on ``like``'s device and dtype, copied there once."""
        key = (like.device, like.dtype)
        if key not in self._arrays_on:
            self._arrays_on[key] = (self.t_array.to(like.device, like.dtype),
                                    self.log_alpha_array.to(like.device, like.dtype))
        return self._arrays_on[key]

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log α_t."""
        if self.schedule == "discrete":
            return interpolate_fn(t, *self._arrays(t))
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return torch.log(torch.cos((t + self.cosine_s) / (1.0 + self.cosine_s) * math.pi / 2.0)) - self.cosine_log_alpha_0

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 − α_t²)."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """λ_t = log α_t − log σ_t."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        return log_mean_coeff - 0.5 * torch.log(-torch.expm1(2.0 * log_mean_coeff))

    def log_coefficients(self, t: float) -> tuple[float, float]:
        """(log α_t, log σ_t) at one time, in float64."""
        log_alpha = self.marginal_log_mean_coeff(torch.tensor([t], dtype=torch.float64)).item()
        return log_alpha, 0.5 * math.log(-math.expm1(2.0 * log_alpha))

    def time_at_lambda(self, lamb: float) -> float:
        """:meth:`inverse_lambda` at one value, in float64."""
        return self.inverse_lambda(torch.tensor([lamb], dtype=torch.float64)).item()

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """The t with λ_t = ``lamb``, from log α = −½·log(1 + e^{−2λ})."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        if self.schedule == "discrete":
            t_array, log_alpha_array = self._arrays(lamb)
            return interpolate_fn(log_alpha, log_alpha_array.flip(0), t_array.flip(0))
        if self.schedule == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
            delta = self.beta_0 ** 2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        angle = torch.arccos(torch.exp(log_alpha + self.cosine_log_alpha_0))
        return angle * 2.0 * (1.0 + self.cosine_s) / math.pi - self.cosine_s


class NoiseScheduleVE:
    """The variance-exploding form x_σ = x_0 + σ·ε with the noise level itself as the time (Karras et al. 2022,
    "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364): α = 1, λ = −log σ.

    A VP latent at noise level σ is this x scaled by 1/√(1 + σ²); the solver's updates are the same formulas in
    either form. σ = 0 (the data) is a valid time: λ = ∞, and a first-order step to it returns the data prediction.
    Everything is float arithmetic on the host.
    """

    @staticmethod
    def log_coefficients(sigma: float) -> tuple[float, float]:
        """(log α, log σ) = (0, log σ)."""
        return 0.0, math.log(sigma) if sigma > 0 else -math.inf

    @staticmethod
    def time_at_lambda(lamb: float) -> float:
        """σ = e^{−λ}."""
        return math.exp(-lamb)


def model_wrapper(model: Callable, noise_schedule: NoiseScheduleVP, model_type: str = "noise",
                  model_kwargs: dict | None = None, guidance_type: str = "uncond", condition: Any = None,
                  unconditional_condition: Any = None, guidance_scale: float = 1.0,
                  classifier_fn: Callable | None = None, classifier_kwargs: dict | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Turn a network into the solver's ``model_fn(x, t_continuous) -> ε`` (noise prediction).

    ``model(x, t_input, **model_kwargs)`` (``model(x, t_input, cond, **model_kwargs)`` with classifier-free
    guidance) returns ``model_type``: ``noise`` ε, ``x_start`` x_0 (ε = (x − α_t·x_0)/σ_t), ``v``
    (ε = α_t·v + σ_t·x) or ``score`` ∇log p (ε = −σ_t·score). t_input is (t − 1/N)·N for discrete schedules.
    Guidance: ``classifier`` gives ε − s·σ_t·∇_x log p(c | x_t) with ``classifier_fn(x, t_input, condition)``
    returning log-probabilities; ``classifier-free`` gives ε_u + s·(ε_c − ε_u) from one doubled batch.
    """
    _check_choice("model_type", model_type, MODEL_TYPES)
    _check_choice("guidance_type", guidance_type, GUIDANCE_TYPES)
    if guidance_type == "classifier" and classifier_fn is None:
        raise ValueError("classifier guidance needs a classifier_fn")
    model_kwargs, classifier_kwargs = model_kwargs or {}, classifier_kwargs or {}
    ns = noise_schedule

    def model_input_time(t_continuous: torch.Tensor) -> torch.Tensor:
        return (t_continuous - 1.0 / ns.total_N) * ns.total_N if ns.schedule == "discrete" else t_continuous

    def expand(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def noise_prediction(x: torch.Tensor, t_continuous: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t_input = model_input_time(t_continuous)
        output = (model(x, t_input, cond, **model_kwargs) if guidance_type == "classifier-free"
                  else model(x, t_input, **model_kwargs))
        if model_type == "noise":
            return output
        alpha_t = expand(ns.marginal_alpha(t_continuous), x)
        sigma_t = expand(ns.marginal_std(t_continuous), x)
        if model_type == "x_start":
            return (x - alpha_t * output) / sigma_t
        if model_type == "v":
            return alpha_t * output + sigma_t * x
        return -sigma_t * output

    def classifier_gradient(x: torch.Tensor, t_input: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_prob = classifier_fn(x_in, t_input, condition, **classifier_kwargs)
            return torch.autograd.grad(log_prob.sum(), x_in)[0]

    def model_fn(x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        if guidance_type == "uncond":
            return noise_prediction(x, t_continuous)
        if guidance_type == "classifier":
            gradient = classifier_gradient(x, model_input_time(t_continuous))
            sigma_t = expand(ns.marginal_std(t_continuous), x)
            return noise_prediction(x, t_continuous) - guidance_scale * sigma_t * gradient
        return classifier_free_guidance(noise_prediction, x, t_continuous, condition, unconditional_condition,
                                        guidance_scale)

    return model_fn


def phi_1(h: float) -> float:
    """e^h − 1, for the signed step h = ĥ."""
    return math.expm1(h)


def phi_2(h: float) -> float:
    """(e^h − 1)/h − 1."""
    return phi_1(h) / h - 1.0


def phi_3(h: float) -> float:
    """φ_2(h)/h − 1/2."""
    return phi_2(h) / h - 0.5


class Marginals(NamedTuple):
    log_alpha: float
    log_sigma: float
    lamb: float


class StepCoefficients(NamedTuple):
    """For a step s → t: x_t = ratio·x_s − b_t·(…), with ratio = a_t/a_s and the signed step ĥ = ±h (see the
    module docstring)."""

    ratio: float
    b_t: float
    h_signed: float


class DPM_Solver:
    """DPM-Solver (``algorithm_type="dpmsolver"``, on ε) and DPM-Solver++ (``"dpmsolver++"``, on x_0).

    ``model_fn(x, t)`` is a noise predictor with t: (B,) continuous times (see :func:`model_wrapper`).
    ``correcting_x0_fn(x0, t)`` corrects data predictions (``"dynamic_thresholding"``: Imagen's, per sample
    the ``dynamic_thresholding_ratio`` quantile of |x_0|, at least ``thresholding_max_val``);
    ``correcting_xt_fn(x, t, step)`` corrects the sample after every step (t a float), e.g. for inpainting.
    ``sde_eta`` η > 0 turns DPM-Solver++'s updates into SDE-DPM-Solver++'s (module docstring); the caller adds the
    noise of :meth:`noise_std` after each step.
    """

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP | NoiseScheduleVE,
                 algorithm_type: str = "dpmsolver++",
                 correcting_x0_fn: str | Callable | None = None, correcting_xt_fn: Callable | None = None,
                 thresholding_max_val: float = 1.0, dynamic_thresholding_ratio: float = 0.995, sde_eta: float = 0.0):
        _check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        if sde_eta < 0 or (sde_eta and algorithm_type != "dpmsolver++"):
            raise ValueError("sde_eta must be non-negative, and is for DPM-Solver++ only")
        self.sde_eta = sde_eta
        if correcting_x0_fn == "dynamic_thresholding":
            correcting_x0_fn = self.dynamic_thresholding_fn
        elif correcting_x0_fn is not None and not callable(correcting_x0_fn):
            raise ValueError("correcting_x0_fn must be None, 'dynamic_thresholding' or a callable")
        self.model = model_fn
        self.noise_schedule = noise_schedule
        self.algorithm_type = algorithm_type
        self.correcting_x0_fn = correcting_x0_fn
        self.correcting_xt_fn = correcting_xt_fn
        self.thresholding_max_val = thresholding_max_val
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.nfe = 0
        self._latest: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (x, M(x, t), t) of the last call
        self._marginals_at: dict[float, Marginals] = {}
        # Order → update, each as (x, s, t, M_s, ratios r1[, r2], solver_type) -> x_t.
        self._single_updates = {
            1: lambda x, s, t, model_s, ratios, solver_type: self.first_update(x, s, t, model_s),
            2: lambda x, s, t, model_s, ratios, solver_type: self.singlestep_second_update(
                x, s, t, model_s, *ratios, solver_type=solver_type)[0],
            3: lambda x, s, t, model_s, ratios, solver_type: self.singlestep_third_update(
                x, s, t, model_s, *ratios, solver_type=solver_type)[0],
        }
        # Order → update, each as (x, model outputs, their times, t, solver_type) -> x_t.
        self._multi_updates = {
            1: lambda x, model_prev, t_prev, t, solver_type: self.first_update(x, t_prev[-1], t, model_prev[-1]),
            2: self.multistep_second_update,
            3: self.multistep_third_update,
        }
        self._loops = {"multistep": self._sample_multistep, "singlestep": self._sample_singlestep,
                       "singlestep_fixed": self._sample_singlestep, "adaptive": self._sample_adaptive}

    # Schedule values at float times, on the CPU in float64.

    def _marginals(self, t: float) -> Marginals:
        """Remembered per time: the grid's are computed once, before the step loop."""
        if t not in self._marginals_at:
            log_alpha, log_sigma = self.noise_schedule.log_coefficients(t)
            self._marginals_at[t] = Marginals(log_alpha, log_sigma, log_alpha - log_sigma)
        return self._marginals_at[t]

    def lambda_at(self, t: float) -> float:
        """λ_t = log α_t − log σ_t at one time."""
        return self._marginals(t).lamb

    def log_alpha_at(self, t: float) -> float:
        return self._marginals(t).log_alpha

    def _time_at(self, lamb: float) -> float:
        return self.noise_schedule.time_at_lambda(lamb)

    def _coefficients(self, s: float, t: float) -> StepCoefficients:
        """(a_t/a_s, b_t, ĥ): (α_t/α_s, σ_t, h) for DPM-Solver, (σ_t/σ_s, α_t, −h) for DPM-Solver++, and for
        SDE-DPM-Solver++ with noise level η: (σ_t/σ_s·e^{−ηh}, α_t, −(1 + η)·h)."""
        m_s, m_t = self._marginals(s), self._marginals(t)
        h = m_t.lamb - m_s.lamb
        if self.algorithm_type == "dpmsolver":
            return StepCoefficients(math.exp(m_t.log_alpha - m_s.log_alpha), math.exp(m_t.log_sigma), h)
        eta_h = self.sde_eta * h if self.sde_eta else 0.0
        return StepCoefficients(math.exp(m_t.log_sigma - m_s.log_sigma - eta_h), math.exp(m_t.log_alpha), -h - eta_h)

    def noise_std(self, s: float, t: float) -> float:
        """The standard deviation of the noise SDE-DPM-Solver++ adds after a step s → t: σ_t·√(1 − e^{−2ηh})."""
        m_s, m_t = self._marginals(s), self._marginals(t)
        if not self.sde_eta or m_t.log_sigma == -math.inf:
            return 0.0
        return math.exp(m_t.log_sigma) * math.sqrt(-math.expm1(-2.0 * self.sde_eta * (m_t.lamb - m_s.lamb)))

    # The model, as the algorithm needs it.

    def evaluate(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """ε_θ(x, t) for DPM-Solver, x_θ(x, t) = (x − σ_t·ε_θ)/α_t (corrected) for DPM-Solver++."""
        self.nfe += 1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        noise = self.model(x, t_batch)
        output = noise if self.algorithm_type == "dpmsolver" else self._data_from_noise(x, noise, t, t_batch)
        self._latest = (x, output, t)
        return output

    def latest_data_prediction(self) -> torch.Tensor | None:
        """x̂_0 of the latest model evaluation (None before the first): the model's own output for DPM-Solver++,
        (x − σ_t·ε_θ)/α_t for DPM-Solver. After a step, the x̂_0 that the step was taken with."""
        if self._latest is None:
            return None
        x, output, t = self._latest
        if self.algorithm_type == "dpmsolver++":
            return output
        marginals = self._marginals(t)
        return (x - math.exp(marginals.log_sigma) * output) / math.exp(marginals.log_alpha)

    def _data_from_noise(self, x: torch.Tensor, noise: torch.Tensor, t: float, t_batch: torch.Tensor
                         ) -> torch.Tensor:
        marginals = self._marginals(t)
        x0 = (x - math.exp(marginals.log_sigma) * noise) / math.exp(marginals.log_alpha)
        return x0 if self.correcting_x0_fn is None else self.correcting_x0_fn(x0, t_batch)

    def dynamic_thresholding_fn(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Clamp x_0 to [−s, s] and divide by s, s = max(quantile_p |x_0|, max_val) per sample (Imagen)."""
        s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), self.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=self.thresholding_max_val).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return torch.clamp(x0, -s, s) / s

    # Update rules: one step from s to t. M denotes the model output (ε or x_0), see the module docstring.

    def first_update(self, x: torch.Tensor, s: float, t: float, model_s: torch.Tensor) -> torch.Tensor:
        """DPM-Solver-1 (eq. 3.7; ≡ DDIM): x_t = (a_t/a_s)·x_s − b_t·φ_1(ĥ)·M_s."""
        c = self._coefficients(s, t)
        return c.ratio * x - c.b_t * phi_1(c.h_signed) * model_s

    def singlestep_second_update(self, x: torch.Tensor, s: float, t: float, model_s: torch.Tensor,
                                 r1: float = 0.5, solver_type: str = "dpmsolver"
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPM-Solver-2 (Alg. 1) / DPM-Solver++(2S) (Alg. 1): one intermediate point s_1 at λ_s + r1·h.

        u = (a_{s1}/a_s)·x_s − b_{s1}·φ_1(r1·ĥ)·M_s,  D = M(u, s_1) − M_s,
        x_t = (a_t/a_s)·x_s − b_t·φ_1(ĥ)·M_s − b_t·[φ_1(ĥ)/(2·r1) | φ_2(ĥ)/r1]·D  (dpmsolver | taylor).
        Returns x_t and M(u, s_1).
        """
        s1 = self._time_at(self.lambda_at(s) + r1 * (self.lambda_at(t) - self.lambda_at(s)))
        c1 = self._coefficients(s, s1)
        model_s1 = self.evaluate(c1.ratio * x - c1.b_t * phi_1(c1.h_signed) * model_s, s1)
        c = self._coefficients(s, t)
        second = phi_1(c.h_signed) / (2.0 * r1) if solver_type == "dpmsolver" else phi_2(c.h_signed) / r1
        x_t = c.ratio * x - c.b_t * phi_1(c.h_signed) * model_s - c.b_t * second * (model_s1 - model_s)
        return x_t, model_s1

    def singlestep_third_update(self, x: torch.Tensor, s: float, t: float, model_s: torch.Tensor,
                                r1: float = 1.0 / 3.0, r2: float = 2.0 / 3.0, solver_type: str = "dpmsolver",
                                model_s1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DPM-Solver-3 (Alg. 2) / DPM-Solver++(3S): points s_1, s_2 at λ_s + r1·h, λ_s + r2·h.

        u_1 = (a_{s1}/a_s)·x_s − b_{s1}·φ_1(r1·ĥ)·M_s,
        u_2 = (a_{s2}/a_s)·x_s − b_{s2}·φ_1(r2·ĥ)·M_s − b_{s2}·(r2/r1)·φ_2(r2·ĥ)·(M_{s1} − M_s),
        dpmsolver: x_t = (a_t/a_s)·x_s − b_t·φ_1(ĥ)·M_s − b_t·φ_2(ĥ)/r2·(M_{s2} − M_s);
        taylor: with D1 = (r2·Δ1/r1 − r1·Δ2/r2)/(r2 − r1), D2 = 2·(Δ2/r2 − Δ1/r1)/(r2 − r1), Δi = M_{si} − M_s,
        x_t = (a_t/a_s)·x_s − b_t·(φ_1(ĥ)·M_s + φ_2(ĥ)·D1 + φ_3(ĥ)·D2).
        ``model_s1`` may be given (the adaptive solver has it already). Returns x_t and M(u_2, s_2).
        """
        lambda_s = self.lambda_at(s)
        h = self.lambda_at(t) - lambda_s
        s1, s2 = self._time_at(lambda_s + r1 * h), self._time_at(lambda_s + r2 * h)
        if model_s1 is None:
            c1 = self._coefficients(s, s1)
            model_s1 = self.evaluate(c1.ratio * x - c1.b_t * phi_1(c1.h_signed) * model_s, s1)
        c2 = self._coefficients(s, s2)
        x_s2 = (c2.ratio * x - c2.b_t * phi_1(c2.h_signed) * model_s
                - c2.b_t * (r2 / r1) * phi_2(c2.h_signed) * (model_s1 - model_s))
        model_s2 = self.evaluate(x_s2, s2)
        c = self._coefficients(s, t)
        x_t = c.ratio * x - c.b_t * phi_1(c.h_signed) * model_s
        if solver_type == "dpmsolver":
            return x_t - c.b_t * phi_2(c.h_signed) / r2 * (model_s2 - model_s), model_s2
        d1_0, d1_1 = (model_s1 - model_s) / r1, (model_s2 - model_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return x_t - c.b_t * phi_2(c.h_signed) * d1 - c.b_t * phi_3(c.h_signed) * d2, model_s2

    def multistep_second_update(self, x: torch.Tensor, model_prev: list[torch.Tensor], t_prev: list[float],
                                t: float, solver_type: str = "dpmsolver") -> torch.Tensor:
        """DPM-Solver++(2M) (Alg. 2) and its DPM-Solver analogue, from the last two model outputs.

        With h_0 = λ_{prev0} − λ_{prev1}, r0 = h_0/h and D1 = (M_{prev0} − M_{prev1})/r0:
        x_t = (a_t/a_{prev0})·x − b_t·φ_1(ĥ)·M_{prev0} − b_t·[φ_1(ĥ)/2 | φ_2(ĥ)]·D1  (dpmsolver | taylor).
        """
        lambda_1, lambda_0 = self.lambda_at(t_prev[-2]), self.lambda_at(t_prev[-1])
        r0 = (lambda_0 - lambda_1) / (self.lambda_at(t) - lambda_0)
        d1 = (model_prev[-1] - model_prev[-2]) / r0
        c = self._coefficients(t_prev[-1], t)
        second = 0.5 * phi_1(c.h_signed) if solver_type == "dpmsolver" else phi_2(c.h_signed)
        return c.ratio * x - c.b_t * phi_1(c.h_signed) * model_prev[-1] - c.b_t * second * d1

    def multistep_update(self, order: int, x: torch.Tensor, model_prev: list[torch.Tensor], t_prev: list[float],
                         t: float, solver_type: str = "dpmsolver") -> torch.Tensor:
        """The order-k multistep update (k = 1, 2, 3) from the last k model outputs and their times."""
        return self._multi_updates[order](x, model_prev, t_prev, t, solver_type)

    def multistep_third_update(self, x: torch.Tensor, model_prev: list[torch.Tensor], t_prev: list[float],
                               t: float, solver_type: str = "dpmsolver") -> torch.Tensor:
        """Multistep third order (DPM-Solver++ §4.2), from the last three model outputs.

        r0 = h_0/h, r1 = h_1/h; D1_0 = (M_0 − M_1)/r0, D1_1 = (M_1 − M_2)/r1;
        D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0 + r1);
        x_t = (a_t/a_{prev0})·x − b_t·(φ_1(ĥ)·M_0 + φ_2(ĥ)·D1 + φ_3(ĥ)·D2).
        """
        lambda_2, lambda_1, lambda_0 = (self.lambda_at(s) for s in t_prev[-3:])
        h = self.lambda_at(t) - lambda_0
        r0, r1 = (lambda_0 - lambda_1) / h, (lambda_1 - lambda_2) / h
        d1_0 = (model_prev[-1] - model_prev[-2]) / r0
        d1_1 = (model_prev[-2] - model_prev[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        c = self._coefficients(t_prev[-1], t)
        signed = c.h_signed
        return c.ratio * x - c.b_t * (phi_1(signed) * model_prev[-1] + phi_2(signed) * d1 + phi_3(signed) * d2)

    # Time grids and loops.

    def get_time_steps(self, skip_type: str, t_T: float, t_0: float, N: int) -> list[float]:
        """N + 1 times from t_T to t_0: uniform in t, in λ (``logSNR``), or in √t (``time_quadratic``)."""
        _check_choice("skip_type", skip_type, SKIP_TYPES)
        if skip_type == "logSNR":
            lambdas = torch.linspace(self.lambda_at(t_T), self.lambda_at(t_0), N + 1, dtype=torch.float64)
            times = self.noise_schedule.inverse_lambda(lambdas)
        elif skip_type == "time_uniform":
            times = torch.linspace(t_T, t_0, N + 1, dtype=torch.float64)
        else:
            times = torch.linspace(t_T ** 0.5, t_0 ** 0.5, N + 1, dtype=torch.float64) ** 2
        times = times.tolist()
        times[0], times[-1] = t_T, t_0
        for t in times:
            self._marginals(t)
        return times

    def sample(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
               lower_order_final: bool = True, denoise_to_zero: bool = False, solver_type: str = "dpmsolver",
               atol: float = 0.0078, rtol: float = 0.05, return_intermediate: bool = False, progress: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Solve the diffusion ODE from ``t_start`` (default T) to ``t_end`` (default 1/N) starting at x.

        ``method``: ``multistep`` (DPM-Solver++(kM); ``steps`` model calls), ``singlestep`` (DPM-Solver-fast:
        steps split into order-k intervals plus a lower-order remainder; ``steps`` calls),
        ``singlestep_fixed`` (steps // order intervals of order k), ``adaptive`` (DPM-Solver-12 / -23 with
        step-size control to ``atol``/``rtol``; order 2 or 3; its model calls are in ``self.nfe``).
        ``lower_order_final``: multistep runs of fewer than 10 steps end on lower orders.
        ``denoise_to_zero``: one extra data prediction at ``t_end``. ``solver_type``: ``dpmsolver`` or
        ``taylor`` coefficients for the second-order terms. With ``return_intermediate`` the latents after
        every step (the start included) are returned too. ``t_start < t_end`` integrates forwards (see
        :meth:`inverse`).
        """
        t_T = self.noise_schedule.T if t_start is None else float(t_start)
        t_0 = 1.0 / self.noise_schedule.total_N if t_end is None else float(t_end)
        _check_choice("method", method, METHODS)
        _check_choice("skip_type", skip_type, SKIP_TYPES)
        _check_choice("solver_type", solver_type, SOLVER_TYPES)
        _check_choice("order", order, (1, 2, 3))
        if t_0 <= 0 or t_T <= 0:
            raise ValueError("times must be positive: the schedule is singular at t = 0")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if method == "adaptive" and (return_intermediate or self.correcting_xt_fn is not None):
            raise ValueError("the adaptive solver has no fixed steps: it supports neither intermediates nor "
                             "correcting_xt_fn")
        self.nfe = 0
        intermediates: list[torch.Tensor] = []

        def after_step(x_t: torch.Tensor, t: float, step: int) -> torch.Tensor:
            if self.correcting_xt_fn is not None:
                x_t = self.correcting_xt_fn(x_t, t, step)
            if return_intermediate:
                intermediates.append(x_t)
            return x_t

        with torch.no_grad():
            x = self._loops[method](x, steps=steps, order=order, t_T=t_T, t_0=t_0, skip_type=skip_type,
                                    method=method, lower_order_final=lower_order_final, solver_type=solver_type,
                                    atol=atol, rtol=rtol, after_step=after_step, progress=progress)
            if denoise_to_zero:
                self.nfe += 1
                t_batch = torch.full((x.shape[0],), t_0, device=x.device,
                                     dtype=torch.promote_types(x.dtype, torch.float32))
                x = after_step(self._data_from_noise(x, self.model(x, t_batch), t_0, t_batch), t_0, steps + 1)
        return (x, intermediates) if return_intermediate else x

    def inverse(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
                **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Integrate the ODE forwards, data to noise: from ``t_start`` (default 1/N) to ``t_end`` (default T).

        The same solver on the reversed grid (h < 0); takes the keyword arguments of :meth:`sample`.
        """
        if kwargs.get("method") == "adaptive":
            raise ValueError("the adaptive solver only samples (noise to data)")
        t_0 = 1.0 / self.noise_schedule.total_N if t_start is None else t_start
        t_T = self.noise_schedule.T if t_end is None else t_end
        return self.sample(x, steps=steps, t_start=t_0, t_end=t_T, **kwargs)

    def add_noise(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The forward marginal x_t = α_t·x + σ_t·ε for times t: (K,) → (K, *x.shape), or x.shape when K = 1."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        shape = (-1, *([1] * x.dim()))
        alpha_t = self.noise_schedule.marginal_alpha(t).to(x.device, x.dtype).view(shape)
        sigma_t = self.noise_schedule.marginal_std(t).to(x.device, x.dtype).view(shape)
        if noise is None:
            noise = randn((len(t), *x.shape), generator, x.device, x.dtype)
        x_t = alpha_t * x + sigma_t * noise.reshape(len(t), *x.shape)
        return x_t.squeeze(0) if len(t) == 1 else x_t

    def _sample_multistep(self, x: torch.Tensor, steps: int, order: int, t_T: float, t_0: float, skip_type: str,
                          lower_order_final: bool, solver_type: str, after_step: Callable, progress: bool,
                          **unused: Any) -> torch.Tensor:
        """Order-k multistep: warm up with orders 1 … k−1, then reuse the last k model outputs every step."""
        if steps < order:
            raise ValueError(f"multistep order {order} needs at least {order} steps, got {steps}")
        times = self.get_time_steps(skip_type, t_T, t_0, steps)
        t_prev, model_prev = [times[0]], [self.evaluate(x, times[0])]
        x = after_step(x, times[0], 0)
        for step in tqdm(range(1, steps + 1), desc="DPM-Solver", disable=not progress, leave=False,
                         unit="step"):
            step_order = min(order, step)
            if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW_STEPS:
                step_order = min(step_order, steps + 1 - step)
            x = self.multistep_update(step_order, x, model_prev, t_prev, times[step], solver_type)
            x = after_step(x, times[step], step)
            if step < steps:
                t_prev = [*t_prev, times[step]][-order:]
                model_prev = [*model_prev, self.evaluate(x, times[step])][-order:]
        return x

    def _sample_singlestep(self, x: torch.Tensor, steps: int, order: int, t_T: float, t_0: float, skip_type: str,
                           method: str, solver_type: str, after_step: Callable, progress: bool,
                           **unused: Any) -> torch.Tensor:
        """Singlestep: each interval takes one order-k update (k model calls), intermediate points inside it."""
        orders = singlestep_orders(steps, order) if method == "singlestep" else [order] * (steps // order)
        if not orders:
            raise ValueError(f"singlestep_fixed order {order} needs at least {order} steps, got {steps}")
        if skip_type == "logSNR":
            outer = self.get_time_steps(skip_type, t_T, t_0, len(orders))
        else:
            fine = self.get_time_steps(skip_type, t_T, t_0, sum(orders))
            outer = [fine[i] for i in itertools.accumulate(orders, initial=0)]
        x = after_step(x, outer[0], 0)
        bar = tqdm(orders, desc="DPM-Solver", disable=not progress, leave=False, unit="step")
        for step, step_order in enumerate(bar, start=1):
            s, t = outer[step - 1], outer[step]
            inner = [self.lambda_at(u) for u in self.get_time_steps(skip_type, s, t, step_order)]
            ratios = [(lamb - inner[0]) / (inner[-1] - inner[0]) for lamb in inner[1:-1]]
            x = self._single_updates[step_order](x, s, t, self.evaluate(x, s), ratios, solver_type)
            x = after_step(x, t, step)
        return x

    def _sample_adaptive(self, x: torch.Tensor, order: int, t_T: float, t_0: float, solver_type: str,
                         atol: float, rtol: float, h_init: float = 0.05, theta: float = 0.9, t_err: float = 1e-5,
                         **unused: Any) -> torch.Tensor:
        """DPM-Solver-12 / -23 (§5): accept the order-k step when its difference from the order-(k−1) step
        is within tolerance, ‖(x_k − x_{k−1})/δ‖_RMS ≤ 1 with δ = max(atol, rtol·max(|x_{k−1}|, |x_prev|));
        the next h is θ·h·E^(−1/k). Each accepted or rejected trial costs k model calls."""
        if order == 1:
            raise ValueError("the adaptive solver needs order 2 or 3 (it compares order k with k − 1)")
        lambda_s, lambda_0 = self.lambda_at(t_T), self.lambda_at(t_0)
        s, h, x_prev = t_T, h_init, x
        while abs(s - t_0) > t_err:
            t = self._time_at(lambda_s + h)
            model_s = self.evaluate(x, s)
            if order == 2:
                x_lower = self.first_update(x, s, t, model_s)
                x_higher, _ = self.singlestep_second_update(x, s, t, model_s, r1=0.5, solver_type=solver_type)
            else:
                x_lower, model_s1 = self.singlestep_second_update(x, s, t, model_s, r1=1.0 / 3.0,
                                                                  solver_type=solver_type)
                x_higher, _ = self.singlestep_third_update(x, s, t, model_s, r1=1.0 / 3.0, r2=2.0 / 3.0,
                                                           solver_type=solver_type, model_s1=model_s1)
            delta = torch.maximum(torch.full_like(x_lower, atol), rtol * torch.maximum(x_lower.abs(), x_prev.abs()))
            error = ((x_higher - x_lower) / delta).reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt().max().item()
            if error <= 1.0:
                x, s, x_prev, lambda_s = x_higher, t, x_lower, self.lambda_at(t)
            h = min(theta * h * max(error, 1e-12) ** (-1.0 / order), lambda_0 - lambda_s)
        logger.debug("adaptive DPM-Solver used %d model evaluations", self.nfe)
        return x


def singlestep_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast's split of ``steps`` model calls into intervals of order ``order`` and a lower remainder."""
    if order == 1:
        return [1] * steps
    full, remainder = divmod(steps, order)
    if order == 3 and remainder == 0 and full > 0:
        return [3] * (full - 1) + [2, 1]
    return [order] * full + ([remainder] if remainder else [])

