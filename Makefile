# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo demo-text test test-fast lint bench-train bench-video clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch 2.13.0 is on the build machines' disk; install it first so no
	# dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,video,wandb]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/megatron-keye demo

demo-text: setup
	$(VENV)/bin/megatron-keye demo --text

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check megatron_keye tests tools

bench-train: setup
	$(PY) tools/bench_train.py

# The peer (keye-vl-utils with OpenCV) comes with the dev extra that `make setup` installs.
bench-video: setup
	$(PY) tools/bench_video.py

clean:
	rm -rf outputs .pytest_cache
