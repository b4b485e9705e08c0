"""Independent transcriptions of the σ-space samplers diffusers does not have, written from the published algorithms
(k-diffusion's ``sampling.py``, Karras et al. 2022, Lu et al. 2022) in their own variables — log σ as time, no use of
our DPM-Solver core — to check ours against.

``denoise(x, σ)`` is the denoiser D; ``noise(σ, σ')`` a standard normal for the step (ours injected, so both sides
see the same noise); ``grid`` ends in 0.
"""

import math


def ancestral_step(sigma, sigma_next, eta):
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - up ** 2) ** 0.5, up


def dpmpp_2s_ancestral(denoise, x, grid, noise, eta=1.0):
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        denoised = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / sigma) * x - math.expm1(-h / 2) * denoised
            x = (down / sigma) * x - math.expm1(-h) * denoise(x_2, math.exp(-s))
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * up
    return x


def dpmpp_sde(denoise, x, grid, noise, eta=1.0, r=0.5):
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        s = t + h * r
        down, up = ancestral_step(sigma, math.exp(-s), eta)
        x_2 = (down / sigma) * x - math.expm1(t + math.log(down)) * denoised
        x_2 = x_2 + noise(sigma, math.exp(-s)) * up
        denoised_2 = denoise(x_2, math.exp(-s))
        down, up = ancestral_step(sigma, sigma_next, eta)
        mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (down / sigma) * x - math.expm1(t + math.log(down)) * mixed
        x = x + noise(sigma, sigma_next) * up
    return x


def dpmpp_3m_sde(denoise, x, grid, noise, eta=1.0):
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = (h if sigma_next else None), h_1
    return x
