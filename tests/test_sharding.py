"""Per-image runs: the same files whatever the number of processes (torchrun on gloo, 1/2/3 processes) and the batch
size, an interrupted run resumed to the uninterrupted one without writing a file twice, and the manifest guarding
a resume against other settings."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script
from ldm.cli import check_run_flags
from ldm.distributed import Process
from ldm.sharding import GlobalProgress, Manifest, WorkItem, work_items
from ldm.util import InputError

txt2img = load_script("txt2img")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple circle",
           "an orange square", "a white triangle"]
SAMPLERS = {"ddim": [], "plms": ["--plms"], "dpm_solver": ["--dpm_solver"]}
# Max |difference| (of 255) between a file drawn in a batch of other images and the same file drawn in another
# batch: the CPU kernels' rounding differs with the batch (measured 0: bit-identical on this machine).
BATCH_ROUNDING = 1


def arguments(outdir, checkpoint, prompts, *extra):
    return ["--config", str(TINY_CONFIG), "--ckpt", str(checkpoint), "--H", "64", "--W", "64", "--ddim_steps", "3",
            "--n_iter", "2", "--n_samples", "3", "--from-file", str(prompts), "--seed", "7", "--outdir", str(outdir),
            "--device", "cpu", "--no_safety_checker", *extra]


def torchrun(processes: int, argv: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "scripts/txt2img.py"), *argv]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def workers(parent: int) -> list[int]:
    """The processes torchrun started (each in a session of its own, so they are found by parent)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return sorted(children)


def finished(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def pictures(outdir) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)).astype(int) for path in sorted((outdir / "samples").iterdir())}


def assert_same_pictures(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    differences = [np.abs(got[name] - expected[name]) for name in expected]
    print(f"max {max(d.max() for d in differences)}, pixels differing {sum((d > 0).sum() for d in differences)} "
          f"of {sum(d.size for d in differences)}")
    assert max(d.max() for d in differences) <= BATCH_ROUNDING


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")  # a blank line, skipped
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint, prompt_file):
    """Each sampler's per-image run in one plain process (the reference)."""
    runs = {}
    for sampler, flags in SAMPLERS.items():
        outdir = tmp_path_factory.mktemp(f"one-{sampler}")
        assert txt2img.main(arguments(outdir, tiny_checkpoint, prompt_file, "--seed_mode", "per_image", *flags)) == 0
        runs[sampler] = outdir
    return runs


def test_work_items_number_every_image_of_every_pass():
    items = list(work_items(lambda: iter(["a", "b", "c"]), 2))
    assert [(item.index, item.prompt) for item in items] == [(0, "a"), (1, "b"), (2, "c"), (3, "a"), (4, "b"),
                                                             (5, "c")]
    assert items[4].file == "samples/00004.png" and WorkItem(123456, "x").file == "samples/123456.png"
    assert items[4].seed(10) == 14 and WorkItem(3, "x").seed(2 ** 32 - 2) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_the_shards_split_the_items_without_overlap(world_size):
    shards = [{k for k in range(14) if Process(rank, world_size).takes(k)} for rank in range(world_size)]
    assert set().union(*shards) == set(range(14)) and sum(map(len, shards)) == 14


def test_a_one_process_run_has_the_original_layout_and_a_manifest(one_process):
    outdir = one_process["ddim"]
    assert sorted(os.listdir(outdir / "samples")) == [f"{k:05d}.png" for k in range(14)]
    lines = (outdir / "manifest.jsonl").read_text().splitlines()
    settings, entries = json.loads(lines[0])["settings"], [json.loads(line) for line in lines[1:]]
    assert settings["seed"] == 7 and settings["seed_mode"] == "per_image" and settings["noise_device"] == "cpu"
    assert [entry["index"] for entry in entries] == list(range(14))
    assert entries[8] == dict(index=8, prompt=PROMPTS[1], seed=15, file="samples/00008.png", sampler="ddim",
                              steps=3, rank=0)
    assert Image.open(outdir / "samples/00008.png").text["seed"] == "15"
    assert not list(outdir.glob("manifest-rank*"))
    assert len(list(outdir.glob("grid-*.png"))) == 1


def test_the_image_of_an_item_is_its_own_whatever_the_batch(tmp_path, tiny_checkpoint, prompt_file, one_process):
    for n_samples in ("1", "4"):
        outdir = tmp_path / n_samples
        argv = arguments(outdir, tiny_checkpoint, prompt_file, "--seed_mode", "per_image", "--skip_grid")
        argv[argv.index("--n_samples") + 1] = n_samples
        assert txt2img.main(argv) == 0
        assert_same_pictures(pictures(outdir), pictures(one_process["ddim"]))


