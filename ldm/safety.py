"""The Stable Diffusion safety checker: diffusers' StableDiffusionSafetyChecker with its weights from a local
directory, CLIP image preprocessing done here, flagged images replaced by a neutral placeholder."""

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.util import InputError

logger = logging.getLogger(__name__)

CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
PLACEHOLDER = Path(__file__).resolve().parents[1] / "assets" / "safety_placeholder.png"
CLIP_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_preprocess(images: list[Image.Image]) -> torch.Tensor:
    """CLIP's image preprocessing: shorter side to 224 (bicubic), centre crop 224×224, scale to [0, 1], normalise
    with CLIP's mean and std. Returns (B, 3, 224, 224) float32."""
    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = CLIP_SIZE / min(image.size)
        width, height = (CLIP_SIZE, int(image.height * scale)) if image.width <= image.height else (
            int(image.width * scale), CLIP_SIZE)
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - CLIP_SIZE) // 2, (height - CLIP_SIZE) // 2
        image = image.crop((left, top, left + CLIP_SIZE, top + CLIP_SIZE))
        array = (np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        batch.append(array.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(batch))


def cached_checker_dir() -> Path | None:
    """The Hugging Face cache's copy of the checker, if there is one; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(CHECKER_REPO, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


class SafetyChecker:
    """Flags images with the CLIP-based concept classifier and replaces them by the placeholder image."""

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu"):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise InputError(f"{directory} is not a diffusers safety checker directory (no config.json)")
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise InputError(f"cannot load the safety checker from {directory}: "
                             f"{str(error).strip().splitlines()[0]}") from None
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.placeholder = Image.open(PLACEHOLDER).convert("RGB")
        # diffusers warns that flagged images become black; here they become the placeholder, reported by the caller.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """images: (B, 3, H, W) in [0, 1] → the same with flagged images replaced, and the flags."""
        array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        pil = [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
        clip_input = clip_preprocess(pil).to(self.device, self.dtype)
        _, flags = self.model(clip_input=clip_input, images=np.zeros((len(pil), 1)))
        flags = [bool(flag) for flag in flags]
        if any(flags):
            height, width = images.shape[-2:]
            replacement = torch.from_numpy(
                np.asarray(self.placeholder.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0)
            images = images.clone()
            images[torch.tensor(flags)] = replacement.permute(2, 0, 1).to(images.device, images.dtype)
        return images, flags
