"""benchmarks/speed.py: a smoke run on the CPU with the tiny model (in a subprocess: the script sets global
torch state, such as the thread count)."""

import json
import math
import subprocess
import sys

from conftest import ROOT


def test_tiny_cpu_benchmark_checks_agreement_and_prints_table_and_json():
    command = [sys.executable, str(ROOT / "benchmarks/speed.py"), "--size", "tiny", "--device", "cpu",
               "--repeats", "1", "--steps", "3", "--batches", "1", "--image_batches", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| what | ours | diffusers | ours / diffusers |" in lines
    assert sum(line.startswith("agreement: ") for line in lines) == 3
    (json_line,) = [line for line in lines if line.startswith("JSON: ")]
    report = json.loads(json_line.removeprefix("JSON: "))
    assert (report["size"], report["dtype"]) == ("tiny", "float32")
    assert all(difference <= report["tolerance"] for difference in report["agreement"].values())
    whats = {(figure["what"], figure["unit"]) for figure in report["figures"]}
    assert whats == {("UNet step, batch 1, eager", "ms"), ("UNet step, batch 1, eager", "TFLOP/s"),
                     ("3-step image, batch 1, eager", "ms")}
    assert all(math.isfinite(figure["ratio"]) and figure["ratio"] > 0 for figure in report["figures"])


def test_a_failing_side_is_reported_and_the_other_still_timed(capsys):
    from benchmarks import speed as benchmark
    args = benchmark.parse_args(["--device", "cpu", "--repeats", "3"])
    calls = []

    def failing_on_second_timed_call():
        calls.append(None)
        if len(calls) == 3:  # warm-up, first timed call, then out of memory
            raise RuntimeError("CUDA out of memory")

    ours, theirs = benchmark.Runner(args, deadline=math.inf).both("step", failing_on_second_timed_call, lambda: None,
                                                                  warmup=1)
    assert ours == (None, None) and theirs[0] is not None and theirs[1] is None
    assert "failed step (ours): RuntimeError: CUDA out of memory" in capsys.readouterr().out
    assert benchmark.Runner(args, deadline=-math.inf).both("step", lambda: None, lambda: None, 1) == [(None, None)] * 2
