import pytest
import torch
import torch.nn.functional as F

from ldm.modules.winograd import MIN_CHANNELS, Conv3x3, set_winograd, transform_kernel, winograd_conv3x3

FLOAT32_RELATIVE = 2e-5  # measured 2–7e-6 relative to the largest output; the direct convolution rounds too


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 16, 8, 6), (3, 32, 16, 16), (1, 8, 4, 12)])
def test_winograd_equals_direct_convolution(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(24, shape[1], 3, 3, generator=generator)
    bias = torch.randn(24, generator=generator)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert relative_error(winograd_conv3x3(x, transform_kernel(weight), bias).double(), reference) < FLOAT32_RELATIVE
    exact = winograd_conv3x3(x.double(), transform_kernel(weight.double()), bias.double())
    assert relative_error(exact, reference) < 1e-13  # the transforms are exact: only rounding separates them


def test_large_inputs_are_computed_in_pieces_that_equal_the_whole():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 10, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=generator, dtype=torch.float64)
    kernel, bias = transform_kernel(weight), torch.randn(5, generator=generator, dtype=torch.float64)
    whole = winograd_conv3x3(x, kernel, bias)
    for max_pixels in (16, 80, 160, 200):  # bands of 2 rows, whole images, two images, and a short last group
        assert relative_error(winograd_conv3x3(x, kernel, bias, max_pixels=max_pixels), whole) < 1e-13


def test_conv3x3_uses_winograd_only_in_float32_cpu_inference_of_wide_layers(monkeypatch):
    conv, narrow = Conv3x3(MIN_CHANNELS, MIN_CHANNELS), Conv3x3(MIN_CHANNELS, 4)
    calls = []
    monkeypatch.setattr("ldm.modules.winograd.winograd_conv3x3",
                        lambda *args: calls.append(args) or winograd_conv3x3(*args))
    x = torch.randn(1, MIN_CHANNELS, 4, 4)
    with torch.no_grad():
        conv(x)
        assert len(calls) == 1
        conv(torch.randn(1, MIN_CHANNELS, 3, 4))  # odd height
        narrow(x)  # too few output channels to gain
        conv.to(torch.bfloat16)(x.to(torch.bfloat16))  # other dtypes
        conv.float()
    assert len(calls) == 1
    conv(x).sum().backward()  # gradients on: the ordinary convolution, which autograd knows
    assert len(calls) == 1 and conv.weight.grad is not None
    set_winograd(conv, False)
    with torch.no_grad():
        conv(x)
    assert len(calls) == 1 and conv._kernel_cache is None


def test_conv3x3_matches_nn_conv2d_and_follows_weight_changes():
    torch.manual_seed(0)
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    plain = torch.nn.Conv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, MIN_CHANNELS, 6, 6)
    with torch.no_grad():
        assert relative_error(conv(x), plain(x)) < FLOAT32_RELATIVE
        conv.weight.mul_(2.0)  # in-place writes (load_state_dict, EMA swaps) must invalidate the cached kernel
        plain.weight.mul_(2.0)
        assert relative_error(conv(x), plain(x)) < FLOAT32_RELATIVE
