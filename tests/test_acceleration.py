import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import TINY_CONFIG
from ldm.models.acceleration import Acceleration, CompiledCUDAGraphUNet, CUDAGraphUNet, accelerate
from ldm.models.loading import build_model, load_config
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.winograd import MIN_CHANNELS, Conv3x3, set_winograd
from ldm.util import ParameterError, randomize_parameters_

FLOAT32_RELATIVE = 1e-4  # the fast paths change the order of float32 sums only: measured ≤ 1e-5


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def unet_inputs(model, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    x = torch.randn(batch, unet.in_channels, model.image_size, model.image_size, generator=generator)
    context = torch.randn(batch, 77, model.cond_stage_model.transformer.text_model.config.hidden_size,
                          generator=generator)
    return x, torch.tensor([999.0, 17.5])[:batch], context


def test_winograd_unet_equals_the_plain_convolutions():
    """A UNet as wide as SD v1's first level, so that its 3×3 convolutions take the Winograd path."""
    torch.manual_seed(0)
    unet = UNetModel(in_channels=4, model_channels=MIN_CHANNELS, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=(1, 1), num_head_channels=64, context_dim=32).eval()
    for module in unet.modules():  # zero-initialised output layers would hide the convolutions' errors
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        fast = unet(x, t, context)
        set_winograd(unet, False)
        plain = unet(x, t, context)
    assert relative_error(fast, plain) < FLOAT32_RELATIVE
    assert not torch.equal(fast, plain)  # the other path really ran


@pytest.mark.parametrize("query_tokens", [1, 7, 64])
def test_attention_slicing_changes_nothing(tiny_model, query_tokens):
    model = copy.deepcopy(tiny_model)
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        whole = model.apply_model(x, t, context)
        accelerate(model, Acceleration(attention_slicing=query_tokens))
        sliced = model.apply_model(x, t, context)
    assert relative_error(sliced, whole) < FLOAT32_RELATIVE


@pytest.fixture(scope="module")
def one_level_model():
    """A one-level tiny UNet: Inductor's C++ compile time grows with the kernels (the tiny v1 UNet takes 100 s)."""
    config = load_config(TINY_CONFIG)
    config.model.params.unet_config.params.update(channel_mult=[1], attention_resolutions=[1], num_res_blocks=1)
    return randomize_parameters_(build_model(config), seed=0).eval()


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not support this Python")
def test_compiled_unet_equals_eager_and_a_second_compile_reads_the_cache(one_level_model, tmp_path, monkeypatch):
    """The real --compile path (Inductor, C++ on the CPU), its cache in a temporary directory."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, t, context = unet_inputs(one_level_model)
    with torch.no_grad():
        eager = one_level_model.apply_model(x, t, context)
        for run in ("first", "second"):
            torch._dynamo.reset()
            counters.clear()
            model = copy.deepcopy(one_level_model)
            accelerate(model, Acceleration(compile=True))
            assert relative_error(model.apply_model(x, t, context), eager) < FLOAT32_RELATIVE
            assert counters["inductor"]["fxgraph_cache_hit"] == (run == "second"), run
    torch._dynamo.reset()


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not support this Python")
def test_compiled_cuda_graph_outputs_are_copies(one_level_model, tmp_path, monkeypatch):
    """--compile --cuda_graph (mode "reduce-overhead"; on the CPU Inductor compiles without graphs): each output
    is a fresh tensor, since the graphs overwrite theirs on the next replay."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = copy.deepcopy(one_level_model)
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        eager = model.apply_model(x, t, context)
        accelerate(model, Acceleration(compile=True, cuda_graph=True))
        assert isinstance(model.model.engine, CompiledCUDAGraphUNet)
        first = model.apply_model(x, t, context)
        second = model.apply_model(x, t, context)
    torch._dynamo.reset()
    assert first.data_ptr() != second.data_ptr()
    assert relative_error(first, eager) < FLOAT32_RELATIVE and torch.equal(first, second)


def test_unet_traces_without_graph_breaks(tiny_model):
    """torch.compile(fullgraph=True) refuses graph breaks: one graph per UNet call, nothing left to Python."""
    unet = torch.compile(tiny_model.model.diffusion_model, backend="eager", fullgraph=True)
    x, t, context = unet_inputs(tiny_model)
    with torch.no_grad():
        assert relative_error(unet(x, t, context), tiny_model.model.diffusion_model(x, t, context)) < 1e-6
    torch._dynamo.reset()


def test_cuda_graph_needs_cuda_and_slicing_needs_a_count():
    with pytest.raises(ParameterError, match="cuda_graph needs a CUDA device") as error:
        Acceleration(cuda_graph=True).for_device(torch.device("cpu"))
    assert error.value.parameter == "cuda_graph"
    with pytest.raises(ParameterError, match="attention_slicing must be 0"):
        Acceleration(attention_slicing=-1).for_device(torch.device("cpu"))
    assert Acceleration().for_device(torch.device("cpu")).cuda_graph is False  # on by default only with CUDA
    assert Acceleration().for_device(torch.device("cuda")).cuda_graph is True


def test_cuda_graph_wrapper_runs_eagerly_off_cuda(tiny_model):
    unet = CUDAGraphUNet(tiny_model.model.diffusion_model)
    x, t, context = unet_inputs(tiny_model)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), tiny_model.model.diffusion_model(x, t, context))
    assert not unet.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_replays_equal_eager_and_outputs_survive_later_calls(tiny_model):
    model = copy.deepcopy(tiny_model).cuda()
    unet = model.model.diffusion_model
    graphed = CUDAGraphUNet(unet)
    first, second = (tuple(tensor.cuda() for tensor in unet_inputs(model, seed=seed)) for seed in (1, 2))
    with torch.no_grad():
        expected = [unet(*first), unet(*second)]
        outputs = [graphed(*first), graphed(*second)]
        again = graphed(*first)
    assert len(graphed.graphs) == 1 and not graphed.failed
    for output, reference in zip(outputs + [again], expected + expected[:1]):
        assert relative_error(output, reference) < FLOAT32_RELATIVE


def test_on_the_cpu_the_unet_goes_channels_last_with_winograd_and_computes_the_same(tiny_model):
    model = copy.deepcopy(tiny_model)
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        before = model.apply_model(x, t, context)
        accelerate(model, Acceleration())
        after = model.apply_model(x, t, context)
    unet = model.model.diffusion_model
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(after, before) < FLOAT32_RELATIVE


def test_winograd_can_be_turned_off_to_save_memory(tiny_model):
    model = copy.deepcopy(tiny_model)
    accelerate(model, Acceleration(winograd=False))
    convolutions = [m for m in model.modules() if isinstance(m, Conv3x3)]
    assert convolutions and not any(m.winograd for m in convolutions)
