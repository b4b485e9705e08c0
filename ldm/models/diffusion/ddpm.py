"""Latent diffusion: the DDPM noise schedule, the conditioned UNet, and the two frozen stages around it.

Notation (Ho et al. 2020): β_t the noise schedule, ᾱ_t = Π_{s≤t}(1 − β_s),
x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε. The network predicts ε ("eps"), x_0 ("x0") or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 ("v").

Attribute paths equal the original checkpoint's prefixes: ``model.diffusion_model.*`` (the UNet),
``first_stage_model.*`` (the autoencoder), ``cond_stage_model.*`` (the text encoder), ``model_ema.*``, and the
schedule buffers (``betas``, ``alphas_cumprod``, …). Training (losses, optimiser, Lightning hooks) is kept
out of this module.
"""

import contextlib
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, rescale_zero_terminal_snr
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import count_params, instantiate_from_config

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "x0", "v")
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid")


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet: ``concat`` joins channels, ``crossattn`` is the attention context."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        self.engine = None

    def set_engine(self, engine: Callable | None) -> None:
        """Run the UNet through ``engine`` (a compiled, graph-replayed or converted form of ``diffusion_model``
        that reads its weights), or plainly again with None. The engine is not a submodule, so the state dict keeps
        the UNet's own names: LoRA merges, EMA copies and checkpoints see the same weights with or without one."""
        object.__setattr__(self, "engine", engine)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if self.conditioning_key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(list(c_crossattn), dim=1) if self.conditioning_key in ("crossattn", "hybrid") else None
        unet = self.diffusion_model if self.engine is None else self.engine
        return unet(x, t, context=context)


