"""Mask inpainting with any sampler: repaint where the mask is white, keep the rest of the image.

Two things keep the unmasked region, for every model:

* :class:`KnownRegion` wraps the model so that outside the mask its prediction is the one whose x̂_0 is the image's
  own latent z_0 (AUTOMATIC1111 blends the denoised x̂_0 the same way): every sampler then steers the masked region
  to fit a background that stays the image's. In ε form, at a timestep with x_t = α·x_0 + σ·ε, that prediction is
  ε = (x_t − α·z_0)/σ; in v form v = α·ε − σ·z_0. It is affine in the prediction with the same background term for
  the conditional and unconditional calls, so classifier-free guidance leaves it as it is.
* after the last step the latent outside the mask is z_0 itself, so the kept region is exact in latent space and,
  after decoding, differs from the input only by the autoencoder's reconstruction error.

An inpainting checkpoint (:class:`~ldm.models.diffusion.ddpm.LatentInpaintDiffusion`, 9 input channels) also sees
the mask and the masked image (its ``c_concat``), which is what it was trained for; a text-to-image checkpoint
sees only the pinned background. The latent mask marks every latent pixel that any masked image pixel falls in
(a max-pool over each f×f block), so the whole masked region can change and the kept latents cover only unmasked
pixels.
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pixel_mask(mask: Image.Image | torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (any size; white or 1 = repaint) as a binary (1, 1, H, W) tensor at ``size`` = (H, W): resized
    bilinearly, then thresholded at ½ (the original's ``mask[mask >= 0.5] = 1``)."""
    if not isinstance(mask, Image.Image):
        array = torch.as_tensor(mask, dtype=torch.float32).squeeze().cpu().numpy()
        mask = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    resized = mask.convert("L").resize((size[1], size[0]), Image.BILINEAR)
    binary = (np.asarray(resized, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    return torch.from_numpy(binary)[None, None]


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask → (B, 1, H/f, W/f): 1 where any pixel of the f×f block is to be repainted."""
    return F.max_pool2d(mask, factor)


class KnownRegion:
    """``model`` whose prediction outside ``mask`` (1 = repaint; (1, 1, h, w)) is the one that denoises to
    ``known`` (the image's latent z_0, (1, C, h, w)); every other attribute is the model's own.

    α_t and σ_t at a real-valued timestep come from ᾱ by interpolating log α linearly between integer timesteps
    (DPM-Solver's discrete schedule; exact at the integer timesteps of DDIM and PLMS).
    """

    def __init__(self, model, known: torch.Tensor, mask: torch.Tensor):
        self.model, self.known, self.mask = model, known, mask
        self._log_alphas = 0.5 * torch.log(model.alphas_cumprod.double())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        out = self.model.apply_model(x, t, cond)
        alpha, sigma = self._alpha_sigma(t, x)
        known = self.known.to(x)
        eps = (x - alpha * known) / sigma
        target = {"eps": eps, "v": alpha * eps - sigma * known, "x0": known}[self.model.parameterization]
        mask = self.mask.to(x)
        return mask * out + (1 - mask) * target.to(out.dtype)

    def _alpha_sigma(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alphas = self._log_alphas.to(t.device)
        t = t.double().clamp(0, len(log_alphas) - 1)
        low = t.floor().long().clamp(max=len(log_alphas) - 2)
        log_alpha = torch.lerp(log_alphas[low], log_alphas[low + 1], t - low)
        alpha = log_alpha.exp().reshape(-1, *[1] * (x.dim() - 1))
        return alpha.to(x), (1 - alpha ** 2).sqrt().to(x)
