"""Speed and memory of our Stable Diffusion v1 against diffusers on identical random weights, in one process.

Builds our LatentDiffusion from a config with random weights, and diffusers' UNet2DConditionModel and
AutoencoderKL and transformers' CLIPTextModel with the same weights (ldm.testing.diffusers_interop). First
checks that the two give the same text features, UNet ε and VAE decode, and refuses to time if they do not.
Then times, for each variant (eager; on CUDA our UNet replayed from CUDA graphs against diffusers' eager, both
without a compile wait; with ``--compile`` both UNets torch.compile'd, and on CUDA also compiled with CUDA
graphs, mode "reduce-overhead"), ours set up by ldm.models.acceleration as the scripts do:

* one UNet step at each of ``--batches``, each side called as its own sampling loop calls it;
* a whole image per ``--image_batches``: text encoder, ``--steps`` DPM-Solver++(2M) steps with classifier-free
  guidance, VAE decode to [0, 1] on the CPU (ours: DPMSolverSampler; diffusers: DPMSolverMultistepScheduler
  and an explicit loop);
* on CUDA, the peak allocated memory of each (both sides' weights stay on the device: they count alike).

UNet throughput is the network's FLOPs (torch.utils.flop_counter on diffusers' UNet) over time, and a share of
``--peak_tflops`` when given.
GPU times come from CUDA events, CPU times from perf_counter: after warm-up, ``--repeats`` calls alternating
between ours and diffusers' (a slow spell of a shared machine falls on both), the median of each side's.
A variant that fails (compile error, out of memory) is reported and skipped; measurements that would start
after ``--budget_s`` seconds are skipped. Prints a Markdown table, then one line ``JSON: {...}``.

    python benchmarks/speed.py                                   # full size, float16 on CUDA; tiny on the CPU
    python benchmarks/speed.py --compile --peak_tflops 989       # H100 SXM dense fp16/bf16 peak
    python benchmarks/speed.py --size tiny --device cpu --repeats 1
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import diffusers
import torch
from diffusers import DPMSolverMultistepScheduler
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ldm.generation import decode_images
from ldm.models.acceleration import Acceleration, accelerate
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.loading import build_model, load_config
from ldm.modules.encoders.modules import clip_tokenizer
from ldm.testing.diffusers_interop import diffusers_unet, diffusers_vae, transformers_text_encoder
from ldm.util import randomize_parameters_

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"full": ROOT / "configs/stable-diffusion/v1-inference.yaml",
           "tiny": ROOT / "configs/stable-diffusion/v1-tiny.yaml"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest allowed max |ours − diffusers| / max |diffusers|: float32 differs only by summation order; half
# precisions round every layer's output (10 and 7 mantissa bits), and the differences grow through the network.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE_SCALE = 7.5


@dataclass
class Row:
    """One line of the table: a figure for both sides and their ratio."""

    what: str
    unit: str
    ours: float | None
    diffusers: float | None

    @property
    def ratio(self) -> float | None:
        return self.ours / self.diffusers if self.ours is not None and self.diffusers else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", choices=tuple(CONFIGS), help="model size; default full on CUDA, tiny on the CPU")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default float16 on CUDA, float32 on the CPU")
    parser.add_argument("--batches", type=int, nargs="+", help="UNet step batch sizes; default 2 8 16 on CUDA, "
                        "2 on the CPU")
    parser.add_argument("--image_batches", type=int, nargs="*", help="images per sampling run; default 1 8 on "
                        "CUDA, 1 on the CPU; none given: no whole images")
    parser.add_argument("--latent_size", type=int, help="latent side (default: the config's, 64 = 512 px for v1)")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++(2M) steps per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets")
    parser.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s in --dtype, for UNet "
                        "utilisation")
    parser.add_argument("--threads", type=int, help="CPU threads for the CPU device; default 1, which keeps "
                        "times steady on a shared machine (several threads stall when one is descheduled)")
    parser.add_argument("--budget_s", type=float, default=240.0, help="start no measurement after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but this machine has no CUDA device")
    args.device = torch.device("cuda" if cuda else "cpu")
    args.size = args.size or ("full" if cuda else "tiny")
    args.dtype = DTYPES[args.dtype or ("float16" if cuda else "float32")]
    args.batches = args.batches or ([2, 8, 16] if cuda else [2])
    if args.image_batches is None:
        args.image_batches = [1, 8] if cuda else [1]
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def build_models(config_path: Path, device: torch.device, dtype: torch.dtype, seed: int
                 ) -> tuple[torch.nn.Module, SimpleNamespace]:
    """Our model with random weights, and diffusers' and transformers' modules built on the very same tensors
    (no copies)."""
    config = load_config(config_path)
    model = randomize_parameters_(build_model(config), seed=seed).eval().to(device)
    for child in model.children():  # the schedule buffers of the model itself stay float32, as load_model does
        child.to(dtype)
    state_dict, original_config = model.state_dict(), OmegaConf.to_container(config)
    text_config = model.cond_stage_model.transformer.text_model.config
    theirs = SimpleNamespace(
        unet=diffusers_unet(state_dict, original_config, meta=True),
        vae=diffusers_vae(state_dict, original_config, meta=True),
        text_encoder=transformers_text_encoder(state_dict, text_config, meta=True),
        scheduler=DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              algorithm_type="dpmsolver++", solver_order=2))
    return model, theirs


def latent_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    side = model.image_size
    return model.channels, side, side


def unet_calls(model: torch.nn.Module, theirs: SimpleNamespace, batch: int, dtype: torch.dtype
               ) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """One UNet call per side with a batch as its sampler passes it: ours float32 latents and real-valued
    times (B,), diffusers latents in the model's dtype and one integer timestep."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *latent_shape(model), generator=generator).to(model.device)
    context_dim = theirs.unet.config.cross_attention_dim
    context = torch.randn(batch, 77, context_dim, generator=generator).to(model.device, dtype)
    t_ours = torch.full((batch,), 500.0, device=model.device)
    t_theirs = torch.tensor(500, device=model.device)
    x_theirs = x.to(dtype)
    return (lambda: model.apply_model(x, t_ours, context),
            lambda: theirs.unet(x_theirs, t_theirs, encoder_hidden_states=context).sample)


