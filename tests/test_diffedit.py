"""DiffEdit: mask estimation arithmetic, background pinned to the input at every step, end to end on the tiny model."""

import pytest
import torch

from ldm.editing.diffedit import edit_latent, estimate_mask, mask_from_difference, resize_mask
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.testing.analytic import GaussianLatentDiffusion
from ldm.util import ParameterError

SHAPE = (4, 8, 8)


def half_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1.0
    return mask


def input_latent(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return 0.3 + 0.5 * torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conds(batch: int = 1):
    """src, dst and uncond for the Gaussian model: the conditioning is the data mean."""
    return (torch.full((batch,), 0.3, dtype=torch.float64), torch.full((batch,), -0.8, dtype=torch.float64),
            torch.zeros(batch, dtype=torch.float64))


def test_mask_arithmetic_is_the_seeds():
    difference = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 9.0]])  # mean 3.75, cap 13.125
    expected = (difference.clamp(max=3.75 * 3.5) / (3.75 * 3.5) > 0.5).float()
    assert torch.equal(mask_from_difference(difference), expected)
    assert mask_from_difference(difference).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert mask_from_difference(difference, clamp_rate=1.0, threshold=0.9).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_estimated_mask_finds_where_the_prompts_disagree():
    region = half_mask()

    class TwoPrompts(GaussianLatentDiffusion):
        def apply_model(self, x, t, cond):
            self.timesteps_seen.append(float(t[0]))
            self.calls += 1
            disagreement = region.to(x.dtype) * (cond.view(-1, 1, 1, 1) < 0)
            return 0.01 * torch.ones_like(x) + disagreement

    model = TwoPrompts()
    sampler = DPMSolverSampler(model)
    src, dst, _ = conds()
    mask = estimate_mask(sampler, input_latent(), src, dst, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, region.double())
    assert model.calls == 2 and model.timesteps_seen[0] == pytest.approx(499.5)  # no guidance; t at ratio 0.5


@pytest.mark.parametrize("mask", [torch.zeros(8, 8), half_mask()])
def test_deterministic_encoding_pins_the_background_to_the_inversion(mask):
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    x0 = input_latent(batch=2)
    src, dst, uncond = conds(2)
    _, encoding = sampler.encode(10, x0, 0.6, conditioning=src, unconditional_guidance_scale=7.5,
                                 unconditional_conditioning=uncond, lower_order_final=False)
    trajectory = encoding.x_inter
    edited, latents = edit_latent(sampler, x0, mask, src, dst, uncond, encode_ratio=0.6, steps=10,
                                  encode_type="deterministic", scale=7.5)
    assert len(latents) == len(trajectory) == 11
    outside = mask == 0
    for latent, encoded in zip(latents, trajectory[::-1]):
        assert torch.equal(latent[..., outside], encoded[..., outside])
    assert torch.equal(edited[..., outside], x0[..., outside])
    if mask.sum() == 0:
        assert torch.equal(edited, x0)
    else:
        assert (edited[..., ~outside] - x0[..., ~outside]).abs().mean() > 0.1  # the target prompt changed it


def test_stochastic_encoding_renoises_the_background_to_every_time(monkeypatch):
    model = GaussianLatentDiffusion()
    sampler = DPMSolverSampler(model)
    draws = []
    encode = sampler.stochastic_encode

    def recorded(x0, ratio, noise=None, generator=None):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        draws.append((ratio, noise))
        return encode(x0, ratio, noise=noise)

    monkeypatch.setattr(sampler, "stochastic_encode", recorded)
    x0, mask = input_latent(batch=2), half_mask()
    src, dst, uncond = conds(2)
    edited, latents = edit_latent(sampler, x0, mask, src, dst, uncond, encode_ratio=0.6, steps=10,
                                  encode_type="stochastic", generator=torch.Generator().manual_seed(1))
    times = torch.linspace(sampler._ratio_to_time(0.6), 1e-3, 11, dtype=torch.float64).tolist()
    ratios = [ratio for ratio, _ in draws]
    assert ratios[0] == 0.6 and ratios[1] == pytest.approx(0.6)  # x_T, then the background at step 0
    assert ratios[1:] == pytest.approx([sampler._time_to_ratio(t) for t in times])  # the true inverse, every step
    assert ratios[-1] == pytest.approx(0.0, abs=1e-12)
    alpha_end, sigma_end = (f(torch.tensor([1e-3], dtype=torch.float64)).item() for f in
                            (sampler.noise_schedule.marginal_alpha, sampler.noise_schedule.marginal_std))
    outside = mask == 0
    expected = alpha_end * x0 + sigma_end * draws[-1][1]
    torch.testing.assert_close(edited[..., outside], expected[..., outside])
    for latent, (ratio, noise) in zip(latents, draws[1:]):
        torch.testing.assert_close(latent[..., outside], encode(x0, ratio, noise=noise)[..., outside])


def test_bad_encode_settings_name_the_parameter():
    sampler = DPMSolverSampler(GaussianLatentDiffusion())
    src, dst, uncond = conds()
    for change, parameter in (({"encode_ratio": 0.0}, "encode_ratio"), ({"encode_type": "ddim"}, "encode_type")):
        with pytest.raises(ParameterError) as error:
            edit_latent(sampler, input_latent(), half_mask(), src, dst, uncond, **change)
        assert error.value.parameter == parameter


def test_user_masks_are_resized_and_binarised():
    mask = torch.zeros(64, 48)
    mask[:32] = 1.0
    small = resize_mask(mask, (8, 6))
    assert small.shape == (8, 6) and small[:4].eq(1).all() and small[4:].eq(0).all()
