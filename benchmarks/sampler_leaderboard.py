"""The sampler leaderboard: error against model calls, for every sampler on every schedule.

``--model analytic`` (default): Gaussian data N(μ, s²) on SD v1's schedule with classifier-free guidance between two
Gaussian conditionals (scale 7.5), whose ideal model makes every quantity exact.

* Deterministic samplers: RMS distance to the exact answer from the same start: the probability-flow ODE solved
  exactly to the data, σ = 0. σ-space samplers end with a denoising step D(x, σ_last), which is E[x_0 | x] and not
  the ODE's endpoint: from σ_min = 0.029 it alone costs σ²/(2s) ≈ 8.5e-4 here, a floor no solver gets under (from
  Align Your Steps' last level, 0.152 at 10 steps, about 2e-2). DDIM, PLMS and DPM-Solver stop at DDPM step 0's
  noise level without it (a floor of about 4e-4).
* Stochastic samplers: over 20 000 draws, the error of the sample variance as a share of the true one,
  |Var/s² − 1|, and of the sample mean, |E − μ| (standard errors 0.01 and 0.004).

``--model demo``: the trained demo model on held-out captions, the same start noise for every sampler: RMS pixel
distance to the converged picture (σ-space samplers: Heun on 500 Karras steps; DDIM, PLMS, DPM-Solver: DDIM with
all 1000 DDPM steps) and prompt adherence (colour / shape / position shares). Stochastic samplers are scored on
adherence only.

Budgets are model calls, not steps (Heun, DPM2, DPM++ 2S a and DPM++ SDE make two per step; PLMS one extra): each
sampler runs the most steps its budget allows. Prints Markdown tables and writes a log-log plot.

    python benchmarks/sampler_leaderboard.py [--model demo --count 16] [--out assets/sampler_leaderboard.png]
"""

import argparse
import math
from pathlib import Path

import matplotlib
import torch

from ldm.models.diffusion.dpm_solver.sigma_samplers import SIGMA_METHODS, SigmaSampler
from ldm.models.diffusion.dpm_solver.sigmas import SCHEDULE_LABELS, SCHEDULES
from ldm.models.diffusion.samplers import SAMPLER_LABELS, make_sampler
from ldm.models.diffusion.sampling_util import make_ddim_timesteps
from ldm.testing.analytic import GaussianLatentDiffusion, exact_solution

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CALLS = (5, 8, 10, 15, 20, 25, 50)
ROOT = Path(__file__).resolve().parents[1]
MU_COND, MU_UNCOND, SPREAD, SCALE = 0.4, 0.3, 0.5, 7.5
MU_GUIDED = MU_UNCOND + SCALE * (MU_COND - MU_UNCOND)
COMPVIS = ("ddim", "plms", "dpm_solver")


def entries(every_schedule: bool) -> list[tuple[str, str, str | None]]:
    """(label, sampler, schedule): the CompVis samplers, then every σ-space sampler on every schedule (or on its
    default one and DPM++ 2M on all)."""
    rows = [(SAMPLER_LABELS[name], name, None) for name in COMPVIS]
    for name, method in SIGMA_METHODS.items():
        for schedule in SCHEDULES:
            if every_schedule or schedule == method.schedule or name == "dpmpp_2m":
                rows.append((f"{method.label} · {SCHEDULE_LABELS[schedule]}", name, schedule))
    return rows


def steps_within(name: str, sampler, calls: int) -> int:
    """The most steps whose model calls fit the budget."""
    if isinstance(sampler, SigmaSampler):
        return max(s for s in range(1, calls + 1) if sampler.model_calls(s) <= calls)
    extra = 1 if name == "plms" else 0
    if name == "dpm_solver":
        return calls
    return max(s for s in range(1, calls + 1) if len(make_ddim_timesteps(s)) + extra <= calls)


