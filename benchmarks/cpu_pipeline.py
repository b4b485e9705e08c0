"""A whole 25-step image on the CPU, text encoder to decoded pixels: ours against the same pipeline on OpenVINO.

The peer is what FastSD CPU and optimum-intel's ``OVStableDiffusionPipeline`` run: diffusers' text encoder, UNet
and VAE decoder converted by ``openvino.convert_model`` and compiled for the CPU, stepped by diffusers'
``DPMSolverMultistepScheduler`` (DPM-Solver++(2M), the sampler of our ``--dpm_solver``). Ours is
``Pipeline.txt2img`` with ``--backend openvino`` (f32 and bf16) and, for scale, the default torch backend. One
process, identical random SD v1 weights, one prompt with classifier-free guidance (batch 2 through the UNet),
512×512 by default; each engine warmed up by one image (which also converts or reads its cache), then timed over
``--repeats`` images. Prints the seconds per image, each stage's share, and ratios to the OpenVINO pipeline.

    python benchmarks/cpu_pipeline.py [--size 512] [--steps 25] [--repeats 1] [--no-torch] [--interleave]
"""

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cpu_engines import cpu_name  # the sibling script (benchmarks/ is on the path when run)
from diffusers import DPMSolverMultistepScheduler

from ldm.generation import Geometry, Pipeline
from ldm.models.acceleration import Acceleration, accelerate
from ldm.models.loading import build_model, load_config
from ldm.testing.diffusers_interop import diffusers_pipeline
from ldm.util import randomize_parameters_

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
PROMPT = "a photograph of an astronaut riding a horse"


def compiled(module: torch.nn.Module, example: tuple, precision: str):
    import openvino

    with torch.no_grad():
        model = openvino.convert_model(module, example_input=example)
    model.reshape({port: list(tensor.shape) for port, tensor in zip(model.inputs, example)})
    return openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


class Returning(torch.nn.Module):
    """A diffusers module called with positional tensors, returning its first output (what convert_model needs)."""

    def __init__(self, module: torch.nn.Module, call):
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *inputs):
        return self.call(self.module, *inputs)


class OpenVINOPipeline:
    """diffusers' components on OpenVINO with diffusers' DPM-Solver++(2M) loop (the peer)."""

    def __init__(self, pipe, precision: str, size: int):
        latent = size // 8
        tokens = torch.zeros(2, 77, dtype=torch.long)
        context = torch.randn(2, 77, 768)
        self.tokenizer = pipe.tokenizer
        self.scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     algorithm_type="dpmsolver++", solver_order=2)
        self.vae_scale = pipe.vae.config.scaling_factor
        self.text = compiled(Returning(pipe.text_encoder, lambda m, ids: m(ids)[0]), (tokens,), precision)
        self.unet = compiled(Returning(pipe.unet, lambda m, x, t, c: m(x, t, encoder_hidden_states=c)[0]),
                             (torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), context), precision)
        self.decoder = compiled(Returning(pipe.vae, lambda m, z: m.decode(z).sample),
                                (torch.randn(1, 4, latent, latent),), precision)
        self.latent = latent
        self.stages = {}

    def __call__(self, prompt: str, steps: int, scale: float, generator: torch.Generator) -> np.ndarray:
        start = time.perf_counter()
        ids = [self.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
               for text in ("", prompt)]
        context = self.text([np.array(ids, dtype=np.int64)])[0].copy()
        text_done = time.perf_counter()
        self.scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, self.latent, self.latent, generator=generator) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = np.concatenate([latents.numpy()] * 2)
            eps = torch.from_numpy(self.unet([x, np.full(2, float(t), np.float32), context])[0].copy())
            eps = eps[:1] + scale * (eps[1:] - eps[:1])
            latents = self.scheduler.step(eps, t, latents).prev_sample
        unet_done = time.perf_counter()
        image = self.decoder([(latents / self.vae_scale).numpy()])[0].copy()
        self.stages = {"text": text_done - start, "UNet": unet_done - text_done, "VAE": time.perf_counter() - unet_done}
        return image


