"""The σ-space samplers against diffusers' schedulers, against independent transcriptions, and against the exact
answers of Gaussian data: agreement to float32 rounding, convergence orders, and the statistics of the stochastic
ones."""

import math

import diffusers
import numpy as np
import pytest
import torch

import k_diffusion_reference as reference
from ldm.models.diffusion.dpm_solver.sigma_samplers import (SIGMA_METHODS, BrownianNoise, SigmaSampler,
                                                            lms_coefficients, unipc_coefficients)
from ldm.models.diffusion.dpm_solver.sigmas import SCHEDULES, DiscreteSigmas
from ldm.testing.analytic import (ZERO_TERMINAL_SNR_ALPHAS_CUMPROD, GaussianLatentDiffusion, exact_solution,
                                  ideal_denoiser)

MU, S = 0.3, 0.5
DIFFUSERS_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def model():
    return GaussianLatentDiffusion(MU, S, sigma_space=True)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def ours(model, name, grid, x_T, generator=None, **options):
    sampler = SigmaSampler(model, name, list(grid), **options)
    return sampler.sample(len(grid) - 1, x_T.shape[0], tuple(x_T.shape[1:]), x_T=x_T, verbose=False,
                          generator=generator)[0]


def run_diffusers(scheduler, model, x_T, steps, generator=None):
    """diffusers' own loop from our start σ_0·x_T (VP schedulers: its VP form); returns the result (as a VE latent)
    and the σ grid."""
    scheduler.set_timesteps(steps)
    grid = [float(sigma) for sigma in scheduler.sigmas]
    variance_preserving = scheduler.init_noise_sigma == 1.0
    x = x_T * grid[0] / (math.sqrt(1 + grid[0] ** 2) if variance_preserving else 1.0)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model.apply_model(x_in, t.reshape(1)), t, x,
                           **({} if generator is None else {"generator": generator})).prev_sample
    unique = list(dict.fromkeys(grid))  # Heun and DPM2 list each inner level twice
    final = unique[-1]
    return x * (math.sqrt(1 + final ** 2) if variance_preserving else 1.0), unique


def seeded():
    return torch.Generator().manual_seed(5)


# name, diffusers scheduler, its options, stochastic. Karras grids where diffusers feeds the network t(σ) exactly;
# integer time grids ("linspace") where it rounds or truncates Karras times (the network would see another σ than
# the one stepped with) or has no Karras option.
DIFFUSERS_TWINS = [
    ("euler", diffusers.EulerDiscreteScheduler, dict(use_karras_sigmas=True), False),
    ("heun", diffusers.HeunDiscreteScheduler, dict(use_karras_sigmas=True), False),
    ("lms", diffusers.LMSDiscreteScheduler, dict(use_karras_sigmas=True), False),
    ("dpm_2", diffusers.KDPM2DiscreteScheduler, dict(timestep_spacing="linspace"), False),
    ("euler_ancestral", diffusers.EulerAncestralDiscreteScheduler, dict(timestep_spacing="linspace"), True),
    ("dpm_2_ancestral", diffusers.KDPM2AncestralDiscreteScheduler, dict(timestep_spacing="linspace"), True),
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, dict(timestep_spacing="linspace", final_sigmas_type="zero"),
     False),
    ("dpmpp_2m_sde", diffusers.DPMSolverMultistepScheduler,
     dict(timestep_spacing="linspace", final_sigmas_type="zero", algorithm_type="sde-dpmsolver++"), True),
    ("dpmpp_2m_sde_heun", diffusers.DPMSolverMultistepScheduler,
     dict(timestep_spacing="linspace", final_sigmas_type="zero", algorithm_type="sde-dpmsolver++", solver_type="heun"),
     True),
    ("uni_pc_bh2", diffusers.UniPCMultistepScheduler,
     dict(timestep_spacing="linspace", final_sigmas_type="zero", solver_type="bh2", solver_order=3), False),
    # diffusers' bh1 multiplies B(h) = −∞ by 0 in a last step to σ = 0: compared on its σ_min ending instead
    ("uni_pc", diffusers.UniPCMultistepScheduler,
     dict(timestep_spacing="linspace", final_sigmas_type="sigma_min", solver_type="bh1", solver_order=3), False),
]


