"""Numbered PNGs: never overwritten, never half-written, with text metadata; grids as torchvision's."""

import os

import pytest
import torch
from PIL import Image

from ldm.output import ImageWriter, check_writable, image_grid, to_pil
from ldm.util import InputError


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
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
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


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_writable(blocker / "out")
    check_writable(tmp_path / "new" / "deeper")
