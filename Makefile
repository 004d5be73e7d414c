# One entry point per task. `make test` and `make run` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check fuzz bench clean

$(STAMP): pyproject.toml scripts/setup.sh tests/js/package.json
	./scripts/setup.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/eventcast serve $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fuzz tests of tests/fuzz with many examples each (Hypothesis profile "fuzz";
# EVENTCAST_FUZZ_EXAMPLES=N for more or fewer, 5,000 by default).
fuzz: $(STAMP)
	$(BIN)/python -m pytest tests/fuzz --hypothesis-profile=fuzz --timeout=0 $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy --strict src

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
