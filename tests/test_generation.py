"""The pipeline: one road for txt2img, img2img and DiffEdit; its precision and memory options on the trained demo
model where numbers matter."""

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CONFIG
from ldm.generation import (Geometry, ImageLatents, Pipeline, activation_bytes, decode_images, load_image,
                            precision_scope, resolve_device, resolve_precision, to_rgb)
from ldm.models.loading import load_config
from ldm.util import InputError, ParameterError
from test_lora import ATTN_Q, FF, kohya_file

DEMO_CONFIG = ROOT / "configs/demo/shapes-inference.yaml"
DEMO_CHECKPOINT = ROOT / "models/demo/shapes.safetensors"
CPU = torch.device("cpu")
# Largest mean |Δ| of a 20-step guided image in [0, 1] against float32 (measured on the demo model: float16
# 3.1e-4, bfloat16 2.2e-3, largest pixel 0.012 / 0.052; half precisions keep 10 and 7 mantissa bits).
IMAGE_TOLERANCE = {"fp16": 3e-3, "bf16": 2e-2}


def render(pipeline: Pipeline, prompts: list[str], steps: int = 20) -> torch.Tensor:
    x_T = pipeline.initial_noise(len(prompts), generator=torch.Generator().manual_seed(0))
    return pipeline.txt2img(prompts, steps=steps, scale=5.0, x_T=x_T).images


def demo_pipeline(precision: str = "full", sampler: str = "dpm_solver") -> Pipeline:
    return Pipeline.from_config(DEMO_CONFIG, DEMO_CHECKPOINT, device="cpu", precision=precision, sampler=sampler)


@pytest.fixture(scope="module")
def float32_images() -> torch.Tensor:
    return render(demo_pipeline(), ["a small red circle at the top", "a large blue square on the left"])


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model, Geometry.of(load_config(TINY_CONFIG)), sampler="ddim")


def test_one_loaded_pipeline_draws_from_several_prompt_lists(tiny_pipeline):
    generator = torch.Generator().manual_seed(0)
    first = tiny_pipeline.txt2img(["a red circle", "a blue square"], steps=3, generator=generator)
    second = tiny_pipeline.txt2img("a green star", steps=3, generator=generator)
    assert first.images.shape == (2, 3, 64, 64) and second.images.shape == (1, 3, 64, 64)  # the native size
    assert first.flagged == second.flagged == 0
    assert 0 <= first.images.min() and first.images.max() <= 1 and first.images.device.type == "cpu"
    again = tiny_pipeline.txt2img(["a red circle", "a blue square"], steps=3,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.images, again.images)


