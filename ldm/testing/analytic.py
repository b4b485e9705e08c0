"""A diffusion problem with exact answers, for testing and benchmarking samplers.

Gaussian data, its ideal noise predictor and the exact solution of its probability-flow ODE.

For data x_0 ~ N(μ, s²) per element and x_t = α_t·x_0 + σ_t·ε, the ideal noise predictor is
ε*(x, t) = σ_t·(x − α_t·μ)/(α_t²·s² + σ_t²), and along the probability-flow ODE the standardised value
(x − α_t·μ)/√(α_t²·s² + σ_t²) is constant, which gives the exact solution between any two times.
"""

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule, rescale_zero_terminal_snr

SD_ALPHAS_CUMPROD = torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012)),
                                 dtype=torch.float32)
ZERO_TERMINAL_SNR_ALPHAS_CUMPROD = torch.tensor(np.cumprod(1 - rescale_zero_terminal_snr(
    make_beta_schedule("linear", 1000, 0.00085, 0.012))), dtype=torch.float32)


def ideal_noise(x: torch.Tensor, alpha, sigma, mu, s: float) -> torch.Tensor:
    return sigma * (x - alpha * mu) / (alpha ** 2 * s ** 2 + sigma ** 2)


def exact_solution(x: torch.Tensor, alpha_from: float, alpha_to: float, mu, s: float) -> torch.Tensor:
    """x at the time with α = alpha_to on the ODE trajectory through x at α = alpha_from (σ = √(1 − α²))."""
    def spread(alpha):
        return (alpha ** 2 * s ** 2 + 1 - alpha ** 2) ** 0.5
    return alpha_to * mu + (x - alpha_from * mu) / spread(alpha_from) * spread(alpha_to)


def log_alpha_at(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor = SD_ALPHAS_CUMPROD) -> torch.Tensor:
    """log α at real-valued DDPM timesteps, linear between the integers (as the discrete NoiseScheduleVP)."""
    log_alphas = 0.5 * alphas_cumprod.double().cpu().log()
    t = timesteps.double().cpu()
    return torch.from_numpy(np.interp(t.numpy(), np.arange(1000), log_alphas.numpy())).to(timesteps.device)


def log_alpha_between_sigmas(timesteps: torch.Tensor,
                             alphas_cumprod: torch.Tensor = SD_ALPHAS_CUMPROD) -> torch.Tensor:
    """log α at real-valued DDPM timesteps with log σ linear between the integers (as k-diffusion's σ ↔ t), where
    σ = √((1 − ᾱ)/ᾱ) and α = 1/√(1 + σ²)."""
    alphas_cumprod = alphas_cumprod.double().cpu()
    log_sigmas = 0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()
    t = timesteps.double().cpu()
    log_sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(1000), log_sigmas.numpy()))
    return (-0.5 * torch.log1p(torch.exp(2 * log_sigma))).to(timesteps.device)


def ideal_denoiser(x: torch.Tensor, sigma: float, mu, s: float) -> torch.Tensor:
    """E[x_0 | x_0 + σ·ε = x] for x_0 ~ N(μ, s²): μ + s²/(s² + σ²)·(x − μ)."""
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


class GaussianLatentDiffusion:
    """Stands in for LatentDiffusion: SD v1's schedule (or ``alphas_cumprod``) and the ideal predictor for Gaussian
    data N(μ, s²).

    Between integer timesteps, log α is linear (DPM-Solver's discrete schedule), or with ``sigma_space`` log σ
    (k-diffusion's), so that the model is exact for the samplers that step in that time.
    ``parameterization`` ``"v"`` gives the same model as v = α·ε − σ·x̂_0 with x̂_0 = (x − σ·ε)/α (SD 2's
    v-prediction, Salimans & Ho 2022); every sampler must then draw the same samples as from ``"eps"``.

    The conditioning, when given, is μ per sample, shape (B,); ``calls`` counts ``apply_model`` calls.
    """

    num_timesteps = 1000

    def __init__(self, mu: float = 0.3, s: float = 0.5, device: str = "cpu", sigma_space: bool = False,
                 parameterization: str = "eps", alphas_cumprod: torch.Tensor = SD_ALPHAS_CUMPROD):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be eps or v, got {parameterization!r}")
        self.mu, self.s, self.sigma_space, self.parameterization = mu, s, sigma_space, parameterization
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32).to(device)
        self.device = torch.device(device)
        self.calls = 0
        self.timesteps_seen: list[float] = []

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        self.timesteps_seen.append(float(t[0]))
        shape = (-1, *([1] * (x.dim() - 1)))
        log_alpha = (log_alpha_between_sigmas if self.sigma_space else log_alpha_at)(t, self.alphas_cumprod)
        alpha = log_alpha.exp().view(shape)
        sigma = (1 - alpha ** 2).sqrt()
        mu = self.mu if cond is None else cond.double().view(shape)
        eps = ideal_noise(x.double(), alpha, sigma, mu, self.s)
        if self.parameterization == "v":
            return (alpha * eps - sigma * (x.double() - sigma * eps) / alpha).to(x.dtype)
        return eps.to(x.dtype)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = √ᾱ_t·v + √(1 − ᾱ_t)·x_t at integer timesteps t, as LatentDiffusion's."""
        alphas_cumprod = self.alphas_cumprod.to(x_t.device).double()[t.long()].view(-1, *([1] * (x_t.dim() - 1)))
        return (alphas_cumprod.sqrt() * v + (1 - alphas_cumprod).sqrt() * x_t).to(x_t.dtype)
