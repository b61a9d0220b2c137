"""The `torch` backend: composite PyTorch ops with hand-written tangent and backward formulas (DESIGN 4.3).

It runs wherever PyTorch runs and is the CPU fast path: each launcher makes the fewest passes it can with
eager ops, never calls torch.func, and computes in float32 (float64 for float64 inputs).
"""

import importlib
from typing import Any

from imf_kernels.dispatch import OP_FAMILIES

# usable everywhere, and every call that passes the public checks runs here: `dispatch` selects it without probing
TAKES_EVERY_CALL = True


def unavailable_reason() -> str | None:
    """The torch backend runs everywhere."""
    return None


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Delegates to the family module of `op`."""
    family = importlib.import_module(f"{__name__}.{OP_FAMILIES[op]}")
    return family.not_supported_reasons(op, args)
