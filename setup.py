"""Build imf-kernels: the `imf` and `imf_kernels` packages, plus the `imf_kernels._C` CUDA extension where
CUDA torch and nvcc are present (see csrc/). Install with `pip install -e . --no-build-isolation`."""

import glob
import os
import sys

from setuptools import find_packages, setup

# Commands that compile; metadata-only runs (egg_info, dist_info) stay quiet, so each message shows once.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
# torch adds the C++ standard it needs (C++20 from 2.10 on). -lineinfo maps compute-sanitizer reports to
# source lines at no cost to the generated code.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
# The default; a CPU machine (CI) builds sm_90 only, which is what the static checks read.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CPU_ARCH_LIST = "9.0"


def say(message: str) -> None:
    if BUILD_COMMANDS & set(sys.argv[1:]):
        print(f"imf-kernels: {message}", file=sys.stderr)


def missing_cuda_reason() -> str | None:
    """Why the extension cannot be built here, or None when CUDA torch and nvcc are present."""
    if os.environ.get("IMF_BUILD_CUDA", "1") == "0":
        return "IMF_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as error:
        return f"torch is not importable ({error})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for `imf_kernels._C`, or empty ones when CUDA is missing (said once)."""
    reason = missing_cuda_reason()
    if reason is not None:
        say(f"building without the CUDA extension imf_kernels._C: {reason}")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = CPU_ARCH_LIST
            say(
                f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building imf_kernels._C for sm_90 only "
                f"(set TORCH_CUDA_ARCH_LIST='{DEFAULT_ARCH_LIST}' for the full default)"
            )
    extension = CUDAExtension(
        name="imf_kernels._C",
        sources=sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="imf-kernels",
    version="0.1.0",
    description="Improved MeanFlow one-step generative models with fused Triton and CUDA kernels",
    packages=find_packages(include=["imf", "imf.*", "imf_kernels", "imf_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "scipy",
        "scikit-learn",
        "safetensors",
        "tqdm",
        "matplotlib",
        "rich",
        "pillow",
    ],
    # ninja: tests/cuda_emulator.py builds the emulated kernels with torch.utils.cpp_extension.load
    # pytest-xdist: `make test` runs the suite on TEST_WORKERS processes
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "ruff", "ninja"]},
    entry_points={"console_scripts": ["imf=imf.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
