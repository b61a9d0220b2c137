"""The `triton` backend: one module per op family (`group_norm`, `attention`, `loss`) with Triton kernels.

It runs CUDA tensors when triton imports and a GPU is present, and CPU tensors only through the Triton
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported; that is how CI tests the kernels).
"""

import importlib
import os
from typing import Any

import torch

from imf_kernels.dispatch import OP_FAMILIES


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    """None when triton imports and either a GPU or the interpreter can run its kernels."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"cannot import triton ({error})"
    if torch.cuda.is_available() or _interpreting():
        return None
    return "no CUDA device, and TRITON_INTERPRET=1 is not set (set it before importing triton to run on CPU)"


def _device_reasons(op: str, args: dict[str, Any]) -> list[str]:
    devices = {value.device.type for value in args.values() if isinstance(value, torch.Tensor)}
    if "cpu" in devices and not _interpreting():
        return [f"{op}: CPU tensors run on triton only with TRITON_INTERPRET=1 (set before importing triton)"]
    if "cuda" in devices and not torch.cuda.is_available():
        return [f"{op}: CUDA tensors but no CUDA device"]
    return []


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """The device rule above, then the family module's own reasons (dtypes, head dims, context lengths)."""
    reasons = _device_reasons(op, args)
    module_name = f"{__name__}.{OP_FAMILIES[op]}"
    try:
        family = importlib.import_module(module_name)
    except ImportError as error:
        if error.name == module_name:
            return [*reasons, f"{op}: {module_name} is not written yet"]
        return [*reasons, f"{op}: cannot import {module_name} ({error})"]
    return [*reasons, *family.not_supported_reasons(op, args)]
