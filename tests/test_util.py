"""Config helpers keep the original's semantics; the test session itself has no network."""

import socket

import pytest
import torch

from conftest import NetworkBlocked
from ldm.util import (InputError, ParameterError, count_params, get_obj_from_str, instantiate_from_config,
                      seed_everything)


def test_instantiate_from_config_calls_the_dotted_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (2, 3)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert count_params(layer) == 8


def test_special_strings_mean_no_model_and_target_is_required():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None
    with pytest.raises(InputError, match="target"):
        instantiate_from_config({"params": {}})


def test_get_obj_from_str():
    assert get_obj_from_str("ldm.util.count_params") is count_params
    assert get_obj_from_str("torch.nn.Linear") is torch.nn.Linear


@pytest.mark.parametrize("target, problem", [
    ("os.system", "only ldm.* and torch.nn.*"),
    ("Linear", "only ldm.* and torch.nn.*"),
    ("ldm.util.importlib", "only ldm.* and torch.nn.*"),  # a module imported there
    ("ldm.util.random", "only ldm.* and torch.nn.*"),
    ("ldm.util.seed_everything.__globals__", "does not exist"),
    ("ldm.models.nothing.Here", "does not exist"),
    ("ldm.util.NoSuchClass", "does not exist"),
    (42, "only ldm.* and torch.nn.*"),
])
def test_configs_can_name_only_our_classes(target, problem):
    with pytest.raises(InputError, match=problem):
        get_obj_from_str(target)
    with pytest.raises(InputError, match=problem):
        instantiate_from_config({"target": target, "params": {"command": "touch PWNED"}})


def test_params_that_do_not_fit_are_a_config_error():
    with pytest.raises(InputError, match="cannot build torch.nn.Linear"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "colour": "red"}})


def test_seed_everything_seeds_torch_and_refuses_seeds_out_of_range():
    seed_everything(5)
    first = torch.randn(3)
    seed_everything(5)
    assert torch.equal(first, torch.randn(3))
    for seed in (-1, 2 ** 32):
        with pytest.raises(ParameterError, match="seed must be between 0 and 4294967295") as error:
            seed_everything(seed)
        assert error.value.parameter == "seed" and isinstance(error.value, ValueError)


def _raw_connect():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("93.184.215.14", 80))


@pytest.mark.parametrize("connect", [
    lambda: socket.create_connection(("huggingface.co", 443), timeout=1),
    lambda: socket.getaddrinfo("huggingface.co", 443),
    _raw_connect,
])
def test_the_network_is_blocked_for_every_test(connect):
    with pytest.raises(NetworkBlocked):
        connect()
