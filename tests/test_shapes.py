"""The demo dataset and its detector: deterministic captioned images, and a detector that reads them right."""

import numpy as np
import pytest
from PIL import ImageFilter

from ldm.data.shapes import ATTRIBUTES, COLOURS, HELD_OUT, SHAPES, ShapesDataset, describe, held_out_scenes, render


def test_items_are_deterministic_images_with_captions():
    dataset = ShapesDataset(length=10, size=64, seed=5)
    first, again = dataset[3], ShapesDataset(length=10, size=64, seed=5)[3]
    assert first["image"].shape == (64, 64, 3) and -1 <= first["image"].min() and first["image"].max() <= 1
    assert np.array_equal(first["image"].numpy(), again["image"].numpy()) and first["caption"] == again["caption"]
    scene, text = dataset.scene(3)
    assert text.startswith("a ") and scene.colour in text and scene.shape in text


def test_held_out_pairs_never_appear_in_training_data():
    dataset = ShapesDataset(length=3000, seed=0)
    pairs = {(scene.colour, scene.shape) for scene, _ in map(dataset.scene, range(len(dataset)))}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT
    assert {(scene.colour, scene.shape) for scene, _ in held_out_scenes(200)} == HELD_OUT


def test_the_detector_reads_ground_truth_images():
    dataset = ShapesDataset(length=400, seed=7)
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for index in range(len(dataset)):
        scene, _ = dataset.scene(index)
        found = describe(np.asarray(render(scene)))
        for attribute in correct:
            correct[attribute] += getattr(found, attribute) == getattr(scene, attribute)
    assert all(count >= 0.99 * len(dataset) for count in correct.values()), correct


def test_the_detector_reads_soft_shapes_and_never_makes_a_star_of_softness():
    """The autoencoder and the demo model draw soft edges: rendered scenes blurred by a Gaussian of 1.5 pixels
    (a small star's points still plain to see) are read right; blurred by 2.5 pixels a small star may pass for a
    circle, but no other shape is ever taken for a star."""
    dataset = ShapesDataset(length=200, seed=11)
    scenes = [dataset.scene(index)[0] for index in range(len(dataset))]
    for radius, least in ((1.5, 0.99), (2.5, 0.8)):
        found = [describe(np.asarray(render(scene).filter(ImageFilter.GaussianBlur(radius)))).shape
                 for scene in scenes]
        assert sum(f == scene.shape for f, scene in zip(found, scenes)) >= least * len(scenes), radius
        assert all(scene.shape == "star" for f, scene in zip(found, scenes) if f == "star"), radius


def test_the_detector_sees_nothing_in_a_blank_image():
    assert describe(np.full((64, 64, 3), 200, dtype=np.uint8)).colour is None


def test_mentions_change_the_captions_not_the_pictures():
    default = ShapesDataset(length=200, seed=3)
    wordy = ShapesDataset(length=200, seed=3, mentions={"position": 1.0, "colour": 0.0})
    for index in range(len(default)):
        (scene, text), (same_scene, other_text) = default.scene(index), wordy.scene(index)
        named = f"{scene.colour} {scene.shape}"
        assert scene == same_scene and named in text
        assert scene.position in other_text and named not in other_text
        bare = [words.replace(f" {scene.position}", "").replace(named, scene.shape) for words in (text, other_text)]
        assert bare[0] == bare[1], (text, other_text)  # size and background named as before
    with pytest.raises(ValueError, match="shade"):
        ShapesDataset(mentions={"shade": 0.5})


@pytest.mark.parametrize("mentions", [{"colour": 1.5}, {"position": -0.1}, {"size": "often"}, {"colour": True},
                                      ["position"]])
def test_mention_odds_outside_0_to_1_or_not_numbers_are_refused_when_the_dataset_is_built(mentions):
    with pytest.raises(ValueError, match="mentions"):
        ShapesDataset(mentions=mentions)
