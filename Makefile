# One entry point per task. `make test` and `make run` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check fuzz bench proto chaos chaos-short chaos-long clean

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

# Regenerate the Protobuf module of the client protocol from its schema (commit the result).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src \
		src/eventcast/protocol/_pb/client.proto

# The chaos harness (docs/reliability.md): every scenario, ~10 minutes; one line each.
chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py $(CHAOS_ARGS)

# The CI profile (< 3 minutes; tests/benchmarks/test_chaos.py runs it scenario by scenario).
chaos-short: $(STAMP)
	$(BIN)/python benchmarks/chaos.py --short $(CHAOS_ARGS)

# Issue 12's long runs: churn for 5 minutes (> 10,000 recoveries), kill -9 repeated 20 times.
chaos-long: $(STAMP)
	$(BIN)/python benchmarks/chaos.py --only churn --seconds 300 $(CHAOS_ARGS)
	$(BIN)/python benchmarks/chaos.py --only kill9 --short --repeat 20 $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
