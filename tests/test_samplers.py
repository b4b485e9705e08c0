"""Every registered sampler through one call on the tiny model: shape, dtype, device, determinism, cost."""

import pytest
import torch

from ldm.models.diffusion.samplers import SAMPLERS, make_sampler

MODEL_CALLS = {"ddim": 5, "plms": 6, "dpm_solver": 5}


@pytest.fixture(scope="module")
def conditioning(tiny_model):
    with torch.no_grad():
        return tiny_model.get_learned_conditioning(["a red circle", "a blue square"]), \
            tiny_model.get_learned_conditioning(["", ""])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
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
    assert calls == [4] * MODEL_CALLS[name]  # guided calls on the doubled batch
    assert first.shape == (2, 4, 8, 8) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.isfinite(first).all()
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert run(0, torch.float64).dtype == torch.float64


def test_unknown_sampler_names_the_choices(tiny_model):
    with pytest.raises(ValueError, match="ddim, plms, dpm_solver"):
        make_sampler("euler", tiny_model)


SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
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
    assert events.count("model") == MODEL_CALLS[name]
    assert [event for event in events[first:last] if event != "model"] == []
