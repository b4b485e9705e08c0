"""A procedural captioned dataset for the demo model: one coloured shape on a plain or gradient background.

Every image is drawn from its integer index (deterministic, no downloads) and captioned in plain words:
"a small blue triangle in the top left corner on a white background". Captions name the shape and its colour
always; its size, position and the background only sometimes, so the model also learns short prompts.

:func:`describe` is the matching analytic detector (dominant colour, shape from which drawing best explains
it, position from its centroid), used to measure prompt adherence of generated images.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import Dataset

COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 225), "yellow": (245, 215, 35),
    "purple": (135, 45, 175), "orange": (250, 135, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128), "light blue": (175, 205, 235),
               "beige": (230, 215, 180)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.28, 0.38), "large": (0.5, 0.62)}  # shape width as a fraction of the image; large ones
# sit in the center (they do not fit in a corner)
POSITIONS = {"in the top left corner": (0.25, 0.25), "in the top right corner": (0.75, 0.25),
             "in the bottom left corner": (0.25, 0.75), "in the bottom right corner": (0.75, 0.75),
             "in the center": (0.5, 0.5)}
# (colour, shape) pairs never shown in training, to test that the model composes what it learned.
HELD_OUT = {("purple", "star"), ("orange", "triangle"), ("green", "circle"), ("yellow", "square")}
SUPERSAMPLE = 4  # draw at 4× and downsample, for anti-aliased edges
MARGIN = 0.05  # fraction of the image kept free around every shape
FOREGROUND_DISTANCE = 50.0  # RGB distance from the background above which a pixel belongs to the shape
STAR_INNER_RADIUS = 0.45  # of the outer one
# The area of each shape of half-width h, in h², and how far its centroid lies below its drawing centre, in h.
SHAPE_AREAS = {"circle": math.pi, "square": 4.0, "triangle": 2.0,
               "star": 5 * STAR_INNER_RADIUS * math.sin(math.pi / 5)}
CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "star": 0.0}
FIT_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)  # Gaussian σ in pixels tried for each shape's drawing
FIT_SCALES = (0.94, 1.0, 1.06)  # sizes tried around the one of the measured area


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    gradient: bool
    jitter: tuple[float, float]
    width: float


def caption(scene: Scene, with_size: bool = True, with_position: bool = True, with_background: bool = True,
            with_colour: bool = True) -> str:
    words = ["a"] + ([scene.size] if with_size else []) + ([scene.colour] if with_colour else []) + [scene.shape]
    if with_position:
        words.append(scene.position)
    if with_background:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A scene whose (colour, shape) is in HELD_OUT if ``held_out``, else not; shape and background differ."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if ((colour, shape) in HELD_OUT) == held_out:
            break
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    size = rng.choice(list(SIZES))
    low, high = SIZES[size]
    position = rng.choice(list(POSITIONS)) if size == "small" else "in the center"  # large shapes fill corners
    return Scene(colour, shape, size, position, background, bool(rng.random() < 0.3),
                 tuple(rng.uniform(-0.05, 0.05, size=2)), float(rng.uniform(low, high)))


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    points = []
    for k in range(10):  # a five-pointed star, point up
        radius = half if k % 2 == 0 else STAR_INNER_RADIUS * half
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render(scene: Scene, size: int = 64) -> Image.Image:
    big = size * SUPERSAMPLE
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.gradient:  # a soft vertical gradient of the background colour
        shade = np.linspace(1.08, 0.85, big, dtype=np.float32)[:, None, None]
        canvas = np.clip(background[None, None] * shade, 0, 255) * np.ones((big, big, 1), dtype=np.float32)
    else:
        canvas = np.broadcast_to(background, (big, big, 3))
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    px, py = POSITIONS[scene.position]
    half = scene.width * big / 2
    cx = np.clip(px + scene.jitter[0], 0, 1) * big
    cy = np.clip(py + scene.jitter[1], 0, 1) * big
    margin = MARGIN * big  # shapes never touch the border, which shows the background alone
    cx, cy = np.clip(cx, half + margin, big - half - margin), np.clip(cy, half + margin, big - half - margin)
    _draw(draw, scene.shape, cx, cy, half, COLOURS[scene.colour])
    return image.resize((size, size), Image.LANCZOS)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    """``shape`` of half-width ``half`` around (cx, cy) (a triangle's and a star's polygon centre, not centroid)."""
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, half), fill=fill)


MENTIONS = {"size": 0.6, "position": 0.6, "background": 0.5, "colour": 1.0}  # the odds a caption names each


def mention_odds(mentions: Mapping[str, float] | None) -> dict[str, float]:
    """:data:`MENTIONS` with ``mentions`` in place of its odds; a ValueError names an unknown attribute or odds
    that are not a number in [0, 1] (a config's typo, caught before training starts rather than at its first
    caption)."""
    mentions = {} if mentions is None else mentions
    if not isinstance(mentions, Mapping):
        raise ValueError(f"mentions: expected attribute: odds pairs, got {mentions!r}")
    unknown = set(mentions) - set(MENTIONS)
    if unknown:
        raise ValueError(f"mentions: unknown attributes {sorted(unknown)}; known: {list(MENTIONS)}")
    odds = {**MENTIONS, **mentions}
    invalid = {name: value for name, value in odds.items()
               if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1}
    if invalid:
        raise ValueError(f"mentions: odds must be numbers in [0, 1], got {invalid}")
    return odds


class ShapesDataset(Dataset):
    """``length`` images drawn from indices ``offset …``; item = {"image": (H, W, 3) in [−1, 1], "caption": str}.

    ``held_out`` selects the held-out (colour, shape) pairs instead of the training ones. ``mentions`` overrides
    :data:`MENTIONS`, the odds that a caption names the size, position, background and colour (the shape is
    always named); the images do not depend on them. Naming the position more often gives the rare teaching
    signal for corners (a small shape, a corner named, a step so noisy the network must place it from the
    caption alone) more weight; leaving the colour out sometimes teaches the shape word to stand on its own, which
    a held-out (colour, shape) pair needs.
    """

    def __init__(self, length: int = 50_000, size: int = 64, seed: int = 0, held_out: bool = False,
                 mentions: dict[str, float] | None = None):
        self.length, self.size, self.seed, self.held_out = length, size, seed, held_out
        self.mentions = mention_odds(mentions)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, str]:
        rng = np.random.default_rng([self.seed, index, int(self.held_out)])
        scene = random_scene(rng, self.held_out)
        named = rng.random(len(MENTIONS)) < [self.mentions[name] for name in MENTIONS]
        return scene, caption(scene, **{f"with_{name}": bool(flag) for name, flag in zip(MENTIONS, named)})

    def __getitem__(self, index: int) -> dict:
        scene, text = self.scene(index)
        array = np.asarray(render(scene, self.size), dtype=np.float32) / 127.5 - 1.0
        return {"image": torch.from_numpy(array), "caption": text}


ATTRIBUTES = ("colour", "shape", "position", "background")  # what a full caption names and score() checks


@dataclass(frozen=True)
class Description:
    colour: str | None
    shape: str | None
    position: str | None
    background: str | None = None


def _background(pixels: np.ndarray) -> np.ndarray:
    """A plane per channel fitted to the border pixels, refitted without the ones it fits badly (a shape
    touching the border), evaluated everywhere."""
    height, width, _ = pixels.shape
    ys, xs = np.mgrid[0:height, 0:width]
    design = np.stack([np.ones_like(xs), xs, ys], axis=-1).astype(np.float32)
    border = np.zeros((height, width), dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    for _ in range(2):
        coefficients, *_ = np.linalg.lstsq(design[border], pixels[border], rcond=None)
        residual = np.linalg.norm(pixels - design @ coefficients, axis=-1)
        border &= residual <= max(np.median(residual[border]) * 3, 12.0)
    return design @ coefficients


def _coverage(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How much of each pixel the shape covers, if the picture mixes the shape's colour c and the background b:
    the projection ⟨p − b, c − b⟩ / |c − b|², clipped to [0, 1]."""
    contrast = colour - background
    share = ((pixels - background) * contrast).sum(axis=-1) / np.maximum((contrast * contrast).sum(axis=-1), 1e-6)
    return np.clip(share, 0.0, 1.0)


