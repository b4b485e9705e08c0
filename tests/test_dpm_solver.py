"""The DPM-Solver core against exact answers: Gaussian data make the ODE solvable in closed form."""

import math

import pytest
import torch

from ldm.models.diffusion.dpm_solver.dpm_solver import (DPM_Solver, NoiseScheduleVP, interpolate_fn, model_wrapper,
                                                        singlestep_orders)
from ldm.testing.analytic import SD_ALPHAS_CUMPROD, ZERO_TERMINAL_SNR_ALPHAS_CUMPROD, exact_solution, ideal_noise

MU, S = 0.3, 0.5
SD_SCHEDULE = NoiseScheduleVP("discrete", alphas_cumprod=SD_ALPHAS_CUMPROD)
ZERO_TERMINAL_SNR_SCHEDULE = NoiseScheduleVP("discrete", alphas_cumprod=ZERO_TERMINAL_SNR_ALPHAS_CUMPROD)


def analytic_model(schedule: NoiseScheduleVP, mu=MU, model_type: str = "noise"):
    """The ideal ε as a network in the model_wrapper's convention: model(x, t_input[, cond]); with ``model_type``
    "v" the same model answering in v = α·ε − σ·x̂_0 (SD 2's v-prediction)."""
    def model(x, t_input, cond=None):
        t = (t_input + 1) / schedule.total_N if schedule.schedule == "discrete" else t_input
        shape = (-1, *([1] * (x.dim() - 1)))
        alpha = schedule.marginal_alpha(t.double()).to(x.dtype).view(shape)
        sigma = schedule.marginal_std(t.double()).to(x.dtype).view(shape)
        eps = ideal_noise(x, alpha, sigma, mu if cond is None else cond.view(shape), S)
        return alpha * eps - sigma * (x - sigma * eps) / alpha if model_type == "v" else eps
    return model


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def solve_error(steps: int, schedule=SD_SCHEDULE, **sample_kwargs) -> float:
    """max |DPM-Solver − exact| from t = T to t = 1/N."""
    solver_kwargs = {k: sample_kwargs.pop(k) for k in ("algorithm_type",) if k in sample_kwargs}
    model_type = sample_kwargs.pop("model_type", "noise")
    solver = DPM_Solver(model_wrapper(analytic_model(schedule, model_type=model_type), schedule,
                                      model_type=model_type), schedule, **solver_kwargs)
    x_T = start_noise()
    x_0 = solver.sample(x_T, steps=steps, **sample_kwargs)
    t_T, t_0 = torch.tensor([schedule.T], dtype=torch.float64), torch.tensor([1.0 / schedule.total_N],
                                                                             dtype=torch.float64)
    exact = exact_solution(x_T, schedule.marginal_alpha(t_T).item(), schedule.marginal_alpha(t_0).item(), MU, S)
    return (x_0 - exact).abs().max().item()


def fitted_order(steps_a: int, steps_b: int, **kwargs) -> float:
    return math.log(solve_error(steps_a, **kwargs) / solve_error(steps_b, **kwargs)) / math.log(steps_b / steps_a)


