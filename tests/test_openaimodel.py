"""The UNet: original checkpoint layout, and the same outputs as diffusers' UNet2DConditionModel on the same weights."""

import pytest
import torch

from ldm.modules.diffusionmodules.util import normalization
from ldm.testing.diffusers_interop import diffusers_unet
from ldm.util import count_params


def test_v1_unet_has_original_layout_and_size(v1_meta_model, v1_original_config):
    assert round(count_params(v1_meta_model.model) / 1e6, 2) == 859.52
    state_dict = v1_meta_model.state_dict()
    unet = diffusers_unet(state_dict, v1_original_config, meta=True)  # strict load
    ours = {k: v.shape for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
    assert len(ours) == len(unet.state_dict()) == 686
    assert ours["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert ours["model.diffusion_model.output_blocks.5.0.skip_connection.weight"] == (1280, 1920, 1, 1)


def test_tiny_unet_matches_diffusers(tiny_model, tiny_original_config):
    unet = diffusers_unet(tiny_model.state_dict(), tiny_original_config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 24, generator=generator)
    t = torch.tensor([981.0, 37.5])
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ours = tiny_model.apply_model(x, t, context)
        theirs = unet(x, t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 0.1
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_group_norm_is_the_float32_one_rounded_once(dtype):
    norm = normalization(64).to(dtype)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 64, 8, 8) * 300 + 1000).to(dtype)  # large mean: float16 sums of squares would overflow
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    out = norm(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.float() - expected).abs() / expected.abs().clamp(min=1)).max() <= torch.finfo(dtype).eps
