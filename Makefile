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

models/tiny/random.safetensors: configs/stable-diffusion/v1-tiny.yaml | $(STAMP)
	rm -f $@
	$(BIN)/python scripts/make_random_checkpoint.py --config $< --out $@

demo: $(STAMP) models/tiny/random.safetensors
	@echo "Sampling arrives with the samplers (issue 3) and txt2img (issue 4); the tiny checkpoint is ready."

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
