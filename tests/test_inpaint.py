"""scripts/inpaint.py on tiny configs: an inpainting checkpoint and a text-to-image one, every sampler, bad input."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script
from ldm.models.loading import build_model
from ldm.util import randomize_parameters_

inpaint = load_script("inpaint")
INPAINTING_TINY = ROOT / "configs/stable-diffusion/v1-inpainting-tiny.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(data.rocket()).resize((128, 96)).save(folder / "rocket.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(folder / "square.png")
    model = randomize_parameters_(build_model(INPAINTING_TINY), seed=6)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "inpainting.safetensors")
    return folder


def run(outdir, inputs, *extra: str, config=INPAINTING_TINY, checkpoint=None) -> list[str]:
    checkpoint = checkpoint or inputs / "inpainting.safetensors"
    return ["--config", str(config), "--ckpt", str(checkpoint), "--init-img", str(inputs / "rocket.png"),
            "--mask", str(inputs / "mask.png"), "--ddim_steps", "4", "--outdir", str(outdir), "--device", "cpu",
            "--no_safety_checker", "--prompt", "a red balloon", *extra]


def test_defaults_are_runwayml_inpainting_from_pure_noise():
    args = inpaint.parse_args([])
    assert args.config == "configs/stable-diffusion/v1-inpainting-inference.yaml"
    assert (args.strength, args.scale, args.n_samples, args.n_iter, args.ddim_steps) == (1.0, 7.5, 1, 1, 50)


@pytest.mark.parametrize("sampler", [[], ["--plms"], ["--dpm_solver"], ["--sampler", "DPM++ 2M Karras"]])
def test_writes_reproducible_inpaintings_that_keep_the_unmasked_region(sampler, tmp_path, inputs):
    for name in ("a", "b"):
        assert inpaint.main(run(tmp_path / name, inputs, "--n_samples", "2", *sampler)) == 0
    first = np.asarray(Image.open(tmp_path / "a" / "samples" / "00000.png"), dtype=np.float32)
    assert first.shape == (64, 128, 3)  # 128×96 rounded down to multiples of 64 (the mask drawn on 128×96)
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "b" / "samples" / "00000.png"), dtype=np.float32))
    second = np.asarray(Image.open(tmp_path / "a" / "samples" / "00001.png"), dtype=np.float32)
    assert not np.array_equal(first, second)
    text = Image.open(tmp_path / "a" / "samples" / "00000.png").text
    assert text["mask"] == "mask.png" and text["init_image"] == "rocket.png" and text["strength"] == "1.0"
    assert (tmp_path / "a" / "grid-0000.png").exists()


def test_a_text_to_image_checkpoint_inpaints_too(tmp_path, inputs, tiny_checkpoint):
    assert inpaint.main(run(tmp_path, inputs, "--strength", "0.8", config=TINY_CONFIG,
                            checkpoint=tiny_checkpoint)) == 0
    assert (tmp_path / "samples" / "00000.png").exists()


@pytest.mark.parametrize("mask, extra, message", [
    (None, [], "--init-img and --mask are required"),
    ("square.png", [], "give a mask with the image's aspect ratio"),
    ("missing.png", [], "missing.png"),
    ("mask.png", ["--strength", "0"], "--strength must be in (0, 1]"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(mask, extra, message, tmp_path, inputs, capsys):
    argv = run(tmp_path / "out", inputs, *extra)
    index = argv.index("--mask")
    argv[index:index + 2] = [] if mask is None else ["--mask", str(inputs / mask)]
    assert inpaint.main(argv) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").iterdir())


def test_an_inpainting_checkpoint_with_a_text_to_image_config_names_the_config(tmp_path, inputs, capsys):
    assert inpaint.main(run(tmp_path, inputs, config=TINY_CONFIG)) == 2
    assert_one_error_line(capsys, "v1-inpainting-inference.yaml")
