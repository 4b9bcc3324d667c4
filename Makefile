# Two commands take a fresh machine to results:
#   make repro   install everything, then run the pipeline (`dvc repro`) on the default params
#   make test    install everything, then run the checks and the test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: repro test install data-package browser-package lint clean-outputs

# Stages run `python pipeline/<stage>.py`: the venv's bin goes first on PATH, as `source .venv/bin/activate` does.
repro: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install browser-package
	$(BIN)/ruff check src pipeline tests benchmarks
	$(BIN)/ruff format --check src pipeline tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q -n auto

install: $(STAMP) data-package

# Headless Chromium (Debian's package) for the browser check of the MLflow UI in the tests.
browser-package:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	else echo "note: no apt-get; the browser test will be skipped"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST offline: Debian's dataset-fashion-mnist holds the full set. Skipped where it is
# already installed or where there is no apt (then use data.root or the canonical download).
data-package:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: no apt-get; set data.root in params.yaml to a folder with the Fashion-MNIST IDX files"; fi

lint: install
	$(BIN)/ruff check src pipeline tests benchmarks
	$(BIN)/ruff format --check src pipeline tests benchmarks
	$(BIN)/mypy

clean-outputs:
	rm -rf data/dataset data/binarized data/models data/metrics data/plots checkpoints
