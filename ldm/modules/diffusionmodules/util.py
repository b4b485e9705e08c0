"""Building blocks shared by the diffusion networks: noise schedules, timestep embeddings, normalisation."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """The DDPM β_t schedule in float64.

    ``"linear"`` is the latent-diffusion one, linear in √β (diffusers calls it ``scaled_linear``):
    β_t = (√β_start + t/(T−1)·(√β_end − √β_start))².
    ``"cosine"`` is Nichol & Dhariwal's ᾱ_t = cos²((t/T + s)/(1 + s)·π/2), with β clipped to 0.999.
    """
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas_cumprod = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, cosine, sqrt_linear or sqrt")


TERMINAL_ALPHA_CUMPROD = 2.0 ** -24
"""ᾱ_T of a zero-terminal-SNR schedule as stored: 0 would make log-SNR and σ infinite at t = T, so it is kept at
2⁻²⁴ (√ᾱ_T ≈ 2.4·10⁻⁴, σ_T = 4096), as diffusers' samplers do; no sampler then needs a special case."""


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """β_t rescaled so that √ᾱ_t is shifted to 0 at t = T and scaled back to its value at t = 1 (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1), ᾱ_T then floored at
    :data:`TERMINAL_ALPHA_CUMPROD`.

    SD's schedule leaves √ᾱ_T ≈ 0.07 of the image in x_T, so a network learns to read the picture's layout from
    x_T, which at sampling time is pure noise; with ᾱ_T ≈ 0 it must take it from the prompt. Needs the v (or x_0)
    parameterization: ε is not predictable from x_T = ε."""
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    alphas_cumprod = ((sqrt_alphas_cumprod - last) * first / (first - last)) ** 2
    alphas_cumprod[-1] = TERMINAL_ALPHA_CUMPROD
    return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])


def extract_into_tensor(values: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Pick ``values[t]`` per batch element and shape it ``(B, 1, 1, …)`` to broadcast against ``x_shape``."""
    out = values.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f_k), sin(t·f_k)]`` with f_k = max_period^(−k/(dim/2)); t may be real-valued.

    timesteps: (B,). Returns (B, dim) in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, so fp16/bf16 models normalise without overflow.

    When input and weights share a half-precision dtype, PyTorch's kernel already accumulates in float32 and
    rounds once at the end, as the original's cast-compute-cast does, in one kernel instead of three; mixed
    dtypes (autocast) take the original's way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def normalization(channels: int, num_groups: int = 32) -> nn.Module:
    """The UNet's normalisation layer: 32 groups (by default), eps 1e-5."""
    return GroupNorm32(num_groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the UNet's output convolutions start at zero) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(function, inputs: tuple, enabled: bool):
    """Gradient checkpointing: recompute ``function(*inputs)`` in the backward pass when training.

    It changes memory use only, never values; at inference (no grad) it is a plain call.
    """
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)
