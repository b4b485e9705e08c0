"""Write a checkpoint with random weights for a config: for smoke runs and benchmarks of untrained architectures.

    python scripts/make_random_checkpoint.py --config configs/stable-diffusion/v1-tiny.yaml --out models/tiny/random.safetensors
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.models.loading import build_model
from ldm.util import InputError, randomize_parameters_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint for a model config.")
    parser.add_argument("--config", required=True, help="model config (YAML)")
    parser.add_argument("--out", required=True, type=Path, help="output file, .safetensors or .ckpt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; refusing to overwrite it", file=sys.stderr)
        return 2
    try:
        model = randomize_parameters_(build_model(args.config), seed=args.seed)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.out.suffix == ".safetensors":
        save_file(state_dict, args.out)
    else:
        torch.save({"state_dict": state_dict}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
