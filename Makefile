# make demo: sample pictures on CPU; make test: the test suite. Both create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean-venv

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/txt2img.py --config configs/demo/shapes-inference.yaml \
		--ckpt models/demo/shapes.safetensors --H 64 --W 64 --dpm_solver --ddim_steps 25 --n_iter 1 \
		--from-file assets/demo-prompts.txt --n_samples 4 --outdir outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
