"""Numbered PNGs: never overwritten, never half-written, with text metadata; grids as torchvision's."""

import errno
import os

import pytest
import torch
from PIL import Image

from ldm.output import ImageWriter, check_writable, image_grid, to_pil
from ldm.util import InputError, ParameterError


def test_numbering_continues_after_the_highest_existing_file(tmp_path):
    writer = ImageWriter(tmp_path, watermark=False)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00007.png").write_bytes(b"not ours")
    (tmp_path / "samples" / "notes.txt").write_text("keep")
    image = Image.new("RGB", (8, 8))
    assert writer.save(image).name == "00008.png"
    assert writer.save(image).name == "00009.png"
    assert writer.save(image, "", prefix="grid-", digits=4).name == "grid-0000.png"
    assert (tmp_path / "samples" / "00007.png").read_bytes() == b"not ours"


def test_a_name_taken_meanwhile_is_skipped_not_overwritten(tmp_path, monkeypatch):
    writer = ImageWriter(tmp_path, watermark=False)
    (tmp_path / "samples").mkdir()
    monkeypatch.setattr(ImageWriter, "next_number", lambda self, subdir, prefix: 0)
    (tmp_path / "samples" / "00000.png").write_bytes(b"someone else's")
    assert writer.save(Image.new("RGB", (8, 8))).name == "00001.png"
    assert (tmp_path / "samples" / "00000.png").read_bytes() == b"someone else's"


def test_an_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(image, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ImageWriter(tmp_path, watermark=False).save(Image.new("RGB", (8, 8)))
    assert os.listdir(tmp_path / "samples") == []


def test_metadata_is_written_as_png_text(tmp_path):
    path = ImageWriter(tmp_path, watermark=False).save(Image.new("RGB", (8, 8)), metadata={"prompt": "a cat",
                                                                                             "seed": 42})
    assert Image.open(path).text == {"prompt": "a cat", "seed": "42"}


def test_pixels_are_truncated_and_grids_padded_as_the_original():
    images = torch.full((3, 3, 4, 4), 0.999)
    assert to_pil(images)[0].getpixel((0, 0)) == (254, 254, 254)
    grid = image_grid(images, n_rows=2)
    assert grid.size == (2 + 2 * (4 + 2), 2 + 2 * (4 + 2))
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((2, 2)) == (254, 254, 254)


def test_unwritable_output_is_refused_and_the_check_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_writable(blocker / "out")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples").write_text("a file where the samples folder goes")
    with pytest.raises(InputError, match="samples is not a directory"):
        check_writable(tmp_path / "run")
    with pytest.raises(InputError, match="cannot write to /proc/ldm-outputs"):
        check_writable("/proc/ldm-outputs")
    with pytest.raises(ParameterError, match="^outdir must name a directory"):
        check_writable("")
    check_writable(tmp_path / "new" / "deeper", ("samples", "masks"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]
    assert os.listdir(tmp_path / "run") == ["samples"]


def test_a_link_planted_at_a_temporary_name_is_never_followed(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's file")
    samples = tmp_path / "out" / "samples"
    samples.mkdir(parents=True)
    for name in (f".{os.getpid()}.png.partial", ".png.partial", "00000.png"):  # the old fixed name, guesses, a sample
        (samples / name).symlink_to(precious)
    writer = ImageWriter(tmp_path / "out", watermark=False)
    paths = [writer.save(Image.new("RGB", (8, 8))) for _ in range(2)]
    assert precious.read_text() == "the user's file"
    assert [p.name for p in paths] == ["00001.png", "00002.png"]
    assert all(p.is_file() and not p.is_symlink() for p in paths)


def test_a_full_disk_is_one_error_that_keeps_the_saved_images_and_leaves_no_partial_file(tmp_path, monkeypatch):
    save = Image.Image.save
    calls = []

    def full_after_one(image, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            fp.write(b"\x89PNG part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_after_one)
    writer = ImageWriter(tmp_path, watermark=False)
    writer.save(Image.new("RGB", (8, 8)))
    with pytest.raises(InputError, match="No space left on device; the 1 image.s. saved before are kept"):
        writer.save(Image.new("RGB", (8, 8)))
    assert os.listdir(tmp_path / "samples") == ["00000.png"]
