"""Runs of many images, one seed per image, split over processes and resumable.

Image k of a run (k counts from 0 over ``n_iter`` passes through the prompts) is drawn from its own generator
seeded with ``(seed + k) mod 2³²`` — AUTOMATIC1111's numbering of a batch's seeds — and saved as
``samples/{k:05d}.png``. Its picture therefore depends on (settings, prompt, seed + k) only: not on the batch it
was drawn in, the number of processes, or the order they finish in; and ``--seed seed+k`` with one sample draws
it again. Process r of W draws the images with k ≡ r (mod W), with no traffic between processes while sampling.

Every process appends one JSON line per saved image to its own ``manifest-rank{r}.jsonl`` (one writer per file,
so lines cannot interleave; a line is flushed and fsynced after its PNG is in place). At the end rank 0 merges them
into ``manifest.jsonl`` (written to a temporary file and renamed: never half a manifest), the first line of each
being the run's settings. A resumed run reads every manifest file first: other settings are refused, the images
whose file exists are skipped (and recorded if the manifest missed them), and only the missing ones are drawn.
"""

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from ldm.distributed import Process
from ldm.generation import open_image
from ldm.models.diffusion.sampling_util import ImageGenerators
from ldm.output import ImageWriter, image_grid, infotext, to_pil
from ldm.util import InputError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
GRID_LIMIT = 1000  # images; a larger run writes no grid (it would be an unwieldy file), and says so
SEED_RANGE = 2 ** 32


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str

    def seed(self, run_seed: int) -> int:
        return (run_seed + self.index) % SEED_RANGE

    @property
    def file(self) -> str:
        return f"samples/{self.index:05d}.png"


def work_items(prompts: Callable[[], Iterable[str]], n_iter: int) -> Iterator[WorkItem]:
    """``n_iter`` passes through ``prompts()`` (called once per pass, so a file is streamed, never held)."""
    index = 0
    for _ in range(n_iter):
        for prompt in prompts():
            yield WorkItem(index, prompt)
            index += 1