@pytest.mark.parametrize("name, scheduler, options, stochastic", DIFFUSERS_TWINS, ids=[t[0] for t in DIFFUSERS_TWINS])
@pytest.mark.parametrize("steps", [10, 25])
def test_agrees_with_diffusers(name, scheduler, options, stochastic, steps, model, x_T):
    """Same model, same σ grid, same start and (ancestral, SDE) the same generator: float32 rounding apart."""
    theirs, grid = run_diffusers(scheduler(**DIFFUSERS_CONFIG, **options), model, x_T, steps,
                                 seeded() if stochastic else None)
    mine = ours(model, name, grid, x_T, seeded() if stochastic else None)
    assert len(grid) == steps + 1
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), float((mine - theirs).abs().max())


def test_3m_without_noise_is_diffusers_third_order_multistep(model, x_T):
    theirs, grid = run_diffusers(diffusers.DPMSolverMultistepScheduler(
        **DIFFUSERS_CONFIG, timestep_spacing="linspace", final_sigmas_type="zero", solver_order=3), model, x_T, 20)
    assert torch.allclose(ours(model, "dpmpp_3m_sde", grid, x_T, eta_ancestral=0.0), theirs, atol=1e-5, rtol=0)


def test_ddpm_is_diffusers_ddpm_posterior(model, x_T):
    times = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    scheduler = diffusers.DDPMScheduler(**DIFFUSERS_CONFIG, clip_sample=False)
    scheduler.set_timesteps(timesteps=times)
    sigmas = DiscreteSigmas(model.alphas_cumprod)
    grid = [sigmas.sigma(t) for t in times] + [0.0]
    x, generator = x_T * grid[0] / math.sqrt(1 + grid[0] ** 2), seeded()
    for t in scheduler.timesteps:
        x = scheduler.step(model.apply_model(x, t.reshape(1)), t, x, generator=generator).prev_sample
    assert torch.allclose(ours(model, "ddpm", grid, x_T, seeded()), x, atol=1e-5, rtol=0)


REFERENCES = {"dpmpp_2s_ancestral": reference.dpmpp_2s_ancestral, "dpmpp_sde": reference.dpmpp_sde,
              "dpmpp_3m_sde": reference.dpmpp_3m_sde}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_agrees_with_the_published_algorithm(name, eta, model, x_T):
    """Against a transcription of k-diffusion's loop, with the same noise injected (a Brownian path from the same
    seed, asked the same questions in the same order)."""
    sampler = SigmaSampler(model, name, eta_ancestral=eta)
    grid = sampler.grid(12)

    def denoise(x, sigma):
        x_in = x / math.sqrt(1 + sigma ** 2)
        t = torch.full((x.shape[0],), sampler.sigmas.timestep(sigma))
        return x - sigma * model.apply_model(x_in, t)

    mine, _ = sampler.solve(x_T * grid[0], grid, noise=BrownianNoise(x_T, seeded()))
    theirs = REFERENCES[name](denoise, x_T * grid[0], grid, BrownianNoise(x_T, seeded()), eta=eta)
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), float((mine - theirs).abs().max())


def exact_answer(x_T: torch.Tensor, grid) -> torch.Tensor:
    """The ODE solved exactly from σ_0 to the last non-zero level, then the final step's denoising (every sampler's
    last step, σ_min → 0, returns D)."""
    sigma_0, sigma_min = grid[0], grid[-2]
    x = exact_solution(x_T.double() * grid[0] / math.sqrt(1 + sigma_0 ** 2), 1 / math.sqrt(1 + sigma_0 ** 2),
                       1 / math.sqrt(1 + sigma_min ** 2), MU, S) * math.sqrt(1 + sigma_min ** 2)
    return ideal_denoiser(x, sigma_min, MU, S)


def rms_error(model, name, schedule, steps, x_T, **options):
    sampler = SigmaSampler(model, name, schedule, **options)
    grid = sampler.grid(steps)
    samples, _ = sampler.solve(x_T.double() * grid[0], grid)
    return float((samples - exact_answer(x_T, grid)).pow(2).mean().sqrt())