def _drawing(shape: str, cx: float, cy: float, half: float, height: int, width: int) -> np.ndarray:
    """The coverage of ``shape`` drawn as :func:`render` draws it, (height, width) in [0, 1]."""
    image = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    _draw(ImageDraw.Draw(image), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, half * SUPERSAMPLE, 255)
    return np.asarray(image.resize((width, height), Image.BOX), dtype=np.float32) / 255


def _fitted_shape(pixels: np.ndarray, background: np.ndarray, piece: np.ndarray) -> str:
    """The shape whose drawing best explains the coverage around ``piece`` (analysis by synthesis).

    Each shape is drawn with the coverage's area and centroid, at a few sizes around that and blurred by a few
    σ, and the one leaving the least squared residual wins. Thresholding the picture and reading the mask's
    convexity loses a soft small star's points: such a rule read 0 of 107 rendered small stars blurred by
    1.5 pixels as stars (the autoencoder and the demo model draw soft edges), this fit all of them (README,
    "Thirteenth sitting"); a blob is drawn best by a circle, so softness does not make stars.
    """
    window = ndimage.binary_dilation(piece, iterations=4)
    coverage = _coverage(pixels, background, np.median(pixels[piece], axis=0)) * window
    area = max(float(coverage.sum()), 1e-6)  # positive (``piece`` is nearer its colour than the background's)
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]] + 0.5  # pixel centres
    cy, cx = float((coverage * ys).sum()) / area, float((coverage * xs).sum()) / area

    def residual(drawing: np.ndarray, sigma: float) -> float:
        blurred = ndimage.gaussian_filter(drawing, sigma) if sigma else drawing
        return float((((blurred - coverage) * window) ** 2).sum())

    residuals = {}
    for shape, unit_area in SHAPE_AREAS.items():
        halves = [math.sqrt(area / unit_area) * scale for scale in FIT_SCALES]
        drawings = [_drawing(shape, cx, cy - CENTROID_BELOW_CENTRE[shape] * half, half, *coverage.shape)
                    for half in halves]
        residuals[shape] = min(residual(drawing, sigma) for drawing in drawings for sigma in FIT_BLURS)
    return min(residuals, key=residuals.get)