def test_image_k_is_drawn_again_by_seed_plus_k(tmp_path, tiny_checkpoint, one_process):
    argv = arguments(tmp_path, tiny_checkpoint, "unused", "--seed", "15", "--n_iter", "1", "--n_samples", "1",
                     "--prompt", PROMPTS[1], "--skip_grid")
    argv.remove("--from-file")
    argv.remove("unused")
    assert txt2img.main(argv) == 0  # the original mode, one image: seed 7 + 8
    difference = np.abs(pictures(tmp_path)["00000.png"] - pictures(one_process["ddim"])["00008.png"])
    assert difference.max() <= BATCH_ROUNDING  # drawn alone there, in a batch of three here


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_two_and_three_processes_write_the_one_process_files(sampler, tmp_path, tiny_checkpoint, prompt_file,
                                                             one_process):
    runs = {n: torchrun(n, arguments(tmp_path / str(n), tiny_checkpoint, prompt_file, *SAMPLERS[sampler]))
            for n in (2, 3)}
    for n, run in runs.items():
        finished(run)
        assert_same_pictures(pictures(tmp_path / str(n)), pictures(one_process[sampler]))
        entries = [json.loads(line) for line in (tmp_path / str(n) / "manifest.jsonl").read_text().splitlines()[1:]]
        assert [entry["rank"] for entry in entries] == [k % n for k in range(14)]


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tmp_path, tiny_checkpoint, prompt_file):
    argv = arguments(tmp_path / "run", tiny_checkpoint, prompt_file, "--n_samples", "1")
    argv[argv.index("--ddim_steps") + 1] = "30"  # slow enough to be stopped midway
    reference = arguments(tmp_path / "reference", tiny_checkpoint, prompt_file, "--seed_mode", "per_image")
    reference[reference.index("--ddim_steps") + 1] = "30"
    assert txt2img.main(reference) == 0
    run = torchrun(2, argv)
    samples = tmp_path / "run" / "samples"
    deadline = time.monotonic() + 240
    while len(list(samples.glob("*.png")) if samples.is_dir() else []) < 4:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(workers(run.pid)[-1], signal.SIGKILL)  # one rank lost; torchrun then stops the other
    run.communicate(timeout=120)
    assert run.returncode != 0
    before = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in samples.glob("*.png")}
    assert 4 <= len(before) < 14 and not (tmp_path / "run" / "manifest.jsonl").exists()
    assert txt2img.main(argv + ["--resume"]) == 0  # one process finishes what two began
    assert_same_pictures(pictures(tmp_path / "run"), pictures(tmp_path / "reference"))
    for name, identity in before.items():
        path = samples / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity  # not written again
    entries = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()[1:]]
    assert [entry["index"] for entry in entries] == list(range(14))
    assert not list((tmp_path / "run").glob("manifest-rank*")) and not list(samples.glob(".*partial"))


def test_more_processes_than_images_leave_the_idle_ones_done(tmp_path, tiny_checkpoint):
    argv = arguments(tmp_path, tiny_checkpoint, "unused", "--prompt", "a red circle", "--n_iter", "1",
                     "--n_samples", "2")
    argv.remove("--from-file")
    argv.remove("unused")
    finished(torchrun(3, argv))
    assert sorted(os.listdir(tmp_path / "samples")) == ["00000.png", "00001.png"]


@pytest.mark.parametrize("change, message", [
    (["--seed", "8"], "seed: 7 there, 8 now"),
    (["--plms"], "sampler"),
    (["--H", "128"], "size"),
    (["--ddim_steps", "4"], "steps"),
])
def test_resuming_with_other_settings_is_refused(change, message, tmp_path, tiny_checkpoint, prompt_file,
                                                 one_process, capsys):
    outdir = tmp_path / "run"
    outdir.mkdir()
    for name in ("samples", "manifest.jsonl"):
        source = one_process["ddim"] / name
        target = outdir / name
        if source.is_dir():
            target.mkdir()
            for path in list(source.iterdir())[:5]:
                (target / path.name).write_bytes(path.read_bytes())
        else:
            target.write_text(source.read_text())
    argv = arguments(outdir, tiny_checkpoint, prompt_file, "--resume")
    for flag_index in range(0, len(change), 2):
        if change[flag_index] in argv and change[flag_index] != "--plms":
            argv[argv.index(change[flag_index]) + 1] = change[flag_index + 1]
        else:
            argv += change[flag_index:flag_index + 2]
    before = sorted(os.listdir(outdir / "samples"))
    assert txt2img.main(argv) == 2
    assert_one_error_line(capsys, message)
    assert sorted(os.listdir(outdir / "samples")) == before


def test_resuming_with_other_prompts_is_refused(tmp_path, tiny_checkpoint, prompt_file, one_process, capsys):
    outdir = tmp_path / "run"
    (outdir / "samples").mkdir(parents=True)
    (outdir / "manifest.jsonl").write_text((one_process["ddim"] / "manifest.jsonl").read_text())
    other = tmp_path / "prompts.txt"
    other.write_text("\n".join(reversed(PROMPTS)))
    assert txt2img.main(arguments(outdir, tiny_checkpoint, other, "--resume")) == 2
    assert_one_error_line(capsys, "image 0's prompt")


