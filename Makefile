# Two commands set everything up on a fresh machine:
#   make demo   # create .venv if needed, train the tiny model on the generated dataset, evaluate it
#   make test   # create .venv if needed, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench clean-venv

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) train.py $(ARGS)

# The suite is mostly XLA compilation, one thread at a time: two pytest workers (pytest-xdist,
# one test file each at a time, so module fixtures are built once) keep both CI cores busy.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
