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
