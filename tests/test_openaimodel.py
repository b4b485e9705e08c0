"""The UNet: original checkpoint layouts (v1, SD 2, inpainting), and the same outputs as diffusers'
UNet2DConditionModel on the same weights."""

import contextlib
import copy

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import ROOT
from ldm.models.loading import build_model
from ldm.modules.attention import CrossAttention, attends_in_float32
from ldm.modules.diffusionmodules.util import normalization
from ldm.testing.diffusers_interop import diffusers_unet
from ldm.util import count_params, randomize_parameters_


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


SD_CONFIGS = ROOT / "configs/stable-diffusion"


@pytest.mark.parametrize("name, millions, in_channels, context", [
    ("v2-inference-v.yaml", 865.91, 4, 1024), ("v2-inference.yaml", 865.91, 4, 1024),
    ("v1-inpainting-inference.yaml", 859.54, 9, 768), ("v2-inpainting-inference.yaml", 865.93, 9, 1024)])
def test_sd2_and_inpainting_unets_load_strict_into_diffusers(name, millions, in_channels, context):
    """Built on meta from our configs, converted by diffusers' single-file converter, loaded strictly."""
    model = build_model(SD_CONFIGS / name, meta=True)
    original = yaml.safe_load((SD_CONFIGS / name).read_text())
    unet = diffusers_unet(model.state_dict(), original, meta=True)
    assert round(count_params(model.model) / 1e6, 2) == round(count_params(unet) / 1e6, 2) == millions
    assert (unet.config.in_channels, unet.config.cross_attention_dim) == (in_channels, context)
    if context == 1024:
        assert unet.config.use_linear_projection and unet.config.attention_head_dim == [5, 10, 20, 20]


@pytest.mark.parametrize("name", ["v2-tiny-v.yaml", "v1-inpainting-tiny.yaml"])
def test_tiny_sd2_and_inpainting_unets_match_diffusers(name):
    model = randomize_parameters_(build_model(SD_CONFIGS / name), seed=2).eval()
    unet = diffusers_unet(model.state_dict(), yaml.safe_load((SD_CONFIGS / name).read_text()))
    generator = torch.Generator().manual_seed(1)
    channels = model.model.diffusion_model.in_channels
    x = torch.randn(2, channels, 16, 24, generator=generator)
    t = torch.tensor([981.0, 37.5])
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, context)
        theirs = unet(x, t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 0.1
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH])
def test_float16_attention_on_the_cpu_survives_scores_beyond_float16_range(backend):
    """q·kᵀ of 1.6e6 (float16 ends at 65 504): the CPU's SDPA kernels keep the scores in float32, so float16
    attention gives the float32 answer without an upcast, which is why ``upcast_attention`` casts only elsewhere."""
    attention = CrossAttention(64, heads=1, dim_head=64)
    with torch.no_grad():
        for projection in (attention.to_q, attention.to_k):
            projection.weight.copy_(torch.eye(64) * 80)
        x = torch.full((1, 4, 64), 2.0)
        x[0, 1] = -2.0
        assert (attention.to_q(x) @ attention.to_k(x).transpose(1, 2)).abs().max() > 1e6
        reference = attention(x)
        with sdpa_kernel(backend) if backend else contextlib.nullcontext():
            half = attention.half()(x.half())
    torch.testing.assert_close(half.float(), reference, rtol=2e-3, atol=2e-3)


def test_upcast_attention_casts_float16_only_off_cuda_and_the_cpu():
    assert [attends_in_float32(dtype, torch.device(device)) for dtype, device in
            ((torch.float16, "mps"), (torch.float16, "cpu"), (torch.float16, "cuda"), (torch.bfloat16, "mps"),
             (torch.float32, "mps"))] == [True, False, False, False, False]


@pytest.mark.parametrize("change", [
    {},  # attention at the first level: x is tiled inside the first transformer block
    {"attention_resolutions": [2], "use_linear_in_transformer": True, "transformer_depth": 2},  # at a lower level
    {"attention_resolutions": []},  # only in the middle block: tiled between its two ResBlocks
])
def test_a_guided_batch_may_pass_x_once(change, tiny_original_config):
    """x and timesteps of B rows with contexts of 2B rows give the UNet's output on torch.cat([x] * 2): the
    condition-independent part computed once, tiled at the first cross-attention (and the skips and time
    embedding with it)."""
    config = copy.deepcopy(tiny_original_config)
    config["model"]["params"]["unet_config"]["params"].update(change)
    unet = randomize_parameters_(build_model(config), seed=3).eval().model.diffusion_model
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([981.0, 37.5])
    contexts = torch.randn(4, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet(torch.cat([x, x]), torch.cat([t, t]), contexts)
        got = unet(x, t, contexts)
    assert got.shape == expected.shape == (4, 4, 16, 16)
    scale = expected.abs().max()
    assert (expected[:2] - expected[2:]).abs().max() > 1e-3 * scale  # the contexts matter
    assert (got - expected).abs().max() <= 1e-5 * scale
