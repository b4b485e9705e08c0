"""Test-wide setup: no network at all, tiny models with every weight randomised."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from ldm.models.loading import build_model  # noqa: E402
from ldm.util import randomize_parameters_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V1_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
TINY_CONFIG = ROOT / "configs/stable-diffusion/v1-tiny.yaml"


class NetworkBlocked(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkBlocked("tests must not use the network")


def _is_local(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, str) and (host in ("localhost", "::1") or host.startswith(("127.", "/")))


_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo


def _guarded_connect(sock, address):
    if sock.family == socket.AF_UNIX or _is_local(address):
        return _connect(sock, address)
    _refuse()


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect
socket.getaddrinfo = lambda host, *args, **kwargs: (_getaddrinfo(host, *args, **kwargs) if _is_local((host,))
                                                    else _refuse())


@pytest.fixture(scope="session")
def v1_original_config() -> dict:
    return yaml.safe_load(V1_CONFIG.read_text())


@pytest.fixture(scope="session")
def tiny_original_config() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny v1 model with all weights random, shared read-only by the tests of a session."""
    return randomize_parameters_(build_model(TINY_CONFIG), seed=0).eval()


@pytest.fixture(scope="session")
def v1_meta_model():
    """The full-size v1 model with parameters on the meta device: its layout without its memory."""
    return build_model(V1_CONFIG, meta=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """The tiny random model as a .safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, path)
    return path


def assert_one_error_line(capsys, message: str) -> None:
    """What a user error prints: exactly one line on stderr, ``error: …``, containing ``message``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module, to call its ``main(argv)`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name.replace('/', '_')}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_safety_checker(directory: Path, flag_everything: bool) -> Path:
    """A tiny random StableDiffusionSafetyChecker in diffusers format whose thresholds flag every image
    (threshold −1 < any cosine) or none (threshold 2 > any cosine)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=224, patch_size=32),
                        projection_dim=16)
    checker = randomize_parameters_(StableDiffusionSafetyChecker(config), seed=3)
    threshold = -1.0 if flag_everything else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def flagging_checker(tmp_path_factory) -> Path:
    return make_tiny_safety_checker(tmp_path_factory.mktemp("checker-flags"), flag_everything=True)


@pytest.fixture(scope="session")
def passing_checker(tmp_path_factory) -> Path:
    return make_tiny_safety_checker(tmp_path_factory.mktemp("checker-passes"), flag_everything=False)
