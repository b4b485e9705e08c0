"""One SD v1 UNet step on the CPU, engine against engine, in one process on identical random weights.

Ours in torch float32 as the scripts set it up (Winograd, channels_last) and diffusers' UNet in float32; then
OpenVINO on diffusers' UNet (f32 and bf16 inference precision: the peer's setup, as FastSD CPU and the OpenVINO
notebooks convert it) and our ``--backend openvino`` (f32, bf16). Batch 2 ([x, x]: classifier-free guidance); after one
warm-up call each, ``--repeats`` rounds alternating within each group (torch; OpenVINO f32; OpenVINO bf16:
together they do not fit in 24 GB), the median of each. Every
engine's output is compared with diffusers' float32 one first (max |difference| / max |output|). Prints a Markdown
table with ratios to OpenVINO f32 and the CPU's name.

    python benchmarks/cpu_engines.py [--latent 32 64] [--repeats 3]
"""

import argparse
import copy
import gc
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ldm.models.acceleration import Acceleration, accelerate
from ldm.models.loading import build_model, load_config
from ldm.models.openvino_engine import OpenVINOUNet
from ldm.testing.diffusers_interop import diffusers_unet
from ldm.util import randomize_parameters_

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def openvino_on(module: torch.nn.Module, precision: str, example: tuple):
    """The peer: convert_model + compile_model, as a callable on our inputs."""
    import openvino

    with torch.no_grad():
        model = openvino.convert_model(module, example_input=example)
    model.reshape({port: list(tensor.shape) for port, tensor in zip(model.inputs, example)})
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return lambda x, t, c: torch.from_numpy(compiled((x.numpy(), t.numpy(), c.numpy()))[0].copy())


class DiffusersCall(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, c):
        return self.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


def models(latent: int) -> tuple:
    """Our UNet and diffusers' on the same random weights, and one guided input: [x, x] at one timestep with two
    contexts, as classifier-free guidance calls the UNet (our OpenVINO engine passes that x once)."""
    config = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    model = randomize_parameters_(build_model(config).eval())
    state = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    peer = DiffusersCall(diffusers_unet(state, config))
    example = (torch.randn(1, 4, latent, latent).repeat(2, 1, 1, 1), torch.tensor([500.0, 500.0]),
               torch.randn(2, 77, 768))
    return model, peer, example


def timed(table: dict, example: tuple, reference: torch.Tensor, repeats: int) -> list[tuple[str, float, float]]:
    """After a warm-up call (which also gives the error), ``repeats`` rounds alternating over the table."""
    errors = {name: float((call(*example) - reference).abs().max() / reference.abs().max())
              for name, call in table.items()}
    times: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(repeats):
        for name, call in table.items():
            start = time.perf_counter()
            call(*example)
            times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(times[name]), errors[name]) for name in table]


@torch.no_grad()
def measure(latent: int, repeats: int) -> list[tuple[str, float, float]]:
    """Torch engines, then OpenVINO ones a precision at a time, peer beside ours (all at once do not fit in 24 GB)."""
    model, peer, example = models(latent)
    reference = peer(*example)
    plain = copy.deepcopy(model.model.diffusion_model)
    accelerate(model, Acceleration(cuda_graph=False))  # ours as the scripts set it up on the CPU
    rows = timed({"diffusers fp32 (torch)": peer, "ours fp32 (torch, Winograd)": model.model.diffusion_model},
                 example, reference, repeats)
    del model
    gc.collect()
    with tempfile.TemporaryDirectory() as cache:
        for precision in ("f32", "bf16"):
            pair = {f"OpenVINO {precision} (diffusers' UNet)": openvino_on(peer, precision, example),
                    f"ours --backend openvino {precision}": OpenVINOUNet(plain, precision, Path(cache))}
            rows += timed(pair, example, reference, repeats)
            del pair
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[32, 64], help="latent sides (32: 256×256 px)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for latent in args.latent:
        rows = measure(latent, args.repeats)
        peer = dict((name, seconds) for name, seconds, _ in rows)["OpenVINO f32 (diffusers' UNet)"]
        print(f"\nUNet step, batch 2, {latent}×{latent} latent ({8 * latent}×{8 * latent} px):\n")
        print("| engine | seconds | × OpenVINO f32 | rel. difference to diffusers fp32 |\n|---|---|---|---|")
        for name, seconds, error in rows:
            print(f"| {name} | {seconds:.2f} | {seconds / peer:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
