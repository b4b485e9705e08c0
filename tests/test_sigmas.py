"""Noise levels and schedules: closed forms, the published numbers, and diffusers' own grids."""

import math

import diffusers
import numpy as np
import pytest
import torch

from ldm.models.diffusion.dpm_solver.sigmas import (ALIGN_YOUR_STEPS_SD15, SCHEDULES, DiscreteSigmas, beta,
                                                    discard_next_to_last, karras)
from ldm.testing.analytic import SD_ALPHAS_CUMPROD

DIFFUSERS_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def sigmas():
    return DiscreteSigmas(SD_ALPHAS_CUMPROD)


def test_sd_noise_levels(sigmas):
    assert math.isclose(sigmas.sigma_min, 0.0291675, rel_tol=1e-4)
    assert math.isclose(sigmas.sigma_max, 14.6146, rel_tol=1e-4)


def test_time_and_noise_level_are_inverse(sigmas):
    for t in (0.0, 0.25, 17.5, 500.0, 998.9, 999.0):
        assert math.isclose(sigmas.timestep(sigmas.sigma(t)), t, abs_tol=1e-9)


def test_device_times_equal_host_times_and_diffusers(sigmas):
    levels = [14.6, 7.3, 1.0, 0.5, 0.1, 0.03]
    scheduler = diffusers.EulerDiscreteScheduler(**DIFFUSERS_CONFIG)
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5)
    on_device = sigmas.timesteps(torch.tensor(levels, dtype=torch.float64))
    for level, t in zip(levels, on_device.tolist()):
        assert math.isclose(t, sigmas.timestep(level), abs_tol=1e-9)
        assert math.isclose(t, float(scheduler._sigma_to_t(np.array(level), log_sigmas)), abs_tol=2e-3)


def test_karras_is_the_closed_form(sigmas):
    n, rho = 12, 7.0
    grid = karras(n, sigmas)
    for i, level in enumerate(grid[:-1]):
        ramp = i / (n - 1)
        high, low = sigmas.sigma_max ** (1 / rho), sigmas.sigma_min ** (1 / rho)
        expected = (high + ramp * (low - high)) ** rho
        assert math.isclose(level, expected, rel_tol=1e-12)
    assert grid[0] == pytest.approx(sigmas.sigma_max) and grid[-2] == pytest.approx(sigmas.sigma_min) and grid[-1] == 0


@pytest.mark.parametrize("schedule, options", [("karras", dict(use_karras_sigmas=True)),
                                               ("exponential", dict(use_exponential_sigmas=True)),
                                               ("normal", dict(timestep_spacing="linspace"))])
def test_schedules_equal_diffusers_grids(schedule, options, sigmas):
    scheduler = diffusers.EulerDiscreteScheduler(**DIFFUSERS_CONFIG, **options)
    scheduler.set_timesteps(10)
    np.testing.assert_allclose(SCHEDULES[schedule](10, sigmas), scheduler.sigmas.numpy(), rtol=2e-6, atol=1e-7)


def test_align_your_steps_is_the_published_list_at_ten_steps(sigmas):
    grid = SCHEDULES["align_your_steps"](10, sigmas)
    np.testing.assert_allclose(grid[:-1], ALIGN_YOUR_STEPS_SD15[:-1], rtol=1e-12)
    assert grid[-1] == 0 and len(grid) == 11


def test_align_your_steps_interpolates_log_linearly(sigmas):
    grid = SCHEDULES["align_your_steps"](20, sigmas)
    np.testing.assert_allclose(grid[:-1:2], ALIGN_YOUR_STEPS_SD15[:-1], rtol=1e-12)  # every other point is published
    np.testing.assert_allclose(grid[1], math.sqrt(ALIGN_YOUR_STEPS_SD15[0] * ALIGN_YOUR_STEPS_SD15[1]), rtol=1e-12)


def test_time_based_schedules(sigmas):
    assert SCHEDULES["normal"](4, sigmas)[:-1] == pytest.approx([sigmas.sigma(t) for t in (999, 666, 333, 0)])
    assert SCHEDULES["sgm_uniform"](4, sigmas)[:-1] == pytest.approx([sigmas.sigma(t) for t in (999, 749.25, 499.5,
                                                                                                 249.75)])
    assert SCHEDULES["simple"](4, sigmas)[:-1] == pytest.approx(sigmas.sigmas[[999, 749, 499, 249]].tolist())


def test_beta_schedule_crowds_both_ends(sigmas):
    grid = beta(20, sigmas)
    times = [sigmas.timestep(level) for level in grid[:-1]]
    gaps = np.diff(times)
    assert times[0] == 999 and grid[-1] == 0 and (gaps < 0).all()
    assert abs(gaps[0]) < abs(gaps[len(gaps) // 2]) and abs(gaps[-1]) < abs(gaps[len(gaps) // 2])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_decreases_to_zero(name, sigmas):
    for steps in (1, 2, 7, 30):
        grid = SCHEDULES[name](steps, sigmas)
        assert len(grid) == steps + 1 or name == "beta"
        assert grid[-1] == 0 and all(a > b for a, b in zip(grid, grid[1:]))


def test_discard_next_to_last():
    assert discard_next_to_last([5.0, 3.0, 1.0, 0.5, 0.0]) == [5.0, 3.0, 1.0, 0.0]
