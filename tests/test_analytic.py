"""The analytic test problem itself: its noise predictor is the true posterior mean, its solution an ODE flow."""

import torch

from ldm.testing.analytic import exact_solution, ideal_noise


def test_ideal_noise_is_the_regression_of_noise_on_the_noisy_sample():
    generator = torch.Generator().manual_seed(0)
    mu, s, alpha = 0.3, 0.5, 0.6
    sigma = (1 - alpha ** 2) ** 0.5
    x0 = mu + s * torch.randn(400_000, generator=generator, dtype=torch.float64)
    eps = torch.randn(400_000, generator=generator, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    slope = ((x_t - x_t.mean()) * (eps - eps.mean())).mean() / x_t.var()
    intercept = eps.mean() - slope * x_t.mean()
    probe = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ideal_noise(probe, alpha, sigma, mu, s), intercept + slope * probe, rtol=0, atol=0.01)


def test_exact_solution_is_a_flow():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    there = exact_solution(x, 0.1, 0.9, 0.3, 0.5)
    torch.testing.assert_close(exact_solution(there, 0.9, 0.1, 0.3, 0.5), x)
    torch.testing.assert_close(exact_solution(exact_solution(x, 0.1, 0.5, 0.3, 0.5), 0.5, 0.9, 0.3, 0.5), there)
