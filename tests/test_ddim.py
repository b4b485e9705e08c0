"""DDIM: the original's grid and update, checked against diffusers' DDIMScheduler and the exact ODE solution."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling_util import make_ddim_timesteps
from ldm.testing.analytic import GaussianLatentDiffusion, exact_solution

SHAPE = (3, 4, 4)


def nonlinear_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A noise predictor with some structure in x and t, for comparing two implementations step by step."""
    return torch.tanh(0.7 * x + 0.002 * t.double().view(-1, 1, 1, 1)) + 0.1 * x


class NonlinearModel(GaussianLatentDiffusion):
    def apply_model(self, x, t, cond=None):
        self.calls += 1
        return nonlinear_eps(x, t)


def compvis_like(scheduler_class, **kwargs):
    return scheduler_class(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", **kwargs)


def start(seed=0, batch=2):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_grid_is_the_originals_including_its_quirks():
    assert make_ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    assert len(make_ddim_timesteps(7)) == 8  # stride 142: 0, 142, …, 994 — one more step than asked
    assert len(make_ddim_timesteps(150)) == 167
    assert make_ddim_timesteps(3).tolist() == [1, 334, 667]  # the original would index timestep 1000
    assert all(len(make_ddim_timesteps(s)) >= s and make_ddim_timesteps(s).max() < 1000 for s in range(1, 1000))
    assert len(make_ddim_timesteps(1000)) == 999
    for bad in (0, -5, 1001):
        with pytest.raises(ValueError, match="between 1 and 1000"):
            make_ddim_timesteps(bad)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matches_diffusers_ddim_scheduler(steps, eta):
    model = NonlinearModel()
    x_T = start()
    ours, _ = DDIMSampler(model).sample(steps, 2, SHAPE, eta=eta, x_T=x_T, verbose=False,
                                         generator=torch.Generator().manual_seed(5))
    scheduler = compvis_like(DDIMScheduler, clip_sample=False)
    scheduler.set_timesteps(steps)
    assert np.array_equal(scheduler.timesteps.numpy()[::-1], make_ddim_timesteps(steps))
    x, generator = x_T, torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if eta else None
        x = scheduler.step(nonlinear_eps(x, t.expand(2)), t, x, eta=eta, variance_noise=noise).prev_sample
    assert model.calls == steps
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_deterministic_ddim_converges_at_order_one_to_the_exact_solution(parameterization):
    model = GaussianLatentDiffusion(parameterization=parameterization)
    errors = {}
    for steps in (100, 200):
        x_T = start()
        grid = make_ddim_timesteps(steps)
        x_0, _ = DDIMSampler(model).sample(steps, 2, SHAPE, x_T=x_T, verbose=False)
        alpha_from = model.alphas_cumprod[grid[-1]].double().sqrt().item()
        alpha_to = model.alphas_cumprod[0].double().sqrt().item()
        errors[steps] = (x_0 - exact_solution(x_T, alpha_from, alpha_to, model.mu, model.s)).abs().max().item()
    assert 0.8 < math.log2(errors[100] / errors[200]) < 1.2


def test_guidance_batches_uncond_and_cond_together():
    model = GaussianLatentDiffusion()
    cond, uncond = torch.tensor([0.9, -0.5]), torch.zeros(2)
    guided, _ = DDIMSampler(model).sample(20, 2, SHAPE, conditioning=cond, unconditional_conditioning=uncond,
                                          unconditional_guidance_scale=4.0, x_T=start(), verbose=False)
    assert model.calls == 20
    reference = GaussianLatentDiffusion()
    plain, _ = DDIMSampler(reference).sample(20, 2, SHAPE, conditioning=4.0 * cond, x_T=start(), verbose=False)
    torch.testing.assert_close(guided, plain)


def test_img2img_encode_and_decode_follow_the_original_indexing():
    """Noised to grid index t_enc = int(0.75·50) = 37 (timestep 741), then denoised from index 36 (timestep 721)."""
    model = GaussianLatentDiffusion()
    x0, noise = start(1), start(2)
    first_latents = []
    DDIMSampler(model).img2img(x0, 0.75, 50, None, noise=noise, verbose=False,
                               callback=lambda step, x, pred_x0: first_latents.append(x) if step == 0 else None)
    assert model.timesteps_seen == [float(t) for t in make_ddim_timesteps(50)[:37][::-1]]
    assert model.timesteps_seen[0] == 721
    alpha, alpha_prev = model.alphas_cumprod[741].double(), model.alphas_cumprod[721].double()
    encoded = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    eps = model.apply_model(encoded, torch.full((2,), 721.0), None)
    # the original's first step: DDIM from timestep 721 (ᾱ at 721) to the next grid point (ᾱ at 701)
    alpha_t, alpha_next = alpha_prev, model.alphas_cumprod[701].double()
    pred_x0 = (encoded - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    torch.testing.assert_close(first_latents[0], alpha_next.sqrt() * pred_x0 + (1 - alpha_next).sqrt() * eps)


def test_callback_and_intermediates():
    seen = []
    _, intermediates = DDIMSampler(GaussianLatentDiffusion()).sample(
        10, 2, SHAPE, x_T=start(), verbose=False, log_every_t=5,
        callback=lambda step, x, pred_x0: seen.append((step, x.shape, pred_x0.shape)))
    assert [s for s, _, _ in seen] == list(range(10))
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 4  # start, index 9, 5, 0


def test_wrong_conditioning_batch_or_eta_is_a_clear_error():
    sampler = DDIMSampler(GaussianLatentDiffusion())
    with pytest.raises(ValueError, match="batch size 3"):
        sampler.sample(10, 2, SHAPE, conditioning=torch.zeros(3), verbose=False)
    with pytest.raises(ValueError, match="eta"):
        sampler.sample(10, 2, SHAPE, eta=-1.0, verbose=False)


def test_img2img_noises_to_int_strength_steps_and_caps_strength_one():
    model = GaussianLatentDiffusion()
    sampler = DDIMSampler(model)
    sampler.img2img(start(1), 0.75, 50, None, verbose=False)
    assert model.calls == 37 and model.timesteps_seen[0] == 721
    model.timesteps_seen.clear()
    sampler.img2img(start(1), 1.0, 50, None, verbose=False)
    assert model.timesteps_seen[0] == 961  # the original would index past its 50-point grid
