# Two commands do everything: `make demo` (train on the built-in corpus) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench-cpu
setup:
	@bash scripts/setup_env.sh

# Passive OpenMP waiting: on a CPU shared with other jobs, spinning threads make torch ~10x slower.
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/centrifuge train $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments examples scripts

bench-cpu: setup
	$(BIN)/centrifuge bench --preset tiny --device cpu --reps 2