class DDPM(nn.Module):
    """A diffusion model: the schedule buffers and the network ``self.model`` that predicts noise.

    Training-only settings (``loss_type``, ``l_simple_weight``, ``original_elbo_weight``, ``monitor``,
    ``scheduler_config``, ``first_stage_key``, ``log_every_t``, ``logvar_init``, ``learn_logvar``) are kept
    as attributes for the training module; sampling does not read them.
    """

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 given_betas: Sequence[float] | None = None, v_posterior: float = 0.0, parameterization: str = "eps",
                 conditioning_key: str | None = None, use_ema: bool = True, image_size: int = 256,
                 channels: int = 3, loss_type: str = "l2", l_simple_weight: float = 1.0,
                 original_elbo_weight: float = 0.0, learn_logvar: bool = False, logvar_init: float = 0.0,
                 monitor: str = "val/loss", scheduler_config: Mapping[str, Any] | None = None,
                 first_stage_key: str = "image", log_every_t: int = 100, zero_terminal_snr: bool = False):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.parameterization = parameterization
        logger.debug("%s: running in %s-prediction mode", type(self).__name__, parameterization)
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        logger.debug("DiffusionWrapper has %.2f M params.", count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.v_posterior = v_posterior
        if zero_terminal_snr and parameterization == "eps":
            raise ValueError("zero_terminal_snr needs parameterization v or x0: ε cannot be predicted from pure noise")
        self.zero_terminal_snr = zero_terminal_snr
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                               zero_terminal_snr)
        self.loss_type = loss_type
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.logvar = logvar
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        self.first_stage_key = first_stage_key
        self.log_every_t = log_every_t

    def register_schedule(self, given_betas: Sequence[float] | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3, zero_terminal_snr: bool = False) -> None:
        """Compute the schedule in float64 and store it as float32 buffers (all in the state dict);
        ``zero_terminal_snr`` rescales it to ᾱ_T ≈ 0 (:func:`rescale_zero_terminal_snr`)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        schedule = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, values in schedule.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32))

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Within the scope the network uses its EMA weights (a no-op when ``use_ema`` is off)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε for integer timesteps t: (B,)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (Salimans & Ho 2022)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = √ᾱ_t·v + √(1 − ᾱ_t)·x_t."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned on a (frozen) text encoder.

    ``scale_factor`` rescales latents to unit variance (0.18215 for SD v1): z = scale_factor · E(x).
    With ``scale_by_std`` it is a buffer (stored in the checkpoint) instead of a plain attribute.
    """

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Mapping[str, Any] | str,
                 num_timesteps_cond: int | None = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, conditioning_key: str | None = None, scale_factor: float = 1.0,
                 scale_by_std: bool = False, **kwargs: Any):
        if num_timesteps_cond not in (None, 1):
            raise ValueError("num_timesteps_cond other than 1 (a shortened conditioning schedule) is not supported")
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        elif conditioning_key is None:
            conditioning_key = "crossattn"
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.num_timesteps_cond = 1
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self._freeze(self.first_stage_model)
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None and not cond_stage_trainable:
            self._freeze(self.cond_stage_model)

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Switch training mode; the frozen stages stay in eval mode (no dropout) either way."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Conditioning features for the UNet, e.g. prompts (list of str) → (B, 77, 768) for SD v1."""
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (B, 3, H, W) in [−1, 1] → posterior over unscaled latents (in the autoencoder's dtype)."""
        return self.first_stage_model.encode(x.to(self.first_stage_dtype))

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """z = scale_factor · (a sample of the posterior, or the tensor itself)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → image (B, 3, h·f, w·f) in the autoencoder's dtype, roughly in [−1, 1]."""
        return self.first_stage_model.decode((z / self.scale_factor).to(self.first_stage_dtype))

    @property
    def first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's prediction for x_noisy at timesteps t: (B,) (real-valued allowed).

        ``cond`` is a tensor (routed by ``conditioning_key``) or a dict with ``c_concat`` / ``c_crossattn`` lists.
        """
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, (list, tuple)) else [cond]}
        return self.model(x_noisy, t, **cond)


class LatentInpaintDiffusion(LatentDiffusion):
    """Latent diffusion for inpainting (RunwayML's ``sd-v1-5-inpainting``, SD 2's ``512-inpainting``): the UNet reads
    the noisy latent joined (``conditioning_key: hybrid``) with ``c_concat`` = [mask at latent size (1 = repaint),
    latent of the image with the masked pixels zeroed] — 4 + 1 + 4 = 9 channels for SD — and the text through
    cross-attention.

    ``concat_keys``, ``masked_image_key``, ``finetune_keys`` and ``keep_finetune_dims`` are the original's training
    settings (which dataset fields feed ``c_concat``; which weights were copied from a text-to-image model), read
    and kept; sampling needs only :meth:`concat_conditioning`.
    """

    def __init__(self, *args: Any, concat_keys: Sequence[str] = ("mask", "masked_image"),
                 masked_image_key: str = "masked_image", finetune_keys: Sequence[str] | None = None,
                 keep_finetune_dims: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.model.conditioning_key != "hybrid":
            raise ValueError("an inpainting model needs conditioning_key: hybrid (mask and masked image joined to the "
                             "latent, text through cross-attention)")
        self.concat_keys, self.masked_image_key = tuple(concat_keys), masked_image_key
        self.finetune_keys, self.keep_finetune_dims = finetune_keys, keep_finetune_dims

    @torch.no_grad()
    def concat_conditioning(self, image: torch.Tensor, pixel_mask: torch.Tensor, latent_mask: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """``c_concat`` for ``image`` (B, 3, H, W) in [−1, 1]: [``latent_mask`` (B, 1, h, w), z of
        image·(pixel_mask < ½)] (B, 1 + C, h, w), as the original's ``make_batch_sd`` builds it (masked pixels
        set to 0, the middle grey of [−1, 1]; one posterior sample)."""
        masked = image * (pixel_mask < 0.5).to(image.dtype)
        latent = self.get_first_stage_encoding(self.encode_first_stage(masked), generator).float()
        return torch.cat([latent_mask.to(latent).expand(len(latent), -1, -1, -1), latent], dim=1)
