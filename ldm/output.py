"""Writing results: numbered PNGs that never overwrite anything, grids, watermark and text metadata."""

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid

from ldm.util import InputError
from ldm.watermark import can_watermark, put_watermark

logger = logging.getLogger(__name__)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → PIL images, ×255 and truncated to uint8 as the original saves them."""
    array = (255.0 * images.detach().float().cpu().permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def image_grid(images: torch.Tensor, n_rows: int) -> Image.Image:
    """torchvision's grid (2-pixel black padding) with ``n_rows`` images per row, as the original."""
    return to_pil(make_grid(images, nrow=n_rows)[None])[0]


def check_writable(directory: str | Path) -> None:
    """Raise unless ``directory`` exists as a writable directory or can be created."""
    directory = Path(directory)
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write to {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {directory}: permission denied")


class ImageWriter:
    """Saves numbered PNGs under ``outdir``, each one after the highest number already there.

    Files are written to a temporary name and linked into place only if that name is still free, so nothing
    is overwritten and an interrupted run leaves no half-written PNG. Every image gets the invisible watermark
    (images under 256×256 cannot carry it; they are counted and reported) and PNG text ``metadata``.
    """

    def __init__(self, outdir: str | Path, watermark: bool = True):
        self.outdir = Path(outdir)
        self.watermark = watermark
        self.unmarked = 0

    def save(self, image: Image.Image, subdir: str = "samples", prefix: str = "", digits: int = 5,
             metadata: Mapping[str, Any] | None = None, number: int = 0, watermark: bool = True) -> Path:
        """Save as ``outdir/subdir/{prefix}{number:0{digits}}.png`` with the first free number from ``number`` on
        that is above every number already there; returns the path."""
        directory = self.outdir / subdir
        directory.mkdir(parents=True, exist_ok=True)
        if self.watermark and watermark:
            if can_watermark(image):
                image = put_watermark(image)
            else:
                self.unmarked += 1
        info = PngInfo()
        for key, value in (metadata or {}).items():
            info.add_text(key, str(value))
        temporary = directory / f".{prefix}{os.getpid()}.png.partial"
        try:
            image.save(temporary, format="PNG", pnginfo=info)
            number = max(number, self.next_number(subdir, prefix))
            while True:
                path = directory / f"{prefix}{number:0{digits}d}.png"
                try:
                    os.link(temporary, path)
                    return path
                except FileExistsError:
                    number += 1
        finally:
            temporary.unlink(missing_ok=True)

    def next_number(self, subdir: str = "samples", prefix: str = "") -> int:
        """One more than the highest ``{prefix}NNNNN.png`` in ``outdir/subdir`` (0 when there is none)."""
        directory = self.outdir / subdir
        if not directory.is_dir():
            return 0
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.png$")
        numbers = [int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m]
        return max(numbers, default=-1) + 1

    def report(self) -> None:
        if self.unmarked:
            logger.warning("%d image(s) smaller than 256×256 were saved without the invisible watermark "
                           "(the dwtDct watermark needs at least 256×256 pixels)", self.unmarked)


class RunOutput:
    """The files of one txt2img / img2img run: each batch as numbered samples, all of them as one grid at the end,
    as the original writes them (``samples/NNNNN.png``, ``grid-NNNN.png``)."""

    def __init__(self, outdir: str | Path, metadata: Mapping[str, Any], skip_save: bool = False,
                 skip_grid: bool = False):
        self.writer = ImageWriter(outdir)
        self.metadata = dict(metadata)
        self.skip_save, self.skip_grid = skip_save, skip_grid
        self.grid_images: list[torch.Tensor] = []
        self.prompts: list[str] = []
        self.saved = self.total = self.flagged = 0

    def add(self, images: torch.Tensor, flagged: int, prompts: list[str]) -> None:
        """A batch of checked images (B, 3, H, W) in [0, 1], how many the safety checker replaced, their prompts."""
        self.total += len(images)
        self.flagged += flagged
        if not self.skip_save:
            for prompt, image in zip(prompts, to_pil(images)):
                self.writer.save(image, "samples", metadata=dict(self.metadata, prompt=prompt))
                self.saved += 1
        if not self.skip_grid:
            self.grid_images.append(images)
            self.prompts += prompts

    def close(self, n_rows: int) -> str:
        """Write the grid (``n_rows`` images per row) and return the run's closing message."""
        grid = ""
        if self.grid_images:
            prompts = sorted(set(self.prompts))
            path = self.writer.save(image_grid(torch.cat(self.grid_images), n_rows), "", prefix="grid-", digits=4,
                                    metadata=dict(self.metadata, prompt=prompts[0] if len(prompts) == 1
                                                  else json.dumps(prompts)))
            grid = f" and the grid {path}"
        self.writer.report()
        if self.flagged:
            logger.warning("the safety checker replaced %d of %d images with a placeholder", self.flagged,
                           self.total)
        return (f"Your samples are ready and waiting for you here:\n{self.writer.outdir}\n({self.saved} samples"
                f"{grid})\nEnjoy.")
