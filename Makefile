# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
RKSC    = $(VENV)/bin/rksc
DEMO_QUESTION ?= A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
export HF_HUB_OFFLINE = 1

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(RKSC) models pull qwen2.5-coder-0.5b
	$(RKSC) solve "$(DEMO_QUESTION)"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