def our_image(model: torch.nn.Module, sampler: DPMSolverSampler, batch: int, steps: int) -> torch.Tensor:
    """Prompts → images in [0, 1] on the CPU: our text encoder, DPMSolverSampler and VAE."""
    c = model.get_learned_conditioning(batch * [PROMPT])
    uc = model.get_learned_conditioning(batch * [""])
    latents, _ = sampler.sample(S=steps, batch_size=batch, shape=latent_shape(model),
                                conditioning=c, unconditional_conditioning=uc,
                                unconditional_guidance_scale=GUIDANCE_SCALE, verbose=False)
    return decode_images(model, latents)


def their_image(theirs: SimpleNamespace, shape: tuple[int, int, int], batch: int, steps: int) -> torch.Tensor:
    """The same with diffusers: transformers' text encoder, a scheduler loop as its pipelines run it, its VAE."""
    unet, device = theirs.unet, theirs.unet.device
    tokens = clip_tokenizer()(batch * [""] + batch * [PROMPT], padding="max_length", max_length=77,
                              truncation=True, return_tensors="pt").input_ids.to(device)
    context = theirs.text_encoder(input_ids=tokens).last_hidden_state
    theirs.scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(batch, *shape, device=device, dtype=unet.dtype) * theirs.scheduler.init_noise_sigma
    for t in theirs.scheduler.timesteps:
        noise_uncond, noise_cond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        noise = noise_uncond + GUIDANCE_SCALE * (noise_cond - noise_uncond)
        latents = theirs.scheduler.step(noise, t, latents).prev_sample
    images = theirs.vae.decode(latents / theirs.vae.config.scaling_factor).sample
    return torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu()


