"""Small helpers shared across the package: building objects from configs, counting parameters."""

import importlib
import os
import random
from typing import Any, Mapping

import numpy as np
import torch

# Configs come from strangers (model pages ship YAML next to checkpoints): they may name only these.
ALLOWED_TARGET_PREFIXES = ("ldm.", "torch.nn.")


def get_obj_from_str(string: str) -> Any:
    """The class or function a config's ``target`` names, e.g. ``"ldm.models.autoencoder.AutoencoderKL"``.

    Only ``ldm.*`` and ``torch.nn.*`` are allowed, and the object must be defined there (not a module, nor a
    function those modules import from elsewhere, such as ``os.system``): a config can build our model, never
    run other code.
    """
    if not isinstance(string, str) or not string.startswith(ALLOWED_TARGET_PREFIXES):
        raise InputError(f"config names {string!r}; only ldm.* and torch.nn.* classes are built from configs")
    module_name, _, attr = string.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise InputError(f"config names {string!r}, which does not exist in this version") from None
    if not callable(obj) or not getattr(obj, "__module__", "").startswith(ALLOWED_TARGET_PREFIXES):
        raise InputError(f"config names {string!r}; only ldm.* and torch.nn.* classes are built from configs")
    return obj


def instantiate_from_config(config: Mapping | str) -> Any:
    """Build ``config["target"](**config.get("params", {}))``.

    As in the original, the strings ``"__is_first_stage__"`` and ``"__is_unconditional__"`` stand for
    "no separate model" and give ``None``; the caller decides what they mean.
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise InputError("config has a part without 'target' to build it from")
    cls = get_obj_from_str(config["target"])
    try:
        return cls(**config.get("params", dict()))
    except TypeError as error:  # params that do not fit the class: a config for another version or model
        raise InputError(f"config cannot build {config['target']}: {error}") from None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_parameters_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, for tests and smoke runs of untrained architectures.

    Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²). Unlike the training
    initialisation, nothing is zero, so no layer can hide behind a zero-initialised output.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.2 * noise)
    return module


class InputError(Exception):
    """Something the user supplied (a file, a config, an image) is wrong; the message says what, in one line."""


class Problems(InputError):
    """Several things the user must fix, found together so that one run reports them all (``errors``)."""

    def __init__(self, errors: list[Exception]):
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


class ParameterError(ValueError):
    """An argument's value is wrong: ``parameter`` names the argument (as the library spells it), ``problem``
    says what is wrong with it. The command line (:mod:`ldm.cli`) shows the flag's name instead."""

    def __init__(self, parameter: str, problem: str):
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


def check_seed(seed: int) -> int:
    if not 0 <= seed <= 2 ** 32 - 1:
        raise ParameterError("seed", f"must be between 0 and {2 ** 32 - 1}, got {seed}")
    return seed


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch (CPU and every CUDA device), as PyTorch Lightning's ``seed_everything``."""
    check_seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
