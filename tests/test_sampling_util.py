"""ldm/models/diffusion/sampling_util.py: the pieces every sampler shares, checked against their formulas."""

import numpy as np
import pytest
import torch

from ldm.models.diffusion.sampling_util import (ImageGenerators, Intermediates, batch_size_of, check_batch_size,
                                                classifier_free_guidance, concat_conditioning, ddim_coefficients,
                                                make_ddim_timesteps, randn)
from ldm.testing.analytic import SD_ALPHAS_CUMPROD
from ldm.util import ParameterError


def test_ddim_coefficients_are_eq_16():
    timesteps = make_ddim_timesteps(10)
    alphas, alphas_prev, sigmas = ddim_coefficients(SD_ALPHAS_CUMPROD, timesteps, eta=0.7)
    cumprod = SD_ALPHAS_CUMPROD.double().numpy()
    assert np.array_equal(alphas, cumprod[timesteps])
    assert alphas_prev[0] == cumprod[0] and np.array_equal(alphas_prev[1:], cumprod[timesteps[:-1]])
    i = 4
    expected = 0.7 * np.sqrt((1 - alphas_prev[i]) / (1 - alphas[i])) * np.sqrt(1 - alphas[i] / alphas_prev[i])
    assert sigmas[i] == pytest.approx(expected, rel=1e-12)
    assert not ddim_coefficients(SD_ALPHAS_CUMPROD, timesteps, eta=0.0)[2].any()


def test_steps_out_of_range_name_the_parameter():
    for steps in (0, 1001):
        with pytest.raises(ParameterError, match="^steps must be between 1 and 1000"):
            make_ddim_timesteps(steps)


def test_guidance_is_one_doubled_batch_and_the_cfg_formula():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return x * c.view(-1, 1)

    x, t = torch.ones(2, 3), torch.zeros(2)
    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0])
    guided = classifier_free_guidance(model, x, t, cond, uncond, scale=4.0)
    assert calls == [4]
    torch.testing.assert_close(guided, x * (1.0 + 4.0 * (cond - 1.0)).view(-1, 1))
    assert torch.equal(classifier_free_guidance(model, x, t, cond, uncond, scale=1.0), x * cond.view(-1, 1))
    assert calls == [4, 2]  # scale 1 is one conditional call


def test_conditioning_of_every_shape_is_joined_and_measured():
    cond = {"c_crossattn": [torch.zeros(2, 5)], "c_concat": [torch.ones(2, 4)]}
    joined = concat_conditioning(cond, cond)
    assert joined["c_crossattn"][0].shape == (4, 5) and joined["c_concat"][0].shape == (4, 4)
    assert batch_size_of(cond) == 2 and batch_size_of(None) is None and batch_size_of([]) is None
    check_batch_size(cond, 2)
    with pytest.raises(ValueError, match="batch size 2 but 3"):
        check_batch_size(cond, 3)


def test_intermediates_keep_the_start_the_first_step_and_every_log_every_t_th():
    record = Intermediates(log_every_t=3)
    record.start(torch.zeros(1))
    for index in range(9, -1, -1):  # 10 steps, countdown 9 … 0
        record.step(index, 10, torch.full((1,), float(index)), torch.full((1,), -float(index)))
    assert [x.item() for x in record.x_inter] == [0.0, 9.0, 6.0, 3.0, 0.0]
    assert [x.item() for x in record["pred_x0"]] == [0.0, -9.0, -6.0, -3.0, -0.0]
    with pytest.raises(KeyError):
        record["samples"]


def test_a_prompt_longer_than_its_negative_is_guided_with_two_calls():
    calls = []

    def model(x, t, c):
        calls.append(tuple(c.shape))
        return x * c.mean(dim=(1, 2)).view(-1, 1)

    x, t = torch.ones(2, 3), torch.zeros(2)
    cond, uncond = torch.full((2, 154, 4), 2.0), torch.full((2, 77, 4), 1.0)
    guided = classifier_free_guidance(model, x, t, cond, uncond, scale=3.0)
    assert calls == [(2, 77, 4), (2, 154, 4)]
    torch.testing.assert_close(guided, x * (1.0 + 3.0 * (2.0 - 1.0)))


def test_per_image_noise_depends_on_the_image_seed_only():
    together = randn((3, 4, 5, 6), ImageGenerators([11, 12, 13]), "cpu")
    alone = [randn((1, 4, 5, 6), ImageGenerators([seed]), "cpu") for seed in (12, 13, 11)]
    assert torch.equal(together, torch.cat([alone[2], alone[0], alone[1]]))
    assert torch.equal(alone[0], torch.randn((1, 4, 5, 6), generator=torch.Generator().manual_seed(12)))
    stacked = randn((2, 3, 4, 5, 6), ImageGenerators([11, 12, 13]), "cpu", torch.float64)  # (K, B, C, H, W)
    assert stacked.shape == (2, 3, 4, 5, 6) and stacked.dtype == torch.float64
    expected = torch.randn((2, 1, 4, 5, 6), generator=torch.Generator().manual_seed(12))
    assert torch.equal(stacked[:, 1:2].float(), expected)
    with pytest.raises(ValueError, match="per-image noise"):
        randn((2, 4, 5, 6), ImageGenerators([11, 12, 13]), "cpu")
