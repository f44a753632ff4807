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

.PHONY: setup test demo book lint bench clean

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

# The book: every chapter executed offline, warnings as errors, into book/_build/html.
BOOK_STAMP := $(VENV)/.dam-mergekit-book-installed

$(BOOK_STAMP): $(STAMP)
	$(BIN)/pip install -q $(TORCH_PAIR) -e ".[book]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3
	touch $(BOOK_STAMP)

# Every chapter executes on every build: the cache is emptied, then filled two chapters at a time.
book: $(BOOK_STAMP)
	rm -rf book/_build/.jupyter_cache
	$(BIN)/python book/execute_chapters.py book/_build/.jupyter_cache
	$(BIN)/jupyter-book build -W -n --keep-going book/

bench: setup
	$(BIN)/python benchmarks/bench_kernel.py

clean:
	rm -rf $(VENV) out .pytest_cache book/_build
