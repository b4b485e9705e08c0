"""The one checkpoint loader: .ckpt and .safetensors, safe unpickling, clear errors, no wasted initialisation."""

import logging
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from conftest import TINY_CONFIG, V1_CONFIG
from ldm.generation import decode_images
from ldm.models.loading import (CheckpointError, ConfigError, build_model, load_config, load_model, load_vae,
                                read_checkpoint)
from ldm.testing.diffusers_interop import diffusers_pipeline
from ldm.util import InputError, randomize_parameters_


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_model):
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_state_dict, tmp_path_factory):
    """A checkpoint shaped like the original's: Lightning wrapper, callback class as a key, NumPy scalars."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": tiny_state_dict, "global_step": 470000, "epoch": np.int64(6),
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.12), "monitor": "val/loss",
                                                "current_score": np.float64(0.13)}}}, path)
    return path


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, tensor in state_dict.items():
        assert torch.equal(ours[key], tensor), key


def test_ckpt_and_safetensors_give_identical_models(tiny_ckpt, tiny_state_dict, tmp_path, caplog):
    safetensors_path = tmp_path / "model.safetensors"
    save_file(tiny_state_dict, safetensors_path)
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        from_ckpt = load_model(TINY_CONFIG, tiny_ckpt)
    assert "Global Step: 470000" in caplog.text
    from_safetensors = load_model(TINY_CONFIG, safetensors_path)
    assert_same_weights(from_ckpt, tiny_state_dict)
    assert_same_weights(from_safetensors, tiny_state_dict)
    assert not from_ckpt.training
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), from_ckpt.get_learned_conditioning(["a cat"])
    with torch.no_grad():  # equal weights; kernels may round differently on differently aligned memory
        torch.testing.assert_close(from_ckpt.apply_model(x, t, context), from_safetensors.apply_model(x, t, context),
                                   rtol=0, atol=1e-5)


def test_loading_initialises_no_weights(tiny_ckpt, monkeypatch):
    def refuse(tensor, *args, **kwargs):
        assert tensor.is_meta, "a real tensor was initialised before being overwritten"
        return tensor

    for name in ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    monkeypatch.setattr(torch.Tensor, "normal_", lambda tensor, *a, **k: refuse(tensor))
    load_model(TINY_CONFIG, tiny_ckpt)


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tiny_state_dict, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state_dict, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="could run code") as error:
        load_model(TINY_CONFIG, path)
    assert "\n" not in str(error.value) and "posix.system" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated ckpt", "truncated safetensors", "random bytes", "empty", "text"])
def test_a_damaged_file_gives_a_one_line_error(damage, tiny_ckpt, tiny_state_dict, tmp_path):
    path = tmp_path / "model.ckpt"
    if damage == "truncated ckpt":
        data = tiny_ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "truncated safetensors":
        save_file(tiny_state_dict, tmp_path / "full.safetensors")
        data = (tmp_path / "full.safetensors").read_bytes()
        path = tmp_path / "model.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("model:\n  target: not a checkpoint\n")
    with pytest.raises(CheckpointError) as error:
        load_model(TINY_CONFIG, path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_missing_checkpoint_or_config_is_a_clear_error(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(TINY_CONFIG, tmp_path / "nope.ckpt")
    with pytest.raises(ConfigError, match="not found"):
        load_model(tmp_path / "nope.yaml", tiny_ckpt)


def test_a_checkpoint_that_matches_nothing_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="matches none"):
        load_model(TINY_CONFIG, path)


def test_a_checkpoint_for_another_architecture_names_the_mismatch(tiny_ckpt):
    with pytest.raises(CheckpointError, match="does not fit this config"):
        load_model(V1_CONFIG, tiny_ckpt)


def test_ema_weights_and_position_ids_are_skipped_and_reported(tiny_state_dict, tmp_path, caplog):
    state_dict = dict(tiny_state_dict)
    state_dict["model_ema.diffusion_modelout2bias"] = torch.zeros(4)
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 1e-4
    state_dict["some.unknown.weight"] = torch.zeros(1)
    path = tmp_path / "full-ema.safetensors"
    save_file(state_dict, path)
    with caplog.at_level(logging.INFO):
        model = load_model(TINY_CONFIG, path)
    assert "1 unexpected, 2 skipped" in caplog.text and "some.unknown.weight" in caplog.text
    position_ids = model.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert torch.equal(position_ids, torch.arange(77)[None])


@pytest.mark.parametrize("kept, lacking", [
    ("model.diffusion_model.out.2.weight", "UNet"),  # 1 tensor of 912
    ("first_stage_model.", "UNet"),
    ("model.diffusion_model.", "VAE"),
])
def test_a_checkpoint_lacking_weights_is_refused_naming_the_parts(kept, lacking, tiny_state_dict, tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tiny_state_dict.items() if k.startswith(kept)}, path)
    with pytest.raises(CheckpointError, match=f"partial.safetensors lacks weights the model needs: .*{lacking} "):
        load_model(TINY_CONFIG, path)


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; give the checkpoint file in it"):
        load_model(TINY_CONFIG, tmp_path)


def test_a_partial_load_keeps_an_initialisation_when_asked(tiny_state_dict, tmp_path, caplog):
    state_dict = {k: v for k, v in tiny_state_dict.items() if not k.startswith("first_stage_model.decoder.")}
    path = tmp_path / "partial.safetensors"
    save_file(state_dict, path)
    model = load_model(TINY_CONFIG, path, allow_partial=True)
    assert "lacks VAE (" in caplog.text
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.state_dict()["model.diffusion_model.out.2.weight"],
                       tiny_state_dict["model.diffusion_model.out.2.weight"])


def test_half_checkpoint_loads_into_the_requested_dtype_with_a_float32_schedule(tiny_state_dict, tmp_path):
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict.items()}, path)
    model = load_model(TINY_CONFIG, path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    bf16 = load_model(TINY_CONFIG, path, dtype=torch.bfloat16)
    assert bf16.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert bf16.alphas_cumprod.dtype == torch.float32
    with torch.no_grad():
        out = bf16.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), bf16.get_learned_conditioning([""]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_raw_state_dict_without_wrapper_loads(tiny_state_dict, tmp_path):
    path = tmp_path / "raw.pt"
    torch.save(tiny_state_dict, path)
    assert read_checkpoint(path).global_step is None
    assert_same_weights(load_model(TINY_CONFIG, path), tiny_state_dict)


def test_config_may_only_build_ldm_and_torch_nn_classes(tmp_path):
    config = TINY_CONFIG.read_text().replace("target: torch.nn.Identity", "target: os.system")
    path = tmp_path / "evil.yaml"
    path.write_text(config)
    with pytest.raises(ConfigError, match="os.system"):
        build_model(path)


PAYLOAD = "{target: os.system, params: {command: 'touch PWNED'}}"
HOSTILE_CONFIGS = {
    # an interpolation resolves to a target that the config's own text never names where it is built
    "interpolation": lambda text: text.replace("        lossconfig:\n          target: torch.nn.Identity",
                                               "        lossconfig: ${payload}") + f"payload: {PAYLOAD}\n",
    # a resolver that turns a string into a mapping
    "decoded string": lambda text: text.replace(
        "        lossconfig:\n          target: torch.nn.Identity",
        "        lossconfig: '${oc.decode:\"{target: os.system, params: {command: touch PWNED}}\"}'"),
    # nested deep inside a list, and outside the model section
    "nested in a list": lambda text: text + f"extras:\n  - name: a\n    parts: [1, {{inner: {PAYLOAD}}}]\n",
    "a non-string target": lambda text: text.replace("target: torch.nn.Identity", "target: [os.system]"),
}


@pytest.mark.parametrize("variant", sorted(HOSTILE_CONFIGS))
def test_no_config_runs_code_however_it_hides_the_target(variant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_CONFIGS[variant](TINY_CONFIG.read_text()))
    with pytest.raises(ConfigError, match="only ldm.* and torch.nn.*"):
        build_model(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_config_is_resolved_once_and_names_what_it_lacks(tmp_path):
    path = tmp_path / "interpolated.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("ch: 32", "ch: ${width}") + "width: 32\n")
    config = load_config(path)
    assert config.model.params.first_stage_config.params.ddconfig.ch == 32  # a plain value now
    path.write_text(TINY_CONFIG.read_text().replace("ch: 32", "ch: ${missing_key}"))
    with pytest.raises(ConfigError, match="cannot resolve config"):
        load_config(path)
    path.write_text(TINY_CONFIG.read_text().replace("target: torch.nn.Identity", "target: ldm.models.NoSuchThing"))
    with pytest.raises(InputError, match="does not exist"):
        build_model(path)


@pytest.mark.parametrize("layout", ["bare", "first_stage_model"])
@torch.no_grad()
def test_a_separate_vae_replaces_the_autoencoder_and_decodes_as_diffusers(layout, tiny_ckpt, tmp_path):
    other = randomize_parameters_(build_model(TINY_CONFIG), seed=11).first_stage_model.state_dict()
    prefix = "" if layout == "bare" else "first_stage_model."
    save_file({prefix + key: value.contiguous() for key, value in other.items()} | {"loss.logvar": torch.zeros(())},
              tmp_path / "vae.safetensors")
    model = load_model(TINY_CONFIG, tiny_ckpt)
    unet_before = model.model.state_dict()["diffusion_model.out.2.weight"].clone()
    load_vae(model, tmp_path / "vae.safetensors")
    assert all(torch.equal(value, other[key]) for key, value in model.first_stage_model.state_dict().items())
    assert torch.equal(model.model.state_dict()["diffusion_model.out.2.weight"], unet_before)
    theirs = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), original_config=str(TINY_CONFIG),
                                            local_files_only=True).eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = decode_images(model, latents)
    reference = ((theirs.decode(latents / model.scale_factor).sample + 1) / 2).clamp(0, 1)
    assert (ours - reference).abs().max() <= 1e-5


def test_a_vae_of_another_shape_or_no_vae_is_refused(tiny_ckpt, tmp_path):
    model = load_model(TINY_CONFIG, tiny_ckpt)
    demo = build_model(TINY_CONFIG.parents[1] / "demo/shapes-inference.yaml").first_stage_model.state_dict()
    save_file({key: value.contiguous() for key, value in demo.items()}, tmp_path / "demo-vae.safetensors")
    with pytest.raises(CheckpointError, match="lacks|another shape"):
        load_vae(model, tmp_path / "demo-vae.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, tmp_path / "unet-only.safetensors")
    with pytest.raises(CheckpointError, match="holds no VAE weights"):
        load_vae(model, tmp_path / "unet-only.safetensors")


def test_a_diffusers_folder_and_a_hub_snapshot_load_every_tensor_equal(tiny_model, tiny_original_config, tmp_path):
    folder = tmp_path / "tiny-diffusers"
    diffusers_pipeline(tiny_model, tiny_original_config).save_pretrained(folder)
    assert (folder / "model_index.json").is_file()
    loaded = load_model(TINY_CONFIG, folder)
    ours = tiny_model.state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in loaded.state_dict().items()
               if not key.endswith("position_ids"))
    repository = tmp_path / "hub" / "models--someone--tiny"  # a Hugging Face cache copy of the same folder
    (repository / "snapshots").mkdir(parents=True)
    folder.rename(repository / "snapshots" / "0123abc")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0123abc")
    again = load_model(TINY_CONFIG, repository)
    assert torch.equal(again.state_dict()[ATTENTION_KEY], ours[ATTENTION_KEY])


ATTENTION_KEY = "first_stage_model.decoder.mid.attn_1.q.weight"  # a 1×1 convolution here, a linear layer there


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match="is a directory; give the checkpoint file in it .* or a diffusers"):
        load_model(TINY_CONFIG, tmp_path / "random")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no unet weights"):
        load_model(TINY_CONFIG, tmp_path / "partial")


def test_a_full_checkpoint_gives_its_ema_weights_when_asked(tiny_state_dict, tmp_path):
    model = build_model(TINY_CONFIG, meta=True)
    shadows = {"model_ema." + name.replace(".", ""): torch.full(value.shape, 0.5)
               for name, value in model.model.named_parameters()}
    save_file({**tiny_state_dict, **shadows}, tmp_path / "full.safetensors")
    plain = load_model(TINY_CONFIG, tmp_path / "full.safetensors")
    averaged = load_model(TINY_CONFIG, tmp_path / "full.safetensors", ema=True)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(plain.state_dict()[key], tiny_state_dict[key])
    assert (averaged.state_dict()[key] == 0.5).all()
    assert torch.equal(averaged.state_dict()["first_stage_model.decoder.conv_out.weight"],
                       tiny_state_dict["first_stage_model.decoder.conv_out.weight"])
    save_file(tiny_state_dict, tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_model(TINY_CONFIG, tmp_path / "pruned.safetensors", ema=True)


CONFIGS = TINY_CONFIG.parent


@pytest.mark.parametrize("checkpoint_config, config, hint", [
    ("v2-tiny-v.yaml", "v1-tiny.yaml", r"checkpoint is an SD 2.x model \(OpenCLIP.*config builds an SD v1 model.*"
                                       r"v2-inference-v.yaml.*v2-inference.yaml"),
    ("v1-tiny.yaml", "v2-tiny.yaml", "checkpoint is an SD v1 model .*SD 2.x.*--config configs/stable-diffusion/"
                                     r"v1-inference.yaml$"),
    ("v1-inpainting-tiny.yaml", "v1-tiny.yaml", "checkpoint is an SD v1 inpainting model .*"
                                                "v1-inpainting-inference.yaml"),
    ("v1-tiny.yaml", "v1-inpainting-tiny.yaml", "checkpoint is an SD v1 model .*builds an SD v1 inpainting model"
                                                r".*v1-inference.yaml$")])
def test_a_checkpoint_of_another_family_is_refused_naming_the_config(checkpoint_config, config, hint, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(CONFIGS / checkpoint_config).state_dict().items()}, path)
    with pytest.raises(CheckpointError, match=hint) as error:
        load_model(CONFIGS / config, path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["v2-tiny.yaml", "v2-tiny-v.yaml", "v1-inpainting-tiny.yaml"])
def test_sd2_and_inpainting_checkpoints_load_whole(name, tmp_path, caplog):
    model = randomize_parameters_(build_model(CONFIGS / name), seed=4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        loaded = load_model(CONFIGS / name, path)
    assert "0 missing, 0 unexpected, 0 skipped" in caplog.text
    assert_same_weights(loaded, model.state_dict())


def test_a_zero_terminal_snr_config_keeps_its_schedule_over_the_checkpoints(tiny_state_dict, tmp_path, caplog):
    """Fine-tunes trained on the rescaled schedule carry the SD schedule buffers they started from: the config's
    ``zero_terminal_snr`` decides, and the file's buffers are reported as skipped."""
    config = load_config(TINY_CONFIG)
    config.model.params.update(parameterization="v", zero_terminal_snr=True)
    path = tmp_path / "zsnr-fine-tune.safetensors"
    save_file(tiny_state_dict, path)
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        model = load_model(config, path)
    assert "0 missing, 0 unexpected, 12 skipped" in caplog.text
    assert model.alphas_cumprod[-1].item() == 2.0 ** -24 != tiny_state_dict["alphas_cumprod"][-1].item()
    torch.testing.assert_close(model.alphas_cumprod, build_model(config).alphas_cumprod)
    assert torch.equal(model.model.diffusion_model.out[2].weight,
                       tiny_state_dict["model.diffusion_model.out.2.weight"])
