"""Do two revisions draw the same pictures? Runs every script with fixed seeds at a git revision and in this working
tree, and compares the PNGs they write, pixel for pixel.

The runs: txt2img (two iterations over three prompts in batches of two, and with --fixed_code) and img2img for DDIM,
PLMS, DPM-Solver and DDIM with η = 0.5, then DiffEdit with both encodings, each on the tiny config (random weights,
made once) and on the demo model, all on the CPU at 64×64 (img2img and DiffEdit: the 512×384 example photo).
A refactor should print only "identical"; a deliberate change shows which runs and files it moved.

    python benchmarks/compare_revisions.py HEAD~1 [--out /tmp/revisions]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = {"ddim": [], "plms": ["--plms"], "dpm_solver": ["--dpm_solver"], "ddim_eta": ["--ddim_eta", "0.5"]}
PHOTO = ROOT / "assets" / "diffedit-input.png"


def runs(models: dict[str, list[str]], prompts: Path) -> dict[str, list[str]]:
    """Run name → the script and its arguments."""
    table = {}
    for model, files in models.items():
        for sampler, flags in SAMPLERS.items():
            batches = ["--n_iter", "2", "--n_samples", "2", "--from-file", str(prompts)]
            table[f"txt2img-{model}-{sampler}"] = ["txt2img", *files, *flags, "--H", "64", "--W", "64",
                                                   "--ddim_steps", "5", *batches]
            table[f"txt2img-{model}-{sampler}-fixed"] = ["txt2img", *files, *flags, "--H", "64", "--W", "64",
                                                         "--ddim_steps", "4", "--n_iter", "2", "--n_samples", "2",
                                                         "--fixed_code"]
            table[f"img2img-{model}-{sampler}"] = ["img2img", *files, *flags, "--init-img", str(PHOTO),
                                                   "--ddim_steps", "6", "--strength", "0.6", *batches]
        for encoding in ("stochastic", "deterministic"):
            table[f"diffedit-{model}-{encoding}"] = ["diffedit_inpaint", *files, "--init-img", str(PHOTO),
                                                     "--ddim_steps", "4", "--n_samples", "2", "--encode_type",
                                                     encoding]
    return table


def run_all(root: Path, out: Path, table: dict[str, list[str]]) -> None:
    environment = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    for name, (script, *argv) in table.items():
        command = [sys.executable, str(root / "scripts" / f"{script}.py"), *argv, "--device", "cpu",
                   "--no_safety_checker", "--outdir", str(out / name)]
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
        if result.returncode:
            print(f"{root.name}: {name} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)


def compare(before: Path, after: Path, names: list[str]) -> None:
    print("| run | PNGs | identical | largest difference (of 255) | the files that differ |")
    print("|---|---|---|---|---|")
    for name in names:
        files = sorted((before / name).rglob("*.png"))
        differences = {}
        for file in files:
            other = after / file.relative_to(before)
            a, b = (np.asarray(Image.open(path)).astype(int) for path in (file, other)) if other.exists() else (0, 255)
            differences[str(file.relative_to(before / name))] = (
                int(np.abs(a - b).max()) if np.shape(a) == np.shape(b) else 255)
        changed = [path for path, difference in differences.items() if difference]
        print(f"| {name} | {len(files)} | {'all' if not changed else len(files) - len(changed)} | "
              f"{max(differences.values(), default=0)} | {', '.join(changed) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare this working tree with")
    parser.add_argument("--out", type=Path, default=None, help="keep the pictures here (default: a temporary dir)")
    args = parser.parse_args()
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        # the scripts number new files on from old ones, so old pictures would be compared instead of the new
        parser.error(f"--out {args.out} is not empty")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.revision],
                       check=True, capture_output=True)
        try:
            tiny = Path(scratch) / "tiny.safetensors"
            subprocess.run([sys.executable, str(ROOT / "scripts/make_random_checkpoint.py"), "--config",
                            str(ROOT / "configs/stable-diffusion/v1-tiny.yaml"), "--out", str(tiny)], check=True,
                           capture_output=True)
            prompts = Path(scratch) / "prompts.txt"
            prompts.write_text("a red circle\na blue square\na green star\n")
            models = {"tiny": ["--config", str(ROOT / "configs/stable-diffusion/v1-tiny.yaml"), "--ckpt", str(tiny)],
                      "demo": ["--config", str(ROOT / "configs/demo/shapes-inference.yaml"), "--ckpt",
                               str(ROOT / "models/demo/shapes.safetensors")]}
            table = runs(models, prompts)
            run_all(baseline, out / "before", table)
            run_all(ROOT, out / "after", table)
            compare(out / "before", out / "after", list(table))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False,
                           capture_output=True)


if __name__ == "__main__":
    main()
