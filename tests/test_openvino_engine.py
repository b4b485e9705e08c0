"""The UNet and VAE decoder on OpenVINO: the same numbers as our torch modules (f32 to 1e-5, bf16 to its stated
bound), the disk cache used on the second run and rebuilt when damaged, --backend auto's choice, and the --backend
flag end to end, on the tiny config and on the demo model."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script
from ldm.models.acceleration import Acceleration, accelerate
from ldm.models.autoencoder import Decoding
from ldm.models.loading import build_model, load_config
from ldm.models.lora import layer_names
from ldm.models.openvino_engine import OpenVINODecoder, OpenVINOUNet
from ldm.util import randomize_parameters_

BF16_BOUND = 0.08  # max |difference| / max |output| of one UNet call in bfloat16 (measured 0.035 tiny, 0.045 SD)
txt2img = load_script("txt2img")


@pytest.fixture(scope="module")
def unet():
    model = build_model(load_config(TINY_CONFIG)).eval()
    return randomize_parameters_(model.model.diffusion_model)


@pytest.fixture(scope="module")
def one_level_model():
    """A one-level tiny model for the engine's bookkeeping: conversion time grows with the modules (the tiny v1
    UNet takes ~15 s)."""
    config = load_config(TINY_CONFIG)
    config.model.params.unet_config.params.update(channel_mult=[1], attention_resolutions=[1], num_res_blocks=1)
    return randomize_parameters_(build_model(config), seed=0).eval()


@pytest.fixture(scope="module")
def small_unet(one_level_model):
    return one_level_model.model.diffusion_model


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([500.0, 20.0]),
            torch.randn(2, 77, 32, generator=generator))


def relative_difference(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One IR for both precisions (it is converted from float32 weights either way): one conversion."""
    return tmp_path_factory.mktemp("openvino")


