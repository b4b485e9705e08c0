"""Images per second of one per-image run in one process against ``torchrun`` with several, on the same CPU cores,
and whether they wrote the same files.

The demo model by default (64 captions of the held-out set, 25 DPM-Solver steps, 64×64); one process uses every
core's thread, ``torchrun --nproc_per_node N`` gives each process cores/N threads. Each run is timed from the
command's start to its end, so loading the model (once per process) counts.

    python benchmarks/sharded_run.py [--processes 2] [--images 64] [--n_samples 8]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.shapes import held_out_scenes

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], threads: int) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def pictures(outdir: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)).astype(int) for path in sorted((outdir / "samples").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n_samples", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as work:
        prompts = Path(work) / "prompts.txt"
        prompts.write_text("\n".join(text for _, text in held_out_scenes(args.images)))
        script = [str(ROOT / "scripts/txt2img.py"), "--config", str(ROOT / "configs/demo/shapes-inference.yaml"),
                  "--ckpt", str(ROOT / "models/demo/shapes.safetensors"), "--H", "64", "--W", "64", "--dpm_solver",
                  "--ddim_steps", "25", "--n_iter", "1", "--n_samples", str(args.n_samples), "--from-file",
                  str(prompts), "--device", "cpu", "--skip_grid"]
        one = run([sys.executable, *script, "--seed_mode", "per_image", "--outdir", f"{work}/one"], cores)
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.processes}", *script, "--outdir", f"{work}/many"],
                   max(1, cores // args.processes))
        a, b = pictures(Path(work) / "one"), pictures(Path(work) / "many")
        same = sorted(a) == sorted(b)
        worst = max(np.abs(a[name] - b[name]).max() for name in a) if same else None
    print(f"{args.images} images, {cores} cores: 1 process {one:.1f} s ({args.images / one:.2f} images/s), "
          f"{args.processes} processes {many:.1f} s ({args.images / many:.2f} images/s): {one / many:.2f}×; "
          f"same files: {same}, max |difference| {worst} of 255")


if __name__ == "__main__":
    main()