def exact_answer(sampler, x_T: torch.Tensor, model) -> torch.Tensor:
    """The probability-flow ODE solved exactly from the sampler's start to the data (σ = 0)."""
    if isinstance(sampler, SigmaSampler):
        sigma = sampler.grid(1)[0]
        alpha = (1 + sigma ** 2) ** -0.5
        return exact_solution(x_T * sigma * alpha, alpha, 1.0, MU_GUIDED, SPREAD)
    return exact_solution(x_T, model.alphas_cumprod[-1].double().sqrt().item(), 1.0, MU_GUIDED, SPREAD)


def run(sampler, model, x_T: torch.Tensor, steps: int, cond, uncond, seed: int) -> torch.Tensor:
    samples, _ = sampler.sample(steps, x_T.shape[0], tuple(x_T.shape[1:]), conditioning=cond,
                                unconditional_conditioning=uncond, unconditional_guidance_scale=SCALE, x_T=x_T,
                                verbose=False, generator=torch.Generator(x_T.device).manual_seed(seed))
    return samples


def is_stochastic(name: str) -> bool:
    return name in SIGMA_METHODS and SIGMA_METHODS[name].noise != "none"


def analytic(seed: int, draws: int) -> tuple[dict, dict]:
    """Deterministic errors and stochastic (variance, mean) errors, per entry and call budget."""
    deterministic: dict[str, dict[int, float]] = {}
    stochastic: dict[str, dict[int, tuple[float, float]]] = {}
    for label, name, schedule in entries(every_schedule=True):
        model = GaussianLatentDiffusion(MU_UNCOND, SPREAD, sigma_space=name not in COMPVIS)
        sampler = make_sampler(name, model, schedule)
        shape = (draws, 1, 1, 1) if is_stochastic(name) else (4, 4, 16, 16)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        cond = torch.full((shape[0],), MU_COND, dtype=torch.float64)
        uncond = torch.full((shape[0],), MU_UNCOND, dtype=torch.float64)
        row = stochastic.setdefault(label, {}) if is_stochastic(name) else deterministic.setdefault(label, {})
        for calls in CALLS:
            steps = steps_within(name, sampler, calls)
            samples = run(sampler, model, x_T, steps, cond, uncond, seed + 1)
            if is_stochastic(name):
                row[calls] = (abs(float(samples.var()) / SPREAD ** 2 - 1), abs(float(samples.mean()) - MU_GUIDED))
            else:
                row[calls] = float((samples - exact_answer(sampler, x_T, model)).pow(2).mean().sqrt())
    return deterministic, stochastic


@torch.no_grad()
def demo(config: Path, ckpt: Path, seed: int, count: int) -> tuple[dict, dict, dict]:
    """Distances to the converged pictures, adherence, and the references' adherence (and their ``distance``)."""
    from ldm.data.shapes import held_out_scenes, score
    from ldm.generation import decode_images
    from ldm.models.loading import load_model

    model = load_model(config, ckpt)
    scenes = held_out_scenes(count)
    cond = model.get_learned_conditioning([text for _, text in scenes])
    uncond = model.get_learned_conditioning([""] * count)
    x_T = torch.randn(count, model.channels, model.image_size, model.image_size,
                      generator=torch.Generator().manual_seed(seed))

    def images(name: str, schedule: str | None, steps: int) -> torch.Tensor:
        return decode_images(model, run(make_sampler(name, model, schedule), model, x_T, steps, cond, uncond, seed))

    references = {"compvis": images("ddim", None, 1000), "sigma": images("heun", "karras", 500)}
    distances: dict[str, dict[int, float]] = {}
    adherence: dict[str, dict[int, dict[str, float]]] = {}
    for label, name, schedule in entries(every_schedule=False):
        sampler = make_sampler(name, model, schedule)
        reference = references["compvis" if name in COMPVIS else "sigma"]
        adherence[label] = {}
        for calls in CALLS:
            picture = images(name, schedule, steps_within(name, sampler, calls))
            adherence[label][calls] = score(picture, scenes)
            if not is_stochastic(name):
                distances.setdefault(label, {})[calls] = float((picture - reference).pow(2).mean().sqrt())
    scores = {key: score(value, scenes) for key, value in references.items()}
    scores["distance"] = float((references["compvis"] - references["sigma"]).pow(2).mean().sqrt())
    return distances, adherence, scores