# name, schedule, options, steps (coarse, fine), order range. Orders of the global error in the step size.
CONVERGENCE = [
    ("euler", "karras", {}, (20, 40), (0.8, 1.3)),
    ("heun", "karras", {}, (10, 20), (1.7, 2.6)),
    ("dpm_2", "karras", {}, (10, 20), (1.7, 2.6)),
    ("dpmpp_2m", "karras", {}, (10, 20), (1.7, 2.6)),
    ("dpmpp_2m", "exponential", {}, (10, 20), (1.7, 2.6)),  # uniform in λ = −log σ: the logSNR grid
    ("dpmpp_2s_ancestral", "karras", dict(eta_ancestral=0.0), (10, 20), (1.7, 2.6)),
    ("lms", "karras", {}, (10, 20), (2.5, 5.0)),
    ("uni_pc_bh2", "karras", {}, (10, 20), (2.5, 10.0)),  # order 3 with the corrector: 6–7 measured here
    ("uni_pc", "karras", {}, (10, 20), (2.5, 10.0)),
]


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("name, schedule, options, steps, orders", CONVERGENCE,
                         ids=[f"{c[0]}-{c[1]}" for c in CONVERGENCE])
def test_converges_at_its_order(name, schedule, options, steps, orders, parameterization, x_T):
    """The exact-solution test, with the ideal model answering in ε and in v (SD 2's v-prediction)."""
    model = GaussianLatentDiffusion(MU, S, sigma_space=True, parameterization=parameterization)
    coarse, fine = (rms_error(model, name, schedule, n, x_T, **options) for n in steps)
    order = math.log(coarse / fine) / math.log(steps[1] / steps[0])
    assert orders[0] <= order <= orders[1], (coarse, fine, order)


def sample_statistics(model, name, schedule, steps, draws=20000, seed=0, **options):
    x_T = torch.randn(draws, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sampler = SigmaSampler(model, name, schedule, **options)
    samples, _ = sampler.sample(steps, draws, (1, 1, 1), x_T=x_T, verbose=False,
                                generator=torch.Generator().manual_seed(seed + 1))
    return float(samples.mean()), float(samples.var())


def test_euler_ancestral_variance_approaches_the_data_as_steps_grow(model):
    """A first-order ancestral sampler under-disperses at few steps and converges slowly: measured here 0.84, 0.91 and
    0.98 of the true variance at 40, 100 and 300 Karras steps (20 000 draws; standard error 0.01)."""
    ratios = [sample_statistics(model, "euler_ancestral", "karras", steps)[1] / S ** 2 for steps in (40, 100, 300)]
    assert ratios[0] < ratios[1] < ratios[2] < 1.02
    assert ratios[0] > 0.75 and ratios[2] > 0.95


def test_euler_ancestral_is_ddpm(model, x_T):
    """With η = 1 the ancestral Euler step is the DDPM posterior step: σ_down = σ'²/σ gives x_down =
    (σ'/σ)²·x + (1 − (σ'/σ)²)·D, and σ_up = σ'·√(1 − (σ'/σ)²) is the posterior's standard deviation."""
    grid = SigmaSampler(model, "ddpm").grid(15)
    assert torch.allclose(ours(model, "euler_ancestral", grid, x_T, seeded()), ours(model, "ddpm", grid, x_T, seeded()),
                          atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                                  "dpmpp_3m_sde", "ddpm", "dpm_2_ancestral"])
def test_stochastic_samplers_draw_the_data_distribution(name, model):
    """At 100 Karras steps the samples have the data's mean and variance (20 000 draws: standard errors 0.0035 and
    0.0025); first-order ancestral steps still under-disperse by about 9 %."""
    mean, variance = sample_statistics(model, name, "karras", 100)
    assert abs(mean - MU) < 0.015
    assert abs(variance / S ** 2 - 1) < (0.12 if name in ("euler_ancestral", "ddpm") else 0.05)


def test_brownian_noise_has_the_law_of_one_path():
    """Two overlapping increments, σ → m and σ → σ': each standard normal, with correlation √((σ − m)/(σ − σ'))."""
    like = torch.zeros(40000, dtype=torch.float64)
    noise = BrownianNoise(like, torch.Generator().manual_seed(0))
    first, second = noise(4.0, 2.0), noise(4.0, 1.0)
    later = noise(1.0, 0.5)
    assert abs(float(first.std()) - 1) < 0.02 and abs(float(second.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1]) - math.sqrt(2 / 3)) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([second, later]))[0, 1])) < 0.02
    bridge = noise(4.0, 3.0)  # between known points: the bridge, still a standard normal
    assert abs(float(bridge.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([bridge, first]))[0, 1]) - math.sqrt(1 / 2)) < 0.02


