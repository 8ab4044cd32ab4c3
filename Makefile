# Both entry points bootstrap a local virtual environment on a fresh machine.
# torch is pinned for the bootstrap (a CPU wheel that installs from local disk); setup.py
# itself states a range.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: test demo bench lint clean floor-test

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
	$(PY) examples/pear_study.py run --tiny --data demo_out/pear_study --cache demo_out/pear_study_cache

bench: $(VENV)/.full
	$(PY) -m pytest benchmarks

lint: $(VENV)/.full
	$(PY) -m ruff check pear_kernels tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks

# The Hugging Face tests at the floors setup.py's "hf" and "rl" extras state, in an environment
# of their own (.venv-floor, apart from $(VENV)): first the "hf" floors, then, without trl, the
# older transformers of the "rl" extra (the RL loop). The pins change when the floors do.
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_PIP := $(FLOOR_PY) -m pip install --disable-pip-version-check -q
FLOOR_HF := transformers==4.56.1 trl==0.23.0 accelerate==1.4.0 datasets==3.0.0 tokenizers==0.22.0
FLOOR_RL := transformers==4.46.1 tokenizers==0.20.0
FLOOR_TESTS := tests/test_hf_*.py tests/test_cli.py tests/test_collect_*.py tests/test_rl_*.py

floor-test:
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PIP) $(TORCH_PIN) $(FLOOR_HF) setuptools pyarrow peft pytest pytest-timeout hypothesis
	$(FLOOR_PIP) --no-build-isolation -e .
	$(FLOOR_PY) -m pytest $(FLOOR_TESTS)
	$(FLOOR_PY) -m pip uninstall --disable-pip-version-check -y -q trl
	$(FLOOR_PIP) $(TORCH_PIN) $(FLOOR_RL)
	$(FLOOR_PY) -m pytest tests/test_rl_*.py
