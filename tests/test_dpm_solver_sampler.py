"""DPMSolverSampler: the seed's --dpm_solver configuration step for step, encode ratios, img2img/DiffEdit hooks."""

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.testing.analytic import SD_ALPHAS_CUMPROD, GaussianLatentDiffusion, exact_solution

SHAPE = (3, 4, 4)
N = 1000


class ConditionedModel(GaussianLatentDiffusion):
    """A nonlinear noise predictor of (x, real-valued t, conditioning), for step-by-step comparisons."""

    def apply_model(self, x, t, cond):
        self.calls += 1
        self.timesteps_seen.append(t.double().tolist())
        return torch.tanh(0.6 * x + 0.001 * t.double().view(-1, 1, 1, 1)) + cond.view(-1, 1, 1, 1) * 0.2


def reference_dpmpp_2m(model, x, steps, cond, uncond, scale):
    """An independent float64 DPM-Solver++(2M): time-uniform from 1 to 1/N, first order at the first step and,
    below 10 steps, at the last; classifier-free guidance from two separate calls. Returns every latent."""
    times = np.linspace(1.0, 1.0 / N, steps + 1)
    log_alpha = np.interp(times, np.arange(1, N + 1) / N, 0.5 * np.log(SD_ALPHAS_CUMPROD.double().numpy()))
    alpha, sigma = np.exp(log_alpha), np.sqrt(1 - np.exp(2 * log_alpha))
    lamb = np.log(alpha) - np.log(sigma)

    def data_prediction(x, i):
        t_input = torch.full((x.shape[0],), (times[i] - 1.0 / N) * N, dtype=torch.float64)
        eps_u, eps_c = model.apply_model(x, t_input, uncond), model.apply_model(x, t_input, cond)
        return (x - sigma[i] * (eps_u + scale * (eps_c - eps_u))) / alpha[i]

    latents, previous, current = [x], None, data_prediction(x, 0)
    for i in range(1, steps + 1):
        h = lamb[i] - lamb[i - 1]
        x = sigma[i] / sigma[i - 1] * x - alpha[i] * math.expm1(-h) * current
        if i > 1 and not (steps < 10 and i == steps):
            r = (lamb[i - 1] - lamb[i - 2]) / h
            x = x - 0.5 * alpha[i] * math.expm1(-h) * (current - previous) / r
        latents.append(x)
        if i < steps:
            previous, current = current, data_prediction(x, i)
    return latents


