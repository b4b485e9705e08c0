"""Training the models with PyTorch Lightning: losses, optimisers and hooks, kept out of the models.

``AutoencoderTraining`` fits an AutoencoderKL with an L1 reconstruction loss and a small KL term (the original
adds LPIPS and a patch GAN; both need downloaded networks). ``DiffusionTraining`` fits a LatentDiffusion model
with the simple loss of Ho et al.: ‖target − network(x_t, t, c)‖² with x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε and the
target ε, x_0 or v by ``parameterization``; the text encoder trains too when ``cond_stage_trainable``.
"""

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.models.loading import ConfigError, load_state_dict, read_checkpoint
from ldm.modules.encoders.modules import lend_attention_key as lend_key
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def images_from_batch(batch: dict, key: str) -> torch.Tensor:
    """Datasets give (B, H, W, C) in [−1, 1], as the original's; the models take (B, C, H, W)."""
    return batch[key].permute(0, 3, 1, 2).contiguous().float()


def denoising_error(model, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Any) -> torch.Tensor:
    """Per sample, the mean of (network(x_t, t, c) − target)² (|·| for ``loss_type`` l1), x_t = √ᾱ_t·z + √(1 − ᾱ_t)·noise,
    the target ε, x_0 or v by the model's ``parameterization``: the simple loss before its weights."""
    prediction = model.apply_model(model.q_sample(z, t, noise), t, cond)
    target = {"eps": noise, "x0": z, "v": model.get_v(z, noise, t)}[model.parameterization]
    error = (prediction - target).abs() if model.loss_type == "l1" else (prediction - target).pow(2)
    return error.mean(dim=tuple(range(1, error.dim())))


class AutoencoderTraining(pl.LightningModule):
    def __init__(self, model, learning_rate: float = 1e-3, kl_weight: float = 1e-6):
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = images_from_batch(batch, self.model.image_key)
        reconstruction, posterior = self.model(images)
        rec_loss = (reconstruction - images).abs().mean()
        kl_loss = posterior.kl().mean() / images[0].numel()
        loss = rec_loss + self.kl_weight * kl_loss
        self.log_dict({"train/rec_loss": rec_loss, "train/kl_loss": kl_loss, "train/loss": loss}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))


