"""The demo model's prompt-adherence table (README, "The demo model"), regenerated from shipped weights.

    python benchmarks/demo_adherence.py                      # models/demo/shapes.safetensors, 64 captions each
    python benchmarks/demo_adherence.py --ckpt logs/shapes-ldm/model.safetensors --scales 7.5
    python benchmarks/demo_adherence.py --corners       # does the caption's corner steer the picture?

Rows: new scenes of the trained (colour, shape) pairs and the held-out pairs, each at every guidance scale, with
the README protocol (DPM-Solver, 25 steps, sampling seed 0, caption seed 1234), each set after what the
autoencoder keeps: the captions' own scenes rendered, encoded and decoded (a model drawing exactly those scenes in
its latent space scores that; generated scenes differ in size and jitter, so it is a reference, not a strict
bound). It is a script, not a test, so that the README's figures come from one command that anyone can rerun on
the shipped file.

``--corners`` draws "a small red circle in the … corner" from the same 16 noises with each position and prints
where each picture's shape was found: identical rows mean the noise, not the caption, chose the corner.
``--swap_cost`` prints how much the network's loss at the noisiest steps rises when corner captions get their
vertical or their horizontal word swapped: near 0 for a word the network does not read (README, "Tenth sitting").
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.shapes import (ATTRIBUTES, POSITIONS, describe, encoded_scenes, held_out_adherence,  # noqa: E402
                             held_out_scenes, reconstruction_adherence)
from ldm.models.diffusion.dpm_solver import DPMSolverSampler  # noqa: E402
from ldm.models.loading import load_model  # noqa: E402
from ldm.models.training import denoising_error  # noqa: E402


def corner_rows(model, steps: int, scale: float, count: int = 16, subject: str = "red circle") -> list[str]:
    """One row per position word: the detected position of each of ``count`` pictures drawn from the same noises
    (tl, tr, bl, br, c; -- where no shape was found) and how many match the caption; then, over the four corners,
    how often each axis matches on its own. Identical rows for two corners mean their differing word is ignored:
    a coin flip on that axis scores about half."""
    shape = (model.channels, model.image_size, model.image_size)
    noise = torch.randn(count, *shape, generator=torch.Generator().manual_seed(7))
    short = {name: "".join(word[0] for word in name.split()[2:4]) for name in POSITIONS}
    uncond = model.get_learned_conditioning([""] * count)
    rows, axes = [], {"top/bottom": 0, "left/right": 0}
    for position in POSITIONS:
        cond = model.get_learned_conditioning([f"a small {subject} {position} on a white background"] * count)
        latents, _ = DPMSolverSampler(model).sample(steps, count, shape, conditioning=cond, x_T=noise.clone(),
                                                    unconditional_conditioning=uncond, verbose=False,
                                                    unconditional_guidance_scale=scale)
        pixels = ((model.decode_first_stage(latents).clamp(-1, 1) + 1) * 127.5).round().byte()
        found = [describe(image).position for image in pixels.permute(0, 2, 3, 1).numpy()]
        rows.append(f"{short[position]:>2}: {' '.join(short.get(f, '--') for f in found)}  "
                    f"{sum(f == position for f in found)}/{count}")
        if "corner" in position:
            for axis, word in zip(axes, position.split()[2:4]):
                axes[axis] += sum(f is not None and word in f.split() for f in found)
    return rows + [", ".join(f"{axis} as captioned {right}/{4 * count}" for axis, right in axes.items())]


def swapped(caption: str, word: str, other: str) -> str:
    return caption.replace(word, "\0").replace(other, word).replace("\0", other)


def swap_costs(model, count: int = 256, low: int = 900, high: int = 1000) -> dict[str, float]:
    """The simple loss (:func:`ldm.models.training.denoising_error`) for ``count`` new corner scenes of trained pairs
    (rendered, encoded, one noise and one t ∈ [low, high) each), with each axis's words swapped, minus that with the
    captions as written."""
    scenes = [(scene, text) for scene, text in held_out_scenes(8 * count, held_out=False)
              if "corner" in scene.position][:count]
    z = encoded_scenes(model, scenes)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(z.shape, generator=generator)
    t = torch.randint(low, high, (len(z),), generator=generator)

    def error(captions: list[str]) -> float:
        return float(torch.cat([denoising_error(model, z[i:i + 64], t[i:i + 64], noise[i:i + 64],
                                                model.get_learned_conditioning(captions[i:i + 64]))
                                for i in range(0, len(z), 64)]).mean())

    captions = [text for _, text in scenes]
    written = error(captions)
    return {axis: error([swapped(text, *words) for text in captions]) - written
            for axis, words in (("top/bottom", ("top", "bottom")), ("left/right", ("left", "right")))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo/shapes-inference.yaml"))
    parser.add_argument("--ckpt", default=str(ROOT / "models/demo/shapes.safetensors"))
    parser.add_argument("--count", type=int, default=64, help="captions per row")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5])
    parser.add_argument("--pairs", choices=("both", "trained", "held_out"), default="both",
                        help="which rows (several processes can share the work)")
    parser.add_argument("--no_header", action="store_true")
    parser.add_argument("--corners", action="store_true", help="print the corner test instead of the table")
    parser.add_argument("--swap_cost", action="store_true",
                        help="print the loss cost of swapping each axis's words instead of the table")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_model(args.config, args.ckpt)
    if args.corners:
        print("\n".join(corner_rows(model, args.steps, args.scales[-1])))
        return 0
    if args.swap_cost:
        costs = swap_costs(model)
        print(", ".join(f"{axis} swapped: loss {cost:+.4f}" for axis, cost in costs.items()) + " (t ≥ 900)")
        return 0
    if not args.no_header:
        print(f"| captions ({args.count} each, DPM-Solver {args.steps} steps) | guidance scale | "
              + " | ".join(ATTRIBUTES) + " |")
        print("|---|---|" + "---|" * len(ATTRIBUTES))
    for held_out in {"both": [False, True], "trained": [False], "held_out": [True]}[args.pairs]:
        label = "held-out pairs" if held_out else "new scenes of trained pairs"
        kept = reconstruction_adherence(model, held_out_scenes(args.count, held_out=held_out))
        print(f"| {label}: the autoencoder's reconstructions of the scenes themselves | — | "
              + " | ".join(f"{kept[a]:.2f}" for a in ATTRIBUTES) + " |", flush=True)
        for scale in args.scales:
            start = time.perf_counter()
            scores = held_out_adherence(model, count=args.count, steps=args.steps, scale=scale, held_out=held_out)
            print(f"| {label} | {scale:g} | " + " | ".join(f"{scores[a]:.2f}" for a in ATTRIBUTES)
                  + f" |  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
