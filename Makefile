# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both install everything first, so they work on a fresh machine.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= /usr/local/cuda
export IMF_BUILD_CUDA ?= 1
# The CUDA 13 torch wheel ships the CUDA headers the extension build needs (cuda_runtime etc.); it is found
# after torch is installed, so inside the recipe.
CU13_INCLUDE = $$($(PYTHON) -c "import importlib.util as u,os;s=u.find_spec('nvidia');print(os.path.join(list(s.submodule_search_locations)[0],'cu13','include') if s else '')")

.PHONY: install demo test lint gpu-check

install:
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)" "setuptools>=70.1" wheel
	CPATH="$(CU13_INCLUDE):$${CPATH:-}" $(PYTHON) -m pip install -q -e ".[test]" --no-build-isolation

# The demo runs on the CPU: it skips the CUDA extension build (minutes on 2 cores); `make test` builds it.
demo:
	$(MAKE) install IMF_BUILD_CUDA=0
	imf demo

# The Triton of the GPU machines' image (torch 2.11) beside ours, for tests/test_triton_aot.py to compile every
# launch configuration with it too: its compiler has failed on kernels that ours compiles.
GPU_IMAGE_TRITON ?= 3.6.0
GPU_IMAGE_TRITON_DIR ?= build/triton-$(GPU_IMAGE_TRITON)

# IMF_REQUIRE_CUDA_EMULATOR=1: tests/test_cuda_emulated.py (csrc/ kernels on the CPU through tests/cuda_emulator.py)
# fails instead of skipping where g++, ninja or the CUDA headers are missing.
# TEST_WORKERS: pytest-xdist processes (2, the CI machine's cores: the suite took 10.4 min on them against 18.8 min
# in one process; work-stealing keeps the long tests from ending up on one worker). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: install
	test -d $(GPU_IMAGE_TRITON_DIR)/triton || $(PYTHON) -m pip install -q --no-deps --target $(GPU_IMAGE_TRITON_DIR) "triton==$(GPU_IMAGE_TRITON)"
	$(PYTHON) -m ruff check imf imf_kernels bench tests setup.py
	IMF_REQUIRE_CUDA_EMULATOR=1 IMF_AOT_EXTRA_TRITON=$(GPU_IMAGE_TRITON_DIR) $(PYTHON) -m pytest -q -n $(TEST_WORKERS) \
		--dist worksteal --durations=10 tests bench --benchmark-disable

# On a GPU machine: build for the local arch, run every test including `gpu` ones, run both benchmarks, and
# write bench/results/ and a log (no network needed: installs the project only, --no-deps).
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

lint:
	$(PYTHON) -m ruff check imf imf_kernels bench tests setup.py
	$(PYTHON) -m ruff format --check imf imf_kernels bench tests setup.py
