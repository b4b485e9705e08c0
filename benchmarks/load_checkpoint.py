"""Time loading a full-size SD v1 checkpoint: our loader against build-then-load (the original's way).

Writes a random-weight v1 checkpoint as .ckpt and .safetensors into a temporary directory (about 4.3 GB each),
then times each way to a ready model twice, so the second run reads from a warm page cache. "Ready" includes
reading every weight once: our loader maps the file and pages weights in on first use.

    python benchmarks/load_checkpoint.py [--dir /tmp]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.models.loading import build_model, load_model, read_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs/stable-diffusion/v1-inference.yaml"


def ready_seconds(load) -> float:
    """Seconds until the model exists and every weight has been read once."""
    start = time.perf_counter()
    model = load()
    for tensor in model.state_dict().values():
        tensor.sum()
    return time.perf_counter() - start


def build_then_load(path: Path) -> torch.nn.Module:
    """The original's path: build with random initialisation, then copy the checkpoint in."""
    model = build_model(CONFIG)
    model.load_state_dict(read_checkpoint(path).state_dict, strict=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the two checkpoints")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        state_dict = build_model(CONFIG).state_dict()
        print(f"building the full model with random initialisation: {time.perf_counter() - start:.1f} s")
        torch.save({"state_dict": state_dict, "global_step": 0}, tmp / "model.ckpt")
        save_file(state_dict, tmp / "model.safetensors")
        del state_dict
        print("| checkpoint | ours: load_model (1st / 2nd) | build + load_state_dict (1st / 2nd) | speed-up (2nd) |")
        print("|---|---|---|---|")
        for name in ("model.safetensors", "model.ckpt"):
            ours = [ready_seconds(lambda: load_model(CONFIG, tmp / name)) for _ in range(2)]
            theirs = [ready_seconds(lambda: build_then_load(tmp / name)) for _ in range(2)]
            print(f"| {name} | {ours[0]:.2f} s / {ours[1]:.2f} s | {theirs[0]:.2f} s / {theirs[1]:.2f} s "
                  f"| {theirs[1] / ours[1]:.1f}× |")


if __name__ == "__main__":
    main()
