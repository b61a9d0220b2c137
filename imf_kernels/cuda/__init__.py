"""The `cuda` backend: hand-written CUDA C++ from csrc/, through the `imf_kernels._C` extension.

One module per op family (`group_norm`, `attention`, `loss`) implements the launchers of
`imf_kernels.interface` by calling `_C`. It runs CUDA tensors of float32, float16 or bfloat16 when the
extension is built (setup.py builds it where CUDA torch and nvcc are present) and a GPU is visible. Without a GPU
the tests run the same kernels on CPU tensors through a CUDA emulator (tests/cuda_emulator.py).
"""

import importlib
from typing import Any

import torch

from imf_kernels.cuda import _common
from imf_kernels.dispatch import OP_FAMILIES


def unavailable_reason() -> str | None:
    """None when the extension imports and a CUDA device is visible, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (the extension needs CUDA torch)"
    try:
        _common.extension()
    except ImportError as error:
        return (
            f"imf_kernels._C is not built ({error}); reinstall with CUDA torch and nvcc present "
            "(CUDA_HOME set): pip install -e . --no-build-isolation"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """The shared device and dtype rules, then the family module's own (shapes, shared memory)."""
    reasons = _common.tensor_reasons(op, args)
    family = importlib.import_module(f"{__name__}.{OP_FAMILIES[op]}")
    return [*reasons, *family.not_supported_reasons(op, args)]
