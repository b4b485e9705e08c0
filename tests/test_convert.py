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


def test_a_weighted_sum_merge_is_the_weighted_sum_of_the_two_files(tmp_path, tiny_checkpoint, capsys):
    """AUTOMATIC1111's checkpoint merger, "weighted sum": (1 − M)·A + M·B per weight, checked in float64 against
    the two files as read by safetensors; a ratio outside [0, 1] is one error line."""
    other = tmp_path / "other.safetensors"
    second = randomize_parameters_(build_model(TINY_CONFIG), seed=5).state_dict()
    save_file({key: value.contiguous() for key, value in second.items()}, other)
    out = tmp_path / "merged.safetensors"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--merge", str(other), "--original", str(out)]
    assert convert.main(argv + ["--merge_ratio", "0.3"]) == 0
    merged, first = load_file(out), load_file(tiny_checkpoint)
    weights = [key for key in merged if merged[key].is_floating_point()]
    assert len(weights) > 100
    for key in weights:
        expected = 0.7 * first[key].double() + 0.3 * second[key].double()
        assert torch.allclose(merged[key].double(), expected, rtol=1e-6, atol=1e-7), key
    assert not torch.equal(merged["model.diffusion_model.out.2.weight"], first["model.diffusion_model.out.2.weight"])
    assert convert.main(argv[:-1] + [str(tmp_path / "again.safetensors"), "--merge_ratio", "1.5"]) == 2
    assert_one_error_line(capsys, "--merge_ratio 1.5 is outside [0, 1]")


def test_a_merge_with_a_file_of_another_model_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({key: value for key, value in load_file(tiny_checkpoint).items()
               if key.startswith("model.diffusion_model.")}, unet_only)
    out = tmp_path / "merged.safetensors"
    assert convert.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--merge", str(unet_only),
                         "--original", str(out)]) == 2
    assert_one_error_line(capsys, "lacks weights the model needs")
    assert not out.exists()
