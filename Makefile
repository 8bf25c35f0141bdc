# flowserve: `make run` serves the shipped models, `make test` runs every check.
# Both create .venv and install the pinned dependencies the first time; later they start at once.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8001
METRICS_PORT ?= 8002

.PHONY: install run test lint typecheck pytest models bench bench-report protos clean

install: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/flowserve serve --store model_store --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy flows training export server flowserve bench

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# Rebuild the shipped default models (seeded, deterministic), then their exports.
SHIPPED_MODELS := moons moons-vp digits
models: $(STAMP)
	$(BIN)/python -m training.defaults --store model_store
	for name in $(SHIPPED_MODELS); do \
		$(BIN)/flowserve export model_store/$$name/1 --format torchscript,onnx --max-dir-bytes 5000000 || exit 1; \
	done

bench: $(STAMP)
	$(BIN)/python -m bench

bench-report: $(STAMP)
	$(BIN)/python -m bench.report

protos: $(STAMP)
	$(BIN)/python -m protos.build

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