@pytest.mark.parametrize("steps", [7, 25, 50])
def test_reproduces_the_seed_configuration_step_for_step(steps):
    cond, uncond = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = ConditionedModel()
    samples, intermediates = DPMSolverSampler(model).sample(steps, 2, SHAPE, conditioning=cond,
                                                            unconditional_conditioning=uncond,
                                                            unconditional_guidance_scale=7.5, x_T=x_T, verbose=False,
                                                            log_every_t=1)
    latents = intermediates.x_inter
    assert model.calls == steps and len(latents) == len(intermediates.pred_x0) == steps + 1
    assert model.timesteps_seen[0] == [999.0] * 4  # one doubled batch per step, t fed as (t − 1/N)·N
    assert model.timesteps_seen[1][0] == pytest.approx(999 - 999 / steps, abs=1e-3)
    reference = reference_dpmpp_2m(ConditionedModel(), x_T, steps, cond, uncond, 7.5)
    for ours, theirs in zip(latents, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(samples, latents[-1])


def test_ratio_and_time_are_true_inverses():
    sampler = DPMSolverSampler(GaussianLatentDiffusion())
    assert sampler._ratio_to_time(0.0) == pytest.approx(1e-3) and sampler._ratio_to_time(1.0) == pytest.approx(1.0)
    assert sampler._ratio_to_time(0.6) == pytest.approx(0.6004)
    for t in np.linspace(1e-3, 1.0, 37):
        assert sampler._ratio_to_time(sampler._time_to_ratio(t)) == pytest.approx(t, abs=1e-12)
        assert sampler._time_to_ratio(sampler._ratio_to_time(t)) == pytest.approx(t, abs=1e-12)


def test_stochastic_encode_has_the_forward_marginal():
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    x0 = torch.full((100_000,), 2.0, dtype=torch.float64)
    noised = sampler.stochastic_encode(x0, 0.5, generator=torch.Generator().manual_seed(0))
    t = sampler._ratio_to_time(0.5)
    alpha = sampler.noise_schedule.marginal_alpha(torch.tensor([t], dtype=torch.float64)).item()
    assert noised.shape == x0.shape
    assert abs(noised.mean().item() - 2.0 * alpha) < 0.01 and abs(noised.std().item() - (1 - alpha ** 2) ** 0.5) < 0.01
    noise = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(sampler.stochastic_encode(x0[:4], 0.5, noise=noise),
                               alpha * x0[:4] + (1 - alpha ** 2) ** 0.5 * noise)


def test_encode_then_sample_from_the_same_time_returns_the_latent():
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    x0 = model.mu + model.s * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    encoded, intermediates = sampler.encode(100, x0, 0.6, skip_type="logSNR")
    trajectory = intermediates.x_inter
    assert len(trajectory) == 101 and torch.equal(trajectory[-1], encoded)
    t = sampler._ratio_to_time(0.6)
    alpha = lambda time: sampler.noise_schedule.marginal_alpha(torch.tensor([time], dtype=torch.float64)).item()
    torch.testing.assert_close(encoded, exact_solution(x0, alpha(1e-3), alpha(t), model.mu, model.s),
                               rtol=0, atol=2e-3)
    decoded, _ = sampler.sample(100, 2, SHAPE, x_T=encoded, strength=0.6, skip_type="logSNR", verbose=False)
    torch.testing.assert_close(decoded, x0, rtol=0, atol=2e-3)


def test_correct_latent_runs_at_the_start_and_after_every_step_with_the_noise_ratio():
    calls = []

    def pin_first_channel(x, ratio, step):
        calls.append((step, ratio))
        x = x.clone()
        x[:, 0] = 0.25
        return x

    samples, intermediates = DPMSolverSampler(GaussianLatentDiffusion()).sample(
        8, 2, SHAPE, correct_latent=pin_first_channel, verbose=False, log_every_t=1,
        generator=torch.Generator().manual_seed(0))
    assert [step for step, _ in calls] == list(range(9))
    assert calls[0][1] == pytest.approx(1.0) and calls[-1][1] == pytest.approx(0.0, abs=1e-12)
    assert all((latent[:, 0] == 0.25).all() for latent in intermediates.x_inter)


def test_the_callback_gets_the_data_prediction_each_step_was_taken_with():
    """DPM-Solver++ steps with x̂_0 = (x − σ_t·ε)/α_t at the previous grid point; the callback receives it."""
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    seen = []
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, intermediates = sampler.sample(5, 2, SHAPE, x_T=x_T, verbose=False, log_every_t=1,
                                      callback=lambda step, x, pred_x0: seen.append((step, x, pred_x0)))
    assert [step for step, _, _ in seen] == list(range(5))
    alpha_T = sampler.noise_schedule.marginal_alpha(torch.tensor([1.0], dtype=torch.float64)).item()
    eps = model.apply_model(x_T, torch.full((2,), 999.0, dtype=torch.float64), None)
    torch.testing.assert_close(seen[0][2], (x_T - (1 - alpha_T ** 2) ** 0.5 * eps) / alpha_T)
    assert all(torch.equal(x, kept) for (_, x, _), kept in zip(seen, intermediates.x_inter[1:]))
    assert all(torch.equal(p, kept) for (_, _, p), kept in zip(seen, intermediates.pred_x0[1:]))


def test_v_prediction_models_are_sampled_through_model_type_v():
    eps_model, v_model = GaussianLatentDiffusion(), GaussianLatentDiffusion(parameterization="v")

    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from_eps, _ = DPMSolverSampler(eps_model).sample(20, 2, SHAPE, x_T=x_T, verbose=False)
    from_v, _ = DPMSolverSampler(v_model).sample(20, 2, SHAPE, x_T=x_T, verbose=False)
    torch.testing.assert_close(from_v, from_eps, rtol=1e-6, atol=1e-6)


def test_eta_must_be_zero():
    with pytest.raises(ValueError, match="eta must be 0"):
        DPMSolverSampler(GaussianLatentDiffusion()).sample(10, 2, SHAPE, eta=0.3, verbose=False)


def test_img2img_starts_at_the_strength_time_with_as_many_calls_as_ddim():
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    x0 = torch.zeros(2, *SHAPE, dtype=torch.float64)
    out = sampler.img2img(x0, 0.6, 25, None, verbose=False, generator=torch.Generator().manual_seed(0))
    assert model.calls == 15 and out.shape == x0.shape
    assert model.timesteps_seen[0] == pytest.approx(999 * 0.6)  # t = 0.6004 is fed as (t − 1/N)·N
    assert torch.equal(sampler.img2img(x0, 0.0, 25, None, noise=torch.zeros(1, 2, *SHAPE, dtype=torch.float64)),
                       x0)
