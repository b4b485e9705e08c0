"""The shipped demo model: small, loads through the one loader with nothing missing, and follows prompts."""

import logging

import pytest

from conftest import ROOT
from ldm.data.shapes import held_out_adherence
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
    assert "0 missing, 0 unexpected, 0 skipped" in caplog.text
    assert load_config(CONFIG).safety_checker is False


@pytest.fixture(scope="module")
def held_out_scores(demo_model):
    """Adherence on 64 captions whose (colour, shape) pair it never saw, with the seed's DPM-Solver."""
    return held_out_adherence(demo_model, count=64, steps=25, scale=7.5)


def test_it_draws_the_shape_of_held_out_prompts(held_out_scores):
    """The issue's shape target (≥ 60%); colour well above chance (1/8) as a guard against regressions."""
    assert held_out_scores["shape"] >= 0.6, held_out_scores
    assert held_out_scores["colour"] >= 0.3, held_out_scores


@pytest.mark.xfail(strict=True, reason="the issue's colour target is not reached within the ~90-minute training "
                   "budget: measured 0.42 on held-out pairs (0.72 on seen ones); see README, 'The demo model'")
def test_it_colours_held_out_prompts_right(held_out_scores):
    assert held_out_scores["colour"] >= 0.9, held_out_scores
