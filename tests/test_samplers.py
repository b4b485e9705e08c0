"""Every registered sampler through one call on the tiny model: shape, dtype, device, determinism, cost."""

import pytest
import torch

from ldm.models.diffusion.samplers import SAMPLER_LABELS, SAMPLERS, make_sampler
from ldm.models.diffusion.sampling_util import Intermediates

ALL_SAMPLERS = sorted(SAMPLER_LABELS)
COMPVIS_MODEL_CALLS = {"ddim": 5, "plms": 6, "dpm_solver": 5}


def model_calls(name, model, steps=5):
    """Guided calls of a 5-step run: PLMS makes one extra; σ-space second-order steps two (the last one, one)."""
    return COMPVIS_MODEL_CALLS[name] if name in SAMPLERS else make_sampler(name, model).model_calls(steps)


@pytest.fixture(scope="module")
def conditioning(tiny_model):
    with torch.no_grad():
        return tiny_model.get_learned_conditioning(["a red circle", "a blue square"]), \
            tiny_model.get_learned_conditioning(["", ""])


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_one_interface_for_every_sampler(name, tiny_model, conditioning, monkeypatch):
    cond, uncond = conditioning
    calls = []
    apply_model = tiny_model.apply_model
    monkeypatch.setattr(tiny_model, "apply_model", lambda x, t, c: calls.append(x.shape[0]) or apply_model(x, t, c))

    def run(seed: int, dtype=torch.float32):
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)
        samples, _ = make_sampler(name, tiny_model).sample(S=5, batch_size=2, shape=(4, 8, 8), conditioning=cond,
                                                           unconditional_conditioning=uncond,
                                                           unconditional_guidance_scale=7.5, eta=0.0, x_T=x_T,
                                                           verbose=False, generator=generator)
        return samples

    first = run(0)
    assert calls == [4] * model_calls(name, tiny_model)  # guided calls on the doubled batch
    assert first.shape == (2, 4, 8, 8) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.isfinite(first).all()
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert run(0, torch.float64).dtype == torch.float64


# Noise draws after the start code, as the original makes them: DDIM draws z in every update (even with σ = 0),
# PLMS in every update plus one for its first step's extra update, DPM-Solver none. DDIM's 7-step grid has 8 points.
ORIGINAL_DRAWS = {("ddim", 5): 5, ("ddim", 7): 8, ("plms", 5): 6, ("dpm_solver", 5): 0}


@pytest.mark.parametrize("name, steps", sorted(ORIGINAL_DRAWS))
def test_the_global_rng_advances_as_in_the_original(name, steps, tiny_model, conditioning):
    """After a run, the RNG stands where the start noise plus the original's draws leave it, so the next batch of a
    run starts from the original's noise."""
    cond, uncond = conditioning
    torch.manual_seed(0)
    make_sampler(name, tiny_model).sample(S=steps, batch_size=2, shape=(4, 8, 8), conditioning=cond,
                                          unconditional_conditioning=uncond, unconditional_guidance_scale=7.5,
                                          verbose=False)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    for _ in range(1 + ORIGINAL_DRAWS[name, steps]):
        torch.randn(2, 4, 8, 8)
    assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("name, draws", [("ddim", 3), ("plms", 4), ("dpm_solver", 0)])
def test_img2img_draws_its_noise_then_the_samplers(name, draws, tiny_model, conditioning):
    """strength 0.6 of 5 steps: one noising draw, then one per update over int(0.6·5) = 3 steps (PLMS: one more,
    for its first step's extra update)."""
    cond, uncond = conditioning
    init_latent = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    make_sampler(name, tiny_model).img2img(init_latent, 0.6, 5, cond, unconditional_guidance_scale=7.5,
                                           unconditional_conditioning=uncond, verbose=False)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    for _ in range(1 + draws):
        torch.randn(2, 4, 8, 8)
    assert torch.equal(after, torch.get_rng_state())


def test_every_sampler_reports_the_predicted_x0_and_the_same_intermediates(tiny_model, conditioning):
    cond, uncond = conditioning
    for name in ALL_SAMPLERS:
        seen = []
        samples, intermediates = make_sampler(name, tiny_model).sample(
            S=5, batch_size=2, shape=(4, 8, 8), conditioning=cond, unconditional_conditioning=uncond,
            unconditional_guidance_scale=7.5, verbose=False, log_every_t=2,
            callback=lambda step, x, pred_x0: seen.append((step, pred_x0)))
        assert [step for step, _ in seen] == list(range(5)), name
        assert all(p is not None and p.shape == (2, 4, 8, 8) for _, p in seen), name
        assert type(intermediates) is Intermediates
        assert len(intermediates.x_inter) == len(intermediates.pred_x0) == 4, name  # start, indices 4, 2, 0
        assert torch.equal(intermediates["x_inter"][-1], samples)


def test_unknown_sampler_names_the_choices(tiny_model):
    with pytest.raises(ValueError, match="DDIM, PLMS, DPM-Solver, Euler, Euler a, Heun"):
        make_sampler("eulr", tiny_model)


@pytest.mark.parametrize("name, key, schedule", [("DPM++ 2M Karras", "dpmpp_2m", "karras"),
                                                 ("dpmpp_2m", "dpmpp_2m", "karras"),
                                                 ("euler a", "euler_ancestral", "normal"),
                                                 ("k_euler_ancestral", "euler_ancestral", "normal"),
                                                 ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
                                                 ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
                                                 ("UniPC", "uni_pc", "normal"), ("LMS Karras", "lms", "karras"),
                                                 ("Euler SGM Uniform", "euler", "sgm_uniform"),
                                                 ("Heun Align Your Steps", "heun", "align_your_steps")])
def test_a1111_names_resolve_to_sampler_and_schedule(name, key, schedule, tiny_model):
    sampler = make_sampler(name, tiny_model)
    assert sampler.method.label == SAMPLER_LABELS[key] and sampler.schedule == schedule


def test_a_schedule_given_apart_or_in_the_name(tiny_model):
    assert make_sampler("Euler", tiny_model, "Karras").name == "Euler Karras"
    assert make_sampler("Euler a", tiny_model).name == "Euler a"
    with pytest.raises(ValueError, match="names the schedule Karras"):
        make_sampler("Euler Karras", tiny_model, "exponential")
    with pytest.raises(ValueError, match="own time grid"):
        make_sampler("ddim", tiny_model, "karras")
    with pytest.raises(ValueError, match="schedule must be one of Normal, Karras"):
        make_sampler("Euler", tiny_model, "karas")


SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_the_step_loop_never_waits_for_the_device(name, tiny_model, conditioning, monkeypatch):
    """Between the first and the last model call nothing copies a tensor to the host (on a GPU each such call
    would stall the queue); grids and coefficients are computed before the loop."""
    cond, uncond = conditioning
    events = []
    apply_model = tiny_model.apply_model
    monkeypatch.setattr(tiny_model, "apply_model", lambda x, t, c: events.append("model") or apply_model(x, t, c))
    for method in SYNCING_METHODS:
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            events.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    sampler = make_sampler(name, tiny_model)
    sampler.sample(S=5, batch_size=2, shape=(4, 8, 8), conditioning=cond, unconditional_conditioning=uncond,
                   unconditional_guidance_scale=7.5, verbose=False)
    monkeypatch.undo()
    first, last = events.index("model"), len(events) - 1 - events[::-1].index("model")
    assert events.count("model") == model_calls(name, tiny_model)
    assert [event for event in events[first:last] if event != "model"] == []
