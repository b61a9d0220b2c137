"""The ahead-of-time compile spec that the families' `aot_specs()` return (tests/test_triton_aot.py compiles them)."""

from typing import Any


def compile_spec(
    name: str,
    fn: Any,
    constexprs: dict,
    runtime_types: dict,
    num_warps: int,
    aligned_ints: list[str],
    pointer_type: str = "*fp32",
) -> dict:
    """A spec of `fn`: arguments in `constexprs` are constexpr, the others take their type from `runtime_types` or
    are `pointer_type` pointers; every pointer is 16-byte aligned, and so are the integers in `aligned_ints`."""
    signature = {
        arg: "constexpr" if arg in constexprs else runtime_types.get(arg, pointer_type) for arg in fn.arg_names
    }
    return {
        "name": name,
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": 1,
        "divisible_by_16": [arg for arg, kind in signature.items() if kind.startswith("*")] + list(aligned_ints),
    }
