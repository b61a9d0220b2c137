"""Backend registry and selection.

A backend is a package `imf_kernels/<package>/` with `unavailable_reason()`, `not_supported_reasons(op, args)`
and one module per op family holding the launchers of `imf_kernels.interface`. `BACKENDS` lists them in
priority order; adding a backend is one line here. Backend packages are imported lazily, on first use, so a
missing extension or a missing GPU is a reason in `backends()`, never an import-time crash.

The backend of a call is, first match wins: the op's `backend=` argument, the innermost `use_backend(name)`
block, the environment variable `IMF_KERNELS_BACKEND`, else `auto`. `auto` picks the first GPU backend
in `AUTO_GPU_ORDER` (triton, then cuda) that takes a call on CUDA tensors, and `torch` for everything else.

Selections are cached: a backend's `not_supported_reasons` depends only on the call's metadata (op, shapes,
dtypes, devices, options) and on the environment variables in `BACKEND_ENV_VARS`, so a call that matches an
earlier successful one in those, with the same requested backend (argument, block or variable, read on every
call), reuses its answer without probing the backends again. `backends()` probes afresh and empties the cache;
so does replacing `BACKENDS` (an edit in place needs `clear_cache()`). Refusals are never cached. A backend
package that declares `TAKES_EVERY_CALL = True` (usable everywhere, taking every call that passes the public
checks: `torch`) is selected without a key when it is the one asked for, or auto's first choice for CPU
tensors: building the key from the call's metadata cost more than a batch-1 launcher on a CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

# name -> package, in priority order.
BACKENDS: dict[str, str] = {
    "cuda": "imf_kernels.cuda",
    "triton": "imf_kernels.triton",
    "torch": "imf_kernels.torch_ops",
}
# Backends that `auto` considers for CPU tensors (the Triton interpreter is for tests, not for speed).
AUTO_CPU_BACKENDS: tuple[str, ...] = ("torch",)
# The order `auto` tries backends in for CUDA tensors (the rest of BACKENDS follow in their own order): triton
# first, as measured on an H200 (bf16, latent-b, 2026-11-26): the fused training step 174 ms on triton against
# 200 ms on cuda, attention forward-with-tangent 69% of copy bandwidth against 5% (cuda runs attention on CUDA
# cores), GroupNorm and the loss as fast or faster on most shapes (BENCHMARKS.md).
AUTO_GPU_ORDER: tuple[str, ...] = ("triton", "cuda")

# public op -> family module inside each backend package
OP_FAMILIES: dict[str, str] = {
    "group_norm_act": "group_norm",
    "group_norm_act_jvp": "group_norm",
    "attention": "attention",
    "attention_jvp": "attention",
    "imf_loss": "loss",
    "meanflow_loss": "loss",
}

ENV_VAR = "IMF_KERNELS_BACKEND"
AUTO = "auto"
# Environment variables the backends read when deciding whether they take a call (part of the cache key).
BACKEND_ENV_VARS: tuple[str, ...] = ("TRITON_INTERPRET",)

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("imf_kernels_backend", default=None)

# Successful selections: (requested backend, op, BACKEND_ENV_VARS values, argument names, argument metadata)
# -> (backend name, family module), made with the registry `_cached_registry`.
_selections: dict[tuple[Any, ...], tuple[str, ModuleType]] = {}
_cached_registry: dict[str, str] = BACKENDS
# (backend, op) -> its family module when the backend's package declares TAKES_EVERY_CALL, else None
_unconditional: dict[tuple[str, str], ModuleType | None] = {}
# A process that meets more distinct call signatures than this starts the cache over.
MAX_CACHED_SELECTIONS = 4096


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """One row of `backends()`: whether the backend can run on this machine, and if not, why."""

    name: str
    usable: bool
    reason: str | None


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or (name != AUTO and name not in BACKENDS):
        accepted = ", ".join([AUTO, *BACKENDS])
        raise ValueError(f"{source}: unknown backend {name!r}; accepted: {accepted}")
    return name


def _import_package(name: str) -> tuple[ModuleType | None, str | None]:
    """The backend package, or None and the reason it cannot be imported."""
    package = BACKENDS[name]
    try:
        return importlib.import_module(package), None
    except ImportError as error:  # e.g. the package or its compiled extension is not there
        return None, f"cannot import {package} ({error})"


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run on this machine, else why not."""
    module, reason = _import_package(_check_name(name, "unavailable_reason"))
    if module is None:
        return reason
    if not hasattr(module, "unavailable_reason"):  # e.g. a package whose developer has not finished it
        return f"{module.__name__} has no unavailable_reason()"
    return module.unavailable_reason()


def clear_cache() -> None:
    """Forget every cached selection (after changing a backend's environment or editing `BACKENDS`)."""
    _selections.clear()
    _unconditional.clear()


