"""LoRA and LyCORIS files merged into a loaded model's weights, and taken out again exactly.

Keys as civitai ships them (kohya / AUTOMATIC1111: ``lora_unet_<diffusers module path with _>.<part>``,
``lora_te_text_model_<module path with _>.<part>``) or diffusers/PEFT's (``unet.<module path>.lora_A.weight``,
``text_encoder.text_model.<module path>.lora_B.weight``). The UNet's diffusers names are mapped to ours by
diffusers' own checkpoint converter. Deltas at weight w (LyCORIS's and AUTOMATIC1111's definitions), with
scale = alpha/rank (alpha = rank when the file has none):

* LoRA / LoCon: w · scale · up.flatten(1) @ down.flatten(1), reshaped to the layer's weight (rank = down's rows);
* LoHa: w · scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or each factor from its Tucker core t (rank = w1_b's rows);
* LoKr: w · scale · kron(w1, w2), each factor full or a @ b (rank = the factored one's inner size; scale 1 when
  both are full).

Merging happens once per run in float32 (no cost per step); the replaced weights are kept, so :meth:`Merged.restore`
puts back every weight bit for bit. Caches derived from weights (the CPU Winograd kernels) see the in-place change
through the tensors' version counters; CUDA graphs read the weights' memory, which is updated in place.
"""

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ldm.models.loading import diffusers_key_map, read_safely
from ldm.util import InputError

logger = logging.getLogger(__name__)

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _scale(parts: Mapping[str, torch.Tensor], rank: int) -> float:
    alpha = parts.get("alpha")
    return float(alpha) / rank if alpha is not None else 1.0


