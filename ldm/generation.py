"""What txt2img, img2img and DiffEdit share: device and precision, the model with its sampler, prompts to
conditioning, images to latents and back, and the safety check."""

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from ldm.models.acceleration import Acceleration, accelerate
from ldm.models.diffusion.samplers import make_sampler
from ldm.models.loading import load_model
from ldm.safety import MISSING_CHECKER, SafetyChecker, cached_checker_dir
from ldm.util import InputError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "full", "autocast", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
WEIGHT_DTYPES = {"full": torch.float32, "autocast": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if not available[name]:
        raise InputError(f"--device {name} was asked for but this machine has no {name.upper()} device")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: float16 weights on GPUs (fastest; equal to float32 up to float16 rounding), float32 on the CPU.

    The others: ``full`` float32; ``autocast`` float32 weights under float16 autocast, as the original runs;
    ``fp16`` / ``bf16`` weights and activations in that type (the sampler's latents stay float32).
    """
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type in ("cuda", "mps") else "full"
    return precision


def precision_scope(precision: str, device: torch.device, cuda_graph: bool = False
                    ) -> contextlib.AbstractContextManager:
    """``autocast``: float16 autocast on GPUs, as the original (its weight cache off when CUDA graphs are
    captured); on the CPU it runs in float32 (exact, and CPU float16 autocast is slow). Others: no autocast."""
    if precision == "autocast" and device.type in ("cuda", "mps"):
        return torch.autocast(device.type, dtype=torch.float16, cache_enabled=not cuda_graph)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Geometry:
    """Image ↔ latent sizes implied by a model config."""

    latent_channels: int
    factor: int  # pixels per latent pixel (the autoencoder's downsampling)
    multiple: int  # image sides must be multiples of this for the UNet's skip connections to line up

    @classmethod
    def of(cls, config: DictConfig) -> "Geometry":
        params = config.model.params
        factor = 2 ** (len(params.first_stage_config.params.ddconfig.ch_mult) - 1)
        levels = len(params.unet_config.params.get("channel_mult", (1, 2, 4, 8)))
        return cls(params.get("channels", params.unet_config.params.in_channels), factor,
                   factor * 2 ** (levels - 1))

    def check(self, height: int, width: int, channels: int | None = None, factor: int | None = None) -> None:
        if channels is not None and channels != self.latent_channels:
            raise InputError(f"--C {channels} does not match the model's {self.latent_channels} latent channels")
        if factor is not None and factor != self.factor:
            raise InputError(f"--f {factor} does not match the model's downsampling factor {self.factor}")
        if height <= 0 or width <= 0 or height % self.multiple or width % self.multiple:
            raise InputError(f"--H and --W must be positive multiples of {self.multiple} for this model, "
                             f"got {height}×{width}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent_channels, height // self.factor, width // self.factor


def encode_images(model, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [−1, 1] → scaled float32 latents: a posterior sample (drawn on the CPU unless
    ``generator`` lives elsewhere, as the original)."""
    posterior = model.encode_first_stage(images.to(model.device))
    return model.get_first_stage_encoding(posterior, generator).float()


def decode_images(model, latents: torch.Tensor, one_at_a_time: bool = False) -> torch.Tensor:
    """Latents → images (B, 3, H, W) in [0, 1], float32 on the CPU (``one_at_a_time``: less memory).

    A half-precision decode that overflows (the SD v1 VAE's activations can pass float16's 65 504 on some
    latents) is redone in float32 with autocast off, with a warning.
    """
    pieces = latents.split(1) if one_at_a_time else [latents]
    images = torch.cat([_decode_finite(model, piece) for piece in pieces])
    return torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu()


def _decode_finite(model, latents: torch.Tensor) -> torch.Tensor:
    images = model.decode_first_stage(latents)
    half = model.first_stage_dtype != torch.float32 or torch.is_autocast_enabled(latents.device.type)
    if not half or torch.isfinite(images).all():
        return images
    logger.warning("the half-precision VAE decode overflowed; decoding again in float32")
    vae = model.first_stage_model
    dtype = model.first_stage_dtype
    try:
        with torch.autocast(latents.device.type, enabled=False):
            vae.float()
            return model.decode_first_stage(latents.float())
    finally:
        vae.to(dtype)


def load_image(path: str | Path, multiple: int) -> torch.Tensor:
    """An image file as (1, 3, H, W) in [−1, 1], its sides rounded down to multiples of ``multiple`` (LANCZOS).

    The original rounds to multiples of 32, which the UNet cannot take; the change in size is logged.
    """
    try:
        image = Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path} is not an image the Python Imaging Library can read ({error})") from None
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise InputError(f"{path} is {image.width}×{image.height}; both sides must be at least {multiple}")
    if (width, height) != image.size:
        logger.info("resizing %s from %d×%d to %d×%d (multiples of %d)", Path(path).name, *image.size, width,
                    height, multiple)
    array = np.asarray(image.resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def load_safety_checker(config: DictConfig, directory: str | Path | None, disabled: bool,
                        device: torch.device) -> SafetyChecker | None:
    """The checker the user gave, else the Hugging Face cache's copy; refuse to go on without one unless the
    user said ``--no_safety_checker`` or the model's config says it needs none (``safety_checker: false``)."""
    if not config.get("safety_checker", True):
        logger.info("this model's config says it needs no safety checker")
        return None
    if disabled:
        logger.warning("the safety checker is disabled (--no_safety_checker)")
        return None
    directory = directory or cached_checker_dir()
    if directory is None:
        raise InputError(MISSING_CHECKER)
    return SafetyChecker(directory, device)


class Pipeline:
    """A loaded model, its sampler and the per-batch steps around sampling."""

    def __init__(self, model, sampler_name: str, device: torch.device, precision: str,
                 safety_checker: SafetyChecker | None = None, acceleration: Acceleration = Acceleration()):
        self.model = model
        self.sampler = make_sampler(sampler_name, model)
        self.sampler_name = sampler_name
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.safety_checker = safety_checker
        self.acceleration = acceleration

    @classmethod
    def load(cls, config: DictConfig, ckpt: str | Path, device: torch.device, precision: str, sampler_name: str,
             safety_checker: SafetyChecker | None = None, acceleration: Acceleration = Acceleration()
             ) -> "Pipeline":
        """Load the checkpoint straight into the precision's weight dtype, then apply ``acceleration``."""
        acceleration.check(device)
        dtype = WEIGHT_DTYPES[resolve_precision(precision, device)]
        model = load_model(config, ckpt, device=device, dtype=dtype)
        accelerate(model, acceleration)
        return cls(model, sampler_name, device, precision, safety_checker, acceleration)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """No gradients, the chosen precision, and the EMA weights where the config uses them."""
        with (torch.no_grad(), precision_scope(self.precision, self.device, self.acceleration.cuda_graph),
              self.model.ema_scope()):
            yield

    def conditioning(self, prompts: list[str], negative_prompt: str, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(c, uc): the prompts' features and, when guidance is on (scale ≠ 1), the negative prompt's."""
        uc = self.model.get_learned_conditioning(len(prompts) * [negative_prompt]) if scale != 1.0 else None
        return self.model.get_learned_conditioning(prompts), uc

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_images(self.model, images, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_images(self.model, latents, self.acceleration.vae_slicing)

    def to_images(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Latents → checked images in [0, 1] (flagged ones replaced) and how many were flagged."""
        return self.check_safety(self.decode(latents))

    def check_safety(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Images with flagged ones replaced, and how many were flagged."""
        if self.safety_checker is None:
            return images, 0
        images, flags = self.safety_checker(images)
        return images, sum(flags)

