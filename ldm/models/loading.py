"""The one way to build a model from a config and load a checkpoint into it (every script, notebook and test).

Reads ``.ckpt`` (PyTorch zip or legacy pickle) with ``torch.load(weights_only=True)`` and ``.safetensors``;
never unpickles arbitrary objects. Parameters are created on the ``meta`` device and the checkpoint's
tensors are assigned to them, so a full-size model is not randomly initialised first.
"""

import contextlib
import logging
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import safetensors
import safetensors.torch
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.modules.ema import LitEma
from ldm.util import ALLOWED_TARGET_PREFIXES, InputError, instantiate_from_config

logger = logging.getLogger(__name__)

# Where each part's weights live in our state dicts.
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."



class CheckpointError(InputError):
    """A checkpoint file cannot be read, is unsafe, or does not fit the model."""


class ConfigError(InputError):
    """A model config cannot be read or names something we will not build."""


class _IgnoredObject:
    """Stands in for harmless non-tensor objects that training checkpoints carry (e.g. a callback's class)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals real SD checkpoints reference besides tensors: PyTorch Lightning stores its ModelCheckpoint
# callback class as a dict key; NumPy scalars and dtypes appear in callback state. None of them runs code here.
_SAFE_GLOBALS = [
    (_IgnoredObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_IgnoredObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np.dtype, "numpy.dtype"),
    *((type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}") for t in
      ("f2", "f4", "f8", "i4", "i8", "u1", "?")),
]

_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                OSError, struct.error, zipfile.BadZipFile, safetensors.SafetensorError, UnicodeDecodeError)


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    global_step: int | None = None


@dataclass
class LoadReport:
    """How a state dict matched a model: loaded, missing from the file, unexpected in it, skipped on purpose."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors; {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.skipped)} skipped")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                text += f"; first {name}: {', '.join(keys[:3])}"
        return text


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def check_checkpoint_path(path: str | Path, what: str = "checkpoint") -> Path:
    """The checkpoint's path, if it names a file (read by :func:`read_checkpoint`) or, for a checkpoint, a
    diffusers model folder (:func:`read_diffusers_folder`)."""
    path = Path(path)
    if path.is_dir() and what == "checkpoint" and is_diffusers_folder(path):
        return path
    if path.is_dir():
        folder = " or a diffusers model folder (with model_index.json)" if what == "checkpoint" else ""
        raise CheckpointError(f"{path} is a directory; give the {what} file in it (.ckpt or .safetensors){folder}")
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    return path


def read_safely(path: str | Path, what: str = "checkpoint") -> Any:
    """What a ``.ckpt``/``.pt``/``.bin`` or ``.safetensors`` file holds, read without executing any code stored in it:
    tensors, and the plain containers and numbers around them (a pickle that would need to run code is refused)."""
    path = check_checkpoint_path(path, what)
    try:
        if _is_safetensors(path):
            return safetensors.torch.load_file(path)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+)", str(error))
        if unsafe:
            raise CheckpointError(f"refusing to load {path}: it contains a pickled object ({unsafe.group(1)}) that "
                                  "could run code; convert it to .safetensors with a tool you trust") from None
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch or safetensors file, "
                              "or truncated") from None
    except _READ_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch or safetensors file, "
                              f"or truncated ({reason})") from None


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Checkpoint:
    """Read a checkpoint's tensors without executing any code stored in it."""
    content = read_safely(path, what)
    if _is_safetensors(Path(path)):
        return Checkpoint(content)
    return _checkpoint_from_content(content, Path(path))


def _checkpoint_from_content(content: Any, path: Path) -> Checkpoint:
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict")
    global_step = content.get("global_step")
    state_dict = content.get("state_dict", content)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: its 'state_dict' entry is not a mapping of tensors")
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors")
    return Checkpoint(tensors, int(global_step) if isinstance(global_step, (int, np.integer)) else None)