def test_img2img_reuses_one_encoding_or_encodes_each_call(tiny_pipeline):
    photo = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    init = tiny_pipeline.encode(photo.repeat(2, 1, 1, 1), generator=torch.Generator().manual_seed(2))
    assert isinstance(init, ImageLatents) and init.latents.shape == (2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    two = tiny_pipeline.img2img(init, 0.5, ["a", "b"], steps=4, noise=noise)
    one = tiny_pipeline.img2img(init, 0.5, ["a"], steps=4, noise=noise)  # a short batch takes the first ones
    assert two.images.shape == (2, 3, 64, 64) and (one.images[0] - two.images[0]).abs().max() < 1e-4
    from_pixels = tiny_pipeline.img2img(photo, 0.5, ["a", "b"], steps=4, generator=torch.Generator().manual_seed(4))
    assert from_pixels.images.shape == (2, 3, 64, 64)  # one image, shared by both prompts


def test_diffedit_through_the_pipeline(tiny_pipeline):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = tiny_pipeline.diffedit(image, "a red circle", "a blue square", steps=4, n_samples=2,
                                   generator=torch.Generator().manual_seed(3))
    again = tiny_pipeline.diffedit(image, "a red circle", "a blue square", steps=4, n_samples=2,
                                   generator=torch.Generator().manual_seed(3))
    assert first.images.shape == (2, 3, 64, 64) and first.mask.shape == (8, 8) and first.flagged == 0
    assert torch.equal(first.images, again.images)
    user = tiny_pipeline.diffedit(image, "a red circle", "a blue square", steps=4, mask=torch.ones(64, 64),
                                  encode_type="deterministic")
    assert user.mask.eq(1).all()


@pytest.mark.parametrize("call, parameter", [
    (lambda p: p.txt2img("a", steps=3, height=100), "height"),
    (lambda p: p.txt2img("a", steps=3, scale=float("nan")), "scale"),
    (lambda p: p.txt2img([], steps=3), "prompts"),
    (lambda p: p.txt2img(["a", "b", "c"], steps=3, x_T=torch.zeros(2, 4, 8, 8)), "x_T"),
    (lambda p: p.txt2img("a", steps=0), "steps"),
    (lambda p: p.img2img(torch.zeros(1, 3, 64, 64), 1.5, "a", steps=3), "strength"),
    (lambda p: p.img2img(torch.zeros(1, 4, 64, 64), 0.5, "a", steps=3), "images"),
    (lambda p: p.diffedit(torch.zeros(1, 3, 64, 64), "a", "b", encode_ratio=0.0), "encode_ratio"),
    (lambda p: p.diffedit(torch.zeros(1, 3, 64, 64), "a", "b", n_samples=0), "n_samples"),
])
def test_bad_arguments_raise_value_errors_naming_the_parameter(call, parameter, tiny_pipeline):
    with pytest.raises(ParameterError) as error:
        call(tiny_pipeline)
    assert error.value.parameter == parameter and str(error.value).startswith(parameter + " ")
    assert "--" not in str(error.value)  # the library never speaks in command-line flags


def test_from_config_checks_what_needs_no_weights_before_reading_the_checkpoint(tmp_path):
    missing = tmp_path / "missing.ckpt"  # never opened: each of these fails first
    for change, parameter in (({"device": "tpu"}, "device"), ({"precision": "fp8"}, "precision"),
                              ({"sampler": "eulr"}, "sampler"), ({"sampler": "Euler", "schedule": "karas"}, "schedule"),
                              ({"sampler": "Euler a", "eta_ancestral": 2.0}, "eta_ancestral")):
        with pytest.raises(ParameterError) as error:
            Pipeline.from_config(DEMO_CONFIG, missing, **change)
        assert error.value.parameter == parameter


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_auto_precision_is_float16_on_gpus_and_float32_on_the_cpu():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("mps")) == "fp16"
    assert resolve_precision("auto", CPU) == "full"
    assert resolve_precision("autocast", torch.device("cuda")) == "autocast"
    with pytest.raises(ParameterError, match="^precision must be one of"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ParameterError, match="^device must be one of"):
        resolve_device("tpu")
    assert isinstance(precision_scope("autocast", torch.device("cuda"), cuda_graph=True), torch.autocast)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_weights_give_the_float32_images_up_to_rounding(precision, float32_images):
    pipeline = demo_pipeline(precision)
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


def saved(image: Image.Image, path) -> str:
    image.save(path)
    return str(path)


@pytest.mark.parametrize("make, expected_mean", [
    # a 16-bit greyscale gradient keeps its gradient (it was clipped to white)
    (lambda: Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)), 127.5),
    (lambda: Image.fromarray(np.full((64, 64), 0.25, dtype=np.float32), "F"), 63.75),
    (lambda: Image.new("CMYK", (64, 64), (0, 0, 0, 0)), 255.0),
    (lambda: Image.new("LA", (64, 64), (0, 0)), 255.0),  # transparent black on the white background
    (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 128)), 127.0),  # half-transparent black: grey
    (lambda: Image.new("P", (64, 64), 0), 0.0),
])
def test_every_image_mode_becomes_the_rgb_picture_it_shows(make, expected_mean, tmp_path):
    image = make()
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.asarray(rgb, dtype=np.float64).mean() == pytest.approx(expected_mean, abs=1.0)