class DiffusionTraining(pl.LightningModule):
    """``first_stage_ckpt``: weights of the trained autoencoder (``first_stage_model.*`` or bare keys).
    ``caption_dropout``: the share of captions replaced by "" so the model also learns the unconditional
    prediction that classifier-free guidance needs (SD v1 dropped 10%). ``snr_gamma``: Min-SNR-γ loss weights
    (Hang et al. 2023), which stop the nearly clean timesteps from dominating training (None: SD's uniform).

    ``init_ckpt``: a whole LatentDiffusion checkpoint to continue from (e.g. the shipped demo weights), loaded
    strictly (the schedule buffers are the config's when it sets ``zero_terminal_snr``); with
    ``init_adds_modules`` the config may add modules the checkpoint lacks (e.g. attention at another resolution,
    whose output projection starts at zero, so the network starts as the checkpoint's): those keys keep their
    initialisation, every other key must match. ``lend_attention_key``: {words, like, weight, spread} for
    :func:`ldm.modules.encoders.modules.lend_attention_key`, applied to the text encoder once the weights are loaded
    (the tenth sitting's remedy for a word no attention head carries).

    ``noise_offset``: the training noise gets ``noise_offset``·N(0, 1) added per sample and channel
    (constant over the image, "offset noise"). SD's schedule keeps √ᾱ_T ≈ 0.07 of the image at t = T, and on a
    16×16 latent the per-channel mean of the noise is only N(0, 1/256): a picture's overall colour shows through
    the noisiest step, so the network learns to read it from x_T instead of from the caption, and at sampling
    time, from pure noise, the random x_T decides it. The offset hides that mean, so the caption must.
    ``noise_pyramid`` d: likewise at every coarser scale (blocks of 2, 4, … latent pixels, weights d, d², …), for
    the colour of a shape, which covers a few latent pixels only.
    ``ema_decay``: an exponential moving average over the UNet **and** the trained text encoder together
    (LitEma covers the UNet only), warmed up as LitEma's, min(decay, (1 + n)/(10 + n)); :meth:`averaged`
    swaps it in for evaluation and export.

    Batches hold either images (``first_stage_key``) or pre-encoded posteriors ``latent_mean``/``latent_std``
    (see :class:`ldm.data.latents.PreEncoded`); captions are under ``cond_stage_key``.
    """

    def __init__(self, model, learning_rate: float = 1e-4, first_stage_ckpt: str | None = None,
                 weight_decay: float = 0.0, caption_dropout: float = 0.1, snr_gamma: float | None = None,
                 init_ckpt: str | None = None, noise_offset: float = 0.0, noise_pyramid: float = 0.0,
                 ema_decay: float | None = None, init_adds_modules: bool = False,
                 lend_attention_key: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.caption_dropout = caption_dropout
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.noise_pyramid = noise_pyramid
        self.ema_decay = ema_decay
        if init_ckpt is not None:
            self.continue_from(init_ckpt, init_adds_modules)
        if first_stage_ckpt is not None:
            state_dict = read_checkpoint(first_stage_ckpt).state_dict
            prefix = "first_stage_model."
            if any(key.startswith(prefix) for key in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            model.first_stage_model.load_state_dict(state_dict, strict=True)
            logger.info("first stage loaded from %s", first_stage_ckpt)
        if lend_attention_key is not None:
            try:
                lend_key(model.cond_stage_model, **lend_attention_key)
            except (TypeError, ValueError) as error:  # a config's typo: one line, before training starts
                raise ConfigError(f"lend_attention_key: {error}") from None
            logger.info("attention key lent: %s", dict(lend_attention_key))
        self._ema: dict[str, torch.Tensor] = {}
        self._ema_updates = 0

    def continue_from(self, checkpoint: str, adds_modules: bool) -> None:
        report = load_state_dict(self.model, read_checkpoint(checkpoint).state_dict)
        if report.unexpected or report.missing and not adds_modules:
            raise ValueError(f"{checkpoint} does not fit this config: {report.summary()}")
        if report.missing:
            logger.info("%d keys new in this config keep their initialisation, e.g. %s", len(report.missing),
                        report.missing[0])
        logger.info("continuing from %s (%s)", checkpoint, report.summary())

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The UNet's parameters, and the text encoder's when it trains along (names as in the model)."""
        parts = [("model.", self.model.model)]
        if self.model.cond_stage_trainable:
            parts.append(("cond_stage_model.", self.model.cond_stage_model))
        return {prefix + name: p for prefix, module in parts for name, p in module.named_parameters()}

    @torch.no_grad()
    def update_average(self) -> None:
        parameters = self.trained_parameters()
        if not self._ema:
            self._ema = {name: p.detach().clone() for name, p in parameters.items()}
        self._ema_updates += 1
        decay = min(self.ema_decay, (1 + self._ema_updates) / (10 + self._ema_updates))
        for name, p in parameters.items():
            self._ema[name].lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the scope the UNet and text encoder hold their moving average (no-op without ``ema_decay``)."""
        if not self._ema:
            yield
            return
        parameters = self.trained_parameters()
        saved = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self._ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(saved[name])

    def latents(self, batch: dict) -> torch.Tensor:
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            return self.model.scale_factor * (mean + std * torch.randn_like(mean))
        images = images_from_batch(batch, self.model.first_stage_key)
        return self.model.get_first_stage_encoding(self.model.encode_first_stage(images))

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ: the x_0 loss weighted by min(SNR_t, γ), written for the network's target: ÷ SNR_t for ε,
        ÷ (SNR_t + 1) for v (SNR_t = ᾱ_t / (1 − ᾱ_t)). All ones without ``snr_gamma``."""
        if self.snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        alphas_cumprod = self.model.alphas_cumprod[t].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.model.parameterization]

    def noise(self, z: torch.Tensor) -> torch.Tensor:
        """The training noise: N(0, I), plus ``noise_offset`` per channel and ``noise_pyramid`` per scale."""
        noise = torch.randn_like(z)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(z.shape[0], z.shape[1], *([1] * (z.dim() - 2)),
                                                            device=z.device, dtype=z.dtype)
        if self.noise_pyramid:  # the same at every coarser scale: 8×8, 4×4, … blocks, weighted d, d², …
            size, level = z.shape[-1] // 2, 1
            while size >= 1:
                coarse = torch.randn(*z.shape[:2], size, size, device=z.device, dtype=z.dtype)
                noise = noise + self.noise_pyramid ** level * torch.nn.functional.interpolate(
                    coarse, size=z.shape[-2:], mode="nearest")
                size, level = size // 2, level + 1
        return noise

    def loss(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        t = torch.randint(0, self.model.num_timesteps, (z.shape[0],), device=z.device)
        per_sample = denoising_error(self.model, z, t, self.noise(z), cond)
        return self.model.l_simple_weight * (self.loss_weights(t) * per_sample).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        captions = [caption if torch.rand(()) >= self.caption_dropout else ""
                    for caption in batch[self.model.cond_stage_key]]
        cond = self.model.get_learned_conditioning(captions)
        loss = self.loss(self.latents(batch), cond)
        self.log("train/loss_simple", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model.use_ema:
            self.model.model_ema(self.model.model)
        if self.ema_decay is not None:
            self.update_average()

    def configure_optimizers(self) -> Any:
        parameters = list(self.model.model.parameters())
        if self.model.cond_stage_trainable:
            parameters += list(self.model.cond_stage_model.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.model.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.model.scheduler_config)
        return [optimizer], [{"scheduler": LambdaLR(optimizer, lr_lambda=schedule), "interval": "step"}]


class PeriodicEvaluation(pl.Callback):
    """Every ``every_minutes`` of training, call ``evaluate(model)`` with the EMA weights (LitEma's, or the
    training module's joint average) in eval mode and log the numbers it returns (e.g. the demo model's prompt
    adherence)."""

    def __init__(self, evaluate, every_minutes: float = 5.0):
        self.evaluate = evaluate
        self.every_seconds = every_minutes * 60
        self.last = time.monotonic()
        self.history: list[dict] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if time.monotonic() - self.last >= self.every_seconds:
            self.run(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.run(trainer, module)

    def run(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        model = module.model
        model.eval()
        averaged = module.averaged() if hasattr(module, "averaged") else contextlib.nullcontext()
        with torch.no_grad(), model.ema_scope(), averaged:
            scores = self.evaluate(model)
        model.train()
        self.last = time.monotonic()
        self.history.append({"step": trainer.global_step, **scores})
        logger.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if trainer.logger is not None:  # module.log is not allowed in every hook; the logger is
            trainer.logger.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=trainer.global_step)


def export_weights(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save the model's state dict as safetensors, with the EMA weights in place when the model keeps them.

    ``dtype`` casts the submodules' floating tensors (e.g. float16 to halve the file); the model's own schedule
    buffers and ``scale_factor`` stay float32. The EMA shadows themselves are not written.
    """
    from safetensors.torch import save_file

    if getattr(model, "use_ema", False):
        model.model_ema.copy_to(model.model)
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model_ema."):
            continue
        if dtype is not None and tensor.is_floating_point() and "." in name:
            tensor = tensor.to(dtype)
        state_dict[name] = tensor.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path)
    return path
