"""Sampler accuracy: error against an exact or converged answer, vs steps, for DDIM, PLMS and DPM-Solver.

``--model analytic`` (default): the ideal noise predictor of Gaussian data on SD v1's schedule, with
classifier-free guidance between two Gaussian conditionals, so the probability-flow ODE has a closed-form
solution. Every sampler starts from the same x_T at DDPM step 999 and is compared with the exact solution at
step 0 (DDIM and PLMS start their grid at step 1 + (S − 1)·⌊1000/S⌋, as the original).

``--model demo``: the shipped demo model on held-out captions. The reference is DDIM with every DDPM step
(η = 0) from the same start noise; each sampler is measured by its RMS distance to that reference in pixels
([0, 1] scale) and by prompt adherence (the share of images whose detected colour, shape and position match).

Prints Markdown tables and writes a log-log plot.

    python benchmarks/sampler_accuracy.py [--model demo] [--out outputs/sampler_accuracy.png]
"""

import argparse
from pathlib import Path

import matplotlib
import torch

from ldm.models.diffusion.samplers import make_sampler
from ldm.testing.analytic import GaussianLatentDiffusion, exact_solution

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STEPS = (5, 10, 15, 20, 25, 50)
ROOT = Path(__file__).resolve().parents[1]
# label → (registered sampler, extra keyword arguments of its sample())
ANALYTIC_SAMPLERS = {
    "DDIM (η = 0)": ("ddim", {}),
    "PLMS": ("plms", {}),
    "DPM-Solver++(2M), seed config": ("dpm_solver", {}),
    "DPM-Solver++(2M), logSNR": ("dpm_solver", {"skip_type": "logSNR"}),
    "DPM-Solver++(3M), logSNR": ("dpm_solver", {"order": 3, "skip_type": "logSNR"}),
    "DPM-Solver++(2S), logSNR": ("dpm_solver", {"method": "singlestep", "skip_type": "logSNR"}),
}
DEMO_SAMPLERS = {key: ANALYTIC_SAMPLERS[key] for key in
                 ("DDIM (η = 0)", "PLMS", "DPM-Solver++(2M), seed config", "DPM-Solver++(2M), logSNR")}


def analytic_errors(scale: float, seed: int, batch: int = 4) -> dict[str, dict[int, float]]:
    """RMS error per element of each sampler at each step count."""
    shape = (4, 16, 16)
    mu_cond, mu_uncond = 0.4, 0.3
    model = GaussianLatentDiffusion(mu=mu_uncond)
    x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = torch.full((batch,), mu_cond, dtype=torch.float64)
    uncond = torch.full((batch,), mu_uncond, dtype=torch.float64)
    alphas_cumprod = model.alphas_cumprod.double()
    exact = exact_solution(x_T, alphas_cumprod[-1].sqrt().item(), alphas_cumprod[0].sqrt().item(),
                           mu_uncond + scale * (mu_cond - mu_uncond), model.s)
    errors: dict[str, dict[int, float]] = {}
    for label, (name, options) in ANALYTIC_SAMPLERS.items():
        errors[label] = {}
        for steps in STEPS:
            samples, _ = make_sampler(name, model).sample(steps, batch, shape, conditioning=cond,
                                                          unconditional_conditioning=uncond,
                                                          unconditional_guidance_scale=scale, x_T=x_T,
                                                          verbose=False, **options)
            errors[label][steps] = (samples - exact).pow(2).mean().sqrt().item()
    return errors


@torch.no_grad()
def demo_results(config: Path, ckpt: Path, scale: float, seed: int, count: int
                 ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, dict[str, float]]], dict[str, float]]:
    """Distance to the converged reference and adherence, per sampler and step count; the reference's adherence."""
    from ldm.data.shapes import held_out_scenes, score
    from ldm.generation import decode_images
    from ldm.models.loading import load_model

    model = load_model(config, ckpt)
    scenes = held_out_scenes(count)
    cond = model.get_learned_conditioning([text for _, text in scenes])
    uncond = model.get_learned_conditioning([""] * count)
    shape = (model.channels, model.image_size, model.image_size)
    x_T = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))

    def run(name: str, steps: int, options: dict) -> torch.Tensor:
        latents, _ = make_sampler(name, model).sample(steps, count, shape, conditioning=cond,
                                                      unconditional_conditioning=uncond,
                                                      unconditional_guidance_scale=scale, x_T=x_T, verbose=False,
                                                      **options)
        return decode_images(model, latents)

    reference = run("ddim", 1000, {})
    distances: dict[str, dict[int, float]] = {}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for label, (name, options) in DEMO_SAMPLERS.items():
        distances[label], scores[label] = {}, {}
        for steps in STEPS:
            images = run(name, steps, options)
            distances[label][steps] = (images - reference).pow(2).mean().sqrt().item()
            scores[label][steps] = score(images, scenes)
    return distances, scores, score(reference, scenes)


def table(values: dict[str, dict[int, float]], cell=lambda v: f"{v:.2e}") -> str:
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for label, row in values.items():
        lines.append(f"| {label} | " + " | ".join(cell(row[s]) for s in STEPS) + " |")
    return "\n".join(lines)


def plot(panels: list[tuple[str, dict[str, dict[int, float]], bool]], path: Path, title: str) -> None:
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, (ylabel, values, log_y) in zip(axes[0], panels):
        for label, row in values.items():
            (axis.loglog if log_y else axis.semilogx)(STEPS, [row[s] for s in STEPS], marker="o", label=label)
        axis.set_xlabel("sampling steps")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("analytic", "demo"), default="analytic")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo/shapes-inference.yaml")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models/demo/shapes.safetensors")
    parser.add_argument("--count", type=int, default=64, help="demo: how many held-out captions")
    parser.add_argument("--out", type=Path, default=None, help="plot file")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(f"outputs/sampler_accuracy_{args.model}.png")
    if args.model == "analytic":
        errors = analytic_errors(args.scale, args.seed)
        print(table(errors))
        plot([("RMS error vs exact ODE solution", errors, True)], out,
             f"Gaussian data, SD v1 schedule, guidance scale {args.scale:g}")
    else:
        distances, scores, reference = demo_results(args.config, args.ckpt, args.scale, args.seed, args.count)
        print("RMS distance (pixels in [0, 1]) to DDIM with every DDPM step:\n" + table(distances))
        print("\nprompt adherence, colour / shape / position (reference: "
              f"{reference['colour']:.2f} / {reference['shape']:.2f} / {reference['position']:.2f}):")
        print(table(scores, cell=lambda s: f"{s['colour']:.2f} / {s['shape']:.2f} / {s['position']:.2f}"))
        adherence = [(f"{attribute} adherence", {label: {s: row[s][attribute] for s in STEPS}
                                                 for label, row in scores.items()}, False)
                     for attribute in ("colour", "shape")]
        plot([("RMS distance to the converged sample", distances, True), *adherence],
             out, f"demo model, {args.count} held-out captions, guidance scale {args.scale:g}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
