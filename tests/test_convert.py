"""scripts/convert.py: our model as a diffusers folder and as an original-layout .safetensors, and back."""

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG, assert_one_error_line, load_script
from ldm.models.loading import build_model, load_model
from ldm.testing.diffusers_interop import diffusers_pipeline
from ldm.util import randomize_parameters_

convert = load_script("convert")


def test_a_diffusers_folder_diffusers_loads_and_we_load_back_equal(tmp_path, tiny_checkpoint, tiny_model):
    out = tmp_path / "tiny-diffusers"
    assert convert.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--diffusers", str(out)]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    reference = diffusers_pipeline(tiny_model, tiny_model.source_config)  # what diffusers' converters make of ours
    for part in ("unet", "vae", "text_encoder"):  # strict: every weight diffusers loaded is the converted one
        loaded, converted = getattr(pipeline, part).state_dict(), getattr(reference, part).state_dict()
        assert loaded.keys() == converted.keys()
        assert all(torch.equal(loaded[key], converted[key]) for key in loaded)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipeline.unet(latents, torch.tensor([500.0]), encoder_hidden_states=context).sample
        ours = tiny_model.apply_model(latents, torch.tensor([500.0]), context)
    assert (ours - theirs).abs().max() <= 1e-5
    back = load_model(TINY_CONFIG, out).state_dict()
    assert all(torch.equal(value, back[key]) for key, value in tiny_model.state_dict().items()
               if not key.endswith("position_ids"))


def test_a_separate_vae_is_baked_into_the_written_model(tmp_path, tiny_checkpoint):
    vae = randomize_parameters_(build_model(TINY_CONFIG), seed=11).first_stage_model.state_dict()
    save_file({key: value.contiguous() for key, value in vae.items()}, tmp_path / "vae.safetensors")
    out = tmp_path / "with-vae.safetensors"
    assert convert.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--original", str(out),
                         "--vae", str(tmp_path / "vae.safetensors")]) == 0
    written = load_file(out)
    assert all(torch.equal(written["first_stage_model." + key], value) for key, value in vae.items())


def test_an_original_file_in_half_precision_and_no_overwriting(tmp_path, tiny_checkpoint, tiny_model, capsys):
    out = tmp_path / "tiny-fp16.safetensors"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--original", str(out), "--half"]
    assert convert.main(argv) == 0
    tensors = load_file(out)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert torch.equal(tensors["model.diffusion_model.out.2.weight"],
                       tiny_model.state_dict()["model.diffusion_model.out.2.weight"].half())
    assert convert.main(argv) == 2
    assert_one_error_line(capsys, "exists; refusing to overwrite it")