def describe(image: np.ndarray) -> Description:
    """What an (H, W, 3) uint8 image shows, by plain measurement.

    Background: a plane per channel fitted to the border. Foreground: pixels far from it. Colour: the palette
    colour nearest to the foreground's median. Shape: the one whose drawing, blurred, best matches the
    picture's coverage (:func:`_fitted_shape`).
    Position: the centroid's corner, or the center when it lies in the middle third. Background colour: the
    background palette colour nearest the plane's mean (a gradient's mean shade is within 4% of its colour),
    so that a prompt's "on a white background" is checked too.
    """
    pixels = image.astype(np.float32)
    height, width, _ = pixels.shape
    background = _background(pixels)
    mean = background.reshape(-1, 3).mean(axis=0)
    backdrop = min(BACKGROUNDS, key=lambda name: np.linalg.norm(mean - np.array(BACKGROUNDS[name])))
    candidate = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    if candidate.sum() < 0.01 * height * width:
        return Description(None, None, None, backdrop)
    median = np.median(pixels[candidate], axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(median - np.array(COLOURS[name])))
    # A pixel belongs to the shape when it is nearer the shape's colour than the background's (robust to soft
    # edges); holes are filled and only the largest connected piece is kept.
    nearer = np.linalg.norm(pixels - median, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    labels, count = ndimage.label(ndimage.binary_fill_holes(nearer))
    if count == 0:
        return Description(colour, None, None, backdrop)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))
    foreground = labels == 1 + int(np.argmax(sizes))
    shape = _fitted_shape(pixels, background, foreground)
    rows, cols = np.nonzero(foreground)
    cy, cx = rows.mean() / height, cols.mean() / width
    if abs(cx - 0.5) < 1 / 6 and abs(cy - 0.5) < 1 / 6:
        position = "in the center"
    else:
        position = f"in the {'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'} corner"
    return Description(colour, shape, position, backdrop)