def batched(items: Iterable[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Manifest:
    """The manifest files of one output directory (module docstring)."""

    def __init__(self, outdir: Path, process: Process, settings: Mapping[str, Any]):
        self.outdir, self.process, self.settings = outdir, process, dict(settings)
        self.own = outdir / f"manifest-rank{process.rank}.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.outdir.glob("manifest-rank*.jsonl")) + [p for p in [self.outdir / MANIFEST] if p.is_file()]

    def read(self) -> tuple[list[dict], dict[int, dict]]:
        """(the settings of every file, the entries by index); a line cut short by a crash is ignored."""
        headers, entries = [], {}
        for path in self.files():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise InputError(f"cannot read the manifest {path}: {error}") from None
            for number, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    if number == len(lines) - 1:
                        continue  # the last line of an interrupted run
                    raise InputError(f"the manifest {path} is damaged at line {number + 1}") from None
                if isinstance(record, dict) and "settings" in record:
                    if not isinstance(record["settings"], dict):
                        raise InputError(f"the manifest {path} is damaged at line {number + 1}")
                    headers.append(record["settings"])
                elif isinstance(record, dict) and isinstance(record.get("index"), int) and record["index"] >= 0:
                    entries[record["index"]] = record  # its file is always samples/{index}: nothing else is opened
        return headers, entries

    def check_settings(self, headers: list[dict]) -> None:
        for recorded in headers:
            changed = sorted(key for key in set(recorded) | set(self.settings)
                             if recorded.get(key) != self.settings.get(key))
            if changed:
                key = changed[0]
                raise InputError(f"--resume: {self.outdir} was drawn with other settings ({', '.join(changed)}: "
                                 f"{recorded.get(key)!r} there, {self.settings.get(key)!r} now); resume with the "
                                 "same flags, or choose another --outdir")

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append one line to this process's file (its first line the settings), flushed to disk."""
        fresh = not self.own.exists()
        with self.own.open("a", encoding="utf-8") as file:
            if fresh:
                file.write(json.dumps({"settings": self.settings}) + "\n")
            file.write(json.dumps(dict(entry), ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def merge(self) -> list[dict]:
        """Rank 0, after every process is done: all entries, by index, in ``manifest.jsonl``; the per-rank files
        removed. Returns the entries."""
        _, entries = self.read()
        ordered = [entries[index] for index in sorted(entries)]
        handle, temporary = tempfile.mkstemp(prefix=".manifest", suffix=".partial", dir=self.outdir)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(json.dumps({"settings": self.settings}) + "\n")
            file.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in ordered)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.outdir / MANIFEST)
        for path in self.outdir.glob("manifest-rank*.jsonl"):
            path.unlink()
        return ordered


class GlobalProgress:
    """Rank 0's count of the images every process has saved, read from the growth of the per-rank manifest files
    (no traffic between processes; counts what the file system shares)."""

    def __init__(self, outdir: Path):
        """Counting from now: lines already there (an interrupted run's) are not this run's images."""
        self.outdir = outdir
        self.offsets = {path: path.stat().st_size for path in outdir.glob("manifest-rank*.jsonl")}
        self.count = 0

    def refresh(self) -> int:
        for path in self.outdir.glob("manifest-rank*.jsonl"):
            try:
                with path.open("rb") as file:
                    file.seek(self.offsets.get(path, 0))
                    new = file.read()
            except OSError:
                continue
            complete = new[:new.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            self.count += complete.count(b'{"index"')
        return self.count


@dataclass
class ShardedRun:
    """Draw the images of ``items`` this process takes, in batches of ``batch_size``, skipping those whose file
    exists when ``resume``. ``draw(prompts, generators)`` returns (images in [0, 1], how many were flagged)."""

    outdir: Path
    process: Process
    settings: Mapping[str, Any]
    metadata: Mapping[str, Any]
    seed: int
    noise_device: str
    resume: bool = False
    watermark: bool = True

    def __post_init__(self):
        self.outdir = Path(self.outdir)
        self.manifest = Manifest(self.outdir, self.process, self.settings)
        self.writer = ImageWriter(self.outdir, self.watermark)
        self.saved = self.flagged = 0

    def run(self, items: Callable[[], Iterable[WorkItem]], batch_size: int,
            draw: Callable[[list[str], ImageGenerators], tuple[torch.Tensor, int]]) -> None:
        progress = GlobalProgress(self.outdir)
        existing, recorded, total = self._prepare(items)
        pending = (item for item in items() if self.process.takes(item.index) and self._pending(item, existing,
                                                                                                 recorded))
        start = time.perf_counter()
        with tqdm(total=total, desc="Images (all ranks)", unit="image", disable=not self.process.is_main) as bar:
            for batch in batched(pending, batch_size):
                generators = ImageGenerators([item.seed(self.seed) for item in batch], self.noise_device)
                images, flagged = draw([item.prompt for item in batch], generators)
                self.flagged += flagged
                for item, image in zip(batch, to_pil(images)):
                    self._save(item, image)
                if self.process.is_main:
                    bar.n = progress.refresh()
                    bar.set_postfix(images_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
                    bar.refresh()

    def _prepare(self, items: Callable[[], Iterable[WorkItem]]) -> tuple[set[str], dict[int, dict], int]:
        """Check the directory, the settings and every item's prompt against the manifest (then wait for every
        process, so that no one writes before all have looked). Returns the sample files already there, the
        recorded entries and how many images are still to draw."""
        samples = self.outdir / "samples"
        existing = {f"samples/{name}" for name in (os.listdir(samples) if samples.is_dir() else [])}
        headers, recorded = self.manifest.read()
        if not self.resume and (headers or any(name.endswith(".png") for name in existing)):
            raise InputError(f"{self.outdir} already holds a run's images: give --resume to fill in the missing "
                             "ones, or choose another --outdir")
        self.manifest.check_settings(headers)
        for partial in samples.glob(".*.png.partial") if self.resume else []:
            partial.unlink(missing_ok=True)  # a write cut short by the interruption (never linked into place)
        missing = 0
        for item in items():
            before = recorded.get(item.index, {}).get("prompt", item.prompt)
            if before != item.prompt:
                raise InputError(f"--resume: image {item.index}'s prompt is {item.prompt!r} now but {before!r} in "
                                 f"{self.outdir}'s manifest; resume with the same prompts, or choose another --outdir")
            missing += item.file not in existing
        self.process.barrier()
        return existing, recorded, missing

    def _pending(self, item: WorkItem, existing: set[str], recorded: dict[int, dict]) -> bool:
        if item.file not in existing:
            return True
        if item.index not in recorded:  # saved just before an interruption, not yet recorded
            self.manifest.record(self._entry(item))
        return False

    def _entry(self, item: WorkItem) -> dict:
        return dict(index=item.index, prompt=item.prompt, seed=item.seed(self.seed), file=item.file,
                    sampler=self.settings.get("sampler"), steps=self.settings.get("steps"), rank=self.process.rank)

    def _save(self, item: WorkItem, image) -> None:
        metadata = dict(self.metadata, prompt=item.prompt, seed=item.seed(self.seed), index=item.index)
        self.writer.save(image, "samples", metadata={**metadata, "parameters": infotext(item.prompt, metadata)},
                         number=item.index, exact=True)
        self.manifest.record(self._entry(item))
        self.saved += 1

    def finish(self, grid: bool, n_rows: int) -> str:
        """Wait for every process; then rank 0 merges the manifest and draws the grid (in index order). Returns the
        closing message (rank 0) or an empty string."""
        self.process.barrier()
        if not self.process.is_main:
            return ""
        entries = self.manifest.merge()
        message = f"{len(entries)} images in {self.outdir / 'samples'}, listed in {self.outdir / MANIFEST}"
        if grid and len(entries) > GRID_LIMIT:
            logger.info("no grid for %d images (more than %d); --n_rows and the grid are for smaller runs",
                        len(entries), GRID_LIMIT)
        elif grid and entries:
            files = [self.outdir / WorkItem(entry["index"], "").file for entry in entries]
            pictures = [np.asarray(open_image(path, "sample").convert("RGB")) for path in files]
            tensor = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
            path = self.writer.save(image_grid(tensor, n_rows), "", prefix="grid-", digits=4,
                                    metadata=dict(self.metadata))
            message += f" and the grid {path}"
        self.writer.report()
        if self.flagged:
            logger.warning("the safety checker replaced %d images with a placeholder (rank 0's share)", self.flagged)
        return f"Your samples are ready and waiting for you here:\n{self.outdir}\n({message})\nEnjoy."
