"""Precision and memory options of the shared pipeline, on the trained demo model where numbers matter."""

import copy
import logging

import pytest
import torch

from conftest import ROOT
from ldm.generation import Pipeline, decode_images, precision_scope, resolve_precision
from ldm.models.loading import load_config
from ldm.util import InputError

DEMO_CONFIG = ROOT / "configs/demo/shapes-inference.yaml"
DEMO_CHECKPOINT = ROOT / "models/demo/shapes.safetensors"
CPU = torch.device("cpu")
# Largest mean |Δ| of a 20-step guided image in [0, 1] against float32 (measured on the demo model: float16
# 3.1e-4, bfloat16 2.2e-3, largest pixel 0.012 / 0.052; half precisions keep 10 and 7 mantissa bits).
IMAGE_TOLERANCE = {"fp16": 3e-3, "bf16": 2e-2}


def render(pipeline: Pipeline, prompts: list[str], steps: int = 20) -> torch.Tensor:
    shape = (pipeline.model.channels, pipeline.model.image_size, pipeline.model.image_size)
    x_T = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(0))
    with pipeline.scope():
        c, uc = pipeline.conditioning(prompts, "", 5.0)
        latents, _ = pipeline.sampler.sample(S=steps, batch_size=len(prompts), shape=shape, conditioning=c,
                                             unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                             verbose=False, x_T=x_T)
        return pipeline.decode(latents)


@pytest.fixture(scope="module")
def float32_images() -> torch.Tensor:
    return render(Pipeline.load(load_config(DEMO_CONFIG), DEMO_CHECKPOINT, CPU, "full", "dpm_solver"),
                  ["a small red circle at the top", "a large blue square on the left"])


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_auto_precision_is_float16_on_gpus_and_float32_on_the_cpu():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("mps")) == "fp16"
    assert resolve_precision("auto", CPU) == "full"
    assert resolve_precision("autocast", torch.device("cuda")) == "autocast"
    with pytest.raises(InputError, match="--precision must be one of"):
        resolve_precision("fp8", CPU)
    assert isinstance(precision_scope("autocast", torch.device("cuda"), cuda_graph=True), torch.autocast)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_weights_give_the_float32_images_up_to_rounding(precision, float32_images):
    pipeline = Pipeline.load(load_config(DEMO_CONFIG), DEMO_CHECKPOINT, CPU, precision, "dpm_solver")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert {p.dtype for p in pipeline.model.parameters() if p.is_floating_point()} == {dtype}
    images = render(pipeline, ["a small red circle at the top", "a large blue square on the left"])
    assert images.dtype == torch.float32 and images.shape == float32_images.shape
    assert (images - float32_images).abs().mean() < IMAGE_TOLERANCE[precision]
    assert (images - float32_images).abs().mean() > 0  # the weights really were half precision


def test_an_overflowing_float16_decode_is_redone_in_float32(tiny_model, caplog):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.first_stage_model.post_quant_conv.weight.mul_(3e4)  # activations beyond float16's 65 504
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model.first_stage_model.half().float()  # weights rounded to float16 values, decoded in float32
    expected = decode_images(model, latents)
    assert torch.isfinite(expected).all()
    model.first_stage_model.half()
    with torch.no_grad():
        assert not torch.isfinite(model.decode_first_stage(latents)).all()
    with caplog.at_level(logging.WARNING):
        images = decode_images(model, latents)
    assert "decoding again in float32" in caplog.text
    assert torch.equal(images, expected)
    assert model.first_stage_dtype == torch.float16  # and the autoencoder is half precision again


def test_decoding_one_image_at_a_time_changes_nothing(tiny_model):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = decode_images(tiny_model, latents)
    assert (decode_images(tiny_model, latents, one_at_a_time=True) - whole).abs().max() < 1e-5
