"""The UNet on OpenVINO: the same numbers as our torch module (f32 to 1e-5, bf16 to its stated bound), the disk
cache used on the second run and rebuilt when damaged, and the --backend flag end to end."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, assert_one_error_line, load_script
from ldm.models.loading import build_model, load_config
from ldm.models.openvino_engine import OpenVINOUNet
from ldm.util import randomize_parameters_

BF16_BOUND = 0.08  # max |difference| / max |output| of one UNet call in bfloat16 (measured 0.035 tiny, 0.045 SD)
txt2img = load_script("txt2img")


@pytest.fixture(scope="module")
def unet():
    model = build_model(load_config(TINY_CONFIG)).eval()
    return randomize_parameters_(model.model.diffusion_model)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([500.0, 20.0]),
            torch.randn(2, 77, 32, generator=generator))


def relative_difference(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("precision, bound", [("f32", 1e-5), ("bf16", BF16_BOUND)])
def test_the_same_numbers_as_torch(precision, bound, unet, inputs, tmp_path):
    with torch.no_grad():
        expected = unet(*inputs)
        got = OpenVINOUNet(unet, precision, tmp_path)(*inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_difference(got, expected) < bound


def test_the_second_run_reads_the_cache_and_a_damaged_entry_is_rebuilt(unet, inputs, tmp_path, monkeypatch):
    with torch.no_grad():
        expected = OpenVINOUNet(unet, "f32", tmp_path)(*inputs)
        conversions = []
        convert = OpenVINOUNet._convert
        monkeypatch.setattr(OpenVINOUNet, "_convert", lambda self, x: conversions.append(1) or convert(self, x))
        assert torch.equal(OpenVINOUNet(unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == []  # from the cache
        weights = next(tmp_path.glob("*.bin"))
        damaged = bytearray(weights.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        weights.write_bytes(bytes(damaged))
        assert torch.equal(OpenVINOUNet(unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == [1]  # converted again, not trusted
        next(tmp_path.glob("*.xml")).write_text("<not an IR")
        assert torch.equal(OpenVINOUNet(unet, "f32", tmp_path)(*inputs), expected)
        assert conversions == [1, 1]


def test_other_weights_or_shapes_get_their_own_entry(unet, inputs, tmp_path):
    with torch.no_grad():
        engine = OpenVINOUNet(unet, "f32", tmp_path)
        engine(*inputs)
        engine(torch.randn(4, 4, 8, 16), torch.full((4,), 300.0), torch.randn(4, 77, 32))
    assert len(list(tmp_path.glob("*.xml"))) == 2


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
    assert list((tmp_path / "cache").glob("*.xml"))


def test_openvino_with_compile_is_one_line(tmp_path, tiny_checkpoint, capsys):
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path / "out"),
            "--device", "cpu", "--backend", "openvino", "--compile"]
    assert txt2img.main(argv) == 2
    assert_one_error_line(capsys, "--backend openvino does not combine with --compile")


def test_lora_merges_reach_the_engine(tiny_model, tmp_path, monkeypatch):
    """The engine is not a submodule: the state dict keeps the UNet's names (so LoRA finds its layers), and weights
    changed in place after compiling are converted anew, not served stale."""
    from ldm.models.acceleration import Acceleration, accelerate
    from ldm.models.lora import layer_names

    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path))
    model = copy.deepcopy(tiny_model)
    names = layer_names(model)
    accelerate(model, Acceleration(cuda_graph=False, backend="openvino"))
    assert layer_names(model) == names and set(model.state_dict()) == set(tiny_model.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = model.model(x, t, c_crossattn=[c])
        weight = model.model.diffusion_model.out[-1].weight
        weight.mul_(2.0)
        after = model.model(x, t, c_crossattn=[c])
        expected = model.model.diffusion_model(x, t, context=c)
    assert not torch.allclose(before, after)
    assert relative_difference(after, expected) < 1e-5