def check_agreement(model: torch.nn.Module, theirs: SimpleNamespace, dtype: torch.dtype) -> dict[str, float]:
    """max |ours − diffusers| / max |diffusers| of text features, UNet ε and VAE decode, printed as we go."""
    prompts = [PROMPT, ""]
    tokens = clip_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids.to(model.device)
    ours_unet, their_unet = unet_calls(model, theirs, 2, dtype)
    latent = torch.randn(1, *latent_shape(model), generator=torch.Generator().manual_seed(2)).to(model.device, dtype)
    pairs = {
        "text features": (lambda: model.get_learned_conditioning(prompts),
                          lambda: theirs.text_encoder(input_ids=tokens).last_hidden_state),
        "UNet ε": (ours_unet, their_unet),
        "VAE decode": (lambda: model.decode_first_stage(latent),
                       lambda: theirs.vae.decode(latent / theirs.vae.config.scaling_factor).sample),
    }
    differences = {}
    for name, (ours, reference) in pairs.items():
        ours, reference = ours().float(), reference().float()
        differences[name] = ((ours - reference).abs().max() / reference.abs().max()).item()
        print(f"agreement: {name}: max |Δ| = {(ours - reference).abs().max().item():.3g}, relative "
              f"{differences[name]:.3g} (tolerance {TOLERANCE[dtype]:g})")
    return differences


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Milliseconds of one ``fn()`` and the peak GiB allocated during it (CUDA only)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated(device) / 2 ** 30


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class Variant:
    label: str
    ours: Acceleration
    their_compile_mode: str | None  # None: diffusers' UNet eager
    skip_reason: str | None = None


def variants(args: argparse.Namespace) -> Iterator[Variant]:
    cuda_reason = None if args.device.type == "cuda" else "CUDA graphs need a CUDA device"
    yield Variant("eager", Acceleration(cuda_graph=False), None)
    yield Variant("ours CUDA graph, diffusers eager", Acceleration(cuda_graph=True), None, cuda_reason)
    if not args.compile:
        return
    compiles = torch._dynamo.is_dynamo_supported()
    reason = None if compiles else f"torch.compile does not support Python {platform.python_version()}"
    yield Variant("UNet torch.compile", Acceleration(compile=True), "default", reason)
    yield Variant("UNet torch.compile + CUDA graphs (reduce-overhead)", Acceleration(compile=True, cuda_graph=True),
                  "reduce-overhead", reason or cuda_reason)


@contextlib.contextmanager
def accelerated(model: torch.nn.Module, theirs: SimpleNamespace, variant: Variant) -> Iterator[None]:
    """Our model set up as the scripts set it up for ``variant``, diffusers' UNet compiled as it says, for the
    duration."""
    reference = theirs.unet
    accelerate(model, variant.ours)
    if variant.their_compile_mode is not None:
        theirs.unet = torch.compile(reference, mode=variant.their_compile_mode)
    try:
        yield
    finally:
        model.model.set_engine(None)
        theirs.unet = reference
        torch._dynamo.reset()


class Runner:
    """Measures both sides of each figure; a failure is printed and leaves that side's figure empty."""

    def __init__(self, args: argparse.Namespace, deadline: float):
        self.args, self.deadline = args, deadline

    def attempt(self, what: str, fn: Callable[[], object]) -> object | None:
        try:
            return fn()
        except Exception as error:  # one variant failing (compile error, out of memory) must not stop the rest
            print(f"failed {what}: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            if self.args.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def both(self, what: str, ours: Callable[[], object], theirs: Callable[[], object], warmup: int
             ) -> list[tuple[float | None, float | None]]:
        """[(ms, GiB) of ours, (ms, GiB) of diffusers]: each side warmed up (compiles, captures), then
        ``--repeats`` timed calls alternating between the sides, so that a slow spell of a shared machine falls
        on both; the median time and the largest peak memory of the timed calls."""
        if time.monotonic() > self.deadline:
            print(f"skipped {what}: the --budget_s of {self.args.budget_s:g} s is spent")
            return [(None, None), (None, None)]
        sides = {"ours": ours, "diffusers": theirs}
        samples = {}
        for side, fn in sides.items():
            if self.attempt(f"{what} ({side})", lambda: [fn() for _ in range(warmup)]) is not None:
                samples[side] = []
        for _ in range(self.args.repeats):
            for side in list(samples):
                result = self.attempt(f"{what} ({side})", lambda: timed_call(sides[side], self.args.device))
                if result is None:
                    del samples[side]
                else:
                    samples[side].append(result)
        return [(statistics.median(ms for ms, _ in samples[side]),
                 None if self.args.device.type != "cuda" else max(gib for _, gib in samples[side]))
                if samples.get(side) else (None, None) for side in sides]


