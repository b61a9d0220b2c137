"""Helpers shared by the cuda backend's family modules: the extension, output allocation, common rules."""

from types import ModuleType
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The device type the kernels run on: "cpu" only under tests/cuda_emulator.py, which runs them emulated.
DEVICE_TYPE = "cuda"


def extension() -> ModuleType:
    """`imf_kernels._C`, imported on first use so that a missing build is a reason, not an import error."""
    from imf_kernels import _C

    return _C


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests swap in a NaN-filled version to prove each
    element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor` as the kernels read it: contiguous (a copy only when it is not), None stays None."""
    return None if tensor is None else tensor.contiguous()


def tensor_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every tensor argument must be a CUDA tensor of a supported dtype, all on one device."""
    reasons = []
    tensors = {name: value for name, value in args.items() if isinstance(value, torch.Tensor)}
    devices = {value.device for value in tensors.values()}
    if any(device.type != DEVICE_TYPE for device in devices):
        reasons.append(
            f"{op}: cuda takes {DEVICE_TYPE.upper()} tensors only, got {', '.join(sorted(map(str, devices)))}"
        )
    elif len(devices) > 1:
        reasons.append(f"{op}: tensors on several devices ({', '.join(sorted(map(str, devices)))})")
    accepted = ", ".join(str(dtype).removeprefix("torch.") for dtype in SUPPORTED_DTYPES)
    for name, value in tensors.items():
        if name in ("t", "r"):  # loss times: any floating dtype, converted to float32 by the api
            continue
        if value.dtype not in SUPPORTED_DTYPES:
            dtype = str(value.dtype).removeprefix("torch.")
            reasons.append(f"{op}: {name} has dtype {dtype}, cuda supports {accepted}")
    return reasons


def tangent_row_spans(batch: int, rows: int) -> list[tuple[slice, bool]]:
    """(samples, whether the launch takes the tangent) of the launches of a jvp call whose tangent covers the first
    `rows` of `batch` samples (TANGENT_ROWS): the jvp kernel on those, the primal kernel on the rest. Slices of
    contiguous tensors along the batch stay contiguous."""
    spans = [(slice(0, rows), True)]
    return spans if rows == batch else [*spans, (slice(rows, batch), False)]


def smem_optin_bytes(device: torch.device) -> int:
    """Shared memory one block may opt in to on `device` (cached by torch, no synchronisation)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def multiprocessor_count(device: torch.device) -> int:
    """SMs of `device` (cached by torch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
