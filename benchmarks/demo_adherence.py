"""The demo model's prompt-adherence table (README, "The demo model"), regenerated from shipped weights.

    python benchmarks/demo_adherence.py                      # models/demo/shapes.safetensors, 64 captions each
    python benchmarks/demo_adherence.py --ckpt logs/shapes-ldm/model.safetensors --scales 7.5

Rows: new scenes of the trained (colour, shape) pairs and the held-out pairs, each at every guidance scale, with
the README protocol (DPM-Solver, 25 steps, sampling seed 0, caption seed 1234). It is a script, not a test, so
that the README's figures come from one command that anyone can rerun on the shipped file.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.shapes import ATTRIBUTES, held_out_adherence  # noqa: E402
from ldm.models.loading import load_model  # noqa: E402


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
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_model(args.config, args.ckpt)
    if not args.no_header:
        print(f"| captions ({args.count} each, DPM-Solver {args.steps} steps) | guidance scale | "
              + " | ".join(ATTRIBUTES) + " |")
        print("|---|---|" + "---|" * len(ATTRIBUTES))
    for held_out in {"both": [False, True], "trained": [False], "held_out": [True]}[args.pairs]:
        label = "held-out pairs" if held_out else "new scenes of trained pairs"
        for scale in args.scales:
            start = time.perf_counter()
            scores = held_out_adherence(model, count=args.count, steps=args.steps, scale=scale, held_out=held_out)
            print(f"| {label} | {scale:g} | " + " | ".join(f"{scores[a]:.2f}" for a in ATTRIBUTES)
                  + f" |  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
