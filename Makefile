# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates (or reuses) the virtual environment .venv and installs what the project needs,
# system packages included (FFCV builds from source against OpenCV and libjpeg-turbo).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev
PYTEST_ARGS ?=
# The tests run in this many processes (pytest-xdist), one per core up to 4. In one process the suite
# kept about one core busy (its CPU time about its wall time): a 2-core machine ran it in 14 min with
# 2 processes, against 23.5 min in one (2026-12-02).
# TEST_WORKERS=0: all in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@free=$$(df -Pk $(VENV) | awk 'NR == 2 { print int($$4 / 1048576) }'); \
	if [ "$${free:-99}" -lt 8 ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "warning: the install needs about 7 GiB (torch with its CUDA libraries, DALI, FFCV); $$free GiB free where $(VENV) is" >&2; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev,dali,ffcv,plot]'
	touch $(STAMP)

# Trains MoCo on the demo set shipped in the package (CPU, a few minutes) and prints the kNN
# accuracy of the trained backbone next to a randomly initialised one. --force: a second
# `make demo` starts over in runs/demo instead of refusing to overwrite the first one's run.
demo: $(STAMP)
	$(BIN)/moco-fast train --device cpu --force

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