def load_config(config: str | Path | Mapping) -> DictConfig:
    """Read a YAML model config (or take a mapping), resolve its interpolations, and check that every ``target``
    in it, at any depth, names an ``ldm.*`` or ``torch.nn.*`` class.

    Interpolations are resolved here, once, so that nothing built later can resolve one into a target that was
    never checked (a ``lossconfig: ${payload}`` whose ``payload`` names ``os.system``, say).
    """
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            raise ConfigError(f"config not found: {config}")
        try:
            config = OmegaConf.load(config)
        except Exception as error:  # OmegaConf/YAML raise many types; all mean "not a valid config file"
            raise ConfigError(f"cannot read config {config}: {str(error).splitlines()[0]}") from None
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception as error:  # unresolvable interpolations, unknown resolvers, bad nodes
        raise ConfigError(f"cannot resolve config: {str(error).splitlines()[0]}") from None
    if not isinstance(resolved.get("model"), Mapping) or "target" not in resolved["model"]:
        raise ConfigError("config has no 'model.target': is it a latent-diffusion model config?")
    _check_targets(resolved)
    return OmegaConf.create(resolved)


def _check_targets(node: Any) -> None:
    if isinstance(node, Mapping):
        if "target" in node:
            target = node["target"]
            if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
                raise ConfigError(f"config names {target!r}; only ldm.* and torch.nn.* classes are built from "
                                  "configs")
        for value in node.values():
            _check_targets(value)
    elif isinstance(node, list):
        for value in node:
            _check_targets(value)


def build_model(config: str | Path | Mapping, meta: bool = False) -> nn.Module:
    """The model a config describes, with freshly initialised weights.

    ``meta=True`` creates the parameters on the meta device instead: the layout without memory or
    initialisation time, for loading a checkpoint into (``load_state_dict(..., assign=True)``).
    """
    config = load_config(config)
    try:
        with _parameters_on_meta() if meta else contextlib.nullcontext():
            model = instantiate_from_config(config.model)
    except ValueError as error:  # a value the classes refuse (parameterization, zero_terminal_snr with ε, …)
        raise ConfigError(f"the config's model cannot be built: {error}") from None
    model.source_config = OmegaConf.to_container(config)  # what it was built from (LoRA names need it)
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device (no memory, no initialisation); buffers stay real."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def with_ema_weights(state_dict: Mapping[str, torch.Tensor], model: nn.Module, path: str | Path
                     ) -> dict[str, torch.Tensor]:
    """``state_dict`` with its EMA shadows (``model_ema.<UNet weight name without dots>``, LitEma's naming) in place
    of the UNet weights they shadow."""
    result = dict(state_dict)
    replaced = 0
    for name, _ in model.model.named_parameters():
        shadow = "model_ema." + name.replace(".", "")
        if shadow in state_dict:
            result["model." + name] = state_dict[shadow]
            replaced += 1
    if not replaced:
        raise CheckpointError(f"{Path(path).name} has no EMA weights (model_ema.*): it is an EMA-only or pruned "
                              "checkpoint; load it without the EMA option")
    logger.info("%s: the UNet's %d weights taken from its EMA", Path(path).name, replaced)
    return result


def _is_skipped(key: str, model: nn.Module) -> bool:
    """Checkpoint entries the model does not use, on purpose.

    ``model_ema.*`` when the config has ``use_ema: False`` (the original loads the non-EMA weights then too);
    the text encoder's ``position_ids``, which newer transformers recompute instead of storing; the schedule
    buffers (``betas``, ``alphas_cumprod``, …) when the config rescales the schedule (``zero_terminal_snr``):
    a checkpoint keeps the buffers of the schedule it was first made with, and the config says which one it
    was trained on since.
    """
    if key.startswith("model_ema.") and not hasattr(model, "model_ema"):
        return True
    if getattr(model, "zero_terminal_snr", False) and "." not in key and key != "scale_factor":
        return True
    return key.startswith("cond_stage_model.") and key.endswith(".position_ids")