@pytest.mark.parametrize("precision, bound", [("f32", 1e-5), ("bf16", BF16_BOUND)])
def test_the_same_numbers_as_torch(precision, bound, unet, inputs, shared_cache):
    with torch.no_grad():
        expected = unet(*inputs)
        got = OpenVINOUNet(unet, precision, shared_cache)(*inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_difference(got, expected) < bound


@pytest.mark.parametrize("precision, bound", [("f32", 1e-5), ("bf16", BF16_BOUND)])
def test_the_decoder_gives_the_same_numbers_as_torch(precision, bound, tiny_model, tmp_path):
    vae = copy.deepcopy(tiny_model.first_stage_model)
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(z)
        vae.set_decode_engine(OpenVINODecoder(Decoding(vae), precision, tmp_path))
        got = vae.decode(z)
    assert got.shape == expected.shape and relative_difference(got, expected) < bound


def test_auto_picks_openvino_where_it_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Acceleration(backend="auto").for_device(cpu).backend == "openvino"
    assert Acceleration(backend="auto").for_device(cpu, "bf16").backend == "openvino"
    assert Acceleration(backend="auto").for_device(cpu, "fp16").backend == "torch"
    assert Acceleration(backend="auto", compile=True).for_device(cpu).backend == "torch"
    assert Acceleration(backend="auto").for_device(cuda, "fp16").backend == "torch"


def test_the_second_run_reads_the_cache_and_a_damaged_entry_is_rebuilt(small_unet, inputs, tmp_path, monkeypatch):
    with torch.no_grad():
        expected = OpenVINOUNet(small_unet, "f32", tmp_path)(*inputs)
        conversions = []
        convert = OpenVINOUNet._convert
        monkeypatch.setattr(OpenVINOUNet, "_convert", lambda self, x: conversions.append(1) or convert(self, x))
        assert torch.equal(OpenVINOUNet(small_unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == []  # from the cache
        weights = next(tmp_path.glob("*.bin"))
        damaged = bytearray(weights.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        weights.write_bytes(bytes(damaged))
        assert torch.equal(OpenVINOUNet(small_unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == [1]  # converted again, not trusted
        next(tmp_path.glob("*.xml")).write_text("<not an IR")
        assert torch.equal(OpenVINOUNet(small_unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == [1, 1]


def test_other_weights_or_shapes_get_their_own_entry(small_unet, inputs, tmp_path):
    with torch.no_grad():
        engine = OpenVINOUNet(small_unet, "f32", tmp_path)
        engine(*inputs)
        engine(torch.randn(4, 4, 8, 16), torch.full((4,), 300.0), torch.randn(4, 77, 32))
    assert len(list(tmp_path.glob("*.xml"))) == 2


def test_a_guided_batch_is_converted_with_x_once(small_unet, inputs, tmp_path):
    """[x, x] with the same timesteps and two contexts (classifier-free guidance) runs the IR for x once; other
    doubled batches (different halves or timesteps) the full one. Both give torch's numbers on the doubled batch."""
    x, t, context = inputs
    guided = (torch.cat([x[:1], x[:1]]), torch.cat([t[:1], t[:1]]), context)
    engine = OpenVINOUNet(small_unet, "f32", tmp_path)
    with torch.no_grad():
        for call in (guided, inputs, (guided[0], t, context)):
            assert relative_difference(engine(*call), small_unet(*call)) < 1e-5
    assert sorted(key[0][0] for key in engine.compiled) == [1, 2]  # guided: x once; the other two: the full batch


def test_the_engine_is_still_a_module_over_its_network(small_unet, tmp_path):
    """Its own parameter registry is nn.Module's: the network's weights appear under ``module.``."""
    engine = OpenVINOUNet(small_unet, "f32", tmp_path)
    assert list(engine.state_dict()) == [f"module.{name}" for name in small_unet.state_dict()]
    assert len(list(engine.parameters())) == len(list(small_unet.parameters()))


def test_the_backend_flag_draws_the_torch_picture(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path / "cache"))

    def draw(name, *extra):
        argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--H", "64", "--W", "64",
                "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp_path / name),
                "--device", "cpu", "--no_safety_checker", "--skip_grid", "--dpm_solver", *extra]
        assert txt2img.main(argv) == 0
        return np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")).astype(int)

    difference = np.abs(draw("torch") - draw("openvino", "--backend", "openvino"))
    assert difference.max() <= 2  # of 255: float32 rounding through three steps and the decoder
    assert len(list((tmp_path / "cache").glob("*.xml"))) == 2  # the UNet's and the decoder's


def test_openvino_with_compile_is_one_line(tmp_path, tiny_checkpoint, capsys):
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path / "out"),
            "--device", "cpu", "--backend", "openvino", "--compile"]
    assert txt2img.main(argv) == 2
    assert_one_error_line(capsys, "--backend openvino does not combine with --compile")


def test_lora_merges_reach_the_engine(one_level_model, tmp_path, monkeypatch):
    """The engine is not a submodule: the state dict keeps the UNet's names (so LoRA finds its layers), and weights
    changed in place after compiling are converted anew, not served stale."""
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path))
    model = copy.deepcopy(one_level_model)
    names = layer_names(model)
    accelerate(model, Acceleration(cuda_graph=False, backend="openvino"))
    assert layer_names(model) == names and set(model.state_dict()) == set(one_level_model.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = model.model(x, t, c_crossattn=[c])
        weight = model.model.diffusion_model.out[-1].weight
        weight.mul_(2.0)
        after = model.model(x, t, c_crossattn=[c])
        expected = model.model.diffusion_model(x, t, context=c)
    assert not torch.allclose(before, after)
    assert relative_difference(after, expected) < 1e-5


# Each engine and precision against the fp32 torch picture on the demo model: 4 prompts, --dpm_solver, 25 steps,
# max / mean |difference| of 255 (measured: openvino f32 1 / 0.00, torch bf16 35 / 1.26, openvino bf16 40 / 1.50).
# bfloat16 moves a few edge pixels visibly, which is why --precision auto stays float32 on the CPU.
DEMO_BOUNDS = {("openvino", "full"): (2, 0.05), ("torch", "bf16"): (60, 3.0), ("openvino", "bf16"): (60, 3.0)}


@pytest.fixture(scope="module")
def demo_pictures(tmp_path_factory):
    """The demo's pictures for every engine and precision we offer (one run each, shared by the checks)."""
    root = tmp_path_factory.mktemp("demo")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((ROOT / "assets/demo-prompts.txt").read_text().splitlines()[:4]))
    pictures = {}
    for backend, precision in [("torch", "full"), *DEMO_BOUNDS]:
        outdir = root / f"{backend}-{precision}"
        argv = ["--config", str(ROOT / "configs/demo/shapes-inference.yaml"), "--ckpt",
                str(ROOT / "models/demo/shapes.safetensors"), "--H", "64", "--W", "64", "--dpm_solver",
                "--ddim_steps", "25", "--n_iter", "1", "--n_samples", "2", "--from-file",
                str(prompts), "--outdir", str(outdir), "--device", "cpu", "--skip_grid",
                "--backend", backend, "--precision", precision]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LDM_OPENVINO_CACHE", str(root / "cache"))
            assert txt2img.main(argv) == 0
        pictures[backend, precision] = np.stack([np.asarray(Image.open(path)).astype(int)
                                                 for path in sorted((outdir / "samples").glob("*.png"))])
    return pictures


@pytest.mark.parametrize("engine", list(DEMO_BOUNDS), ids="-".join)
def test_every_engine_draws_the_demo_near_the_fp32_picture(engine, demo_pictures):
    difference = np.abs(demo_pictures[engine] - demo_pictures["torch", "full"])
    print(f"{engine}: max {difference.max()}, mean {difference.mean():.2f} of 255")
    max_bound, mean_bound = DEMO_BOUNDS[engine]
    assert difference.max() <= max_bound and difference.mean() <= mean_bound