def held_out_scenes(count: int, seed: int = 1234, held_out: bool = True) -> list[tuple[Scene, str]]:
    """``count`` scenes of the held-out (colour, shape) pairs with their full captions; with ``held_out=False``
    new scenes (a seed no training set uses) of the trained pairs, to tell composing from remembering."""
    dataset = ShapesDataset(count, seed=seed, held_out=held_out)
    return [(scene, caption(scene)) for scene in (dataset.scene(i)[0] for i in range(count))]


@torch.no_grad()
def adherence(model, sampler, scenes: list[tuple[Scene, str]], steps: int = 25, scale: float = 7.5,
              batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """The share of generated images whose detected colour, shape, position and background match their caption's."""
    generator = torch.Generator(model.device).manual_seed(seed)
    shape = (model.channels, model.image_size, model.image_size)
    batches = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        cond = model.get_learned_conditioning([text for _, text in chunk])
        uncond = model.get_learned_conditioning([""] * len(chunk))
        latents, _ = sampler.sample(steps, len(chunk), shape, conditioning=cond, unconditional_conditioning=uncond,
                                    unconditional_guidance_scale=scale, verbose=False, generator=generator)
        batches.append((model.decode_first_stage(latents).float().clamp(-1, 1) + 1) / 2)
    return score(torch.cat(batches), scenes)


@torch.no_grad()
def reconstruction_adherence(model, scenes: list[tuple[Scene, str]], batch_size: int = 64) -> dict[str, float]:
    """:func:`score` of the first stage's reconstructions of the scenes' own renders: what a diffusion model
    drawing exactly those scenes in its latent space would score (the autoencoder blurs a small star's points and
    a small triangle's corners into shapes the detector, reading a 64×64 picture, no longer tells apart)."""
    latents = encoded_scenes(model, scenes, batch_size)
    batches = [model.decode_first_stage(chunk) for chunk in latents.split(batch_size)]
    return score((torch.cat(batches).float().clamp(-1, 1) + 1) / 2, scenes)


@torch.no_grad()
def encoded_scenes(model, scenes: list[tuple[Scene, str]], batch_size: int = 64) -> torch.Tensor:
    """The scenes rendered and encoded by the first stage (its posterior's mode, scaled): the latents the diffusion
    model learns to draw, (B, C, h, w)."""
    images = torch.stack([torch.from_numpy(np.asarray(render(scene), dtype=np.float32)) for scene, _ in scenes])
    images = (images / 127.5 - 1).permute(0, 3, 1, 2).to(model.device)
    return torch.cat([model.get_first_stage_encoding(model.encode_first_stage(chunk).mode())
                      for chunk in images.split(batch_size)])


def score(images: torch.Tensor, scenes: list[tuple[Scene, str]]) -> dict[str, float]:
    """The share of images (B, 3, H, W) in [0, 1] whose detected colour, shape, position and background match
    their scene's (the scenes' captions name all four, as :func:`held_out_scenes` writes them)."""
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    found = [describe(image) for image in pixels]
    return {attribute: sum(getattr(f, attribute) == getattr(scene, attribute) for f, (scene, _) in
                           zip(found, scenes)) / len(scenes) for attribute in ATTRIBUTES}


def held_out_adherence(model, count: int = 64, steps: int = 20, scale: float = 7.5,
                       held_out: bool = True) -> dict[str, float]:
    """Prompt adherence on ``count`` held-out captions (trained pairs with ``held_out=False``) with the seed's
    DPM-Solver configuration."""
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler

    return adherence(model, DPMSolverSampler(model), held_out_scenes(count, held_out=held_out), steps=steps,
                     scale=scale)
