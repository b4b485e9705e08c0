"""Mask inpainting (ldm.editing.inpainting): the kept region exact in latent space with every sampler and within the
autoencoder's reconstruction error in pixels; an inpainting checkpoint sees the mask and the masked image."""

import numpy as np
import pytest
import torch

from conftest import ROOT
from ldm.data.shapes import Scene, render
from ldm.editing.inpainting import KnownRegion, latent_mask, pixel_mask
from ldm.generation import Geometry, Pipeline, decode_images, encode_images, image_to_tensor
from ldm.models.loading import build_model, load_config, load_model
from ldm.testing.analytic import GaussianLatentDiffusion
from ldm.util import randomize_parameters_

INPAINTING_TINY = ROOT / "configs/stable-diffusion/v1-inpainting-tiny.yaml"
SAMPLERS = ["ddim", "plms", "dpm_solver", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE"]


def square_mask(size: int, low: int, high: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[low:high, low:high] = 1
    return mask


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_outside_the_mask_the_prediction_denoises_to_the_known_latent(parameterization):
    """x̂_0 = (x − σ·ε̂)/α of the wrapped prediction is z_0 outside the mask, at integer and real timesteps; inside,
    the prediction is the model's own."""
    model = GaussianLatentDiffusion(parameterization=parameterization)
    generator = torch.Generator().manual_seed(0)
    known = torch.randn(1, 2, 4, 4, generator=generator, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :] = 1
    wrapped = KnownRegion(model, known, mask)
    x = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([999.0, 500.0, 37.25], dtype=torch.float64)
    out, plain = wrapped.apply_model(x, t, None), model.apply_model(x, t, None)
    alpha, sigma = wrapped._alpha_sigma(t, x)
    if parameterization == "v":  # ε = α·v + σ·x
        out, plain = alpha * out + sigma * x, alpha * plain + sigma * x
    x0 = (x - sigma * out) / alpha
    torch.testing.assert_close(x0[..., 2:, :], known.expand(3, -1, -1, -1)[..., 2:, :], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[..., :2, :], plain[..., :2, :])
    assert wrapped.parameterization == parameterization and wrapped.alphas_cumprod is model.alphas_cumprod


def test_masks_mark_every_latent_pixel_a_masked_pixel_falls_in():
    mask = torch.zeros(64, 64)
    mask[10, 40] = 1.0  # one pixel
    mask[48:, :16] = 0.6  # above the threshold of ½
    mask[:8, :8] = 0.4  # below it
    binary = pixel_mask(mask, (64, 64))
    assert binary.shape == (1, 1, 64, 64) and set(binary.unique().tolist()) == {0.0, 1.0}
    latent = latent_mask(binary, 8)[0, 0]
    assert latent[1, 5] == 1 and latent[6:, :2].all() and latent[0, 0] == 0
    assert latent.sum() == 1 + 4
    assert pixel_mask(np.ones((8, 4)), (16, 8)).all()


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model):
    return Pipeline(tiny_model, Geometry.of(load_config(ROOT / "configs/stable-diffusion/v1-tiny.yaml")))


@pytest.fixture(scope="module")
def inpainting_pipeline():
    model = randomize_parameters_(build_model(INPAINTING_TINY), seed=5).eval()
    return Pipeline(model, Geometry.of(load_config(INPAINTING_TINY)))


def latents_of(pipeline, monkeypatch) -> list[torch.Tensor]:
    """The latents each call decodes (the pipeline's last step), captured on their way to the decoder."""
    seen = []
    checked = pipeline._checked_images

    def capture(latents):
        seen.append(latents.clone())
        return checked(latents)
    monkeypatch.setattr(pipeline, "_checked_images", capture)
    return seen


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("which", ["text-to-image", "inpainting"])
def test_every_sampler_keeps_the_unmasked_latent_exactly_and_repaints_the_masked_one(
        sampler, which, tiny_pipeline, inpainting_pipeline, monkeypatch):
    pipeline = tiny_pipeline if which == "text-to-image" else inpainting_pipeline
    monkeypatch.setattr(pipeline, "sampler", pipeline._make_sampler(pipeline.model))
    monkeypatch.setitem(pipeline._sampler_choice, "name", sampler)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = square_mask(64, 16, 48)
    seen = latents_of(pipeline, monkeypatch)
    known = encode_images(pipeline.model, image, torch.Generator().manual_seed(2))
    result = pipeline.inpaint(image, mask, ["a cat", "a dog"], steps=6, generator=torch.Generator().manual_seed(2))
    latents = seen[-1]
    latent = result.mask
    assert latent.shape == (8, 8) and latent.sum() == 16
    keep = latent == 0
    assert torch.equal(latents[:, :, keep], known.expand(2, -1, -1, -1)[:, :, keep])
    assert (latents[:, :, ~keep] - known[:, :, ~keep]).abs().mean() > 0.1
    assert not torch.equal(latents[0], latents[1])  # each prompt its own picture


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_an_inpainting_checkpoint_sees_the_mask_and_the_masked_image(strength, inpainting_pipeline, monkeypatch):
    """Channels 4 and 5–8 of every UNet call (conditional and unconditional alike): the latent mask and the latent
    of the image with its masked pixels zeroed (the original's ``make_batch_sd``)."""
    model = inpainting_pipeline.model
    inputs = []
    unet = model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = square_mask(64, 0, 20)
    try:
        inpainting_pipeline.inpaint(image, mask, "a cat", steps=4, strength=strength,
                                    generator=torch.Generator().manual_seed(4))
    finally:
        handle.remove()
    generator = torch.Generator().manual_seed(4)  # the call's draws in its order: the photo's posterior, then this
    encode_images(model, image, generator)
    expected = model.get_first_stage_encoding(model.encode_first_stage(image * (1 - mask)), generator)
    latent = latent_mask(mask[None, None], 8)
    assert inputs and all(x.shape == (2, 9, 8, 8) for x in inputs)  # guided: [uncond, cond]
    for x in inputs:
        assert torch.equal(x[:, 4:5], latent.expand(2, -1, -1, -1))
        torch.testing.assert_close(x[:, 5:], expected.expand(2, -1, -1, -1))


def test_on_the_demo_model_the_kept_pixels_differ_only_by_the_autoencoders_error():
    """The corner holding the shape repainted with another shape: outside the repainted latent pixels (less a
    margin of the decoder's reach, 2 latent pixels) the picture differs from the input about as much as the
    autoencoder's own reconstruction does; inside it changes. (The model draws one shape per picture, so the
    repainted corner holds the shape: a second shape beside a kept one is not drawn.)"""
    config = ROOT / "configs/demo/shapes-inference.yaml"
    model = load_model(config, ROOT / "models/demo/shapes.safetensors")
    pipeline = Pipeline(model, Geometry.of(load_config(config)), sampler="dpm_solver")
    picture = render(Scene("red", "circle", "small", "in the bottom right corner", "light blue", False, (0.0, 0.0),
                           0.3))
    image = image_to_tensor(picture, 4)
    mask = square_mask(64, 32, 64)
    result = pipeline.inpaint(image, mask, "a small yellow star in the bottom right corner on a light blue background",
                              steps=20, generator=torch.Generator().manual_seed(0))
    reconstruction = decode_images(model, encode_images(model, image, torch.Generator().manual_seed(0)))
    original = (image + 1) / 2
    kept = torch.ones(64, 64, dtype=torch.bool)
    kept[32 - 8:, 32 - 8:] = False
    inpaint_error = (result.images[0] - original[0])[:, kept].abs().mean().item()
    vae_error = (reconstruction[0] - original[0])[:, kept].abs().mean().item()
    print(f"kept region: inpainting {inpaint_error * 255:.2f}/255, autoencoder {vae_error * 255:.2f}/255")
    assert inpaint_error <= 1.5 * vae_error + 1 / 255
    assert (result.images[0] - original[0])[:, 32:, 32:].abs().mean() > 0.05
