# `make test` and `make demo` do all set-up on a fresh machine:
# a venv in .venv, the package with its test extras, and (Linux, as root with
# apt) Debian's OpenBLAS, which moe_mpi loads in place of the slow reference
# BLAS of MLX's Linux wheel (see moe_mpi/cpu/blas.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NP ?= 2
PROMPT ?= Return a list of
MAX_TOKENS ?= 60
# Open MPI refuses to run as root without this; 3 ranks on 2 cores need
# --oversubscribe.
MPIRUN_FLAGS := --oversubscribe $(shell [ "$$(id -u)" = 0 ] && echo --allow-run-as-root)

.PHONY: venv blas test demo serve clean

venv: $(STAMP) blas

# setup.py builds the C matrix-vector loop (moe_mpi/cpu/_gemv.c) in place.
$(STAMP): pyproject.toml setup.py moe_mpi/cpu/_gemv.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# OpenBLAS for MLX on Linux CPUs; nothing to do on macOS (Metal, Accelerate).
blas:
	@if [ "$$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing libopenblas0-pthread (fast BLAS for MLX on the CPU)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else \
	    echo "note: install OpenBLAS (Debian/Ubuntu: libopenblas0-pthread) for fast CPU matmuls"; \
	  fi; \
	fi

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/mpirun $(MPIRUN_FLAGS) -n $(NP) $(VENV)/bin/moe-mpi generate \
	  --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS) --temp 0.7 --seed 0 --verbose

# The demo model behind an OpenAI-compatible API on $(NP) ranks, at
# http://127.0.0.1:8080/v1 (try: .venv/bin/python examples/openai_client.py).
SERVE_ARGS ?=
serve: venv
	$(VENV)/bin/mpirun $(MPIRUN_FLAGS) -n $(NP) $(VENV)/bin/moe-mpi serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV)