def test_a_palette_image_with_a_transparent_colour_is_composited(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert np.asarray(to_rgb(image)).min() == 255
    tensor = load_image(saved(image, tmp_path / "p.png"), 64)
    assert tensor.shape == (1, 3, 64, 64) and torch.allclose(tensor, torch.ones_like(tensor))


def test_oversized_images_and_decompression_bombs_are_refused(tmp_path, monkeypatch):
    big = saved(Image.new("1", (5000, 4000)), tmp_path / "big.png")
    with pytest.raises(InputError, match=r"is 5000×4000 \(20 Mpx\); at most 17 Mpx"):
        load_image(big, 64)
    small = saved(Image.new("RGB", (64, 64)), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above this and fails above twice it
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(small, 64)


def test_memory_needs_grow_with_the_batch_and_the_picture():
    config = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    one = activation_bytes(config, 1, 512, 512, "full", guided=True, vae_slicing=False)
    assert 0.5 * 2 ** 30 < one < 4 * 2 ** 30  # SD v1 at 512² holds on the order of a GiB of activations
    assert activation_bytes(config, 4, 512, 512, "full", True, False) == 4 * one
    assert activation_bytes(config, 1, 1024, 1024, "full", True, False) == 4 * one
    assert activation_bytes(config, 1, 512, 512, "fp16", True, False) == one // 2
    assert activation_bytes(config, 4, 512, 512, "full", True, vae_slicing=True) < 4 * one


def test_a_long_prompt_is_guided_separately_or_padded_with_empty_chunks(tiny_pipeline, monkeypatch):
    long_prompt = " ".join(["cat"] * 100)  # two chunks against the negative prompt's one
    contexts = []
    apply_model = tiny_pipeline.model.apply_model
    monkeypatch.setattr(tiny_pipeline.model, "apply_model",
                        lambda x, t, c: contexts.append(tuple(c.shape)) or apply_model(x, t, c))
    separate = tiny_pipeline.txt2img(long_prompt, steps=2, generator=torch.Generator().manual_seed(0)).images
    assert contexts[:2] == [(1, 77, 32), (1, 154, 32)]
    contexts.clear()
    tiny_pipeline.pad_cond_uncond = True
    try:
        padded = tiny_pipeline.txt2img(long_prompt, steps=2, generator=torch.Generator().manual_seed(0)).images
    finally:
        tiny_pipeline.pad_cond_uncond = False
    assert contexts[0] == (2, 154, 32)
    assert separate.shape == padded.shape and not torch.equal(separate, padded)


def test_prompt_loras_are_merged_for_their_calls_and_taken_out_after(tiny_pipeline, tmp_path):
    kohya_file(tmp_path / "ink.safetensors", tiny_pipeline.model, "loha", layers=[ATTN_Q, FF])
    tiny_pipeline.lora_dir = tmp_path
    before = {name: value.clone() for name, value in tiny_pipeline.model.state_dict().items()}
    try:
        tiny_pipeline.txt2img("a circle <lora:ink:0.8>", steps=2)
        assert tiny_pipeline.active_loras == ["ink:0.8"]
        assert not torch.equal(tiny_pipeline.model.state_dict()[ATTN_Q[1]], before[ATTN_Q[1]])
        tiny_pipeline.txt2img("a circle", steps=2)
        assert tiny_pipeline.active_loras == []
        assert all(torch.equal(value, before[name]) for name, value in tiny_pipeline.model.state_dict().items())
        with pytest.raises(InputError, match="<lora:nope>: no nope.safetensors"):
            tiny_pipeline.txt2img("a circle <lora:nope>", steps=2)
    finally:
        tiny_pipeline.lora_dir = Path("models/lora")