def backends() -> list[BackendStatus]:
    """Every registered backend, in priority order, with whether it is usable here and why not.

    It probes each backend afresh and forgets the cached selections, which were made before the probe."""
    clear_cache()
    statuses = []
    for name in BACKENDS:
        reason = unavailable_reason(name)
        statuses.append(BackendStatus(name=name, usable=reason is None, reason=reason))
    return statuses


def not_supported_reasons(name: str, op: str, args: dict[str, Any]) -> list[str]:
    """Why backend `name` cannot take this call of `op` (empty when it can)."""
    reason = unavailable_reason(name)
    if reason is not None:
        return [reason]
    module, _ = _import_package(name)
    return list(module.not_supported_reasons(op, args))


def family_module(name: str, op: str) -> ModuleType:
    """The module of backend `name` that holds the launchers of `op`."""
    return importlib.import_module(f"{BACKENDS[name]}.{OP_FAMILIES[op]}")


def current_backend() -> str:
    """The default backend of this context: `use_backend`, else $IMF_KERNELS_BACKEND, else auto."""
    name = _current.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, AUTO) or AUTO, f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` (or `auto`) unless a call names its own backend."""
    token = _current.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _current.reset(token)


def _device_of(args: dict[str, Any]) -> torch.device:
    for value in args.values():
        if isinstance(value, torch.Tensor):
            return value.device
    raise ValueError("dispatch: the call has no tensor argument")


def _cache_key(name: str, op: str, args: dict[str, Any]) -> tuple[Any, ...]:
    """This call's key in `_selections`: what a backend may look at in deciding, never a tensor's values."""
    metadata = [
        (value.shape, value.dtype, value.device) if isinstance(value, torch.Tensor) else value
        for value in args.values()
    ]
    return name, op, tuple(map(os.environ.get, BACKEND_ENV_VARS)), tuple(args), tuple(metadata)


def _unconditional_family(name: str, op: str) -> ModuleType | None:
    """The family module of `op` on backend `name` when its package declares TAKES_EVERY_CALL, else None."""
    try:
        return _unconditional[name, op]
    except KeyError:
        package, _ = _import_package(name)
        takes_all = package is not None and getattr(package, "TAKES_EVERY_CALL", False)
        family = _unconditional[name, op] = family_module(name, op) if takes_all else None
        return family


def _first_auto_candidate(args: dict[str, Any]) -> str | None:
    """The backend auto tries first for a call on CPU tensors (None on CUDA tensors: the GPU backends decide by
    the call's metadata)."""
    if _device_of(args).type == "cuda":
        return None
    return next((candidate for candidate in BACKENDS if candidate in AUTO_CPU_BACKENDS), None)


def select(op: str, args: dict[str, Any], backend: str | None = None) -> tuple[str, ModuleType]:
    """The backend that runs this call of `op` and its family module; ValueError with every reason if none."""
    global _cached_registry
    name = _check_name(backend, op) if backend is not None else current_backend()
    if _cached_registry is not BACKENDS:
        clear_cache()
        _cached_registry = BACKENDS
    first = name if name != AUTO else _first_auto_candidate(args)
    family = None if first is None else _unconditional_family(first, op)
    if family is not None:
        return first, family
    key = _cache_key(name, op, args)
    try:
        selection = _selections.get(key)
    except TypeError:  # an option that cannot be hashed: no caching for this call
        return _probe(name, op, args)
    if selection is None:
        selection = _probe(name, op, args)
        if len(_selections) >= MAX_CACHED_SELECTIONS:
            _selections.clear()
        _selections[key] = selection
    return selection


def auto_order(on_gpu: bool) -> list[str]:
    """The registered backends in the order `auto` tries them: AUTO_GPU_ORDER first for CUDA tensors."""
    if not on_gpu:
        return list(BACKENDS)
    rank = {name: position for position, name in enumerate(AUTO_GPU_ORDER)}
    return sorted(BACKENDS, key=lambda name: rank.get(name, len(rank)))  # stable: the rest keep their order


def _probe(name: str, op: str, args: dict[str, Any]) -> tuple[str, ModuleType]:
    """`select` without the cache: asks the backends (in priority order for auto)."""
    if name != AUTO:
        reasons = not_supported_reasons(name, op, args)
        if reasons:
            raise ValueError(f"{op}: backend {name!r} cannot take this call: " + "; ".join(reasons))
        return name, family_module(name, op)

    on_gpu = _device_of(args).type == "cuda"
    refusals = []
    for candidate in auto_order(on_gpu):
        if not on_gpu and candidate not in AUTO_CPU_BACKENDS:
            refusals.append(f"{candidate}: auto uses it only for CUDA tensors (name it to run it on CPU)")
            continue
        reasons = not_supported_reasons(candidate, op, args)
        if not reasons:
            return candidate, family_module(candidate, op)
        refusals.append(f"{candidate}: " + "; ".join(reasons))
    raise ValueError(f"{op}: no backend takes this call: " + " | ".join(refusals))
