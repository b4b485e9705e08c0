"""scripts/diffedit_inpaint.py and its notebook on the tiny config: files, masks, bad input, top-to-bottom run."""

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import ROOT, TINY_CONFIG, assert_one_error_line, load_script

diffedit_inpaint = load_script("diffedit_inpaint")
PHOTO = ROOT / "assets" / "diffedit-input.png"


def tiny_run(outdir, checkpoint, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(checkpoint), "--init-img", str(PHOTO), "--ddim_steps", "3",
            "--outdir", str(outdir), "--device", "cpu", "--no_safety_checker", *extra]


def test_writes_an_edit_and_its_mask_per_sample(tmp_path, tiny_checkpoint):
    assert diffedit_inpaint.main(tiny_run(tmp_path, tiny_checkpoint, "--n_samples", "2")) == 0
    assert diffedit_inpaint.main(tiny_run(tmp_path, tiny_checkpoint, "--encode_type", "deterministic")) == 0
    names = [f"{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == names
    sample, mask = Image.open(tmp_path / "samples" / "00002.png"), Image.open(tmp_path / "masks" / "00002.png")
    assert sample.size == mask.size == (512, 384)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert sample.text["edit"] == "A bowl of pears" and sample.text["encode_type"] == "deterministic"
    assert sample.text["mask"] == "estimated"


def test_a_sigma_sampler_decodes_the_stochastic_encoding(tmp_path, tiny_checkpoint):
    assert diffedit_inpaint.main(tiny_run(tmp_path, tiny_checkpoint, "--sampler", "DPM++ 2M Karras")) == 0
    sample = Image.open(tmp_path / "samples" / "00000.png")
    assert sample.text["sampler"] == "DPM++ 2M Karras" and sample.text["schedule"] == "Karras"


def test_a_user_mask_is_used_as_given(tmp_path, tiny_checkpoint):
    user_mask = np.zeros((192, 256), dtype=np.uint8)
    user_mask[:, :128] = 255
    Image.fromarray(user_mask).save(tmp_path / "left.png")
    assert diffedit_inpaint.main(tiny_run(tmp_path / "out", tiny_checkpoint, "--mask", str(tmp_path / "left.png"))) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "masks" / "00000.png").convert("L"))
    assert (written[:, :256] == 255).all() and (written[:, 256:] == 0).all()


@pytest.mark.parametrize("change, message", [
    (["--init-img", "missing.png"], "missing.png does not exist"),
    (["--encode_ratio", "0"], "--encode_ratio must be in (0, 1]"),
    (["--encode_ratio", "1.2"], "--encode_ratio must be in (0, 1]"),
    (["--mask", "SQUARE.png"], "aspect ratio"),
    (["--mask", "missing-mask.png"], "--mask missing-mask.png does not exist"),
    (["--ddim_steps", "0"], "--ddim_steps must be a positive"),
    (["--scale", "nan"], "argument --scale: must be a finite number"),
    (["--encode_ratio", "inf"], "argument --encode_ratio: must be a finite number"),
    (["--outdir", ""], "--outdir must name a directory"),
    (["--sampler", "Euler", "--encode_type", "deterministic"],
     "--sampler Euler cannot decode DiffEdit's deterministic"),
    (["--sampler", "PLMS"], "--sampler PLMS cannot decode DiffEdit's stochastic"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(change, message, tmp_path, tiny_checkpoint, capsys,
                                                         monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "SQUARE.png")
    monkeypatch.chdir(tmp_path)
    assert diffedit_inpaint.main(tiny_run(tmp_path / "out", tiny_checkpoint) + change) == 2
    assert_one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_the_notebook_runs_top_to_bottom(tiny_checkpoint):
    notebook = nbformat.read(ROOT / "scripts" / "diffedit_inpaint.ipynb", as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    parameters.source += (f"\nCONFIG = {str(TINY_CONFIG)!r}\nCKPT = {str(tiny_checkpoint)!r}\nSTEPS = 3\n"
                          "DEVICE = 'cpu'\nSAFETY_CHECKER = False\n")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "scripts")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("mask covers" in output.get("text", "") for output in outputs)
    assert any("image/png" in output.get("data", {}) for output in outputs)