def test_lms_coefficients_integrate_polynomials_exactly():
    grid = [10.0, 6.0, 3.5, 2.0, 1.0, 0.0]
    for step in range(3, 5):
        c = lms_coefficients(grid, step, 4)  # the rule is exact for cubics through the last four nodes
        f = np.poly1d([0.3, -1.0, 2.0, 0.5])
        nodes = [grid[step - k] for k in range(4)]
        exact = f.integ()(grid[step + 1]) - f.integ()(grid[step])
        assert math.isclose(sum(ci * f(n) for ci, n in zip(c, nodes)), exact, rel_tol=1e-12)


def test_unipc_low_orders_are_the_papers_closed_forms():
    """Order 2 predictor ρ = ½ (UniPC §3.2) and order 1 corrector ρ = ½; order 3 solves the 2×2 system."""
    assert unipc_coefficients([], -0.4, "bh2", predictor=True)[0] == []
    assert unipc_coefficients([-1.0], -0.4, "bh2", predictor=True)[0] == [0.5]
    assert unipc_coefficients([], -0.4, "bh1", predictor=False)[0] == [0.5]
    rho, _ = unipc_coefficients([-1.0, -2.0], -0.4, "bh2", predictor=True)
    assert len(rho) == 2


def test_every_method_on_every_schedule_gives_finite_samples(model, x_T):
    for name in SIGMA_METHODS:
        for schedule in SCHEDULES:
            sampler = SigmaSampler(model, name, schedule)
            samples, _ = sampler.sample(6, 4, (1, 8, 8), x_T=x_T, verbose=False, generator=seeded())
            assert torch.isfinite(samples).all(), (name, schedule)


def test_img2img_runs_the_tail_of_the_grid_as_a1111(model):
    """strength 0.5 of 10 steps: int(0.5·10) + 1 = 6 model calls from σ = grid[4]."""
    sampler = SigmaSampler(model, "euler")
    init = torch.full((2, 1, 4, 4), MU)
    model.timesteps_seen.clear()
    sampler.img2img(init, 0.5, 10, None, noise=torch.zeros_like(init), verbose=False)
    assert len(model.timesteps_seen) == 6
    assert math.isclose(model.timesteps_seen[0], sampler.sigmas.timestep(sampler.grid(10)[4]), rel_tol=1e-5)


def test_v_prediction_models_give_the_same_samples(model, x_T):
    v_model = GaussianLatentDiffusion(MU, S, sigma_space=True, parameterization="v")
    for name in ("euler", "dpmpp_2m", "uni_pc"):
        grid = SigmaSampler(model, name).grid(8)
        assert torch.allclose(ours(v_model, name, grid, x_T), ours(model, name, grid, x_T), atol=1e-5)


@pytest.mark.parametrize("name, schedule, options, steps, orders", CONVERGENCE,
                         ids=[f"{c[0]}-{c[1]}" for c in CONVERGENCE])
def test_converges_from_zero_terminal_snr(name, schedule, options, steps, orders, x_T):
    """On the rescaled schedule (ᾱ_T = 2⁻²⁴, σ_max = 4096) with a v-model, as such checkpoints are. Grids from
    σ = 4096 spend their first steps where the answer hardly changes and the higher orders converge unevenly
    there, so: with 4× the steps every sampler still converges and is at least as accurate as on SD's schedule."""
    zero_snr = GaussianLatentDiffusion(MU, S, sigma_space=True, parameterization="v",
                                       alphas_cumprod=ZERO_TERMINAL_SNR_ALPHAS_CUMPROD)
    coarse, fine = (rms_error(zero_snr, name, schedule, 4 * n, x_T, **options) for n in steps)
    sd = rms_error(GaussianLatentDiffusion(MU, S, sigma_space=True, parameterization="v"), name, schedule,
                   steps[1], x_T, **options)
    assert fine < coarse and fine <= sd, (coarse, fine, sd)
