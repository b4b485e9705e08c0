"""The invisible watermark survives a PNG round trip on a photo, and the original's check script reads it."""

import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
from skimage import data

from conftest import ROOT
from ldm.output import ImageWriter
from ldm.watermark import PAYLOAD, can_watermark, put_watermark, read_watermark


def test_watermark_round_trip_through_a_written_png(tmp_path):
    photo = Image.fromarray(data.astronaut())
    path = ImageWriter(tmp_path).save(photo, "samples")
    written = np.asarray(Image.open(path))
    assert read_watermark(cv2.imread(str(path))) == PAYLOAD
    difference = np.abs(written.astype(int) - data.astronaut().astype(int))
    assert 0 < difference.mean() < 3  # invisible, but present
    assert read_watermark(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)) != PAYLOAD


def test_small_images_cannot_carry_it_and_are_counted(tmp_path):
    small = Image.fromarray(data.astronaut()).resize((128, 128))
    assert not can_watermark(small) and can_watermark(put_watermark(Image.fromarray(data.astronaut())))
    writer = ImageWriter(tmp_path)
    writer.save(small, "samples")
    assert writer.unmarked == 1


def test_check_script_prints_the_payload(tmp_path):
    path = ImageWriter(tmp_path).save(Image.fromarray(data.astronaut()), "samples")
    result = subprocess.run([sys.executable, str(ROOT / "scripts/tests/test_watermark.py"), str(path)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == PAYLOAD
