"""LatentDiffusion: the original's schedule buffers and state-dict layout, conditioning routes, EMA scope."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from omegaconf import OmegaConf

from conftest import TINY_CONFIG
from ldm.models.loading import ConfigError, build_model, load_config

SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


def tiny_with(**params):
    config = load_config(TINY_CONFIG)
    config.model.params = OmegaConf.merge(config.model.params, params)
    return build_model(config)


def test_state_dict_has_only_original_prefixes_and_schedule_buffers(v1_meta_model):
    keys = list(v1_meta_model.state_dict())
    schedule = [k for k in keys if not k.startswith(PREFIXES)]
    assert sorted(schedule) == sorted(SCHEDULE_BUFFERS)
    assert len(keys) == 1142
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "first_stage_model.quant_conv.weight" in keys and "first_stage_model.post_quant_conv.bias" in keys


def test_schedule_is_sd_v1_scaled_linear(v1_meta_model):
    model = v1_meta_model
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    for name in SCHEDULE_BUFFERS:
        buffer = getattr(model, name)
        assert buffer.dtype == torch.float32 and buffer.shape == (1000,), name
    torch.testing.assert_close(model.betas, reference.betas, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.alphas_cumprod, reference.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert model.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert model.alphas_cumprod[999].item() == pytest.approx(0.004660, abs=1e-6)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    torch.testing.assert_close(model.alphas_cumprod_prev, ac_prev.float())
    torch.testing.assert_close(model.sqrt_recipm1_alphas_cumprod, (1 / ac - 1).sqrt().float())
    torch.testing.assert_close(model.posterior_mean_coef2, ((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)).float())
    assert model.scale_factor == 0.18215 and model.parameterization == "eps" and model.num_timesteps == 1000


def test_prediction_conversions_are_consistent(tiny_model):
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    x_t = tiny_model.q_sample(x0, t, eps)
    v = tiny_model.get_v(x0, eps, t)
    torch.testing.assert_close(tiny_model.predict_start_from_noise(x_t, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny_model.predict_start_from_z_and_v(x_t, t, v), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny_model.predict_eps_from_z_and_v(x_t, t, v), eps, rtol=1e-4, atol=1e-4)


def test_parameterization_is_checked_and_v_is_representable():
    assert tiny_with(parameterization="v").parameterization == "v"
    with pytest.raises(ConfigError, match="parameterization"):
        tiny_with(parameterization="score")


def test_apply_model_accepts_a_tensor_or_the_original_dict(tiny_model):
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([250.0])
    context = torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(tiny_model.apply_model(x, t, context),
                           tiny_model.apply_model(x, t, {"c_crossattn": [context]}))


def test_first_stage_encoding_scales_by_scale_factor(tiny_model):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    posterior = tiny_model.encode_first_stage(image)
    torch.testing.assert_close(tiny_model.get_first_stage_encoding(posterior.mode()), 0.18215 * posterior.mean)
    z = tiny_model.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)


def test_ema_scope_swaps_in_ema_weights_with_original_key_names():
    model = tiny_with(use_ema=True)
    keys = [k for k in model.state_dict() if k.startswith("model_ema.")]
    assert "model_ema.diffusion_modelinput_blocks00weight" in keys
    assert "model_ema.decay" in keys and "model_ema.num_updates" in keys
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    original = weight.detach().clone()
    model.model_ema.diffusion_modelinput_blocks00weight.fill_(0.5)
    with model.ema_scope():
        assert (weight == 0.5).all()
    assert torch.equal(weight, original)


def test_ema_update_follows_the_warm_up_decay():
    model = tiny_with(use_ema=True)
    ema = model.model_ema
    weight = model.model.diffusion_model.out[2].bias
    shadow = ema.diffusion_modelout2bias
    before = shadow.clone()
    with torch.no_grad():
        weight.add_(1.0)
    ema(model.model)
    decay = min(0.9999, 2 / 11)  # first update: (1 + 1)/(10 + 1)
    torch.testing.assert_close(shadow, before - (1 - decay) * (before - weight.detach()))


def test_scale_by_std_stores_scale_factor_in_the_state_dict():
    model = tiny_with(scale_by_std=True, scale_factor=0.5)
    assert "scale_factor" in model.state_dict()
    assert "scale_factor" not in tiny_with().state_dict()


def test_schedule_variants():
    model = tiny_with(beta_schedule="cosine")
    assert model.betas.max() <= 0.999 and np.all(np.diff(model.alphas_cumprod.numpy()) < 0)
    with pytest.raises(ConfigError, match="beta schedule"):
        tiny_with(beta_schedule="quadratic")


def test_zero_terminal_snr_is_diffusers_rescaled_schedule_with_a_floor():
    """Lin et al.'s rescaled β equal diffusers' ``rescale_betas_zero_snr``; ᾱ_T is kept at 2⁻²⁴ (diffusers' Euler
    and DPM-Solver schedulers do the same) so that σ_T and log-SNR stay finite; ε-prediction is refused."""
    model = tiny_with(parameterization="v", zero_terminal_snr=True, linear_start=0.00085, linear_end=0.012)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    torch.testing.assert_close(model.alphas_cumprod[:-1], reference.alphas_cumprod[:-1], rtol=1e-5, atol=1e-8)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # diffusers' in float64
    torch.testing.assert_close(model.betas[:-1], rescale_zero_terminal_snr(betas)[:-1].float(), rtol=1e-5, atol=1e-8)
    assert reference.alphas_cumprod[-1] < 1e-12 and model.alphas_cumprod[-1].item() == 2.0 ** -24
    assert model.alphas_cumprod[0] == tiny_with(linear_start=0.00085, linear_end=0.012).alphas_cumprod[0]
    for name in SCHEDULE_BUFFERS:
        assert torch.isfinite(getattr(model, name)).all(), name
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        tiny_with(zero_terminal_snr=True)
