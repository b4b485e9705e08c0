"""scripts/txt2img.py on the tiny config: the original's flags and files, seeds, safety checker, bad input."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import compvis_reference
from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script
from ldm.generation import Geometry
from ldm.models.loading import build_model, load_config, load_model
from ldm.modules.encoders import modules
from ldm.output import parse_infotext
from ldm.util import randomize_parameters_
from test_lora import ATTN_Q, TEXT_Q, kohya_file

txt2img = load_script("txt2img")

ORIGINAL_DEFAULTS = dict(
    prompt="a painting of a virus monster playing guitar", outdir="outputs/txt2img-samples", skip_grid=False,
    skip_save=False, ddim_steps=50, plms=False, dpm_solver=False, laion400m=False, fixed_code=False, ddim_eta=0.0,
    n_iter=2, n_samples=3, n_rows=0, scale=7.5, from_file=None,
    config="configs/stable-diffusion/v1-inference.yaml", ckpt="models/ldm/stable-diffusion-v1/model.ckpt", seed=42)


def tiny_run(outdir, checkpoint, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(checkpoint), "--H", "64", "--W", "64", "--ddim_steps", "3",
            "--n_samples", "2", "--n_iter", "1", "--outdir", str(outdir), "--device", "cpu", *extra]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_defaults_are_the_originals():
    args = txt2img.parse_args([])
    assert {key: getattr(args, key) for key in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    # --C and --f default to the config's latent channels and factor: 4 and 8 for v1, the original's defaults
    assert (args.C, args.f) == (None, None)
    geometry = Geometry.of(load_config(ROOT / args.config))
    assert (geometry.latent_channels, geometry.factor) == (4, 8)
    # --H and --W default to the config's native size: 512 for v1, as the original's default
    assert (args.H, args.W, geometry.native_size) == (None, None, 512)
    assert Geometry.of(load_config(ROOT / "configs/stable-diffusion/v2-inference-v.yaml")).native_size == 768
    assert args.negative_prompt == "" and args.device == "auto" and not args.no_safety_checker
    # the one changed default: float16 weights on GPUs, float32 on the CPU; the original's is --precision autocast
    assert args.precision == "auto" and txt2img.parse_args(["--precision", "autocast"]).precision == "autocast"


def test_help_lists_every_original_flag():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/txt2img.py"), "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ["--prompt", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms", "--dpm_solver",
                 "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--H", "--W", "--C", "--f", "--n_samples",
                 "--n_rows", "--scale", "--from-file", "--config", "--ckpt", "--seed", "--precision",
                 "--negative_prompt", "--device", "--safety_checker", "--no_safety_checker"]:
        assert f" {flag} " in result.stdout or f"[{flag}" in result.stdout, flag


def test_files_are_numbered_on_across_runs_with_metadata(tmp_path, tiny_checkpoint):
    for _ in range(2):
        assert txt2img.main(tiny_run(tmp_path, tiny_checkpoint, "--no_safety_checker", "--prompt", "a red circle",
                                     "--negative_prompt", "blurry", "--dpm_solver")) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    text = Image.open(tmp_path / "samples" / "00003.png").text
    parameters = text.pop("parameters")
    assert text == {"prompt": "a red circle", "negative_prompt": "blurry", "seed": "42", "sampler": "dpm_solver",
                    "steps": "3", "scale": "7.5", "eta": "0.0", "size": "64x64", "checkpoint": tiny_checkpoint.name,
                    "clip_skip": "1", "index": "1"}
    assert parameters == ("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Uniform, "
                          f"CFG scale: 7.5, Seed: 42, Size: 64x64, Model: {tiny_checkpoint.stem}")
    assert Image.open(tmp_path / "grid-0000.png").size == (2 + 2 * 66, 2 + 66)


def test_grid_rows_follow_batches_when_the_last_batch_is_short(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    assert txt2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--no_safety_checker", "--from-file",
                                 str(prompts), "--n_iter", "2")) == 0  # batches of 2, 1, 2, 1
    grid = pixels(tmp_path / "out" / "grid-0000.png")
    assert grid.shape == (2 + 4 * 66, 2 + 2 * 66, 3)  # a row per batch
    assert (grid[2 + 66:2 + 66 + 64, 2 + 66:2 + 66 + 64] == 0).all()  # the short batch's empty cell is black
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert np.array_equal(grid[2 + 2 * 66:2 + 2 * 66 + 64, 2:2 + 64], pixels(samples[3]))  # iteration 2 starts a row
    assert [Image.open(path).text["index"] for path in samples] == ["0", "1", "2", "3", "4", "5"]


def test_a_short_last_batch_from_file_and_skip_flags(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green star\n")
    assert txt2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--no_safety_checker", "--from-file",
                                 str(prompts))) == 0
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert [Image.open(p).text["prompt"] for p in samples] == ["a red circle", "a blue square", "a green star"]
    assert Image.open(tmp_path / "out" / "grid-0000.png").size == (2 + 2 * 66, 2 + 2 * 66)
    assert txt2img.main(tiny_run(tmp_path / "skip", tiny_checkpoint, "--no_safety_checker", "--skip_save")) == 0
    assert not (tmp_path / "skip" / "samples").exists() and (tmp_path / "skip" / "grid-0000.png").exists()
    assert txt2img.main(tiny_run(tmp_path / "nogrid", tiny_checkpoint, "--no_safety_checker", "--skip_grid")) == 0
    assert len(list((tmp_path / "nogrid" / "samples").iterdir())) == 2 and not list(
        (tmp_path / "nogrid").glob("grid-*"))


@pytest.mark.parametrize("sampler", [[], ["--plms"], ["--dpm_solver"], ["--ddim_eta", "1.0"]])
def test_same_seed_same_pixels_and_different_seed_different_pixels(sampler, tmp_path, tiny_checkpoint):
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--seed", seed,
                                     *sampler)) == 0
        runs[name] = pixels(tmp_path / name / "samples" / "00001.png")
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


DEMO = (ROOT / "configs/demo/shapes-inference.yaml", ROOT / "models/demo/shapes.safetensors")
SAMPLER_FLAGS = {"ddim": [], "plms": ["--plms"], "dpm_solver": ["--dpm_solver"], "ddim_eta": ["--ddim_eta", "0.5"]}


def model_files(name: str, tiny_checkpoint) -> tuple:
    return (TINY_CONFIG, tiny_checkpoint) if name == "tiny" else DEMO


def saved_samples(outdir) -> list[np.ndarray]:
    return [pixels(path) for path in sorted((outdir / "samples").iterdir())]


@pytest.mark.parametrize("model_name", ["tiny", "demo"])
@pytest.mark.parametrize("sampler", sorted(SAMPLER_FLAGS))
def test_every_batch_of_a_run_is_the_originals_picture(model_name, sampler, tmp_path, tiny_checkpoint):
    """Two iterations over three prompts in batches of two (a short last batch): every sample equals the one
    CompVis' loop draws from the same seed (up to float32 rounding, ≤ 1/255), the later batches included."""
    config, checkpoint = model_files(model_name, tiny_checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    argv = ["--config", str(config), "--ckpt", str(checkpoint), "--H", "64", "--W", "64", "--ddim_steps", "5",
            "--n_iter", "2", "--n_samples", "2", "--from-file", str(prompts), "--seed", "11", "--outdir",
            str(tmp_path / "out"), "--device", "cpu", "--no_safety_checker", *SAMPLER_FLAGS[sampler]]
    assert txt2img.main(argv) == 0
    model = load_model(config, checkpoint)
    shape = Geometry.of(load_config(config)).latent_shape(64, 64)
    expected = compvis_reference.txt2img(
        model, [["a red circle", "a blue square"], ["a green star"]], sampler=sampler.removesuffix("_eta"),
        steps=5, scale=7.5, eta=0.5 if sampler == "ddim_eta" else 0.0, n_iter=2, seed=11, latent_shape=shape)
    ours = saved_samples(tmp_path / "out")
    assert len(ours) == len(expected) == 6
    for image, reference in zip(ours, expected):
        assert np.abs(image.astype(int) - reference).max() <= 1


def test_fixed_code_is_the_originals_start_code(tmp_path, tiny_checkpoint):
    argv = tiny_run(tmp_path, tiny_checkpoint, "--no_safety_checker", "--fixed_code", "--n_iter", "2", "--seed", "5")
    assert txt2img.main(argv) == 0
    model = load_model(TINY_CONFIG, tiny_checkpoint)
    expected = compvis_reference.txt2img(model, [2 * [txt2img.parse_args([]).prompt]], sampler="ddim", steps=3,
                                         scale=7.5, eta=0.0, n_iter=2, seed=5, latent_shape=(4, 8, 8),
                                         fixed_code=True)
    for image, reference in zip(saved_samples(tmp_path), expected, strict=True):
        assert np.abs(image.astype(int) - reference).max() <= 1


def test_fixed_code_reuses_one_start_code(tmp_path, tiny_checkpoint):
    assert txt2img.main(tiny_run(tmp_path / "fixed", tiny_checkpoint, "--no_safety_checker", "--fixed_code",
                                 "--n_iter", "2")) == 0
    assert np.array_equal(pixels(tmp_path / "fixed/samples/00000.png"), pixels(tmp_path / "fixed/samples/00002.png"))
    assert txt2img.main(tiny_run(tmp_path / "free", tiny_checkpoint, "--no_safety_checker", "--n_iter", "2")) == 0
    assert not np.array_equal(pixels(tmp_path / "free/samples/00000.png"),
                              pixels(tmp_path / "free/samples/00002.png"))


def test_the_safety_checker_replaces_what_it_flags_and_says_so(tmp_path, tiny_checkpoint, flagging_checker,
                                                               passing_checker, caplog):
    assert txt2img.main(tiny_run(tmp_path / "plain", tiny_checkpoint, "--no_safety_checker")) == 0
    assert txt2img.main(tiny_run(tmp_path / "passed", tiny_checkpoint, "--safety_checker", str(passing_checker))) == 0
    assert np.array_equal(pixels(tmp_path / "plain/samples/00000.png"), pixels(tmp_path / "passed/samples/00000.png"))
    assert txt2img.main(tiny_run(tmp_path / "flagged", tiny_checkpoint, "--safety_checker",
                                 str(flagging_checker))) == 0
    assert "replaced 2 of 2 images" in caplog.text and "black image" not in caplog.text
    placeholder = pixels(tmp_path / "flagged/samples/00000.png").astype(int)
    assert placeholder.std() < 20 and abs(placeholder.mean() - 128) < 10  # the neutral grey placeholder


@pytest.mark.parametrize("change, message", [
    (["--ckpt", "missing.ckpt"], "checkpoint not found"),
    (["--ckpt", "NOT_A_CHECKPOINT"], "not a PyTorch or safetensors file"),
    (["--config", "missing.yaml"], "config not found"),
    (["--H", "100"], "--H must be a positive multiple of 64"),
    (["--W", "0"], "--W must be a positive multiple of 64"),
    (["--C", "8"], "--C 8 does not match the model's 4 latent channels"),
    (["--ddim_steps", "0"], "--ddim_steps must be a positive"),
    (["--ddim_steps", "5000"], "at most 1000"),
    (["--n_samples", "0"], "--n_samples must be a positive"),
    (["--n_iter", "-1"], "--n_iter must be a positive"),
    (["--scale", "-2"], "--scale must be between 0 and 100"),
    (["--scale", "1e30"], "--scale must be between 0 and 100"),
    (["--scale", "nan"], "argument --scale: must be a finite number"),
    (["--scale", "inf"], "argument --scale: must be a finite number"),
    (["--ddim_eta", "nan"], "argument --ddim_eta: must be a finite number"),
    (["--ddim_eta", "2"], "--ddim_eta must be between 0 and 1"),
    (["--dpm_solver", "--ddim_steps", "1"], "--ddim_steps must be at least 2 for DPM-Solver++(2M)"),
    (["--prompt"], "--prompt needs a value"),
    (["--outdir"], "--outdir needs a value"),
    (["--outdir", ""], "--outdir must name a directory"),
    (["--outdir", "/proc/ldm-test"], "cannot write to /proc/ldm-test"),
    (["--n_samples", "two"], "argument --n_samples: invalid int value"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--H", "99968", "--W", "99968"], "image(s) of 99968×99968 at once need about"),
    (["--n_samples", "200000"], "lower --n_samples or --H/--W"),
    (["--ckpt", "."], "is a directory; give the checkpoint file in it"),
    (["--config", "NO_FIRST_STAGE.yaml"], "not a latent-diffusion model config"),
    (["--config", "MISSING_CLASS.yaml"], "config names 'ldm.modules.encoders.modules.NoSuchEncoder', which does not"),
    (["--config", "HOSTILE.yaml"], "only ldm.* and torch.nn.* classes"),
    (["--plms", "--ddim_eta", "0.5"], "--ddim_eta must be 0 with --plms"),
    (["--from-file", "missing.txt"], "cannot read --from-file"),
    (["--from-file", "EMPTY"], "contains no prompts"),
    (["--outdir", "A_FILE/out"], "not a directory"),
    (["--seed", "-2"], "--seed must be between"),
    (["--laion400m"], "LAION-400M"),
    (["--cuda_graph"], "--cuda_graph needs a CUDA device"),
    (["--attention_slicing", "-1"], "--attention_slicing must be 0 (off) or a positive"),
    ([], "no safety checker weights found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(change, message, tmp_path, tiny_checkpoint, capsys,
                                                         monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "NOT_A_CHECKPOINT").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "A_FILE").write_text("")
    (tmp_path / "HOSTILE.yaml").write_text(TINY_CONFIG.read_text().replace(
        "        lossconfig:\n          target: torch.nn.Identity", "        lossconfig: ${payload}")
        + "payload: {target: os.system, params: {command: 'touch PWNED'}}\n")
    (tmp_path / "MISSING_CLASS.yaml").write_text(TINY_CONFIG.read_text().replace(
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "ldm.modules.encoders.modules.NoSuchEncoder"))
    (tmp_path / "NO_FIRST_STAGE.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    unet_config: {}\n")
    monkeypatch.chdir(tmp_path)
    argv = tiny_run(tmp_path / "out", tiny_checkpoint) + change
    if change:
        argv.append("--no_safety_checker")
    assert txt2img.main(argv) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()


def test_an_unusable_output_folder_is_found_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("ldm.generation.Pipeline.from_config", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples").write_text("a file where the samples go")
    assert txt2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--no_safety_checker")) == 2
    assert "samples is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples"]


def test_a_random_seed_is_picked_reported_and_recorded(tmp_path, tiny_checkpoint, caplog):
    assert txt2img.main(tiny_run(tmp_path, tiny_checkpoint, "--no_safety_checker", "--seed", "-1")) == 0
    seed = Image.open(tmp_path / "samples" / "00000.png").text["seed"]
    assert 0 <= int(seed) < 2 ** 32
    summary = [record.getMessage() for record in caplog.records if "sampler" in record.getMessage()]
    assert summary == [f"{tiny_checkpoint.name} (v1-tiny.yaml): DDIM sampler, 3 steps, 64×64, seed {seed}, cpu, "
                       "precision full"]


def test_speed_and_memory_flags_run(tmp_path, tiny_checkpoint):
    argv = tiny_run(tmp_path, tiny_checkpoint, "--precision", "bf16", "--attention_slicing", "8", "--vae_slicing",
                    "--no-winograd", "--no-cuda_graph", "--no_safety_checker", "--skip_grid")
    assert txt2img.main(argv) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_as_a_user_runs_it(tmp_path, tiny_checkpoint):
    command = [sys.executable, str(ROOT / "scripts/txt2img.py"), *tiny_run(tmp_path, tiny_checkpoint)]
    bad = subprocess.run(command + ["--no_safety_checker", "--H", "96"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    good = subprocess.run(command + ["--no_safety_checker", "--dpm_solver"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ready and waiting" in good.stdout and len(list((tmp_path / "samples").iterdir())) == 2


def test_the_parameters_text_draws_the_same_picture_again(tmp_path, tiny_checkpoint):
    argv = tiny_run(tmp_path / "first", tiny_checkpoint, "--no_safety_checker", "--n_samples", "1", "--dpm_solver",
                    "--prompt", "a (red:1.2) circle, [small]", "--negative_prompt", "blurry", "--seed", "5",
                    "--scale", "6", "--clip_skip", "2", "--skip_grid")
    assert txt2img.main(argv) == 0
    first = tmp_path / "first" / "samples" / "00000.png"
    again = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--from-png", str(first), "--n_iter", "1",
             "--n_samples", "1", "--outdir", str(tmp_path / "again"), "--device", "cpu", "--no_safety_checker",
             "--skip_grid"]
    assert txt2img.main(again) == 0
    second = tmp_path / "again" / "samples" / "00000.png"
    assert np.array_equal(pixels(first), pixels(second))
    assert Image.open(second).text["parameters"] == Image.open(first).text["parameters"]
    assert "Clip skip: 2" in Image.open(first).text["parameters"]


def test_emphasis_none_keeps_brackets_as_text_and_bracket_free_prompts_draw_the_same(tmp_path, tiny_checkpoint):
    def draw(name, prompt, *extra):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--n_samples", "1",
                                     "--prompt", prompt, "--skip_grid", *extra)) == 0
        return pixels(tmp_path / name / "samples" / "00000.png")

    assert np.array_equal(draw("plain", "a red circle"), draw("plain-none", "a red circle", "--emphasis", "none"))
    assert not np.array_equal(draw("weighted", "a (red:1.5) circle"),
                              draw("weighted-none", "a (red:1.5) circle", "--emphasis", "none"))


@pytest.mark.parametrize("change, message", [
    (["--clip_skip", "0"], "--clip_skip must be between 1 and 2"),
    (["--clip_skip", "3"], "--clip_skip must be between 1 and 2"),
    (["--embeddings", "no-such-dir"], "--embeddings no-such-dir does not exist"),
    (["--embeddings", "EMBEDDINGS"], "broken.pt"),
    (["--from-png", "no-such.png"], "--from-png no-such.png does not exist"),
    (["--from-png", "PLAIN.png"], "has no 'parameters' text"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors does not exist"),
    (["--vae", "missing-vae.safetensors"], "VAE not found: missing-vae.safetensors"),
    (["--vae", "NOT_A_CHECKPOINT"], "cannot read VAE NOT_A_CHECKPOINT"),
    (["--lora", "NOT_A_CHECKPOINT"], "cannot read LoRA NOT_A_CHECKPOINT"),
    (["--prompt", "a cat <lora:nothing:0.5>"], "<lora:nothing>: no nothing.safetensors"),
])
def test_bad_prompt_settings_are_one_line(change, message, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    (tmp_path / "EMBEDDINGS").mkdir()
    (tmp_path / "EMBEDDINGS" / "broken.pt").write_bytes(b"garbage")
    (tmp_path / "NOT_A_CHECKPOINT").write_bytes(np.random.default_rng(0).bytes(1000))
    Image.new("RGB", (8, 8)).save(tmp_path / "PLAIN.png")
    monkeypatch.chdir(tmp_path)
    assert txt2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--no_safety_checker", *change)) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_lora_by_flag_or_by_prompt_tag_draws_the_same_and_the_tag_never_reaches_clip(tmp_path, tiny_checkpoint,
                                                                                      monkeypatch):
    (tmp_path / "loras").mkdir()
    kohya_file(tmp_path / "loras" / "ink.safetensors", load_model(TINY_CONFIG, tiny_checkpoint), "lora",
               layers=[ATTN_Q, TEXT_Q])
    seen = []
    parse = modules.parse_emphasis
    monkeypatch.setattr(modules, "parse_emphasis", lambda text: seen.append(text) or parse(text))

    def draw(name, *extra):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--n_samples", "1",
                                     "--skip_grid", "--lora_dir", str(tmp_path / "loras"), *extra)) == 0
        return pixels(tmp_path / name / "samples" / "00000.png")

    by_flag = draw("flag", "--prompt", "a red circle", "--lora", f"{tmp_path / 'loras' / 'ink.safetensors'}:0.6")
    by_tag = draw("tag", "--prompt", "a red circle<lora:ink:0.6>")
    plain = draw("plain", "--prompt", "a red circle")
    assert np.array_equal(by_flag, by_tag) and not np.array_equal(by_flag, plain)
    assert seen and not any("lora" in text for text in seen)
    text = Image.open(tmp_path / "flag" / "samples" / "00000.png").text
    digest = hashlib.sha256((tmp_path / "loras" / "ink.safetensors").read_bytes()).hexdigest()[:12]
    assert text["loras"] == "ink:0.6" and f'Lora hashes: "ink: {digest}"' in text["parameters"]
    assert parse_infotext(text["parameters"])["Lora hashes"] == f"ink: {digest}"


def test_a_separate_vae_is_used_and_recorded(tmp_path, tiny_checkpoint):
    vae = randomize_parameters_(build_model(TINY_CONFIG), seed=11).first_stage_model.state_dict()
    save_file({key: value.contiguous() for key, value in vae.items()}, tmp_path / "my-vae.safetensors")
    for name, extra in (("plain", []), ("vae", ["--vae", str(tmp_path / "my-vae.safetensors")])):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--n_samples", "1",
                                     "--skip_grid", *extra)) == 0
    with_vae = Image.open(tmp_path / "vae" / "samples" / "00000.png")
    assert not np.array_equal(np.asarray(with_vae), pixels(tmp_path / "plain" / "samples" / "00000.png"))
    assert with_vae.text["vae"] == "my-vae.safetensors" and "VAE: my-vae.safetensors" in with_vae.text["parameters"]


def test_a_first_run_reports_every_missing_piece_at_once(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = tiny_run(tmp_path / "out", tmp_path / "missing.ckpt")
    assert txt2img.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: checkpoint not found: ") and "; --safety_checker has no weights" in line
    assert line.endswith("with --no_safety_checker")


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a", "dpmpp_sde", "UniPC"])
def test_a1111_samplers_by_name_draw_and_say_so_in_the_parameters(sampler, tmp_path, tiny_checkpoint):
    """The name and schedule go into the infotext A1111 reads, and --from-png draws the same picture again."""
    argv = tiny_run(tmp_path / "first", tiny_checkpoint, "--no_safety_checker", "--n_samples", "1", "--skip_grid",
                    "--sampler", sampler)
    assert txt2img.main(argv) == 0
    first = tmp_path / "first" / "samples" / "00000.png"
    fields = parse_infotext(Image.open(first).text["parameters"])
    expected = {"DPM++ 2M Karras": ("DPM++ 2M Karras", "Karras"), "Euler a": ("Euler a", "Normal"),
                "dpmpp_sde": ("DPM++ SDE Karras", "Karras"), "UniPC": ("UniPC", "Normal")}[sampler]
    assert (fields["Sampler"], fields["Schedule type"]) == expected
    again = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--from-png", str(first), "--n_iter", "1",
             "--n_samples", "1", "--outdir", str(tmp_path / "again"), "--device", "cpu", "--no_safety_checker",
             "--skip_grid"]
    assert txt2img.main(again) == 0
    assert np.array_equal(pixels(first), pixels(tmp_path / "again" / "samples" / "00000.png"))


def test_schedule_and_noise_flags(tmp_path, tiny_checkpoint):
    def draw(name, *extra):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--n_samples", "1",
                                     "--skip_grid", *extra)) == 0
        return tmp_path / name / "samples" / "00000.png"

    karras = draw("karras", "--sampler", "euler", "--schedule", "karras")
    assert np.array_equal(pixels(karras), pixels(draw("named", "--sampler", "Euler Karras")))
    assert not np.array_equal(pixels(karras), pixels(draw("normal", "--sampler", "euler")))
    calm = draw("calm", "--sampler", "Euler a", "--eta_ancestral", "0.5", "--s_noise", "0.9")
    assert "Eta: 0.5" in Image.open(calm).text["parameters"]
    assert not np.array_equal(pixels(calm), pixels(draw("default", "--sampler", "Euler a")))