def lora_delta(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * _scale(parts, down.shape[0])


def _tucker(core: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """A convolution weight (out, in, kh, kw) from its Tucker core (r, r, kh, kw) and factors (r, in), (r, out)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core.float(), w_b.float(), w_a.float())


def _factor(parts: Mapping[str, torch.Tensor], name: str, core: str) -> torch.Tensor:
    if core in parts:
        return _tucker(parts[core], parts[f"{name}_b"], parts[f"{name}_a"])
    return parts[f"{name}_a"].float() @ parts[f"{name}_b"].float().flatten(1)


def loha_delta(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    product = _factor(parts, "hada_w1", "hada_t1") * _factor(parts, "hada_w2", "hada_t2")
    return product.reshape(shape) * _scale(parts, parts["hada_w1_b"].shape[0])


def lokr_delta(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    factors, rank = [], None
    for name in ("lokr_w1", "lokr_w2"):
        if name in parts:
            factors.append(parts[name].float())
        else:
            factors.append(_factor(parts, name, "lokr_t2" if name == "lokr_w2" else "lokr_t1"))
            rank = parts[f"{name}_b"].shape[0]
    w1, w2 = factors
    if w2.dim() == 4:  # a convolution: the first factor scales whole kernels
        w1 = w1[:, :, None, None]
    w2 = w2.reshape(w2.shape[0], -1) if w1.dim() == 2 else w2
    return torch.kron(w1, w2).reshape(shape) * (_scale(parts, rank) if rank is not None else 1.0)


DELTAS: dict[str, Callable[[Mapping[str, torch.Tensor], torch.Size], torch.Tensor]] = {
    "lora_down.weight": lora_delta, "hada_w1_a": loha_delta, "lokr_w1": lokr_delta, "lokr_w1_a": lokr_delta}


@dataclass
class Merged:
    """LoRAs merged into ``model``; :meth:`restore` takes them out again, every weight bit for bit."""

    model: nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # "name:weight" of each file merged
    sources: list[tuple[Path, float]] = field(default_factory=list)  # the files and weights merged

    @torch.no_grad()
    def restore(self) -> None:
        parameters = dict(self.model.named_parameters())
        for name, original in self.originals.items():
            parameters[name].copy_(original)
        self.originals.clear()


def layer_names(model: nn.Module) -> dict[str, str]:
    """kohya's flat module names → our weight names: the UNet's diffusers names (from :func:`diffusers_key_map`,
    diffusers' own converter) and the text encoder's transformers names."""
    names = {}
    for (part, key), ours in diffusers_key_map(model).items():
        if key.endswith(".weight") and part in KOHYA_PREFIXES:
            names[KOHYA_PREFIXES[part] + key.removesuffix(".weight").replace(".", "_")] = ours
    return names


def read_lora(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA file's tensors grouped by layer, in kohya's naming whatever the file's."""
    content = read_safely(path, what="LoRA")
    if not isinstance(content, Mapping):
        raise InputError(f"LoRA {path} holds a {type(content).__name__}, not a mapping of tensors")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in content.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            continue
        layer, part = _split_key(key)
        layers.setdefault(layer, {})[part] = tensor
    if not layers:
        raise InputError(f"LoRA {path} contains no LoRA tensors")
    return layers


def _split_key(key: str) -> tuple[str, str]:
    for peft, part in PEFT_PARTS.items():
        if key.endswith("." + peft):
            module = key.removesuffix("." + peft)
            module = re.sub(r"^unet\.", "lora_unet_", module)
            module = re.sub(r"^text_encoder\.text_model\.", "lora_te_text_model_", module)
            return module.replace(".", "_"), part
    layer, _, part = key.partition(".")
    return layer, part


@torch.no_grad()
def apply_loras(model: nn.Module, loras: list[tuple[str | Path, float]]) -> Merged:
    """Merge each (file, weight) into ``model``'s weights, in order (they stack); returns the handle to undo it.

    Layers of a file that match none of the model's are reported; a file that matches none, or whose deltas do not
    fit the layers they name (a LoRA for SD 2 or SDXL), is refused.
    """
    names = layer_names(model)
    parameters = dict(model.named_parameters())
    merged = Merged(model, sources=[(Path(path), weight) for path, weight in loras])
    try:
        for path, weight in loras:
            _merge_file(path, weight, names, parameters, merged)
    except BaseException:
        merged.restore()
        raise
    return merged


def _merge_file(path: str | Path, weight: float, names: dict[str, str], parameters: dict[str, nn.Parameter],
                merged: Merged) -> None:
    layers = read_lora(path)
    unmatched = sorted(layer for layer in layers if layer not in names)
    if len(unmatched) == len(layers):
        raise InputError(f"LoRA {path} matches none of this model's layers (first: {unmatched[0]}): is it for "
                         "another model, such as SD 2 or SDXL?")
    if unmatched:
        logger.warning("LoRA %s: %d of its %d layers match nothing in this model and are left out: %s", path,
                       len(unmatched), len(layers), ", ".join(unmatched[:3]))
    for layer, parts in layers.items():
        if layer not in names:
            continue
        kind = next((part for part in DELTAS if part in parts), None)
        if kind is None:
            raise InputError(f"LoRA {path}: layer {layer} has parts {', '.join(sorted(parts))}, of no kind known here "
                             "(LoRA, LoCon, LoHa, LoKr)")
        parameter = parameters[names[layer]]
        try:
            delta = DELTAS[kind](parts, parameter.shape)
        except (RuntimeError, KeyError) as error:
            raise InputError(f"LoRA {path}: layer {layer} does not fit this model's {tuple(parameter.shape)} weight "
                             f"(a LoRA for another architecture?): {str(error).splitlines()[0]}") from None
        merged.originals.setdefault(names[layer], parameter.detach().clone())
        parameter.copy_((parameter.float() + weight * delta).to(parameter.dtype))
    merged.names.append(f"{Path(path).stem}:{weight:g}")


def take_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` tags out of a prompt: the prompt without them (the text CLIP sees),
    and the (name, weight) pairs (weight 1 when not given)."""
    tags = []
    for name, weight in LORA_TAG.findall(prompt):
        try:
            tags.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise InputError(f"<lora:{name}:{weight}>: the weight must be a number") from None
    return LORA_TAG.sub("", prompt), tags


def find_lora(name: str, directory: str | Path) -> Path:
    """The file a ``<lora:NAME>`` tag means: NAME.safetensors (or .pt, .ckpt) in ``directory``. A prompt may come
    from a stranger's PNG (``--from-png``), so NAME is a file name, never a path out of ``directory``."""
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError(f"<lora:{name}>: a LoRA is named by its file name in the LoRA folder, not by a path")
    for suffix in LORA_SUFFIXES:
        if (Path(directory) / f"{name}{suffix}").is_file():
            return Path(directory) / f"{name}{suffix}"
    raise InputError(f"<lora:{name}>: no {name}{'/'.join(LORA_SUFFIXES)} in {directory}")
