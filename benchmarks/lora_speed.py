"""Does a merged LoRA cost anything per image? Times the demo model's txt2img with and without two LoRAs merged
(LoRA on every attention projection, LoHa on the feed-forward layers), alternating the two, in one process.

    python benchmarks/lora_speed.py [--repeats 5] [--steps 25]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.generation import Pipeline
from ldm.models.lora import layer_names

ROOT = Path(__file__).resolve().parents[1]


def random_lora(path: Path, pipeline: Pipeline, kind: str, pattern: str, rank: int = 8) -> int:
    """A random LoRA (``kind`` "lora" or "loha") on the UNet's linear layers whose kohya name contains ``pattern``."""
    weights = dict(pipeline.model.named_parameters())
    generator = torch.Generator().manual_seed(len(kind))
    tensors = {}
    for kohya, ours in layer_names(pipeline.model).items():
        shape = weights[ours].shape
        if pattern not in kohya or not kohya.startswith("lora_unet_") or len(shape) != 2:
            continue
        parts = (("lora_up.weight", (shape[0], rank)), ("lora_down.weight", (rank, shape[1]))) if kind == "lora" else (
            ("hada_w1_a", (shape[0], rank)), ("hada_w1_b", (rank, shape[1])), ("hada_w2_a", (shape[0], rank)),
            ("hada_w2_b", (rank, shape[1])))
        for part, size in parts:
            tensors[f"{kohya}.{part}"] = 0.01 * torch.randn(size, generator=generator)
    save_file(tensors, path)
    return len(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    pipeline = Pipeline.from_config(ROOT / "configs/demo/shapes-inference.yaml",
                                    ROOT / "models/demo/shapes.safetensors", device="cpu", sampler="dpm_solver")
    prompts = ["a small red circle at the top", "a large blue square on the left"]
    with tempfile.TemporaryDirectory() as scratch:
        files = [Path(scratch) / "attention.safetensors", Path(scratch) / "feedforward.safetensors"]
        counts = [random_lora(files[0], pipeline, "lora", "attn"), random_lora(files[1], pipeline, "loha", "ff_net")]
        times = {"without": [], "with 2 LoRAs merged": []}
        merge_seconds = []
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            for label in times:
                pipeline.loras = [(file, 0.8) for file in files] if label != "without" else []
                start = time.perf_counter()
                pipeline._activate_loras(prompts)
                merged = time.perf_counter()
                pipeline.txt2img(prompts, steps=args.steps, scale=5.0, generator=torch.Generator().manual_seed(0))
                end = time.perf_counter()
                times[label].append(end - merged)
                if label != "without":
                    merge_seconds.append(merged - start)
        base = statistics.median(times["without"][1:])
        print(f"demo model, DPM-Solver {args.steps} steps, 2 images; LoRA tensors: {counts[0]} + {counts[1]}")
        print("| run | median seconds per call | ratio |")
        print("|---|---|---|")
        for label, values in times.items():
            median = statistics.median(values[1:])
            print(f"| {label} | {median:.2f} | {median / base:.3f} |")
        print(f"merging both (and restoring before the next plain call): {statistics.median(merge_seconds[1:]):.3f} s")


if __name__ == "__main__":
    main()
