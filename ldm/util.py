"""Small helpers shared across the package: building objects from configs, counting parameters."""

import importlib
import os
import random
from typing import Any, Mapping

import numpy as np
import torch


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Return the object named by a dotted path, e.g. ``"ldm.models.autoencoder.AutoencoderKL"``."""
    module_name, _, attr = string.rpartition(".")
    if not module_name:
        raise ValueError(f"expected a dotted path 'package.module.Name', got {string!r}")
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    return getattr(module, attr)


def instantiate_from_config(config: Mapping | str) -> Any:
    """Build ``config["target"](**config.get("params", {}))``.

    As in the original, the strings ``"__is_first_stage__"`` and ``"__is_unconditional__"`` stand for
    "no separate model" and give ``None``; the caller decides what they mean.
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise KeyError("expected key 'target' to instantiate")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


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
