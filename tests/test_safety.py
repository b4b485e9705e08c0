"""The safety checker: CLIP preprocessing as transformers' PIL processor, flagged images replaced, none skipped."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessorPil

from ldm.generation import load_safety_checker
from ldm.safety import PLACEHOLDER, SafetyChecker, clip_preprocess
from ldm.util import InputError, ParameterError


@pytest.mark.parametrize("size", [(512, 512), (96, 64), (451, 300), (224, 224), (64, 1000)])
def test_clip_preprocessing_matches_transformers(size):
    image = Image.fromarray(data.astronaut()).resize(size)
    ours = clip_preprocess([image])
    theirs = CLIPImageProcessorPil()(images=[image], return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_flagged_images_are_replaced_by_the_placeholder(flagging_checker):
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    checked, flags = SafetyChecker(flagging_checker)(images)
    assert flags == [True, True]
    placeholder = np.asarray(Image.open(PLACEHOLDER).convert("RGB").resize((96, 64), Image.LANCZOS)) / 255.0
    torch.testing.assert_close(checked[1], torch.from_numpy(placeholder).float().permute(2, 0, 1))


def test_unflagged_images_are_untouched(passing_checker):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    checked, flags = SafetyChecker(passing_checker)(images)
    assert flags == [False, False] and torch.equal(checked, images)


def test_no_checker_anywhere_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = OmegaConf.create({"model": {}})
    with pytest.raises(ParameterError, match="no safety checker weights found") as error:
        load_safety_checker(config, True, device=torch.device("cpu"))
    assert error.value.parameter == "safety_checker"
    assert load_safety_checker(config, False, device=torch.device("cpu")) is None
    assert load_safety_checker(OmegaConf.create({"safety_checker": False}), True, torch.device("cpu")) is None
    with pytest.raises(InputError, match="no config.json"):
        load_safety_checker(config, tmp_path, device=torch.device("cpu"))


def test_the_hugging_face_cache_copy_is_found_offline(flagging_checker, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--CompVis--stable-diffusion-safety-checker" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in flagging_checker.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    checker = load_safety_checker(OmegaConf.create({}), True, device=torch.device("cpu"))
    assert isinstance(checker, SafetyChecker)
