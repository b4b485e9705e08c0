"""One road from prompts to checked images: :class:`Pipeline` loads a model once and makes txt2img, img2img,
inpainting and DiffEdit images with it; the scripts only parse flags, call it and write files.

Randomness (one regime for every entry point). Each draw (start codes, img2img and DiffEdit noise, DDIM's
η-noise, the VAE posterior sample) comes from the ``generator`` a call is given; without one, from the global
RNG, as the original: noise on the model's device, the VAE posterior sample on the CPU. The scripts seed the
global RNG once per run (``seed_everything(--seed)``, after the model is loaded) and then draw exactly what the
original draws, in its order — including DDIM's and PLMS's per-step draws that are multiplied by σ = 0 — so a
seed gives the original's pictures in every batch and iteration of a run, not only the first.
"""

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from ldm.editing.diffedit import edit_latent, estimate_mask, resize_mask
from ldm.editing.inpainting import KnownRegion, latent_mask, pixel_mask
from ldm.models.acceleration import VAE_TILE, Acceleration, accelerate
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.dpm_solver.sigma_samplers import SigmaSampler
from ldm.models.diffusion.samplers import SAMPLERS, Sampler, check_sampler, make_sampler
from ldm.models.diffusion.sampling_util import StepCallback
from ldm.models.loading import ConfigError, check_checkpoint_path, load_config, load_model, load_vae
from ldm.models.lora import Merged, apply_loras, find_lora, take_lora_tags
from ldm.safety import CHECKER_REPO, SafetyChecker, cached_checker_dir
from ldm.util import InputError, ParameterError, Problems

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "full", "autocast", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
WEIGHT_DTYPES = {"full": torch.float32, "autocast": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKGROUND = (255, 255, 255)  # what transparent parts of an input image are composited on
MAX_INPUT_PIXELS = 16_777_216  # 4096 × 4096: an input image is used at its own size, and larger ones exhaust memory


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if isinstance(name, torch.device):
        name = name.type
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise ParameterError("device", f"must be one of {', '.join(DEVICES)}, got {name!r}")
    if not available[name]:
        raise ParameterError("device", f"{name} was asked for but this machine has no {name.upper()} device")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: float16 weights on GPUs (fastest; equal to float32 up to float16 rounding), float32 on the CPU.

    The others: ``full`` float32; ``autocast`` float32 weights under float16 autocast, as the original runs;
    ``fp16`` / ``bf16`` weights and activations in that type (the sampler's latents stay float32).
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
    native_size: int  # the side, in pixels, the model was trained at (512 for SD v1)

    @classmethod
    def of(cls, config: DictConfig) -> "Geometry":
        """The sizes of a latent-diffusion config; one that lacks the parts they come from is a :class:`ConfigError`."""
        try:
            params = config.model.params
            factor = 2 ** (len(params.first_stage_config.params.ddconfig.ch_mult) - 1)
            levels = len(params.unet_config.params.get("channel_mult", (1, 2, 4, 8)))
            latent_size = params.get("image_size", params.unet_config.params.get("image_size", 64))
            channels = params.get("channels", params.unet_config.params.in_channels)
        except (AttributeError, KeyError, TypeError) as error:  # omegaconf's missing-key errors are both
            missing = str(error).splitlines()[0]
            raise ConfigError(f"config is not a latent-diffusion model config with first_stage_config and "
                              f"unet_config ({missing})") from None
        return cls(channels, factor, factor * 2 ** (levels - 1), latent_size * factor)

    def check(self, height: int, width: int, channels: int | None = None, factor: int | None = None) -> None:
        if channels is not None and channels != self.latent_channels:
            raise ParameterError("latent_channels", f"{channels} does not match the model's {self.latent_channels} "
                                 "latent channels")
        if factor is not None and factor != self.factor:
            raise ParameterError("factor", f"{factor} does not match the model's downsampling factor {self.factor}")
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % self.multiple:
                raise ParameterError(name, f"must be a positive multiple of {self.multiple} for this model, got "
                                     f"{side}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check(height, width)
        return self.latent_channels, height // self.factor, width // self.factor


def activation_bytes(config: DictConfig, batch: int, height: int, width: int, precision: str, guided: bool,
                     vae_slicing: bool, vae_tiling: bool = False) -> int:
    """Roughly the activation memory a batch holds at once: the UNet about 32·model_channels values per latent
    pixel of each image (twice the images under guidance), the VAE decoder about 4·ch·ch_mult[0] values per pixel
    of each image (or tile) it decodes at once. An order of magnitude, for refusing what cannot fit before loading."""
    params = config.model.params
    geometry = Geometry.of(config)
    ddconfig = params.first_stage_config.params.ddconfig
    latent_pixels = (height // geometry.factor) * (width // geometry.factor)
    unet = 32 * params.unet_config.params.get("model_channels", 320) * latent_pixels * batch * (2 if guided else 1)
    tile = VAE_TILE * geometry.factor
    decoded = min(height, tile) * min(width, tile) if vae_tiling else height * width
    vae = 4 * ddconfig.get("ch", 128) * ddconfig.ch_mult[0] * decoded * (1 if vae_slicing else batch)
    return (unet + vae) * (2 if precision in ("fp16", "bf16") else 4)


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the run computes: the GPU's, or the machine's available RAM (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
            return int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable"))) * 1024
        except (OSError, StopIteration, ValueError):
            return None
    return None


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16- and 32-bit greyscale scaled by their range (not clipped at 255), palettes
    and CMYK converted, transparency composited on ``BACKGROUND`` (white, as AUTOMATIC1111 flattens by default)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max(initial=0.0)
        full_scale = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 1.0 if peak <= 1.0 else 255.0
        grey = np.clip(array / full_scale, 0.0, 1.0)
        return Image.fromarray(np.round(grey * 255.0).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(flat, image).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, multiple: int, name: str = "image") -> torch.Tensor:
    """A PIL image as (1, 3, H, W) in [−1, 1] (:func:`to_rgb`), its sides rounded down to multiples of
    ``multiple`` (LANCZOS).

    The original rounds to multiples of 32, which the UNet cannot take; the change in size is logged.
    """
    image = to_rgb(image)
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise InputError(f"{name} is {image.width}×{image.height}; both sides must be at least {multiple}")
    if (width, height) != image.size:
        logger.info("resizing %s from %d×%d to %d×%d (multiples of %d)", name, *image.size, width, height, multiple)
    array = np.asarray(image.resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file, read whole; a missing, unreadable or oversized one (a decompression bomb, or more than
    ``MAX_INPUT_PIXELS``) is an :class:`InputError` naming ``what`` it is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InputError(f"{what} {path} is {image.width}×{image.height} ({image.width * image.height / 1e6:.0f} "
                             f"Mpx); at most {MAX_INPUT_PIXELS / 1e6:.0f} Mpx are taken: scale it down first")
        image.load()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what} {path} declares a size far beyond any photo (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{what} {path} is not an image the Python Imaging Library can read ({error})") from None
    return image


def load_image(path: str | Path, multiple: int) -> torch.Tensor:
    """An image file as (1, 3, H, W) in [−1, 1] (see :func:`image_to_tensor`)."""
    return image_to_tensor(open_image(path), multiple, Path(path).name)


def load_safety_checker(config: DictConfig, checker: bool | str | Path, device: torch.device
                        ) -> SafetyChecker | None:
    """``checker``: a directory with the checker's weights, True for the Hugging Face cache's copy (refused if
    there is none), False for none. A model whose config says ``safety_checker: false`` needs none."""
    if not config.get("safety_checker", True):
        logger.debug("this model's config says it needs no safety checker")
        return None
    if checker is False:
        logger.warning("the safety checker is disabled")
        return None
    directory = cached_checker_dir() if checker is True else checker
    if directory is None:
        raise ParameterError("safety_checker", f"has no weights: no safety checker weights found in the Hugging "
                             f"Face cache; give a local copy of {CHECKER_REPO} in diffusers format (fetched with "
                             f"`huggingface-cli download {CHECKER_REPO}` where there is network), or turn it off")
    return SafetyChecker(directory, device)


class Generated(NamedTuple):
    """Images (B, 3, H, W) in [0, 1] on the CPU, those the safety checker flagged replaced, and how many it flagged."""

    images: torch.Tensor
    flagged: int


class Edited(NamedTuple):
    """DiffEdit's and inpainting's result: :class:`Generated`'s two fields and the mask used, (h, w) at latent
    resolution, 1 = edited."""

    images: torch.Tensor
    flagged: int
    mask: torch.Tensor


@dataclass(frozen=True)
class ImageLatents:
    """Images encoded once by :meth:`Pipeline.encode` (one posterior sample), to reuse across img2img calls."""

    latents: torch.Tensor  # (B, C, h, w) float32, scaled


ImageInput = torch.Tensor | Image.Image


class Pipeline:
    """A loaded model with its sampler: prompts (and images) in, checked images out.

    Load once with :meth:`from_config`, then call :meth:`txt2img`, :meth:`img2img` and :meth:`diffedit` as often as
    needed. Every call runs without gradients, at the pipeline's precision; see the module docstring for seeds.
    """

    def __init__(self, model, geometry: Geometry, *, sampler: str = "ddim", schedule: str | None = None,
                 eta_ancestral: float | None = None, s_noise: float = 1.0, device: torch.device | None = None,
                 precision: str = "full", safety_checker: SafetyChecker | None = None,
                 acceleration: Acceleration = Acceleration(cuda_graph=False)):
        self.model = model
        self.geometry = geometry
        self._sampler_choice = dict(name=sampler, schedule=schedule, eta_ancestral=eta_ancestral, s_noise=s_noise)
        self.sampler: Sampler = self._make_sampler(model)
        # for metadata: the original's names ("ddim", "plms", "dpm_solver"), A1111's for the others ("Euler a Karras")
        key = check_sampler(sampler, schedule)[0]
        self.sampler_name = key if key in SAMPLERS else self.sampler.name
        self.device = model.device if device is None else device
        self.precision = resolve_precision(precision, self.device)
        self.safety_checker = safety_checker
        self.acceleration = acceleration
        # Prompt and negative prompt of different lengths: pad the shorter with empty chunks and guide in one
        # batched call (faster, slightly different) instead of two calls (AUTOMATIC1111's default, exact).
        self.pad_cond_uncond = False
        # LoRAs: ``loras`` (file, weight) for every call, and <lora:NAME:WEIGHT> tags in prompts found in ``lora_dir``
        self.loras: list[tuple[Path, float]] = []
        self.lora_dir = Path("models/lora")
        self._merged: Merged | None = None

    def sampler_metadata(self) -> dict[str, str | float]:
        """The sampler as output metadata names it: ``sampler`` (the original's key, or A1111's name such as
        "DPM++ 2M Karras"), and for σ-space samplers A1111's ``schedule`` label and an ``eta_ancestral`` that is not
        the default 1."""
        metadata: dict[str, str | float] = {"sampler": self.sampler_name}
        if hasattr(self.sampler, "schedule_label"):
            metadata["schedule"] = self.sampler.schedule_label
            if self.sampler.method.noise != "none" and self.sampler.eta != 1.0:
                metadata["eta_ancestral"] = self.sampler.eta
        return metadata

    @classmethod
    def from_config(cls, config: str | Path | DictConfig, ckpt: str | Path, *, device: str | torch.device = "auto",
                    precision: str = "auto", sampler: str = "ddim", schedule: str | None = None,
                    eta_ancestral: float | None = None, s_noise: float = 1.0,
                    safety_checker: bool | str | Path = True, acceleration: Acceleration = Acceleration(),
                    vae: str | Path | None = None, ema: bool = False) -> "Pipeline":
        """Load ``ckpt`` into the model ``config`` describes, straight into the precision's weight dtype.

        ``safety_checker``: a directory with its weights, True for the Hugging Face cache's copy, False for none.
        ``vae``: a separate VAE file whose weights replace the checkpoint's autoencoder (:func:`load_vae`).
        ``ema``: a full checkpoint's EMA weights for the UNet.
        ``sampler``, ``schedule``, ``eta_ancestral``, ``s_noise``: see
        :func:`~ldm.models.diffusion.samplers.make_sampler`.
        Everything that needs no weights (config, device, precision, sampler, acceleration, the checker's
        files) is checked before the checkpoint is read. Where the config keeps EMA weights, they are used.
        """
        config = load_config(config)
        geometry = Geometry.of(config)
        device = resolve_device(device)
        precision = resolve_precision(precision, device)
        check_sampler(sampler, schedule, eta_ancestral=eta_ancestral, s_noise=s_noise)
        acceleration = acceleration.for_device(device, precision)
        checker = _all_at_once(lambda: check_checkpoint_path(ckpt),
                               lambda: vae is None or check_checkpoint_path(vae, "VAE"),
                               lambda: load_safety_checker(config, safety_checker, device))[2]
        model = load_model(config, ckpt, device=device, dtype=WEIGHT_DTYPES[precision], ema=ema)
        if vae is not None:
            load_vae(model, vae)
        if model.use_ema:
            model.model_ema.copy_to(model.model)
        accelerate(model, acceleration)
        return cls(model, geometry, sampler=sampler, schedule=schedule, eta_ancestral=eta_ancestral, s_noise=s_noise,
                   device=device, precision=precision, safety_checker=checker, acceleration=acceleration)

    def txt2img(self, prompts: str | Sequence[str], *, steps: int = 50, scale: float = 7.5,
                negative_prompt: str = "", eta: float = 0.0, height: int | None = None, width: int | None = None,
                x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = False) -> Generated:
        """One image per prompt, ``height`` × ``width`` pixels (default: the model's native size).

        ``x_T``: the start code (batch 1, or at least one per prompt: the first ones are used), drawn when None.
        """
        prompts = self._activate_loras(_prompt_list(prompts))
        shape = self.geometry.latent_shape(height or self.geometry.native_size, width or self.geometry.native_size)
        with self._scope():
            c, uc = self._conditioning(prompts, negative_prompt, scale)
            latents, _ = self.sampler.sample(S=steps, batch_size=len(prompts), shape=shape, conditioning=c,
                                             callback=callback, eta=eta, verbose=verbose,
                                             x_T=_first(x_T, len(prompts), "x_T"), unconditional_guidance_scale=scale,
                                             unconditional_conditioning=uc, generator=generator)
            return self._checked_images(latents)

    def encode(self, images: ImageInput, generator: torch.Generator | None = None) -> ImageLatents:
        """Images (B, 3, H, W) in [−1, 1], or a PIL image, as latents: one VAE posterior sample."""
        with self._scope():
            return ImageLatents(encode_images(self.model, self._image_tensor(images), generator))

    def img2img(self, images: ImageInput | ImageLatents, strength: float, prompts: str | Sequence[str], *,
                steps: int = 50, scale: float = 5.0, negative_prompt: str = "", eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = False) -> Generated:
        """Each prompt's image drawn from ``images`` noised to ``strength`` ∈ [0, 1] (1: nothing of it is kept).

        ``images``: as for :meth:`encode` (encoded on each call), or :meth:`encode`'s result to reuse one posterior
        sample across calls, as the original script does; batch 1, or at least one per prompt. ``noise``: the
        noise added to the latents (same batch rule), drawn when None.
        """
        prompts = self._activate_loras(_prompt_list(prompts))
        init = images if isinstance(images, ImageLatents) else self.encode(images, generator)
        with self._scope():
            c, uc = self._conditioning(prompts, negative_prompt, scale)
            n = len(prompts)
            latents = self.sampler.img2img(_first(init.latents, n, "images"), strength, steps, c,
                                           unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=eta,
                                           noise=_first(noise, n, "noise"), generator=generator, callback=callback,
                                           verbose=verbose)
            return self._checked_images(latents)

    def diffedit(self, image: ImageInput, source_prompt: str, target_prompt: str, *,
                 mask: Image.Image | torch.Tensor | np.ndarray | None = None, steps: int = 20, scale: float = 7.5,
                 encode_ratio: float = 0.6, encode_type: str = "stochastic", negative_prompt: str = "",
                 n_samples: int = 1, generator: torch.Generator | None = None, verbose: bool = False) -> Edited:
        """Edit ``image`` from ``source_prompt`` to ``target_prompt`` with DPM-Solver++ (:mod:`ldm.editing.diffedit`),
        or decoding with the pipeline's σ-space sampler where it has one (stochastic encoding only).

        ``mask=None`` estimates the mask from the two prompts (DiffEdit); a user mask (any size, white or 1 =
        edit) makes this plain mask inpainting. ``n_samples`` edits of the same image come back.
        """
        if n_samples < 1:
            raise ParameterError("n_samples", f"must be a positive integer, got {n_samples}")
        sampler = self.sampler if isinstance(self.sampler, DPMSolverSampler) else DPMSolverSampler(self.model)
        decoder = self.sampler if isinstance(self.sampler, SigmaSampler) else None
        pixels = self._image_tensor(image)
        source_prompt, target_prompt = self._activate_loras([source_prompt, target_prompt])
        with self._scope():
            src_cond, uncond = self._conditioning([source_prompt], negative_prompt, scale)
            dst_cond = self.model.get_learned_conditioning([target_prompt])
            init_latent = encode_images(self.model, pixels, generator)
            if mask is None:
                everything = torch.ones(1, 1, *init_latent.shape[-2:], device=init_latent.device)
                latent_mask = estimate_mask(sampler, init_latent,
                                            *self._with_image(pixels, everything, generator, src_cond, dst_cond),
                                            generator=generator)
            else:
                latent_mask = resize_mask(mask, tuple(init_latent.shape[-2:]))
            conditionings = self._with_image(pixels, latent_mask[None, None].to(init_latent.device), generator,
                                             src_cond, dst_cond, uncond)
            latents, _ = edit_latent(sampler, init_latent.expand(n_samples, *init_latent.shape[1:]), latent_mask,
                                     *conditionings, encode_ratio, steps, encode_type, scale, generator, verbose,
                                     decoder)
            return Edited(*self._checked_images(latents), latent_mask.cpu())

    def _with_image(self, pixels: torch.Tensor, latent: torch.Tensor, generator: torch.Generator | None,
                    *conditionings: torch.Tensor | None, repaint: torch.Tensor | None = None) -> list[Any]:
        """For an inpainting checkpoint, each text conditioning joined with the mask (``latent`` (1, 1, h, w), 1 =
        repaint) and the image with the pixels of ``repaint`` (default: ``latent``'s nearest upsampling) zeroed, as
        it was trained to see them; for other models the conditionings as they are."""
        if not hasattr(self.model, "concat_conditioning"):
            return list(conditionings)
        if repaint is None:
            repaint = torch.nn.functional.interpolate(latent, size=tuple(pixels.shape[-2:]), mode="nearest")
        concat = self.model.concat_conditioning(pixels, repaint.to(pixels.device), latent, generator)
        return [None if c is None else {"c_concat": [concat.expand(len(c), -1, -1, -1)], "c_crossattn": [c]}
                for c in conditionings]

    def inpaint(self, image: ImageInput, mask: Image.Image | torch.Tensor | np.ndarray, prompts: str | Sequence[str],
                *, steps: int = 50, scale: float = 7.5, negative_prompt: str = "", strength: float = 1.0,
                eta: float = 0.0, generator: torch.Generator | None = None, callback: StepCallback | None = None,
                verbose: bool = False) -> Edited:
        """Each prompt's picture of ``image`` (batch 1) repainted where ``mask`` is white (or 1; any size, resized to
        the image), with the pipeline's sampler (:mod:`ldm.editing.inpainting`).

        ``strength`` 1 (the default, as RunwayML's inpainting scripts) starts the masked region from pure noise;
        below 1 it starts from the image noised to that ratio, as img2img. Outside the mask the result's latent is
        the image's own.
        """
        if not 0.0 < strength <= 1.0:
            raise ParameterError("strength", f"must be in (0, 1], got {strength}")
        prompts = self._activate_loras(_prompt_list(prompts))
        pixels = self._image_tensor(image)[:1]
        n = len(prompts)
        with self._scope():
            c, uc = self._conditioning(prompts, negative_prompt, scale)
            known = encode_images(self.model, pixels, generator)
            repaint = pixel_mask(mask, tuple(pixels.shape[-2:])).to(pixels.device)
            latent = latent_mask(repaint, self.geometry.factor).to(known.device)
            c, uc = self._with_image(pixels, latent, generator, c, uc, repaint=repaint)
            sampler = self._make_sampler(KnownRegion(self.model, known, latent))
            if strength == 1.0:
                latents, _ = sampler.sample(S=steps, batch_size=n, shape=tuple(known.shape[1:]), conditioning=c,
                                            callback=callback, eta=eta, verbose=verbose,
                                            unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                            generator=generator)
            else:
                latents = sampler.img2img(known.expand(n, -1, -1, -1), strength, steps, c,
                                          unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=eta,
                                          generator=generator, callback=callback, verbose=verbose)
            latents = latent * latents + (1 - latent) * known
            return Edited(*self._checked_images(latents), latent[0, 0].cpu())

    def initial_noise(self, batch_size: int, height: int | None = None, width: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """A start code for ``batch_size`` images (the original's ``--fixed_code``), on the model's device."""
        shape = self.geometry.latent_shape(height or self.geometry.native_size, width or self.geometry.native_size)
        return torch.randn((batch_size, *shape), generator=generator, device=self.device)

    def use_loras(self, loras: list[tuple[str | Path, float]]) -> None:
        """Merge ``loras`` (file, weight) now, and for every later call (besides the tags in its prompts)."""
        self.loras = [(Path(path), weight) for path, weight in loras]
        self._activate_loras([])

    @property
    def active_loras(self) -> list[str]:
        """The LoRAs merged now, as ``name:weight``."""
        return list(self._merged.names) if self._merged else []

    def _activate_loras(self, prompts: list[str]) -> list[str]:
        """The prompts without their ``<lora:…>`` tags; the LoRAs they and :attr:`loras` ask for merged into the
        weights (kept merged while the next call asks for the same ones, restored exactly otherwise)."""
        wanted = [(Path(path), weight) for path, weight in self.loras]
        texts = []
        for prompt in prompts:
            text, tags = take_lora_tags(prompt)
            texts.append(text)
            wanted += [entry for entry in ((find_lora(name, self.lora_dir), weight) for name, weight in tags)
                       if entry not in wanted]
        active = self._merged.sources if self._merged else []
        if wanted != active:
            if self._merged:
                self._merged.restore()
                self._merged = None
            if wanted:
                self._merged = apply_loras(self.model, wanted)
        return texts

    def _make_sampler(self, model) -> Sampler:
        """The pipeline's sampler (as chosen at construction) for ``model``."""
        choice = self._sampler_choice
        return make_sampler(choice["name"], model, choice["schedule"], eta_ancestral=choice["eta_ancestral"],
                            s_noise=choice["s_noise"])

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        with torch.no_grad(), precision_scope(self.precision, self.device, self.acceleration.cuda_graph):
            yield

    def _conditioning(self, prompts: list[str], negative_prompt: str, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(c, uc): the prompts' features and, when guidance is on (scale ≠ 1), the negative prompt's."""
        if not (math.isfinite(scale) and scale >= 0):
            raise ParameterError("scale", f"must be a non-negative finite number, got {scale}")
        uc = self.model.get_learned_conditioning(len(prompts) * [negative_prompt]) if scale != 1.0 else None
        c = self.model.get_learned_conditioning(prompts)
        if self.pad_cond_uncond and uc is not None and uc.shape[1] != c.shape[1]:
            length = max(c.shape[1], uc.shape[1])
            c, uc = self._pad_with_empty_chunks(c, length), self._pad_with_empty_chunks(uc, length)
        return c, uc

    def _pad_with_empty_chunks(self, features: torch.Tensor, length: int) -> torch.Tensor:
        """``features`` (B, 77·k, C) followed by empty-prompt chunks up to ``length`` positions."""
        if length <= features.shape[1]:
            return features
        empty = self.model.get_learned_conditioning([""]).to(features.dtype)
        repeats = (length - features.shape[1]) // empty.shape[1]
        return torch.cat([features, empty.repeat(len(features), repeats, 1)], dim=1)

    def _image_tensor(self, images: ImageInput) -> torch.Tensor:
        if isinstance(images, Image.Image):
            return image_to_tensor(images, self.geometry.multiple)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ParameterError("images", f"must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        for name, side in zip(("height", "width"), images.shape[-2:]):
            if side % self.geometry.multiple:
                raise ParameterError("images", f"{name} must be a multiple of {self.geometry.multiple}, got {side}")
        return images

    def _checked_images(self, latents: torch.Tensor) -> Generated:
        images = decode_images(self.model, latents, self.acceleration.vae_slicing)
        if self.safety_checker is None:
            return Generated(images, 0)
        images, flags = self.safety_checker(images)
        return Generated(images, sum(flags))


def _all_at_once(*checks: Callable[[], Any]) -> list[Any]:
    """Run every check and return their results; if any failed, raise them together (:class:`Problems`), so that a
    first run with a real checkpoint reports every missing piece at once."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except (InputError, ParameterError) as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise Problems(errors)
    return results


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ParameterError("prompts", "must hold at least one prompt")
    return prompts


def _first(tensor: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """The first ``n`` of a batch (the original's short last batch), or a batch of one repeated ``n`` times."""
    if tensor is None or len(tensor) == n:
        return tensor
    if len(tensor) == 1:
        return tensor.expand(n, *tensor.shape[1:])
    if len(tensor) < n:
        raise ParameterError(name, f"has a batch of {len(tensor)}, fewer than the {n} prompts")
    return tensor[:n]