class OursTimed:
    """``Pipeline.txt2img`` with its stages timed by hooks on the text encoder and the decode."""

    def __init__(self, model, backend: str, size: int):
        self.size = size
        accelerate(model, Acceleration(cuda_graph=False, backend=backend))
        self.pipeline = Pipeline(model, Geometry.of(load_config(CONFIG)), sampler="dpm_solver",
                                 acceleration=Acceleration(cuda_graph=False, backend=backend))
        self.stages = {}
        self._wrap(model, "get_learned_conditioning", "text")
        self._wrap(model, "decode_first_stage", "VAE")

    def _wrap(self, model, name: str, stage: str):
        model.__dict__.pop(name, None)  # an earlier engine's timer
        method = getattr(model, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start
            return result
        setattr(model, name, timed)

    def __call__(self, prompt: str, steps: int, scale: float, generator: torch.Generator) -> np.ndarray:
        self.stages = {}
        start = time.perf_counter()
        self.pipeline.txt2img(prompt, steps=steps, scale=scale, height=self.size, width=self.size,
                              generator=generator)
        total = time.perf_counter() - start
        self.stages["UNet"] = total - sum(self.stages.values())
        return None


def networks_to(model, dtype: torch.dtype):
    """The networks in ``dtype``, as --precision loads them; the schedule's own buffers stay float32."""
    for network in model.children():
        network.to(dtype)
    return model


def run(name: str, make, args, rows: list) -> None:
    """Build (convert, compile) and draw the first image, then the timed ones."""
    start = time.perf_counter()
    engine = make()
    engine(PROMPT, args.steps, 7.5, torch.Generator().manual_seed(0))
    first = time.perf_counter() - start
    seconds, stages = [], {}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        engine(PROMPT, args.steps, 7.5, torch.Generator().manual_seed(repeat + 1))
        seconds.append(time.perf_counter() - start)
        stages = engine.stages
    rows.append((name, float(np.median(seconds)), first, dict(stages)))
    print(f"{name}: {rows[-1][1]:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in stages.items())})", flush=True)
    del engine
    gc.collect()


def interleaved(model, args) -> None:
    """The f32 pair only (ours --backend openvino and the OpenVINO pipeline), both built first and then timed in
    alternation, so that the VM's drift falls on both alike: the order flips every round (peer, ours / ours, peer
    / …), so an even ``--repeats`` cancels a steady drift instead of always charging it to the second engine."""
    pair = {"OpenVINO pipeline f32": OpenVINOPipeline(diffusers_pipeline(model, load_config(CONFIG)), "f32", args.size),
            "ours --backend openvino f32": OursTimed(model, "openvino", args.size)}
    times: dict[str, list[float]] = {name: [] for name in pair}
    stages: dict[str, list[dict]] = {name: [] for name in pair}
    for round_ in range(args.repeats + 1):  # the first round converts, compiles and warms up
        for name, engine in (list(pair.items()) if round_ % 2 else list(pair.items())[::-1]):
            start = time.perf_counter()
            engine(PROMPT, args.steps, 7.5, torch.Generator().manual_seed(round_))
            if round_:
                times[name].append(time.perf_counter() - start)
                stages[name].append(dict(engine.stages))
    for name in pair:
        print(f"{name}: " + ", ".join(f"{stage} {np.median([s[stage] for s in stages[name]]):.2f} s"
                                      for stage in stages[name][0]))
    peer, ours = (float(np.median(times[name])) for name in pair)
    print(f"interleaved, {args.repeats} rounds: OpenVINO pipeline f32 {peer:.1f} s, ours --backend openvino f32 "
          f"{ours:.1f} s: {ours / peer:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="leave out our torch backend")
    parser.add_argument("--interleave", action="store_true",
                        help="only the f32 pair, timed in alternation, the order flipped each round "
                             "(give an even --repeats)")
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.size}×{args.size}, "
          f"{args.steps} steps, scale 7.5")
    model = randomize_parameters_(build_model(load_config(CONFIG)).eval())
    if args.interleave:
        with tempfile.TemporaryDirectory() as cache, torch.no_grad():
            os.environ["LDM_OPENVINO_CACHE"] = cache
            interleaved(model, args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache, torch.no_grad():
        os.environ["LDM_OPENVINO_CACHE"] = cache
        for precision in ("f32", "bf16"):
            pipe = diffusers_pipeline(model, load_config(CONFIG))
            run(f"OpenVINO pipeline {precision} (diffusers' modules)",
                lambda pipe=pipe, precision=precision: OpenVINOPipeline(pipe, precision, args.size), args, rows)
            del pipe
            gc.collect()
        run("ours --backend openvino f32", lambda: OursTimed(model, "openvino", args.size), args, rows)
        run("ours --backend openvino bf16",
            lambda: OursTimed(networks_to(model, torch.bfloat16), "openvino", args.size), args, rows)
        if args.torch:
            run("ours torch fp32 (the default)",
                lambda: OursTimed(networks_to(model, torch.float32), "torch", args.size), args, rows)
    peer = rows[0][1]
    print("\n| pipeline | s / image | × OpenVINO f32 pipeline | text / UNet / VAE s | first image s |\n"
          "|---|---|---|---|---|")
    for name, seconds, first, stages in rows:
        split = " / ".join(f"{stages.get(stage, 0.0):.1f}" for stage in ("text", "UNet", "VAE"))
        print(f"| {name} | {seconds:.1f} | {seconds / peer:.2f} | {split} | {first:.0f} |")


if __name__ == "__main__":
    main()
