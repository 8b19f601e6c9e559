# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench install clean

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "velo needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes; the plugin in plugins/ is installed
# separately, exactly as a user would install a third-party backend.
$(STAMP): pyproject.toml plugins/velo-tcp/pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet -e plugins/velo-tcp
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/velo demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .hypothesis build *.egg-info
