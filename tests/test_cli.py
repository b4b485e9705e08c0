"""ldm/cli.py: library errors become one line naming the flag; prompts from a file; the flags every script shares
mean the same in all three."""

import argparse

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CONFIG, load_script
from ldm.cli import PARAMETER_FLAGS, acceleration_from_args, clean_exit, flag_message, prompt_batches
from ldm.models.acceleration import Acceleration
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import InputError, ParameterError

SCRIPTS = {name: load_script(name) for name in ("txt2img", "img2img", "diffedit_inpaint")}


def run(failure: Exception) -> int:
    @clean_exit
    def main(argv):
        raise failure
    return main([])


@pytest.mark.parametrize("failure, line", [
    (ParameterError("steps", "must be at least 2 for DPM-Solver++(2M), got 1"),
     "error: --ddim_steps must be at least 2 for DPM-Solver++(2M), got 1"),
    (ParameterError("height", "must be a positive multiple of 64 for this model, got 100"),
     "error: --H must be a positive multiple of 64 for this model, got 100"),
    (ParameterError("a_new_parameter", "is wrong"), "error: a_new_parameter is wrong"),
    (InputError("checkpoint not found: x.ckpt"), "error: checkpoint not found: x.ckpt"),
])
def test_user_errors_are_one_line_naming_the_flag_and_exit_2(failure, line, capsys):
    assert run(failure) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_safety_checker_message_says_how_to_go_without(capsys):
    message = flag_message(ParameterError("safety_checker", "has no weights: none found, or turn it off"))
    assert message.startswith("--safety_checker has no weights") and message.endswith("with --no_safety_checker")


def test_ctrl_c_exits_130_and_says_nothing_was_half_written(capsys):
    assert run(KeyboardInterrupt()) == 130
    assert "nothing half-written" in capsys.readouterr().err


def test_every_mapped_flag_exists_in_some_script(capsys):
    helps = ""
    for module in SCRIPTS.values():
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        helps += capsys.readouterr().out
    assert all(f"{flag} " in helps or f"[{flag}" in helps for flag in PARAMETER_FLAGS.values())


def test_prompt_batches_from_a_file_skip_blank_lines_and_keep_a_short_last_batch(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one\n\n  two  \nthree\n", encoding="utf-8")
    args = argparse.Namespace(from_file=str(path), n_samples=2, prompt="unused")
    assert prompt_batches(args) == [["one", "two"], ["three"]]
    assert prompt_batches(argparse.Namespace(from_file=None, n_samples=3, prompt="p")) == [["p", "p", "p"]]
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(InputError, match="cannot read --from-file"):
        prompt_batches(args)


def test_cuda_graph_is_left_to_the_device_unless_a_flag_says():
    args = SCRIPTS["txt2img"].parse_args([])
    assert acceleration_from_args(args) == Acceleration(cuda_graph=None)
    args = SCRIPTS["txt2img"].parse_args(["--no-cuda_graph", "--vae_slicing", "--attention_slicing", "64"])
    assert acceleration_from_args(args) == Acceleration(cuda_graph=False, vae_slicing=True, attention_slicing=64)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("slicing", [False, True])
def test_vae_slicing_decodes_one_image_at_a_time_in_every_script(script, slicing, tmp_path, tiny_checkpoint,
                                                                 monkeypatch):
    batches = []
    decode = LatentDiffusion.decode_first_stage

    def counted(self, z):
        batches.append(z.shape[0])
        return decode(self, z)

    monkeypatch.setattr(LatentDiffusion, "decode_first_stage", counted)
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--ddim_steps", "3", "--n_samples", "2",
            "--outdir", str(tmp_path / "out"), "--device", "cpu", "--no_safety_checker",
            *(["--vae_slicing"] * slicing)]
    photo = tmp_path / "photo.png"
    Image.open(ROOT / "assets" / "diffedit-input.png").resize((64, 64)).save(photo)
    argv += {"txt2img": ["--H", "64", "--W", "64", "--n_iter", "1"],
             "img2img": ["--init-img", str(photo), "--n_iter", "1"], "diffedit_inpaint": ["--init-img", str(photo)]}[script]
    with torch.no_grad():
        assert SCRIPTS[script].main(argv) == 0
    assert batches == ([1, 1] if slicing else [2])
