"""Sampler accuracy against the exact answer: error vs steps for DDIM, PLMS and DPM-Solver variants.

The model is the ideal noise predictor of Gaussian data on SD v1's schedule, with classifier-free guidance
between two Gaussian conditionals (scale 7.5 by default), so the probability-flow ODE has a closed-form
solution. Each sampler starts from the same x_T at t = T (DDPM step 999) and is compared with the exact
ODE solution at the data end (DDPM step 0): the error includes each sampler's own grid (DDIM and PLMS start
their grid at step 1 + (S − 1)·⌊1000/S⌋, as the original). Prints a Markdown table and writes a log-log plot.

    python scripts/benchmark_samplers.py [--out outputs/benchmark_samplers.png]
"""

import argparse
from pathlib import Path

import matplotlib
import torch

from ldm.models.diffusion.analytic import GaussianLatentDiffusion, exact_solution
from ldm.models.diffusion.samplers import make_sampler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STEPS = (5, 10, 15, 20, 25, 50)
SHAPE = (4, 16, 16)
# name → (registered sampler, extra keyword arguments of its sample())
SAMPLERS = {
    "DDIM (η = 0)": ("ddim", {}),
    "PLMS": ("plms", {}),
    "DPM-Solver++(2M), seed config": ("dpm_solver", {}),
    "DPM-Solver++(2M), logSNR": ("dpm_solver", {"skip_type": "logSNR"}),
    "DPM-Solver++(3M), logSNR": ("dpm_solver", {"order": 3, "skip_type": "logSNR"}),
    "DPM-Solver++(2S), logSNR": ("dpm_solver", {"method": "singlestep", "skip_type": "logSNR"}),
}


def run(scale: float, mu_cond: float, mu_uncond: float, batch: int, seed: int) -> dict[str, dict[int, float]]:
    """RMS error per element of each sampler at each step count."""
    model = GaussianLatentDiffusion(mu=mu_uncond)
    x_T = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = torch.full((batch,), mu_cond, dtype=torch.float64)
    uncond = torch.full((batch,), mu_uncond, dtype=torch.float64)
    mu_guided = mu_uncond + scale * (mu_cond - mu_uncond)
    alphas_cumprod = model.alphas_cumprod.double()
    exact = exact_solution(x_T, alphas_cumprod[-1].sqrt().item(), alphas_cumprod[0].sqrt().item(), mu_guided, model.s)
    errors: dict[str, dict[int, float]] = {}
    for label, (name, options) in SAMPLERS.items():
        errors[label] = {}
        for steps in STEPS:
            samples, _ = make_sampler(name, model).sample(steps, batch, SHAPE, conditioning=cond,
                                                          unconditional_conditioning=uncond,
                                                          unconditional_guidance_scale=scale, x_T=x_T,
                                                          verbose=False, **options)
            errors[label][steps] = (samples - exact).pow(2).mean().sqrt().item()
    return errors


def table(errors: dict[str, dict[int, float]]) -> str:
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]
    for label, row in errors.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[s]:.2e}" for s in STEPS) + " |")
    return "\n".join(lines)


def plot(errors: dict[str, dict[int, float]], path: Path, scale: float) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, row in errors.items():
        axes.loglog(STEPS, [row[s] for s in STEPS], marker="o", label=label)
    axes.set_xlabel("sampling steps")
    axes.set_ylabel("RMS error vs exact ODE solution")
    axes.set_title(f"Gaussian data, SD v1 schedule, guidance scale {scale:g}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_samplers.png"), help="plot file")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    errors = run(args.scale, mu_cond=0.4, mu_uncond=0.3, batch=4, seed=args.seed)
    print(table(errors))
    plot(errors, args.out, args.scale)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
