"""Ways to run the same model faster or in less memory, none of which changes a result beyond rounding.

* ``cuda_graph``: :class:`CUDAGraphUNet` records the UNet's kernels once per input shape and replays them, one
  launch per step instead of ~1 000, without a compile wait.
* ``compile``: ``torch.compile`` of the UNet; with ``cuda_graph`` too, :class:`CompiledCUDAGraphUNet` (mode
  "reduce-overhead"). Inductor's caches live in ``~/.cache/ldm/torchinductor`` unless
  ``TORCHINDUCTOR_CACHE_DIR`` says otherwise, so a second run loads the compiled kernels instead of compiling.
* ``attention_slicing``: attention over at most that many query tokens at a time (less memory on small cards).
* ``vae_slicing``: decode one image at a time (see :func:`ldm.generation.decode_images`).
* ``vae_tiling``: decode latents larger than ``VAE_TILE`` by overlapping tiles, cross-faded
  (:func:`ldm.models.autoencoder.tiled_decode`): the decoder's memory is bounded by the tile, whatever the image.
* ``backend``: ``torch``; ``openvino`` for the UNet and the VAE decoder on OpenVINO's CPU plugin
  (:mod:`ldm.models.openvino_engine`; converted from our modules once, cached on disk); ``auto``: openvino where
  it runs (the CPU, the package installed, float32 or bfloat16 weights, no --compile), else torch. OpenVINO is the
  faster CPU engine at equal precision (README, "Speed"); torch stays the default so that the original's flags
  keep drawing bit-identical pictures and no run waits for a conversion unasked.
* ``winograd`` (on by default): in float32 CPU inference the wide 3×3 convolutions compute by Winograd's
  F(2×2, 3×3) (:mod:`ldm.modules.winograd`), and the UNet's weights are kept channels_last to match its
  results; the transformed kernels take 16/9 the memory of those weights (3.7 GB more for the SD v1 UNet in
  float32), so it can be turned off.
"""

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ldm.models.autoencoder import Decoding
from ldm.models.openvino_engine import PRECISION_HINTS, OpenVINODecoder, OpenVINOUNet, openvino_available
from ldm.modules.attention import set_attention_slicing
from ldm.modules.winograd import set_winograd
from ldm.util import ParameterError

logger = logging.getLogger(__name__)

COMPILE_CACHE = Path.home() / ".cache" / "ldm" / "torchinductor"
BACKENDS = ("torch", "openvino", "auto")
VAE_TILE, VAE_TILE_OVERLAP = 64, 16  # latent pixels: 512-pixel tiles, 128 pixels cross-faded (SD's factor 8)