# The model families a checkpoint's keys tell apart: its text encoder (where the keys live) and its UNet's input
# channels (9 for inpainting: latent, mask, masked-image latent), with the config that fits each.
TEXT_ENCODERS = {"cond_stage_model.transformer.text_model.": ("SD v1", "CLIP ViT-L/14 text encoder"),
                 "cond_stage_model.model.transformer.": ("SD 2.x", "OpenCLIP ViT-H/14 text encoder")}
UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
FAMILY_CONFIGS = {
    ("SD v1", False): "configs/stable-diffusion/v1-inference.yaml",
    ("SD v1", True): "configs/stable-diffusion/v1-inpainting-inference.yaml",
    ("SD 2.x", False): "configs/stable-diffusion/v2-inference-v.yaml (768-v checkpoints: 768-v-ema, v2-1_768-*) or "
                       "configs/stable-diffusion/v2-inference.yaml (512-base ones: 512-base-ema, v2-1_512-*)",
    ("SD 2.x", True): "configs/stable-diffusion/v2-inpainting-inference.yaml",
}


def model_family(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[str, str] | None, bool | None]:
    """((family, text encoder), inpainting UNet?) from a state dict's keys and the UNet's input shape; None where
    the keys do not say."""
    text = next((family for prefix, family in TEXT_ENCODERS.items() if any(key.startswith(prefix)
                                                                          for key in state_dict)), None)
    first = state_dict.get(UNET_INPUT)
    return text, None if first is None or first.dim() != 4 else first.shape[1] == 9


def _describe(text: tuple[str, str], inpaint: bool | None) -> str:
    return f"an {text[0]}{' inpainting' if inpaint else ''} model ({text[1]})"


def check_family(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint of another family than the config's (SD 2 given with a v1 config, an inpainting UNet
    with a text-to-image config, …) in one line that names the config to use: shapes alone would say only that
    hundreds of weights disagree."""
    (model_text, model_inpaint), (text, inpaint) = model_family(model_state), model_family(state_dict)
    if None in (model_text, text) or text == model_text and (None in (inpaint, model_inpaint)
                                                             or inpaint == model_inpaint):
        return
    raise CheckpointError(f"the checkpoint is {_describe(text, inpaint)}, but the config builds "
                          f"{_describe(model_text, model_inpaint)}: use --config "
                          f"{FAMILY_CONFIGS[text[0], bool(inpaint)]}")


def match_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Compare a state dict with a model's; raise if it is another family's (:func:`check_family`), if shapes
    disagree or if nothing matches."""
    expected = model.state_dict(keep_vars=True)
    check_family(expected, state_dict)
    report = LoadReport()
    mismatched = []
    for key, tensor in state_dict.items():
        if _is_skipped(key, model):
            report.skipped.append(key)
        elif key in expected:
            report.loaded.append(key)
            if tuple(tensor.shape) != tuple(expected[key].shape):
                mismatched.append(f"{key} is {tuple(tensor.shape)} in the checkpoint, {tuple(expected[key].shape)} "
                                  "in the model")
        else:
            report.unexpected.append(key)
    report.missing = [key for key in expected if key not in state_dict]
    if not report.loaded:
        raise CheckpointError(f"the checkpoint matches none of the model's {len(expected)} weights: "
                              "is it a Stable Diffusion checkpoint for this config?")
    if mismatched:
        raise CheckpointError(f"the checkpoint does not fit this config ({len(mismatched)} shape mismatches; "
                              f"{mismatched[0]}): is it the config of this checkpoint?")
    return report


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> LoadReport:
    """Load the matching entries of ``state_dict`` into ``model`` and report what matched."""
    report = match_state_dict(model, state_dict)
    model.load_state_dict({key: state_dict[key] for key in report.loaded}, strict=False, assign=assign)
    return report


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _restart_ema(model: nn.Module, report: LoadReport) -> None:
    """A config with ``use_ema: True`` and a checkpoint without EMA weights: start the EMA from the weights."""
    if hasattr(model, "model_ema") and any(key.startswith("model_ema.") for key in report.missing):
        logger.warning("checkpoint has no EMA weights; starting the EMA from the loaded weights")
        model.model_ema = LitEma(model.model)
        report.missing = [key for key in report.missing if not key.startswith("model_ema.")]


