"""Writing results: numbered PNGs that never overwrite anything, grids, watermark and text metadata."""

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid

from ldm.util import InputError, ParameterError
from ldm.watermark import can_watermark, put_watermark

logger = logging.getLogger(__name__)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → PIL images, ×255 and truncated to uint8 as the original saves them."""
    array = (255.0 * images.detach().float().cpu().permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def image_grid(images: torch.Tensor, n_rows: int) -> Image.Image:
    """torchvision's grid (2-pixel black padding) with ``n_rows`` images per row, as the original."""
    return to_pil(make_grid(images, nrow=n_rows)[None])[0]


# The original's sampler names ↔ AUTOMATIC1111's, for the "parameters" text that civitai, A1111 and ComfyUI read (the
# σ-space samplers carry A1111's names already: "DPM++ 2M Karras", with "Schedule type: Karras").
A1111_SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM++ 2M"}
INFOTEXT_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext(prompt: str, metadata: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's "parameters" text for one image: the prompt, ``Negative prompt: …``, then one line of
    ``Key: value`` pairs (Steps, Sampler, CFG scale, Seed, Size, Model, and where they apply Schedule type, Eta DDIM,
    Denoising strength, Clip skip)."""
    fields = {"Steps": metadata["steps"], "Sampler": A1111_SAMPLERS.get(metadata["sampler"], metadata["sampler"])}
    if metadata["sampler"] == "dpm_solver":
        fields["Schedule type"] = "Uniform"
    elif metadata.get("schedule"):
        fields["Schedule type"] = metadata["schedule"]
    fields.update({"CFG scale": metadata["scale"], "Seed": metadata["seed"], "Size": metadata["size"],
                   "Model": Path(str(metadata["checkpoint"])).stem})
    if metadata.get("eta"):
        fields["Eta DDIM"] = metadata["eta"]
    if metadata.get("eta_ancestral") is not None:
        fields["Eta"] = metadata["eta_ancestral"]
    if metadata.get("strength") is not None:
        fields["Denoising strength"] = metadata["strength"]
    if int(metadata.get("clip_skip", 1)) != 1:
        fields["Clip skip"] = metadata["clip_skip"]
    if metadata.get("vae"):
        fields["VAE"] = metadata["vae"]
    if metadata.get("lora_hashes"):
        fields["Lora hashes"] = f'"{metadata["lora_hashes"]}"'
    lines = [prompt, f"Negative prompt: {metadata['negative_prompt']}"] if metadata.get("negative_prompt") else [prompt]
    return "\n".join(lines + [", ".join(f"{key}: {value}" for key, value in fields.items())])


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an AUTOMATIC1111 "parameters" text: ``prompt``, ``negative_prompt`` and every ``Key``."""
    *head, settings = text.strip().split("\n")
    fields = {key.strip(): value.strip().strip('"') for key, value in INFOTEXT_FIELD.findall(settings)}
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **fields}


def check_writable(directory: str | Path, subdirs: tuple[str, ...] = ("samples",)) -> None:
    """Raise unless ``directory`` and its ``subdirs`` are writable directories or can be made: checked before a
    run starts, so that no work is lost at the end. Nothing is left behind (the probe is a nameless temporary
    file in the deepest folder that exists)."""
    if not str(directory).strip():
        raise ParameterError("outdir", "must name a directory (an empty name would mean the current directory)")
    for path in (Path(directory), *(Path(directory) / subdir for subdir in subdirs)):
        existing = path
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"cannot write to {path}: {existing} is not a directory")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise InputError(f"cannot write to {path}: {error.strerror or error}") from None