@dataclass(frozen=True)
class Acceleration:
    """The speed and memory options of a run (the scripts' flags of the same names)."""

    compile: bool = False
    cuda_graph: bool | None = None  # None: on where the model runs on CUDA
    attention_slicing: int = 0  # query tokens per attention call; 0: all at once
    vae_slicing: bool = False
    vae_tiling: bool = False
    winograd: bool = True
    backend: str = "torch"

    def for_device(self, device: torch.device, precision: str = "full") -> "Acceleration":
        """These options checked for ``device`` and ``precision``, with ``cuda_graph`` and ``backend`` decided."""
        if self.backend == "auto":
            openvino_runs = (device.type == "cpu" and openvino_available() and not self.compile
                             and not self.cuda_graph and precision != "fp16")
            return replace(self, backend="openvino" if openvino_runs else "torch").for_device(device, precision)
        cuda_graph = device.type == "cuda" if self.cuda_graph is None else self.cuda_graph
        if cuda_graph and device.type != "cuda":
            raise ParameterError("cuda_graph", f"needs a CUDA device; this run uses {device.type}")
        if self.compile and not torch._dynamo.is_dynamo_supported():
            raise ParameterError("compile", "needs torch.compile, which does not support this Python version")
        if self.backend not in BACKENDS:
            raise ParameterError("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openvino" and (device.type != "cpu" or not openvino_available()):
            raise ParameterError("backend", "openvino runs on the CPU and needs the openvino package"
                                 if openvino_available() else "openvino needs the openvino package (pip install "
                                 "openvino, as pinned in requirements.txt)")
        if self.backend == "openvino" and (self.compile or cuda_graph):
            raise ParameterError("backend", "openvino does not combine with --compile or CUDA graphs")
        if self.backend == "openvino" and precision == "fp16":
            raise ParameterError("backend", "openvino runs float32 or bfloat16 weights (--precision full or bf16)")
        if self.attention_slicing < 0:
            raise ParameterError("attention_slicing", "must be 0 (off) or a positive number of tokens, "
                                 f"got {self.attention_slicing}")
        return replace(self, cuda_graph=cuda_graph)


def accelerate(model: nn.Module, acceleration: Acceleration) -> None:
    """Apply ``acceleration`` (checked by :meth:`Acceleration.for_device`) to a loaded LatentDiffusion in place
    (its UNet runs through an engine that shares its weights: :meth:`DiffusionWrapper.set_engine`)."""
    set_attention_slicing(model, acceleration.attention_slicing)
    set_winograd(model, acceleration.winograd)
    wrapper, vae = model.model, model.first_stage_model
    wrapper.set_engine(None)
    vae.set_decode_engine(None)
    if acceleration.winograd and next(wrapper.parameters()).device.type == "cpu":
        # Winograd's results come channels_last; with the UNet's other convolutions channels_last as well, no layer
        # reorders its input (a UNet step at 512×512 measured 7 % faster, 4 of 4 alternating runs).
        wrapper.diffusion_model.to(memory_format=torch.channels_last)
    vae.tiling = (VAE_TILE, VAE_TILE_OVERLAP) if acceleration.vae_tiling else None
    if acceleration.backend == "openvino":
        unet = wrapper.diffusion_model.to(memory_format=torch.contiguous_format)
        wrapper.set_engine(OpenVINOUNet(unet, openvino_precision(unet)))
        vae.set_decode_engine(OpenVINODecoder(Decoding(vae), openvino_precision(vae)))
        return
    if acceleration.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
        if acceleration.cuda_graph:
            wrapper.set_engine(CompiledCUDAGraphUNet(wrapper.diffusion_model))
        else:
            wrapper.set_engine(torch.compile(wrapper.diffusion_model, dynamic=False))
    elif acceleration.cuda_graph:
        wrapper.set_engine(CUDAGraphUNet(wrapper.diffusion_model))


def openvino_precision(module: nn.Module) -> str:
    """OpenVINO's inference precision for a module's weights (float16 is refused by :meth:`Acceleration.for_device`)."""
    dtype = next(module.parameters()).dtype
    if dtype not in PRECISION_HINTS:
        raise ParameterError("backend", "openvino runs float32 or bfloat16 weights (--precision full or bf16)")
    return PRECISION_HINTS[dtype]


class CUDAGraphUNet(nn.Module):
    """``unet(x, timesteps, context)`` replayed from a CUDA graph captured on the first call with each shape.

    Inputs are copied into the graph's static tensors and the output is copied out, so callers may keep results
    across steps (multistep solvers do). If capture fails, the UNet runs eagerly from then on, with a warning.
    Capture needs the autocast weight cache off (``torch.autocast(..., cache_enabled=False)``): cached casts
    made during capture would be freed with the capture's memory.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.failed = False

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
                ) -> torch.Tensor:
        inputs = [x, timesteps] if context is None else [x, timesteps, context]
        if self.failed or torch.is_grad_enabled() or x.device.type != "cuda":
            return self.unet(*inputs)
        key = tuple((tensor.shape, tensor.dtype) for tensor in inputs) + (torch.is_autocast_enabled("cuda"),)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(inputs)
            except RuntimeError as error:
                logger.warning("CUDA graph capture failed (%s); running the UNet eagerly", str(error).splitlines()[0])
                self.failed = True
                return self.unet(*inputs)
        static_inputs, static_output, graph = self.graphs[key]
        for static, tensor in zip(static_inputs, inputs):
            static.copy_(tensor)
        graph.replay()
        return static_output.clone()

    def _capture(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]:
        static_inputs = [tensor.clone() for tensor in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: kernel selection, workspace allocation
            for _ in range(2):
                self.unet(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.unet(*static_inputs)
        return static_inputs, static_output, graph


class CompiledCUDAGraphUNet(nn.Module):
    """``torch.compile(unet, mode="reduce-overhead")``: compiled kernels replayed from Inductor's CUDA graphs.

    Those graphs overwrite their outputs on the next replay, so each output is copied before it is returned:
    multistep solvers keep earlier outputs (unguided DPM-Solver keeps the raw ε).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.compiled = torch.compile(unet, mode="reduce-overhead", dynamic=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
                ) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, timesteps, context).clone()
