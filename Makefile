# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both install everything first, so they work on a fresh machine.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= /usr/local/cuda
# The CUDA 13 torch wheel ships the CUDA headers the extension build needs (cuda_runtime etc.); it is found
# after torch is installed, so inside the recipe.
CU13_INCLUDE = $$($(PYTHON) -c "import importlib.util as u,os;s=u.find_spec('nvidia');print(os.path.join(list(s.submodule_search_locations)[0],'cu13','include') if s else '')")

.PHONY: install demo test lint gpu-check

install:
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	CPATH="$(CU13_INCLUDE):$${CPATH:-}" $(PYTHON) -m pip install -q -e ".[test]" --no-build-isolation

demo: install
	imf demo

test: install
	$(PYTHON) -m ruff check imf imf_kernels bench tests setup.py
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check imf imf_kernels bench tests setup.py
	$(PYTHON) -m ruff format --check imf imf_kernels bench tests setup.py
