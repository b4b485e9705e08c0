"""PLMS: diffusers' PNDMScheduler(skip_prk_steps=True) computes the same steps; S steps cost S + 1 model calls."""

import pytest
import torch
from diffusers import PNDMScheduler

from ldm.models.diffusion.plms import PLMSSampler
from ldm.testing.analytic import GaussianLatentDiffusion
from test_ddim import SHAPE, NonlinearModel, compvis_like, nonlinear_eps, start


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_matches_diffusers_pndm_without_runge_kutta_steps(steps):
    model = NonlinearModel()
    x_T = start()
    ours, _ = PLMSSampler(model).sample(steps, 2, SHAPE, x_T=x_T, verbose=False)
    assert model.calls == steps + 1
    scheduler = compvis_like(PNDMScheduler, skip_prk_steps=True)
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(nonlinear_eps(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_plms_is_deterministic_only():
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(GaussianLatentDiffusion()).sample(10, 2, SHAPE, eta=0.5, verbose=False)


def test_img2img_with_plms_runs_t_enc_steps():
    model = GaussianLatentDiffusion()
    sampler = PLMSSampler(model)
    sampler.img2img(start(), 0.4, 50, None, verbose=False)  # t_enc = 20: steps from grid index 19
    assert model.calls == 21 and model.timesteps_seen[0] == sampler.ddim_timesteps[19]
