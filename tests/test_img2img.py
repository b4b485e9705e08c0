"""scripts/img2img.py on the tiny config: the original's flags, every sampler, size rounding, bad input."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

import compvis_reference
from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script
from ldm.generation import Geometry, load_image
from ldm.models.loading import load_config, load_model

img2img = load_script("img2img")

ORIGINAL_DEFAULTS = dict(
    prompt="a painting of a virus monster playing guitar", init_img=None, outdir="outputs/img2img-samples",
    skip_grid=False, skip_save=False, ddim_steps=50, plms=False, fixed_code=False, ddim_eta=0.0, n_iter=1,
    n_samples=2, n_rows=0, scale=5.0, strength=0.75, from_file=None,
    config="configs/stable-diffusion/v1-inference.yaml", ckpt="models/ldm/stable-diffusion-v1/model.ckpt", seed=42)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "rocket.png"
    Image.fromarray(data.rocket()).resize((100, 140)).save(path)
    return path


def tiny_run(outdir, checkpoint, image, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(checkpoint), "--init-img", str(image), "--ddim_steps", "4",
            "--outdir", str(outdir), "--device", "cpu", "--no_safety_checker", *extra]


def test_defaults_are_the_originals():
    args = img2img.parse_args([])
    assert {key: getattr(args, key) for key in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    # --C and --f default to the config's latent channels and factor: 4 and 8 for v1, the original's defaults
    assert (args.C, args.f) == (None, None)
    geometry = Geometry.of(load_config(ROOT / args.config))
    assert (geometry.latent_channels, geometry.factor) == (4, 8)
    assert not args.dpm_solver and args.negative_prompt == ""
    # the one changed default: float16 weights on GPUs, float32 on the CPU; the original's is --precision autocast
    assert args.precision == "auto" and img2img.parse_args(["--precision", "autocast"]).precision == "autocast"


@pytest.mark.parametrize("sampler", [[], ["--plms"], ["--dpm_solver"], ["--sampler", "DPM++ 2M Karras"],
                                     ["--sampler", "Euler a"], ["--sampler", "Heun"]])
def test_every_sampler_writes_reproducible_samples_rounded_to_64(sampler, tmp_path, tiny_checkpoint, photo, caplog):
    for name in ("a", "b"):
        assert img2img.main(tiny_run(tmp_path / name, tiny_checkpoint, photo, "--strength", "0.5", *sampler)) == 0
    first = np.asarray(Image.open(tmp_path / "a" / "samples" / "00001.png"))
    assert first.shape == (128, 64, 3)  # 100×140 rounded down to multiples of 64
    assert "rocket.png from 100×140 to 64×128" in caplog.text
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "b" / "samples" / "00001.png")))
    text = Image.open(tmp_path / "a" / "samples" / "00000.png").text
    assert text["strength"] == "0.5" and text["init_image"] == "rocket.png" and text["size"] == "64x128"
    assert (tmp_path / "a" / "grid-0000.png").exists()


@pytest.mark.parametrize("model_name", ["tiny", "demo"])
@pytest.mark.parametrize("eta", ["0", "0.5"])
def test_every_batch_of_a_run_is_the_originals_picture(model_name, eta, tmp_path, tiny_checkpoint):
    """CompVis' img2img loop (DDIM, one posterior sample, a fresh noising per batch) from the same seed gives every
    sample of a two-iteration run with a short last batch, up to float32 rounding (≤ 1/255)."""
    config, checkpoint = (TINY_CONFIG, tiny_checkpoint) if model_name == "tiny" else (
        ROOT / "configs/demo/shapes-inference.yaml", ROOT / "models/demo/shapes.safetensors")
    image = tmp_path / "photo.png"  # under 256×256: saved without the watermark the original's img2img lacks
    Image.open(ROOT / "assets" / "diffedit-input.png").resize((128, 96)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    argv = ["--config", str(config), "--ckpt", str(checkpoint), "--init-img", str(image), "--ddim_steps", "6",
            "--strength", "0.6", "--ddim_eta", eta, "--n_iter", "2", "--from-file", str(prompts), "--seed", "3",
            "--outdir", str(tmp_path / "out"), "--device", "cpu", "--no_safety_checker"]
    assert img2img.main(argv) == 0
    init_image = load_image(image, Geometry.of(load_config(config)).multiple)
    expected = compvis_reference.img2img(load_model(config, checkpoint), init_image,
                                         [["a red circle", "a blue square"], ["a green star"]], steps=6, scale=5.0,
                                         eta=float(eta), strength=0.6, n_iter=2, seed=3)
    ours = [np.asarray(Image.open(path)) for path in sorted((tmp_path / "out" / "samples").iterdir())]
    assert len(ours) == len(expected) == 6
    for sample, reference in zip(ours, expected):
        assert np.abs(sample.astype(int) - reference).max() <= 1


def test_strength_one_and_zero_run(tmp_path, tiny_checkpoint, photo):
    for strength in ("0", "1"):
        assert img2img.main(tiny_run(tmp_path / strength, tiny_checkpoint, photo, "--strength", strength)) == 0


@pytest.mark.parametrize("change, message", [
    (["--init-img", "missing.png"], "does not exist"),
    (["--init-img", "NOT_AN_IMAGE"], "NOT_AN_IMAGE is not an image"),
    (["--init-img", "TINY.png"], "at least 64"),
    (["--strength", "1.5"], "--strength must be between 0 and 1"),
    (["--strength", "-0.1"], "--strength must be between 0 and 1"),
    (["--dpm_solver", "--ddim_eta", "0.3"], "--ddim_eta must be 0 with --dpm_solver"),
    (["--f", "4"], "downsampling factor"),
    (["--init-img", "HUGE.png"], "HUGE.png is 6000×3000 (18 Mpx); at most 17 Mpx"),
    (["--strength", "nan"], "argument --strength: must be a finite number"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(change, message, tmp_path, tiny_checkpoint, photo, capsys,
                                                         monkeypatch):
    (tmp_path / "NOT_AN_IMAGE").write_text("hello")
    Image.new("RGB", (40, 200)).save(tmp_path / "TINY.png")
    Image.new("1", (6000, 3000)).save(tmp_path / "HUGE.png")
    monkeypatch.chdir(tmp_path)
    assert img2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, photo) + change) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_16_bit_greyscale_photo_keeps_its_tones(tmp_path, tiny_checkpoint):
    gradient = np.linspace(0, 65535, 64 * 128).reshape(128, 64).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    assert img2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, tmp_path / "grey16.png", "--strength", "0",
                                 "--n_samples", "1")) == 0
    sample = np.asarray(Image.open(tmp_path / "out" / "samples" / "00000.png")).astype(float)
    assert sample.std() > 10 and (sample == 255).mean() < 0.5  # strength 0: the photo, through the autoencoder


def test_init_img_is_required(tmp_path, tiny_checkpoint, capsys):
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path / "out")]
    assert img2img.main(argv) == 2 and "--init-img is required" in capsys.readouterr().err
