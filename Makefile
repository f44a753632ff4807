# Two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dam-mergekit-installed
# torch and torchvision first, pinned: an unpinned torch pulls a multi-GB build, and a torchvision
# that does not match torch breaks transformers.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q $(TORCH_PAIR) -e ".[dev,zoo,openclip]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check dam_mergekit tests benchmarks
	$(BIN)/ruff format --check dam_mergekit tests benchmarks

demo: setup
	$(BIN)/dam-mergekit demo

bench: setup
	$(BIN)/python benchmarks/bench_kernel.py

clean:
	rm -rf $(VENV) out .pytest_cache