@pytest.mark.parametrize("model_type", ["noise", "v"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
def test_multistep_second_order_converges_at_order_two(algorithm_type, solver_type, model_type):
    order = fitted_order(20, 40, algorithm_type=algorithm_type, order=2, method="multistep", skip_type="logSNR",
                         solver_type=solver_type, model_type=model_type)
    assert 1.8 < order < 2.3


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_singlestep_fixed_third_order_converges_at_order_three(algorithm_type):
    order = fitted_order(48, 96, algorithm_type=algorithm_type, order=3, method="singlestep_fixed",
                         skip_type="logSNR", solver_type="taylor")
    assert 2.7 < order < 3.4


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_multistep_third_order_beats_second_order(algorithm_type):
    """Its first-order warm-up step caps 3M's asymptotic order near 2, but its error is well below 2M's."""
    for steps in (25, 50):
        third = solve_error(steps, algorithm_type=algorithm_type, order=3, skip_type="logSNR")
        second = solve_error(steps, algorithm_type=algorithm_type, order=2, skip_type="logSNR")
        assert third < 0.5 * second


@pytest.mark.parametrize("method", ["multistep", "singlestep", "singlestep_fixed"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
def test_every_method_order_and_grid_converges(method, order, skip_type):
    """4× the steps cut the error at least 3× (time-uniform grids are far from their asymptotic order at 48)."""
    coarse = solve_error(12, order=order, method=method, skip_type=skip_type, lower_order_final=False)
    fine = solve_error(48, order=order, method=method, skip_type=skip_type, lower_order_final=False)
    assert fine < coarse / 3 and fine < 0.12


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_solver_meets_its_tolerance(order):
    """With atol = rtol = tol, the RMS error (the solver's own norm) stays within 2·tol and shrinks with tol."""
    schedule = SD_SCHEDULE
    solver = DPM_Solver(model_wrapper(analytic_model(schedule), schedule), schedule)
    x_T = start_noise()
    exact = exact_solution(x_T, schedule.marginal_alpha(torch.tensor([1.0])).item(),
                           schedule.marginal_alpha(torch.tensor([1e-3])).item(), MU, S)
    errors, evaluations = [], []
    for tol in (1e-3, 1e-4):
        x_0 = solver.sample(x_T, order=order, method="adaptive", atol=tol, rtol=tol)
        errors.append((x_0 - exact).pow(2).mean().sqrt().item())
        evaluations.append(solver.nfe)
        assert errors[-1] < 2 * tol
        assert solver.nfe % order == 0
    assert errors[1] < errors[0] / 5 and evaluations[1] > evaluations[0]
    with pytest.raises(ValueError, match="order 2 or 3"):
        solver.sample(x_T, order=1, method="adaptive")


def test_classifier_free_guidance_of_gaussian_conditionals_stays_exact():
    """ε_u + s(ε_c − ε_u) for means μ_u, μ_c is the ideal ε of the mean μ_u + s(μ_c − μ_u): solvable exactly."""
    schedule, scale = SD_SCHEDULE, 3.0
    mu_cond, mu_uncond = torch.tensor([0.8, -0.4], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    model_fn = model_wrapper(analytic_model(schedule), schedule, guidance_type="classifier-free",
                             condition=mu_cond, unconditional_condition=mu_uncond, guidance_scale=scale)
    x_T = start_noise()
    mu_guided = (mu_uncond + scale * (mu_cond - mu_uncond)).view(-1, 1, 1, 1)
    exact = exact_solution(x_T, schedule.marginal_alpha(torch.tensor([1.0])).item(),
                           schedule.marginal_alpha(torch.tensor([1e-3])).item(), mu_guided, S)
    errors = [(DPM_Solver(model_fn, schedule).sample(x_T, steps=n, skip_type="logSNR") - exact).abs().max()
              for n in (20, 40)]
    assert errors[1] < 5e-3 and 1.8 < math.log2(errors[0] / errors[1]) < 2.3


def test_classifier_guidance_adds_the_scaled_log_likelihood_gradient():
    schedule = SD_SCHEDULE
    target = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)

    def classifier(x, t_input, condition):
        return -0.5 * ((x - condition) ** 2).sum(dim=(1, 2, 3))

    guided = model_wrapper(analytic_model(schedule), schedule, guidance_type="classifier", condition=target,
                           guidance_scale=2.0, classifier_fn=classifier)
    plain = model_wrapper(analytic_model(schedule), schedule)
    x, t = start_noise(), torch.full((2,), 0.7, dtype=torch.float64)
    sigma = schedule.marginal_std(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(guided(x, t), plain(x, t) - 2.0 * sigma * (target - x))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_first_order_step_is_a_ddim_step(algorithm_type):
    """On the discrete schedule, t = (n + 1)/N carries ᾱ_n exactly, so DPM-Solver-1 reproduces DDIM (η = 0)."""
    model = analytic_model(SD_SCHEDULE, mu=0.1)
    solver = DPM_Solver(model_wrapper(model, SD_SCHEDULE), SD_SCHEDULE, algorithm_type=algorithm_type)
    x = start_noise()
    for n_from, n_to in ((981, 961), (501, 481), (21, 0)):
        s, t = (n_from + 1) / 1000, (n_to + 1) / 1000
        ac_s, ac_t = SD_ALPHAS_CUMPROD[n_from].double(), SD_ALPHAS_CUMPROD[n_to].double()
        eps = model(x, torch.full((2,), float(n_from), dtype=torch.float64))
        pred_x0 = (x - (1 - ac_s).sqrt() * eps) / ac_s.sqrt()
        ddim = ac_t.sqrt() * pred_x0 + (1 - ac_t).sqrt() * eps
        dpm = solver.first_update(x, s, t, solver.evaluate(x, s))
        torch.testing.assert_close(dpm, ddim, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_inverse_then_sample_returns_the_start(algorithm_type):
    schedule = SD_SCHEDULE
    solver = DPM_Solver(model_wrapper(analytic_model(schedule), schedule), schedule, algorithm_type=algorithm_type)
    x_0 = MU + S * start_noise(1)
    x_T, trajectory = solver.inverse(x_0, steps=100, skip_type="logSNR", return_intermediate=True)
    assert len(trajectory) == 101 and torch.equal(trajectory[0], x_0)
    exact_T = exact_solution(x_0, schedule.marginal_alpha(torch.tensor([1e-3])).item(),
                             schedule.marginal_alpha(torch.tensor([1.0])).item(), MU, S)
    assert (x_T - exact_T).abs().max() < 2e-3
    assert (solver.sample(x_T, steps=100, skip_type="logSNR") - x_0).abs().max() < 2e-3


def test_add_noise_is_the_forward_marginal():
    solver = DPM_Solver(None, SD_SCHEDULE)
    x = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    alpha, sigma = SD_SCHEDULE.marginal_alpha(t), SD_SCHEDULE.marginal_std(t)
    noise = torch.randn(2, 1, 2, dtype=torch.float64)
    out = solver.add_noise(x, t, noise)
    assert out.shape == (2, 1, 2)
    torch.testing.assert_close(out, alpha.view(2, 1, 1) * x + sigma.view(2, 1, 1) * noise)
    many = solver.add_noise(torch.full((200_000,), 1.5, dtype=torch.float64), torch.tensor([0.5]),
                            generator=torch.Generator().manual_seed(0))
    alpha_half, sigma_half = SD_SCHEDULE.marginal_alpha(torch.tensor([0.5])), SD_SCHEDULE.marginal_std(
        torch.tensor([0.5]))
    assert many.shape == (200_000,)
    assert abs(many.mean() - 1.5 * alpha_half) < 0.01 and abs(many.std() - sigma_half) < 0.01


def test_discrete_schedule_hits_alphas_cumprod_at_the_keypoints_and_inverts():
    n = torch.tensor([0, 499, 999])
    t = (n + 1).double() / 1000
    torch.testing.assert_close(SD_SCHEDULE.marginal_alpha(t) ** 2, SD_ALPHAS_CUMPROD[n].double(), rtol=1e-6, atol=0)
    assert SD_SCHEDULE.marginal_lambda(torch.tensor([1e-3])).item() == pytest.approx(3.535, abs=1e-3)
    assert SD_SCHEDULE.marginal_lambda(torch.tensor([1.0])).item() == pytest.approx(-2.682, abs=1e-3)
    grid = torch.linspace(0.001, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(SD_SCHEDULE.inverse_lambda(SD_SCHEDULE.marginal_lambda(grid)), grid)
    betas_schedule = NoiseScheduleVP("discrete", betas=1 - SD_ALPHAS_CUMPROD.double() / torch.cat(
        [torch.ones(1, dtype=torch.float64), SD_ALPHAS_CUMPROD[:-1].double()]))
    torch.testing.assert_close(betas_schedule.marginal_alpha(grid), SD_SCHEDULE.marginal_alpha(grid), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_continuous_schedules_are_consistent_and_solvable(schedule):
    ns = NoiseScheduleVP(schedule)
    t = torch.linspace(0.01, ns.T, 40, dtype=torch.float64)
    torch.testing.assert_close(ns.marginal_alpha(t) ** 2 + ns.marginal_std(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(ns.inverse_lambda(ns.marginal_lambda(t)), t)
    errors = [solve_error(n, schedule=ns, skip_type="logSNR") for n in (40, 80)]
    assert errors[1] < 3e-3 and 1.8 < math.log2(errors[0] / errors[1]) < 2.3


def test_interpolation_extends_linearly_beyond_the_keypoints():
    xp, yp = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 2.0, 3.0])
    torch.testing.assert_close(interpolate_fn(torch.tensor([-1.0, 0.5, 1.5, 3.0]), xp, yp),
                               torch.tensor([-2.0, 1.0, 2.5, 4.0]))


def test_dynamic_thresholding_clamps_and_rescales_per_sample():
    solver = DPM_Solver(None, SD_SCHEDULE, correcting_x0_fn="dynamic_thresholding", dynamic_thresholding_ratio=0.5)
    x0 = torch.stack([torch.linspace(-4, 4, 9), torch.linspace(-0.5, 0.5, 9)]).view(2, 1, 3, 3)
    out = solver.correcting_x0_fn(x0, None)
    torch.testing.assert_close(out[0].flatten(), x0[0].flatten().clamp(-2, 2) / 2)
    torch.testing.assert_close(out[1], x0[1])


def test_singlestep_orders_spend_exactly_the_steps():
    assert singlestep_orders(6, 3) == [3, 2, 1] and singlestep_orders(7, 3) == [3, 3, 1]
    assert singlestep_orders(8, 3) == [3, 3, 2] and singlestep_orders(7, 2) == [2, 2, 2, 1]
    assert singlestep_orders(5, 1) == [1] * 5
    assert all(sum(singlestep_orders(n, k)) == n for n in range(1, 30) for k in (1, 2, 3))


def test_model_evaluations_per_method():
    model_fn = model_wrapper(analytic_model(SD_SCHEDULE), SD_SCHEDULE)
    solver = DPM_Solver(model_fn, SD_SCHEDULE)
    for method, order, expected in (("multistep", 2, 25), ("multistep", 3, 25), ("singlestep", 3, 25),
                                    ("singlestep_fixed", 3, 24)):
        solver.sample(start_noise(), steps=25, order=order, method=method)
        assert solver.nfe == expected, method
    solver.sample(start_noise(), steps=25, denoise_to_zero=True)
    assert solver.nfe == 26


def test_bad_arguments_name_the_allowed_values():
    solver = DPM_Solver(model_wrapper(analytic_model(SD_SCHEDULE), SD_SCHEDULE), SD_SCHEDULE)
    with pytest.raises(ValueError, match="multistep, singlestep"):
        solver.sample(start_noise(), method="euler")
    with pytest.raises(ValueError, match="time_uniform, logSNR"):
        solver.sample(start_noise(), skip_type="karras")
    with pytest.raises(ValueError, match="at least 3 steps"):
        solver.sample(start_noise(), steps=2, order=3)
    with pytest.raises(ValueError, match="algorithm_type"):
        DPM_Solver(None, SD_SCHEDULE, algorithm_type="dpmsolver+++")
    with pytest.raises(ValueError, match="neither intermediates"):
        solver.sample(start_noise(), method="adaptive", return_intermediate=True)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_a_zero_terminal_snr_schedule_is_solved_from_pure_noise(algorithm_type):
    """ᾱ_T = 2⁻²⁴ (λ_T ≈ −8.3 instead of SD's −2.7): a v-model still converges at order two on a log-SNR grid, and
    on the time-uniform grid the samplers use by default it is within 10 % of its error on SD's schedule."""
    kwargs = dict(algorithm_type=algorithm_type, order=2, method="multistep", model_type="v", lower_order_final=False)
    errors = [solve_error(n, ZERO_TERMINAL_SNR_SCHEDULE, skip_type="logSNR", **kwargs) for n in (25, 50)]
    assert errors[1] < 6e-3 and 1.8 < math.log2(errors[0] / errors[1]) < 2.3
    for steps in (25, 50):
        assert (solve_error(steps, ZERO_TERMINAL_SNR_SCHEDULE, skip_type="time_uniform", **kwargs)
                < 1.1 * solve_error(steps, SD_SCHEDULE, skip_type="time_uniform", **kwargs))
