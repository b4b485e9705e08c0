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
    """The issue's colour, position and background targets (≥ 0.9, 0.8, 0.9; measured 0.91, 0.95 and 0.91 on this
    exact protocol, README table), and a lower bound a little below what shape measures (0.88). The weights before
    these scored 0.94 / 0.80 / 0.69 / 0.98, the first ones 0.42 / 0.84 / 0.59 / 0.27. Chance: colour 1/8, shape
    1/4, background 1/5; weights that ignore the corner words score about 0.7 on position (README)."""
    assert held_out_scores["colour"] >= 0.9, held_out_scores
    assert held_out_scores["background"] >= 0.9, held_out_scores
    assert held_out_scores["position"] >= 0.8, held_out_scores
    assert held_out_scores["shape"] >= 0.85, held_out_scores


def test_its_autoencoder_keeps_what_the_captions_name_but_some_small_shapes(demo_model):
    """The same 64 held-out scenes rendered, encoded and decoded: colour, position and background survive; the
    shape of a few small stars and triangles does not (measured 0.91 on these 64, 0.91 on 256), so no model in
    this latent space is sure to reach the issue's shape target of 0.9 on them (README, 'The demo model')."""
    kept = reconstruction_adherence(demo_model, held_out_scenes(64))
    assert min(kept["colour"], kept["position"], kept["background"]) >= 0.95, kept
    assert kept["shape"] >= 0.85, kept


@pytest.mark.xfail(strict=True, reason="the issue's shape target is not reached: measured 0.88 on held-out pairs "
                   "(target 0.9); the autoencoder's own reconstructions of these scenes score 0.91; see README, "
                   "'The demo model'")
def test_it_reaches_the_issues_shape_target_on_held_out_prompts(held_out_scores):
    assert held_out_scores["shape"] >= 0.9, held_out_scores