class ImageWriter:
    """Saves numbered PNGs under ``outdir``, each one after the highest number already there.

    Files are written to a fresh temporary file (created exclusively, under a random name, so a link planted in
    the folder cannot redirect it) and linked into place only if the final name is still free, so nothing is
    overwritten and an interrupted run or a full disk leaves no half-written PNG. A failed write raises
    :class:`InputError` saying how many images were already saved (they are kept). Every image gets the invisible
    watermark (images under 256×256 cannot carry it; they are counted and reported) and PNG text ``metadata``.
    """

    def __init__(self, outdir: str | Path, watermark: bool = True):
        self.outdir = Path(outdir)
        self.watermark = watermark
        self.unmarked = 0
        self.saved = 0

    def save(self, image: Image.Image, subdir: str = "samples", prefix: str = "", digits: int = 5,
             metadata: Mapping[str, Any] | None = None, number: int = 0, watermark: bool = True,
             exact: bool = False) -> Path:
        """Save as ``outdir/subdir/{prefix}{number:0{digits}}.png`` with the first free number from ``number`` on
        that is above every number already there (``exact``: that number or an error); returns the path."""
        directory = self.outdir / subdir
        if self.watermark and watermark:
            if can_watermark(image):
                image = put_watermark(image)
            else:
                self.unmarked += 1
        info = PngInfo()
        for key, value in (metadata or {}).items():
            info.add_text(key, str(value))
        temporary = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{prefix}", suffix=".png.partial", dir=directory)
            with os.fdopen(handle, "wb") as file:
                image.save(file, format="PNG", pnginfo=info)
            if exact:
                path = self._link_exact(temporary, directory / f"{prefix}{number:0{digits}d}.png")
            else:
                path = self._link(temporary, directory, prefix, digits, max(number, self.next_number(subdir, prefix)))
        except OSError as error:
            raise InputError(f"cannot write to {directory}: {error.strerror or error}; the {self.saved} image(s) "
                             "saved before are kept") from None
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
        self.saved += 1
        return path

    @staticmethod
    def _link(temporary: str, directory: Path, prefix: str, digits: int, number: int) -> Path:
        """Give ``temporary`` the first free name from ``number`` on (a hard link: never replaces a file)."""
        while True:
            path = directory / f"{prefix}{number:0{digits}d}.png"
            try:
                os.link(temporary, path, follow_symlinks=False)
                return path
            except FileExistsError:
                number += 1

    @staticmethod
    def _link_exact(temporary: str, path: Path) -> Path:
        try:
            os.link(temporary, path, follow_symlinks=False)
        except FileExistsError:
            raise InputError(f"{path} appeared while it was being drawn: is another run writing to this "
                             "directory?") from None
        return path

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
        """A batch of checked images (B, 3, H, W) in [0, 1], how many the safety checker replaced, their prompts.

        Each sample's metadata has its ``index`` in the run (0, 1, … in the order drawn): with the run's seed and
        flags, the run remakes it.
        """
        first = self.total
        self.total += len(images)
        self.flagged += flagged
        if not self.skip_save:
            for offset, (prompt, image) in enumerate(zip(prompts, to_pil(images))):
                metadata = dict(self.metadata, prompt=prompt, index=first + offset)
                self.writer.save(image, "samples", metadata={**metadata, "parameters": infotext(prompt, metadata)})
                self.saved += 1
        if not self.skip_grid:
            self.grid_images.append(images)
            self.prompts += prompts

    def close(self, n_rows: int, row_per_batch: bool = False) -> str:
        """Write the grid (``n_rows`` images per row; ``row_per_batch``: each batch starts a row, a short one padded
        with black) and return the run's closing message."""
        grid = ""
        if self.grid_images:
            prompts = sorted(set(self.prompts))
            batches = [_pad(batch, n_rows) for batch in self.grid_images] if row_per_batch else self.grid_images
            path = self.writer.save(image_grid(torch.cat(batches), n_rows), "", prefix="grid-", digits=4,
                                    metadata=dict(self.metadata, prompt=prompts[0] if len(prompts) == 1
                                                  else json.dumps(prompts)))
            grid = f" and the grid {path}"
        self.writer.report()
        if self.flagged:
            logger.warning("the safety checker replaced %d of %d images with a placeholder", self.flagged,
                           self.total)
        return (f"Your samples are ready and waiting for you here:\n{self.writer.outdir}\n({self.saved} samples"
                f"{grid})\nEnjoy.")


def _pad(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` with black images appended up to a multiple of ``size``."""
    missing = -len(batch) % size
    return torch.cat([batch, batch.new_zeros(missing, *batch.shape[1:])]) if missing else batch
