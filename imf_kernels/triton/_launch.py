"""Launching a Triton kernel with less host time: `launch_kernel(kernel, grid, *args, **kwargs)` does what
`kernel[grid](*args, **kwargs)` does, through the compiled kernel that launch found the first time.

`JITFunction.run` specialises every argument on every launch (the binder), builds a cache key from that and a string
of the options, checks the kernel's globals, and makes launch metadata for the hooks, before the C launcher runs:
14 us of the host's time per GroupNorm launch on this repository's CPU (19 us for the attention forward, whose
strides are 32 arguments), where the compiled kernel's launcher alone takes 3 us (`bench/launch_overhead.py
--stand-in-driver`: Triton's own launch path under a stand-in CUDA driver). The eager fused step makes ~300-400
Triton launches and is bound by its host on a GPU, so the launchers here keep each compiled kernel under a key of
their own, cheaper to build than Triton's but at least as fine, and call its launcher directly:

- the key holds every argument as Triton specialises it or finer: a tensor by its dtype and its address modulo 16
  (Triton: element type and 16-byte alignment), an int by its value (Triton: i32 / i64 / u64 by range, divisibility
  by 16, and 1 as a constant), a float by its type (Triton does not specialise floats), anything else (None, bools,
  strings) by its type and value; keyword arguments (the constexprs and num_warps / num_stages) by value, in the
  call's order (each call site passes them in one order, each of one type); and the current device. Equal keys so
  imply equal specialisations (tests/triton_launch_check.py checks it against Triton's own specialisation);
- the first launch of a key goes through `kernel[grid]` (compiling when Triton has not), which returns the compiled
  kernel; later launches call `compiled.run(...)` with the arguments `JITFunction.run` passes it (the grid padded to
  three dimensions, the current stream, every argument in the signature's order, constexprs included);
- with a launch hook registered (a profiler such as Proton), for a kernel that is not a `JITFunction` (the
  interpreter's, or a test's stand-in), with a keyword argument missing (a parameter left to its default), or
  under a torch.compile trace (Dynamo knows `kernel[grid](...)`), the launch is Triton's own `kernel[grid](...)`.
  `IMF_TRITON_CACHED_LAUNCH=0` turns the cache off everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("IMF_TRITON_CACHED_LAUNCH", "1") != "0"
# a kernel's cache is emptied when it holds this many keys (a caller varying an int argument without end)
MAX_KEYS = 4096
_NOT_CACHED = object()  # a key whose launches go through Triton (a parameter left to its default)
Tensor = torch.Tensor


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch grid: `triton.cdiv` is a ConstexprFunction, ~2 us a call from Python."""
    return -(-a // b)


def _hooks_idle(runtime: Any) -> bool:
    """Whether no launch hook would see a launch (Triton's hooks are empty HookChains unless a profiler adds one)."""
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


# keyword arguments of a launch that are options of the compile, not kernel parameters
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _check_keywords(kernel: Any, kwargs: dict) -> None:
    """The launch contract the cache relies on: runtime arguments positional, keywords only for constexprs and
    options (a tensor by keyword would key the cache by its identity and keep it alive)."""
    constexprs = {param.name for param in kernel.params if param.is_constexpr}
    runtime = [name for name in kwargs if name not in constexprs and name not in OPTIONS]
    if runtime:
        raise TypeError(
            f"launch_kernel: {kernel.__name__} gets runtime arguments by keyword ({', '.join(runtime)}); pass them "
            "positionally (keywords are for constexprs and launch options)"
        )


def launch_key(device: int, args: tuple, kwargs: dict) -> tuple:
    """The cache key of a launch (module docstring): at least as fine as Triton's specialisation of its arguments."""
    return (
        device,
        *[
            a
            if type(a) is int
            else (a.dtype, a.data_ptr() & 15)
            if isinstance(a, Tensor)
            else float
            if type(a) is float
            else (type(a), a)  # (a bool is not the int it equals: Triton types it u1)
            for a in args
        ],
        *kwargs.values(),
    )


def launch_kernel(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, through a cached compiled kernel where possible (module docstring)."""
    if not ENABLED or not isinstance(kernel, JITFunction) or torch.compiler.is_compiling():
        kernel[grid](*args, **kwargs)
        return
    active = driver.active
    device = active.get_current_device()
    key = launch_key(device, args, kwargs)
    cache = kernel.__dict__.get("_imf_compiled")
    if cache is None:
        cache = kernel._imf_compiled = {}
    entry = cache.get(key)
    if entry is None:
        _check_keywords(kernel, kwargs)
        compiled = kernel[grid](*args, **kwargs)
        names = kernel.arg_names[len(args) :]
        if len(cache) >= MAX_KEYS:
            cache.clear()
        if compiled is None or any(name not in kwargs for name in names):
            cache[key] = _NOT_CACHED
        else:
            cache[key] = (compiled, tuple(kwargs[name] for name in names))
        return
    if entry is _NOT_CACHED or not _hooks_idle(knobs.runtime):
        kernel[grid](*args, **kwargs)
        return
    compiled, constexprs = entry
    dims = len(grid)
    compiled.run(
        grid[0],
        grid[1] if dims > 1 else 1,
        grid[2] if dims > 2 else 1,
        active.get_current_stream(device),
        compiled.function,
        compiled.packed_metadata,
        None,  # launch metadata: only the hooks read it, and none is registered
        None,
        None,
        *args,
        *constexprs,
    )