def unet_rows(runner: Runner, model: torch.nn.Module, theirs: SimpleNamespace, label: str, flops: dict
              ) -> list[Row]:
    """Per batch: time of one UNet step, achieved TFLOP/s, share of the peak, peak memory."""
    args, rows = runner.args, []
    for batch in args.batches:
        calls = unet_calls(model, theirs, batch, args.dtype)
        if batch not in flops:  # the network's FLOPs, as diffusers' direct convolutions do them (our CPU Winograd
            flops[batch] = count_flops(calls[1])  # path does fewer multiplications for the same result)
        what = f"UNet step, batch {batch}, {label}"
        (ours_ms, ours_gib), (their_ms, their_gib) = runner.both(what, *calls, warmup=3 if args.device.type == "cuda"
                                                                  else 1)
        tflops = [None if ms is None else flops[batch] / ms / 1e9 for ms in (ours_ms, their_ms)]
        rows += [Row(what, "ms", ours_ms, their_ms), Row(what, "TFLOP/s", *tflops)]
        if args.peak_tflops:
            rows.append(Row(what, "% of peak", *(None if x is None else 100 * x / args.peak_tflops for x in tflops)))
        if args.device.type == "cuda":
            rows.append(Row(what, "peak GiB", ours_gib, their_gib))
    return rows


def image_rows(runner: Runner, model: torch.nn.Module, theirs: SimpleNamespace, label: str) -> list[Row]:
    """Per batch: time (and peak memory) of a guided DPM-Solver++(2M) run from prompts to decoded images."""
    args, rows, sampler = runner.args, [], DPMSolverSampler(model)
    for batch in args.image_batches:
        what = f"{args.steps}-step image, batch {batch}, {label}"
        (ours_ms, ours_gib), (their_ms, their_gib) = runner.both(
            what, lambda: our_image(model, sampler, batch, args.steps),
            lambda: their_image(theirs, latent_shape(model), batch, args.steps), warmup=1)
        rows.append(Row(what, "ms", ours_ms, their_ms))
        if args.device.type == "cuda":
            rows.append(Row(what, "peak GiB", ours_gib, their_gib))
    return rows


def markdown_table(rows: list[Row]) -> str:
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4g}"

    lines = ["| what | ours | diffusers | ours / diffusers |", "|---|---|---|---|"]
    lines += [f"| {row.what} ({row.unit}) | {cell(row.ours)} | {cell(row.diffusers)} | {cell(row.ratio)} |"
              for row in rows]
    return "\n".join(lines)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    model, theirs = build_models(CONFIGS[args.size], args.device, args.dtype, args.seed)
    model.image_size = args.latent_size or model.image_size  # the side every latent of the run gets
    info = dict(device=device_name(args.device), cpu_threads=torch.get_num_threads(),
                dtype=str(args.dtype).removeprefix("torch."), size=args.size, latent_size=model.image_size,
                torch=torch.__version__,
                diffusers=diffusers.__version__)
    print(", ".join(f"{key}: {value}" for key, value in info.items()))
    agreement = check_agreement(model, theirs, args.dtype)
    if not all(difference <= TOLERANCE[args.dtype] for difference in agreement.values()):  # NaN fails too
        print("ours and diffusers disagree beyond the tolerance: refusing to time them", file=sys.stderr)
        return 1
    runner, rows, flops = Runner(args, deadline), [], {}
    for variant in variants(args):
        if variant.skip_reason:
            print(f"skipped {variant.label}: {variant.skip_reason}")
            continue
        with accelerated(model, theirs, variant):
            rows += unet_rows(runner, model, theirs, variant.label, flops)
            rows += image_rows(runner, model, theirs, variant.label)
    print(markdown_table(rows))
    figures = [dict(asdict(row), ratio=row.ratio) for row in rows]
    print("JSON: " + json.dumps(dict(info, agreement=agreement, tolerance=TOLERANCE[args.dtype],
                                     peak_tflops=args.peak_tflops, figures=figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
