# Both entry points bootstrap a local virtual environment on a fresh machine.
# torch is pinned for the bootstrap (a CPU wheel that installs from local disk); setup.py
# itself states a range.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: test demo bench lint clean

$(VENV)/.base: setup.py csrc/pear_rows.cpp pear_kernels/kernels/native_cpu.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PIN) setuptools
	$(PIP) --no-build-isolation -e .
	touch $@

# flash-attn has no CPU wheel: its Python files alone (no CUDA build) give its Triton
# cross-entropy for the interpreter cross-check; optional, the test says why when absent
$(VENV)/.full: $(VENV)/.base setup.py
	$(PIP) --no-build-isolation -e ".[dev,hf,triton,bench]"
	-FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE $(PIP) --no-build-isolation --no-deps flash-attn
	touch $@

# the demo runs the core and the RL loop only: transformers, not the test/bench/triton extras
$(VENV)/.demo: $(VENV)/.base setup.py
	$(PIP) --no-build-isolation -e ".[rl]"
	touch $@

test: $(VENV)/.full
	$(PY) -m pytest tests

demo: $(VENV)/.demo
	$(PY) examples/demo.py
	$(PY) examples/sft_then_rl.py --quick --out demo_out

bench: $(VENV)/.full
	$(PY) -m pytest benchmarks

lint: $(VENV)/.full
	$(PY) -m ruff check pear_kernels tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
