# Two commands take a fresh machine to results:
#   make repro   install everything, then run the pipeline (`dvc repro`) on the default params
#   make test    install everything, then run the checks and the test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: repro test install data-package browser-package lint clean-outputs gpu-kit

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

# What a bare GPU machine (torch, numpy, pandas, scikit-learn, matplotlib, ... but no DVC, MLflow, pydantic,
# Foolbox, constriction, mlxtend, and no network) needs to run benchmarks/gpu_pipeline.py: the missing
# packages as wheels (mlflow-skinny with its own requirements, the versions the venv runs; pydantic-core and
# constriction for CPython 3.11-3.13) and the Fashion-MNIST IDX files. About 45 MB: README "GPU run kit".
GPU_KIT    ?= .gpu-kit
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 \
	constriction==0.5.0 mlxtend==0.25.0 mlflow-skinny==3.17.2 cachetools==7.3.3 databricks-sdk==0.162.0 \
	fastapi==0.165.0 starlette==1.10.0 anyio==4.16.0 annotated-doc==0.0.7 uvicorn==0.54.0 h11==0.16.0 \
	importlib-metadata==9.1.0 zipp==4.1.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
	opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1
KIT_PIP := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip
GPU_PLATFORM := --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-kit: data-package
	rm -rf $(GPU_KIT) && mkdir -p $(GPU_KIT)/wheels $(GPU_KIT)/fashion-mnist
	$(KIT_PIP) download -q --no-deps $(GPU_PLATFORM) --python-version 3.12 -d $(GPU_KIT)/wheels $(GPU_WHEELS)
	for py in 3.11 3.13; do $(KIT_PIP) download -q --no-deps $(GPU_PLATFORM) --python-version $$py \
	  -d $(GPU_KIT)/wheels pydantic-core==2.50.5 constriction==0.5.0 || echo "note: no CPython $$py wheels"; done
	printf '%s\n' $(GPU_WHEELS) > $(GPU_KIT)/requirements.txt
	cp /usr/share/datasets/fashion-mnist/*-ubyte.gz $(GPU_KIT)/fashion-mnist/
	du -sh $(GPU_KIT)/wheels $(GPU_KIT)/fashion-mnist