def test_the_original_flags_keep_their_samplers(tmp_path, tiny_checkpoint):
    """--plms, --dpm_solver and the default DDIM are the CompVis samplers, also when named with --sampler."""
    def draw(name, *extra):
        assert txt2img.main(tiny_run(tmp_path / name, tiny_checkpoint, "--no_safety_checker", "--n_samples", "1",
                                     "--skip_grid", "--fixed_code", *extra)) == 0
        return pixels(tmp_path / name / "samples" / "00000.png")

    assert np.array_equal(draw("plms", "--plms"), draw("plms-named", "--sampler", "PLMS"))
    assert np.array_equal(draw("dpm", "--dpm_solver"), draw("dpm-named", "--sampler", "dpm_solver"))
    assert np.array_equal(draw("ddim"), draw("ddim-named", "--sampler", "DDIM"))


@pytest.mark.parametrize("change, message", [
    (["--sampler", "Eulr"], "--sampler must be one of DDIM, PLMS, DPM-Solver, Euler, Euler a,"),
    (["--sampler", "Euler", "--schedule", "Karas"], "--schedule must be one of Normal, Karras, Exponential"),
    (["--sampler", "Euler Karras", "--schedule", "exponential"], "--schedule 'Euler Karras' names the schedule Karras"),
    (["--plms", "--schedule", "karras"], "--schedule PLMS has its own time grid"),
    (["--sampler", "Euler a", "--plms"], "--sampler Euler a and --plms both choose a sampler"),
    (["--sampler", "Euler", "--eta_ancestral", "0.5"],
     "--eta_ancestral is for samplers that add noise; Euler adds none"),
    (["--sampler", "Euler a", "--eta_ancestral", "1.5"], "--eta_ancestral must be between 0 and 1, got 1.5"),
    (["--sampler", "Euler a", "--ddim_eta", "0.5"], "--ddim_eta must be 0 with Euler a"),
    (["--s_noise", "1.1"], "--s_noise is for ancestral and SDE samplers, not DDIM"),
])
def test_bad_sampler_flags_are_one_line(change, message, tmp_path, tiny_checkpoint, capsys):
    assert txt2img.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--no_safety_checker", *change)) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sampler", [["--dpm_solver"], ["--plms"], ["--sampler", "Euler a"]])
def test_an_sd2_v_prediction_model_draws_at_its_configs_size(sampler, tmp_path):
    config = ROOT / "configs/stable-diffusion/v2-tiny-v.yaml"
    model = randomize_parameters_(build_model(config), seed=7)
    checkpoint = tmp_path / "v2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    argv = ["--config", str(config), "--ckpt", str(checkpoint), "--ddim_steps", "3", "--n_samples", "1",
            "--n_iter", "1", "--outdir", str(tmp_path / "out"), "--device", "cpu", "--no_safety_checker", *sampler]
    assert txt2img.main(argv) == 0
    image = Image.open(tmp_path / "out" / "samples" / "00000.png")
    assert image.size == (64, 64) and image.text["size"] == "64x64"