def _place(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move submodules to ``device``/``dtype``; the model's own schedule buffers stay float32 for precision."""
    for child in model.children():
        child.to(device=device, dtype=dtype)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device=device, dtype=torch.float32 if buffer.is_floating_point() else None))


# Where a missing weight belongs, by key prefix, to say which part a partial checkpoint lacks.
MODEL_PARTS = {"model.diffusion_model.": "UNet", "first_stage_model.": "VAE", "cond_stage_model.": "text encoder"}


def missing_parts(missing: list[str]) -> str:
    """'UNet (686 weights), VAE (248)': the parts that ``missing`` keys belong to, with counts."""
    counts: dict[str, int] = {}
    for key in missing:
        part = next((name for prefix, name in MODEL_PARTS.items() if key.startswith(prefix)), "other")
        counts[part] = counts.get(part, 0) + 1
    return ", ".join(f"{part} ({count} weights)" for part, count in counts.items())


def load_model(config: str | Path | Mapping, ckpt: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, allow_partial: bool = False, ema: bool = False) -> nn.Module:
    """Build the model of ``config``, load ``ckpt`` into it, and return it in eval mode on ``device``.

    A checkpoint that lacks weights the model needs is refused, naming the parts (UNet, VAE, text encoder) it
    lacks: it would draw noise. ``allow_partial=True`` keeps their random initial values instead, with a warning.
    ``ema=True``: a full checkpoint's EMA weights (``model_ema.*``) in place of its UNet weights.
    """
    config = load_config(config)
    model = build_model(config, meta=True)
    checkpoint = Checkpoint(read_diffusers_folder(ckpt, model)) if is_diffusers_folder(ckpt) else read_checkpoint(ckpt)
    if ema:
        checkpoint = Checkpoint(with_ema_weights(checkpoint.state_dict, model, ckpt), checkpoint.global_step)
    if checkpoint.global_step is not None:
        logger.debug("Global Step: %d", checkpoint.global_step)
    report = load_state_dict(model, checkpoint.state_dict, assign=True)
    _restart_ema(model, report)
    if _has_meta_tensors(model):
        if not allow_partial:
            raise CheckpointError(f"{Path(ckpt).name} lacks weights the model needs: "
                                  f"{missing_parts(report.missing)}; is it a checkpoint of this model?")
        logger.warning("checkpoint lacks %s; they keep their random initial values", missing_parts(report.missing))
        model = build_model(config)
        report = load_state_dict(model, checkpoint.state_dict)
        _restart_ema(model, report)
    clean = not (report.missing or report.unexpected)
    logger.log(logging.DEBUG if clean else logging.INFO, "%s: %s", Path(ckpt).name, report.summary())
    _place(model, device, dtype)
    return model.eval()


@torch.no_grad()
def load_vae(model: nn.Module, path: str | Path) -> None:
    """Replace ``model``'s autoencoder weights with a separate VAE file's (``vae-ft-mse-840000-ema-pruned`` and the
    like): keys as in a full checkpoint (``first_stage_model.*``) or bare (``encoder.*``, ``decoder.*``,
    ``quant_conv.*``, ``post_quant_conv.*``); a training file's ``loss.*`` keys are ignored. Every weight of the
    autoencoder must be there with its shape."""
    tensors = read_checkpoint(path, "VAE").state_dict
    if any(key.startswith(VAE_PREFIX) for key in tensors):
        tensors = {key.removeprefix(VAE_PREFIX): value for key, value in tensors.items() if key.startswith(VAE_PREFIX)}
    vae = model.first_stage_model
    expected = {key: value for key, value in vae.state_dict().items()}
    missing = [key for key in expected if key not in tensors]
    if len(missing) == len(expected):
        raise CheckpointError(f"{Path(path).name} holds no VAE weights (first of its keys: {next(iter(tensors))})")
    if missing:
        raise CheckpointError(f"{Path(path).name} lacks {len(missing)} of the VAE's weights (first: {missing[0]})")
    wrong = [key for key, value in expected.items() if tensors[key].shape != value.shape]
    if wrong:
        raise CheckpointError(f"{Path(path).name} is a VAE of another shape: {wrong[0]} is "
                              f"{tuple(tensors[wrong[0]].shape)}, this model's is {tuple(expected[wrong[0]].shape)}")
    for key, value in expected.items():
        value.copy_(tensors[key].to(value.dtype))
    extra = [key for key in tensors if key not in expected and not key.startswith("loss.")]
    logger.log(logging.INFO if extra else logging.DEBUG, "VAE %s: %d weights loaded, %d unexpected keys ignored",
               Path(path).name, len(expected), len(extra))


