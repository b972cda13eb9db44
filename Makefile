# Two entry points for a bare machine: `make demo` and `make test`.
# Both create or refresh the project's own virtualenv (.venv) first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test coverage-paper lint format venv ui clean

venv: $(STAMP)

# torch/torchvision are pinned to the release this machine's pip serves (docs/architecture.md, Environment);
# facenet-pytorch goes in --no-deps because its metadata pins old torch/numpy.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fc-pipeline demo

# two workers over the two cores; tests of one file share a worker (and its session fixtures)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

# what the dress rehearsal (tests/paper: the paper profile on a store of stand-in models) runs of the
# modules that load and preprocess for the paper profile; the lines it cannot run are listed in the README
PAPER_LOADING := fc_pipeline/pretrained.py,fc_pipeline/profiles.py,fc_pipeline/model/components.py
PAPER_LOADING := $(PAPER_LOADING),fc_pipeline/data/captioning.py,fc_pipeline/data/segmentation.py
PAPER_LOADING := $(PAPER_LOADING),fc_pipeline/data/matching.py,fc_pipeline/evaluation/faces.py
PAPER_LOADING := $(PAPER_LOADING),fc_pipeline/evaluation/prompt_consistency.py,assets/resources.py
coverage-paper: $(STAMP)
	$(BIN)/python -m coverage run --data-file=.coverage.paper -m pytest -q -p no:cacheprovider tests/paper
	$(BIN)/python -m coverage report --data-file=.coverage.paper --show-missing --include='$(PAPER_LOADING)'

# ruff lint + format check (configuration in pyproject.toml); `make format` rewrites in place
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# webserver (http://127.0.0.1:3000, loopback only) + daemon (sensors, schedules, run queue) on the
# instance in $DAGSTER_HOME (default .dagster_home, the demo's); seeds it with dagster.yaml unless it has one.
# webserver + daemon on 127.0.0.1:3000; `fc-pipeline instance` copies dagster.yaml into the
# instance dir (never over an existing one) and sizes the `gpu` pool to the visible GPUs
ui: $(STAMP)
	export DAGSTER_HOME="$${DAGSTER_HOME:-$(CURDIR)/.dagster_home}" && \
	$(BIN)/fc-pipeline instance && \
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

clean:
	rm -rf $(VENV) data .dagster_home
