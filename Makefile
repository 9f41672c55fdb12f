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

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