def table(values: dict, cell) -> str:
    lines = ["| sampler · schedule | " + " | ".join(f"{c} calls" for c in CALLS) + " |", "|---|" + "---|" * len(CALLS)]
    lines += [f"| {label} | " + " | ".join(cell(row[c]) for c in CALLS) + " |" for label, row in values.items()]
    return "\n".join(lines)


def ranking(values: dict[str, dict[int, float]], calls: int) -> str:
    """The deterministic entries ordered by their error at one budget."""
    ordered = sorted(values.items(), key=lambda item: item[1][calls])
    return "\n".join(f"{rank}. {label}: {row[calls]:.2e}" for rank, (label, row) in enumerate(ordered, start=1))


def plot(panels: list[tuple[str, dict[str, dict[int, float]]]], path: Path, title: str) -> None:
    figure, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 6), squeeze=False)
    for axis, (ylabel, values) in zip(axes[0], panels):
        for label, row in values.items():
            points = [(c, row[c]) for c in CALLS if row[c] > 0 and math.isfinite(row[c])]
            axis.loglog(*zip(*points), marker="o", markersize=3, label=label)
        axis.set_xlabel("model calls")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def defaults_only(values: dict) -> dict:
    """The rows of each sampler on its A1111 default schedule (and the CompVis samplers)."""
    keep = {SAMPLER_LABELS[name] for name in COMPVIS}
    keep |= {f"{method.label} · {SCHEDULE_LABELS[method.schedule]}" for method in SIGMA_METHODS.values()}
    return {label: row for label, row in values.items() if label in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("analytic", "demo"), default="analytic")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo/shapes-inference.yaml")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models/demo/shapes.safetensors")
    parser.add_argument("--count", type=int, default=16, help="demo: how many held-out captions")
    parser.add_argument("--draws", type=int, default=20000, help="analytic: samples per stochastic sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="plot file")
    args = parser.parse_args()
    out = args.out or Path(f"outputs/sampler_leaderboard_{args.model}.png")
    if args.model == "analytic":
        deterministic, stochastic = analytic(args.seed, args.draws)
        print("RMS error against the exact answer:\n" + table(deterministic, lambda v: f"{v:.1e}"))
        print("\nstochastic: |Var/s² − 1| / |E − μ|:\n" + table(stochastic, lambda v: f"{v[0]:.3f} / {v[1]:.3f}"))
        print("\nranking at 10 calls:\n" + ranking(deterministic, 10))
        print("\nranking at 25 calls:\n" + ranking(deterministic, 25))
        variance = {label: {c: row[c][0] for c in CALLS} for label, row in defaults_only(stochastic).items()}
        plot([("RMS error vs the exact answer", defaults_only(deterministic)),
              ("stochastic: |Var/s² − 1| over 20 000 draws", variance)], out,
             f"Gaussian data, SD v1 schedule, guidance {SCALE:g}: each sampler on its A1111 default schedule")
    else:
        distances, adherence, references = demo(args.config, args.ckpt, args.seed, args.count)
        print("RMS pixel distance to the converged picture:\n" + table(distances, lambda v: f"{v:.1e}"))
        print(f"(the two references are {references.pop('distance'):.1e} apart)")
        shown = ", ".join(f"{key} {s['colour']:.2f} / {s['shape']:.2f} / {s['position']:.2f}"
                          for key, s in references.items())
        print(f"\nadherence colour / shape / position (references: {shown}):")
        print(table(adherence, lambda s: f"{s['colour']:.2f} / {s['shape']:.2f} / {s['position']:.2f}"))
        shape = {label: {c: row[c]["shape"] for c in CALLS} for label, row in adherence.items()}
        plot([("RMS distance to the converged picture", defaults_only(distances)),
              ("shape adherence", defaults_only(shape))], out,
             f"demo model, {args.count} held-out captions, guidance {SCALE:g}")
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