@torch.no_grad()
def merge_weighted_sum(model: nn.Module, other: nn.Module, ratio: float) -> None:
    """AUTOMATIC1111's "weighted sum" checkpoint merge, in place: θ ← (1 − ratio)·θ + ratio·θ_other for every
    floating-point weight and buffer of two models built from one config, computed in float32 from the loaded
    weights and rounded once to their dtype.
    Fine-tunes of one model average well into one that is often better than either ("model soups", Wortsman et
    al. 2022); integer buffers (token positions) are kept."""
    others = other.state_dict()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value.copy_(torch.lerp(value.float(), others[key].float(), ratio).to(value.dtype))


# diffusers model folders: each part's weights file.
DIFFUSERS_PARTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


def snapshot_folder(path: str | Path) -> Path:
    """A Hugging Face cache repository folder (``models--org--name``) as the snapshot its ``refs/main`` names (or
    its only snapshot); any other folder as it is."""
    path = Path(path)
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    main = path / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return snapshots / main.read_text().strip()
    candidates = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return candidates[0] if len(candidates) == 1 else path


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (snapshot_folder(path) / "model_index.json").is_file()


def diffusers_key_map(model: nn.Module) -> dict[tuple[str, str], str]:
    """(diffusers part, key there) → our key, for every weight of ``model``.

    The UNet's and the VAE's come from diffusers' own converters (``convert_ldm_*_checkpoint``), run on
    placeholders that share no memory (one-number tensors expanded to each weight's shape), so each converted key is
    traced back to its source by storage; the text encoder's keys are transformers' own. (diffusers is imported
    here, not at the top: it takes a second, and most runs read no folder.)
    """
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    placeholders = {key: torch.zeros(()).expand(value.shape) for key, value in model.state_dict().items()}
    ours_by_storage = {value.data_ptr(): key for key, value in placeholders.items()}
    mapping = {}
    for part, prefix, configure, convert in (
            ("unet", UNET_PREFIX, create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint),
            ("vae", VAE_PREFIX, create_vae_diffusers_config_from_ldm, convert_ldm_vae_checkpoint)):
        subset = {key: value for key, value in placeholders.items() if key.startswith(prefix)}
        for key, value in convert(dict(subset), configure(model.source_config, subset)).items():
            if value.data_ptr() in ours_by_storage:
                mapping[part, key] = ours_by_storage[value.data_ptr()]
    for key in placeholders:
        if key.startswith(TEXT_PREFIX):
            mapping["text_encoder", key.removeprefix(TEXT_PREFIX)] = key
    return mapping


def read_diffusers_folder(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder weights of a diffusers model folder (or Hugging Face cache snapshot) under
    our keys, reshaped where diffusers' layout differs (the VAE's attention as linear layers)."""
    folder = snapshot_folder(path)
    mapping = diffusers_key_map(model)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    state = {}
    for part, names in DIFFUSERS_PARTS.items():
        file = next((folder / part / name for name in names if (folder / part / name).is_file()), None)
        if file is None:
            raise CheckpointError(f"diffusers folder {folder} has no {part} weights ({part}/{names[0]} or .bin)")
        for key, value in read_safely(file, what=f"{part} weights").items():
            ours = mapping.get((part, key.removeprefix("text_model.") if part == "text_encoder" else key))
            if ours is not None:
                state[ours] = value.reshape(shapes[ours]) if value.numel() == shapes[ours].numel() else value
    return state
