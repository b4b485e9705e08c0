"""The shipped demo model: small, loads through the one loader with nothing missing, and follows prompts."""

import logging

import pytest

from conftest import ROOT
from ldm.data.shapes import held_out_adherence, held_out_scenes, reconstruction_adherence
from ldm.models.loading import load_config, load_model

CONFIG = ROOT / "configs/demo/shapes-inference.yaml"
CHECKPOINT = ROOT / "models/demo/shapes.safetensors"


@pytest.fixture(scope="module")
def demo_model():
    return load_model(CONFIG, CHECKPOINT)


def test_the_checkpoint_is_small_complete_and_needs_no_safety_checker(caplog):
    assert CHECKPOINT.stat().st_size <= 30 * 2 ** 20
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        load_model(CONFIG, CHECKPOINT)
    assert "0 missing, 0 unexpected, 12 skipped" in caplog.text  # the schedule buffers zero_terminal_snr recomputes
    assert load_config(CONFIG).safety_checker is False


@pytest.fixture(scope="module")
def held_out_scores(demo_model):
    """Adherence on 64 captions whose (colour, shape) pair it never saw, with the seed's DPM-Solver."""
    return held_out_adherence(demo_model, count=64, steps=25, scale=7.5)


def test_it_follows_held_out_prompts(held_out_scores):
    """The issue's targets: colour, shape, position and background ≥ 0.9, 0.9, 0.8, 0.9 (measured 0.91, 0.92, 0.95
    and 0.91 on this exact protocol, README table). The weights before these scored 0.94 / 0.92 / 0.69 / 0.98, the
    first ones 0.42 / 0.98 / 0.59 / 0.27 (read by today's detector). Chance: colour 1/8, shape 1/4, background 1/5;
    weights that ignore the corner words score about 0.7 on position (README)."""
    assert held_out_scores["colour"] >= 0.9, held_out_scores
    assert held_out_scores["shape"] >= 0.9, held_out_scores
    assert held_out_scores["position"] >= 0.8, held_out_scores
    assert held_out_scores["background"] >= 0.9, held_out_scores


def test_its_autoencoder_keeps_what_the_captions_name(demo_model):
    """The same 64 held-out scenes rendered, encoded and decoded: all four survive (measured 0.98 / 0.97 / 1.00 /
    1.00; the autoencoder softens a small star's points, which the detector still reads, README 'Thirteenth
    sitting'), so the targets ask the diffusion model, not the autoencoder."""
    kept = reconstruction_adherence(demo_model, held_out_scenes(64))
    assert min(kept.values()) >= 0.95, kept