def test_a_second_run_into_a_run_is_refused_without_resume(tmp_path, tiny_checkpoint, prompt_file, one_process,
                                                           capsys):
    argv = arguments(one_process["ddim"], tiny_checkpoint, prompt_file, "--seed_mode", "per_image")
    assert txt2img.main(argv) == 2
    assert_one_error_line(capsys, "give --resume")


def test_a_resume_of_a_complete_run_draws_nothing(tiny_checkpoint, prompt_file, one_process):
    before = {path.name: path.stat().st_mtime_ns for path in (one_process["plms"] / "samples").iterdir()}
    assert txt2img.main(arguments(one_process["plms"], tiny_checkpoint, prompt_file, "--plms", "--resume")) == 0
    assert {path.name: path.stat().st_mtime_ns for path in (one_process["plms"] / "samples").iterdir()} == before


@pytest.mark.parametrize("flags, message", [
    (["--resume", "--seed_mode", "original"], "--resume needs --seed_mode per_image"),
    (["--noise_device", "cpu"], "--noise_device needs --seed_mode per_image"),
    (["--seed_mode", "per_image", "--fixed_code"], "--fixed_code does not go with --seed_mode per_image"),
    (["--seed_mode", "per_image", "--skip_save"], "--skip_save does not go with --seed_mode per_image"),
])
def test_flags_that_do_not_go_together_are_one_line(flags, message, tmp_path, tiny_checkpoint, prompt_file, capsys):
    assert txt2img.main(arguments(tmp_path, tiny_checkpoint, prompt_file, *flags)) == 2
    assert_one_error_line(capsys, message)


def test_the_original_seed_mode_cannot_be_split():
    args = argparse.Namespace(seed_mode="original", resume=False, noise_device=None, fixed_code=False, skip_save=False)
    with pytest.raises(InputError, match="cannot be split over 2 processes"):
        check_run_flags(args, Process(0, 2))


def test_the_manifest_ignores_a_line_cut_short_and_merges_by_index(tmp_path):
    settings = {"seed": 1}
    manifests = [Manifest(tmp_path, Process(rank, 2), settings) for rank in range(2)]
    for index in (3, 0, 1, 2):
        manifests[index % 2].record(dict(index=index, prompt="p", file=f"samples/{index:05d}.png"))
    with (tmp_path / "manifest-rank1.jsonl").open("a") as file:
        file.write('{"index": 5, "pro')  # killed mid-line
    counter = GlobalProgress(tmp_path)
    manifests[0].record(dict(index=4, prompt="p", file="samples/00004.png"))
    assert counter.refresh() == 1  # the lines since it started counting
    headers, entries = manifests[0].read()
    assert sorted(entries) == [0, 1, 2, 3, 4]
    assert headers == [settings, settings]
    assert [entry["index"] for entry in manifests[0].merge()] == [0, 1, 2, 3, 4]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.jsonl"]
    with pytest.raises(InputError, match="seed: 1 there, 2 now"):
        Manifest(tmp_path, Process(), {"seed": 2}).check_settings(Manifest(tmp_path, Process(), {}).read()[0])


def test_stochastic_samplers_draw_each_image_from_its_own_seed(tmp_path, tiny_checkpoint, prompt_file):
    """Ancestral and SDE noise during sampling, too, comes from the image's own generator."""
    runs = {}
    for n_samples in ("1", "3"):
        argv = arguments(tmp_path / n_samples, tiny_checkpoint, prompt_file, "--seed_mode", "per_image",
                         "--skip_grid", "--sampler", "DPM++ 2M SDE", "--n_iter", "1")
        argv[argv.index("--n_samples") + 1] = n_samples
        assert txt2img.main(argv) == 0
        runs[n_samples] = pictures(tmp_path / n_samples)
    assert_same_pictures(runs["1"], runs["3"])


@pytest.mark.parametrize("script", ["img2img", "diffedit_inpaint"])
def test_scripts_without_per_image_seeds_refuse_several_processes(script, tmp_path, monkeypatch, capsys):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert load_script(script).main(["--outdir", str(tmp_path)]) == 2
    assert_one_error_line(capsys, "runs in one process")


def test_a_manifest_with_a_damaged_settings_line_is_refused(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"settings": {"seed": 1}}\n{"index": 0, "file": "../../etc/passwd"}\n'
                                             '{"index": -3, "file": "/etc/shadow"}\n{"settings": 5}\n{"index": 1}\n')
    with pytest.raises(InputError, match="damaged at line 4"):
        Manifest(tmp_path, Process(), {"seed": 1}).read()
