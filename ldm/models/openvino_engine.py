"""Networks on OpenVINO, the CPU engine of this field: the UNet and the VAE decoder converted from our own modules
(the one definition of each network), compiled by OpenVINO's CPU plugin, and cached on disk so only the first run
converts.

The IR (``.xml`` + ``.bin``) is stored under a key made of the module's weights (a BLAKE2 hash of every tensor), the
input shapes and the OpenVINO version; a sidecar records the files' own hashes, and a cache entry whose files do not
match it, or that OpenVINO cannot read, is converted again, never used. Inference precision is OpenVINO's
``INFERENCE_PRECISION_HINT``: ``f32`` for float32 runs, ``bf16`` for ``--precision bf16`` (the IR is converted from
float32 weights either way).
"""

import copy
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.modules.winograd import set_winograd

logger = logging.getLogger(__name__)

OPENVINO_CACHE = Path.home() / ".cache" / "ldm" / "openvino"  # or $LDM_OPENVINO_CACHE
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def weights_hash(module: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class OpenVINOModule(nn.Module):
    """``module(*inputs)`` computed by OpenVINO, one compiled model per input shape (float32 tensors in and out).

    The torch module stays at ``self.module``: calls that need gradients run it, and when its parameters change in
    place (a LoRA merged or restored: their ``_version`` counts move) the IR is converted anew instead of served
    stale."""

    def __init__(self, module: nn.Module, precision: str = "f32", cache_dir: Path | None = None,
                 label: str = "module"):
        super().__init__()
        import openvino

        set_winograd(module, False)  # OpenVINO converts the plain convolutions and picks its own algorithms
        self.module, self.precision, self.label = module, precision, label
        self.cache_dir = Path(cache_dir or os.environ.get("LDM_OPENVINO_CACHE", OPENVINO_CACHE))
        self.core = openvino.Core()
        self.version = openvino.__version__
        self.compiled: dict[tuple, object] = {}
        self._weights: str | None = None
        self._watched = list(module.parameters())  # walking the module tree each call costs 4 ms per UNet step
        self._version: int | None = None  # the parameters' in-place modification count when last compiled

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.module(*inputs)
        version = sum(parameter._version for parameter in self._watched)
        if version != self._version:
            self.compiled.clear()
            self._weights, self._version = None, version
        inputs = [tensor.float() for tensor in inputs]
        key = tuple(tuple(tensor.shape) for tensor in inputs)
        if key not in self.compiled:
            self.compiled[key] = self.core.compile_model(self._model(inputs, key), "CPU",
                                                         {"INFERENCE_PRECISION_HINT": self.precision})
        output = self.compiled[key]([tensor.contiguous().numpy() for tensor in inputs])[0]
        return torch.from_numpy(np.array(output))  # a copy: OpenVINO reuses its output buffer

    def _model(self, inputs: list[torch.Tensor], key: tuple):
        """The IR for these shapes: from the cache if it is intact, else converted now and cached."""
        if self._weights is None:
            self._weights = weights_hash(self.module)
        name = hashlib.blake2b(f"{self._weights}{key}{self.version}".encode(), digest_size=16).hexdigest()
        xml, meta = self.cache_dir / f"{name}.xml", self.cache_dir / f"{name}.json"
        model = self._cached(xml, meta)
        if model is None:
            model = self._convert(inputs)
            self._store(model, xml, meta)
        model.reshape({port: list(tensor.shape) for port, tensor in zip(model.inputs, inputs)})  # static: faster
        return model

    def _cached(self, xml: Path, meta: Path):
        if not (xml.is_file() and meta.is_file()):
            return None
        try:
            recorded = json.loads(meta.read_text())
            intact = all(recorded.get(path.name) == file_hash(path) for path in (xml, xml.with_suffix(".bin")))
            if intact:
                logger.info("OpenVINO: the %s from the cache (%s)", self.label, xml.name)
                return self.core.read_model(str(xml))
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("OpenVINO cache entry %s is unreadable (%s); converting again", xml.name, error)
            return None
        logger.warning("OpenVINO cache entry %s does not match its record; converting again", xml.name)
        return None

    def _convert(self, inputs: list[torch.Tensor]):
        import openvino

        logger.info("OpenVINO: converting the %s for inputs %s (once; later runs read the cache)", self.label,
                    ", ".join("×".join(map(str, tensor.shape)) for tensor in inputs))
        module = self.module
        if next(module.parameters()).dtype != torch.float32:
            module = copy.deepcopy(module).float()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # group_norm's batch-size check, shape-static
            return openvino.convert_model(module, example_input=tuple(inputs))

    def _store(self, model, xml: Path, meta: Path) -> None:
        """Write the IR next to a record of its files' hashes (a failed write leaves no record, so no entry)."""
        import openvino

        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            openvino.save_model(model, str(xml), compress_to_fp16=False)
            meta.write_text(json.dumps({path.name: file_hash(path) for path in (xml, xml.with_suffix(".bin"))}))
        except OSError as error:
            logger.warning("OpenVINO: cannot cache the converted %s in %s (%s)", self.label, self.cache_dir,
                           error)


def distinct_rows(x: torch.Tensor, timesteps: torch.Tensor) -> int:
    """How many leading rows of (x, timesteps) hold the distinct inputs: B when they are ``torch.cat([a] * 2)``
    for one (a, t) of B rows (classifier-free guidance's doubled batch), else all of them."""
    half = x.shape[0] // 2
    if x.shape[0] % 2 or not torch.equal(timesteps[:half], timesteps[half:]) or not torch.equal(x[:half], x[half:]):
        return x.shape[0]
    return half


class OpenVINOUNet(OpenVINOModule):
    """``unet(x, timesteps, context)`` on OpenVINO; the result comes back in ``x``'s dtype.

    A guided batch (x and timesteps doubled, two contexts) goes in with x once: the UNet computes the
    condition-independent part up to its first cross-attention once for both (:meth:`UNetModel.forward`; SD v1
    at 512 px: the first ResBlock and self-attention at 64×64, ~3 % of a step's arithmetic)."""

    def __init__(self, unet: nn.Module, precision: str = "f32", cache_dir: Path | None = None):
        super().__init__(unet, precision, cache_dir, "UNet")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
                ) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.module(x, timesteps, context)
        timesteps = timesteps.expand(x.shape[0])
        if context is None:
            return super().forward(x, timesteps).to(x.dtype)
        rows = distinct_rows(x, timesteps)
        return super().forward(x[:rows], timesteps[:rows], context).to(x.dtype)


class OpenVINODecoder(OpenVINOModule):
    """The autoencoder's ``decode(z)`` (post-quantisation convolution and decoder) on OpenVINO, in ``z``'s dtype."""

    def __init__(self, decoding: nn.Module, precision: str = "f32", cache_dir: Path | None = None):
        super().__init__(decoding, precision, cache_dir, "VAE decoder")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z).to(z.dtype)
