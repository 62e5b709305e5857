# Each target creates or updates the virtualenv .venv in the repo itself.
# The torch extra is a CPU build (torch==2.13.0) so the DataLoader tests run, not skip; the
# mlflow and wandb extras so the tracker tests read their runs back with the real clients.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test examples lint format bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,torch,mlflow,wandb]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_cnn.py

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

# Every example end to end in its fast mode, the slow ones included (make test skips those).
examples: $(STAMP)
	NNXFIT_ALL_EXAMPLES=1 $(BIN)/python -m pytest -n 2 --dist loadgroup -q tests/test_examples.py

lint: $(STAMP)
	$(BIN)/ruff check nnxfit tests examples benchmarks
	$(BIN)/ruff format --check nnxfit tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff format nnxfit tests examples benchmarks
	$(BIN)/ruff check --fix nnxfit tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
