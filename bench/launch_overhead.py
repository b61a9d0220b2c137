"""The host's time per launch on a GPU, layer by layer: how much of an op's host time is Triton's own launch path.

    python bench/launch_overhead.py            # GPU: tiny inputs, the host's time per call, us
    python bench/launch_overhead.py --calls 500 --rounds 7 --out /tmp/launch.json
    PYTHONPATH=. python bench/launch_overhead.py --stand-in-driver   # no GPU: the Triton rows' Python only

The eager fused training step is bound by its host (an H200: device busy 63%, ~150 ms of host time for ~3100
kernels), and `bench/ops.py` puts a Triton op's host time above the same op on the cuda backend (GroupNorm forward
141 us against 100 us on the lease-f H200). This splits one call of each op into what it runs, on inputs small
enough that the GPU keeps up with the host (so the time measured is the host's: `calls` calls between two
synchronisations, per call):
  torch add        one PyTorch elementwise op (x + 1): the cost of a launch through ATen
  public grad      the public op with inputs that require grad (as the training step calls it)
  public no_grad   the same under torch.no_grad (as sampling calls it)
  launcher         the backend's launcher alone (imf_kernels.<backend>.<family>), allocations included; for
                   Triton through its cached compiled kernels (imf_kernels/triton/_launch.py)
  launcher uncached  Triton only: the launcher with that cache off (every launch through JITFunction.run)
  jit launch       Triton only: the launcher's kernel launches replayed as `kernel[grid](*args, **kwargs)`
                   (JITFunction.run: binding, specialisation key, cache lookup, launch)
  compiled launch  Triton only: the same launches through the compiled kernel (`compiled[grid](*args)`), the
                   specialisation skipped: the floor of the launchers' cached launch (which adds its key)
  binder           Triton only: the JIT's argument binder alone (its specialisation of every argument, the first
                   part of JITFunction.run): what a cache keyed on Triton's own specialisation would still pay
The rows are interleaved round by round and their medians reported; a table and a JSON file
(bench/results/<device>-launch.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import imf_kernels  # noqa: E402
from imf_kernels import dispatch  # noqa: E402


class _Recorder:
    """Stands in for a Triton kernel: records each launch's (grid, args, kwargs) and launches it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.launches: list[tuple[Any, tuple, dict]] = []

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def recording(module: Any, names: tuple[str, ...]) -> Iterator[dict[str, _Recorder]]:
    """The kernels `names` of `module` replaced by recorders for the block (restored after it, even on error)."""
    kernels = {name: getattr(module, name) for name in names}
    recorders = {name: _Recorder(kernel) for name, kernel in kernels.items()}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        yield recorders
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def captured_launches(module: Any, names: tuple[str, ...], fn: Callable[[], Any]) -> list[tuple[Any, Any, tuple, dict]]:
    """(kernel, grid, args, kwargs) of every launch of the kernels `names` of `module` while fn() runs."""
    with recording(module, names) as recorders:
        fn()
    return [
        (recorder.kernel, grid, args, kwargs)
        for recorder in recorders.values()
        for grid, args, kwargs in recorder.launches
    ]


def jit_replay(launches: list[tuple[Any, Any, tuple, dict]]) -> Callable[[], None]:
    """The captured launches again, each through the kernel's own `kernel[grid](*args, **kwargs)`."""

    def replay() -> None:
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)

    return replay


def kernel_arguments(kernel: Any, args: tuple, kwargs: dict) -> list[Any]:
    """Every argument of the kernel in its signature's order (constexprs included: the compiled kernel's launcher
    takes them as JITFunction.run passes them), from a launch's positional and keyword arguments."""
    names = kernel.arg_names
    missing = [name for name in names[len(args) :] if name not in kwargs]
    if missing:
        raise ValueError(f"launch of {kernel.__name__} misses arguments {missing} (defaults are not filled in)")
    return [*args, *(kwargs[name] for name in names[len(args) :])]


def compiled_replay(launches: list[tuple[Any, Any, tuple, dict]]) -> Callable[[], None]:
    """The captured launches through their compiled kernels (`compiled[grid](*arguments)`), each compiled kernel
    taken from one JIT launch first (GPU only: the interpreter has no compiled kernels)."""
    runs = []
    for kernel, grid, args, kwargs in launches:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is None or not hasattr(compiled, "run"):
            raise RuntimeError(f"{kernel.__name__}: no compiled kernel came back (Triton interpreter?)")
        if callable(grid):
            raise ValueError(f"{kernel.__name__}: a grid function is not replayed; launchers pass tuples")
        grid3 = (*grid, 1, 1)[:3]  # the compiled kernel's runner reads grid[0..2] (JITFunction.run pads them)
        runs.append((compiled, grid3, kernel_arguments(kernel, args, kwargs)))

    def replay() -> None:
        for compiled, grid, arguments in runs:
            compiled[grid](*arguments)

    return replay


def binder_replay(launches: list[tuple[Any, Any, tuple, dict]], index: int) -> Callable[[], None]:
    """Triton's binder (JITFunction.run's argument binding and specialisation) on the captured launches' arguments,
    nothing launched (the binder is built with device `index`'s cache on the first launch; not in the interpreter)."""
    binders = []
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
        caches = getattr(kernel, "device_caches", None)
        if caches is None or index not in caches:
            raise RuntimeError(f"{kernel.__name__}: no device cache with a binder (this Triton lays it out otherwise)")
        binders.append((caches[index][-1], args, kwargs))

    def replay() -> None:
        for binder, args, kwargs in binders:
            binder(*args, **kwargs)

    return replay


def host_us(variants: dict[str, Callable[[], Any]], calls: int, rounds: int, device: torch.device) -> dict:
    """Per variant: the median over `rounds` of the host's time per call (`calls` calls between synchronisations,
    the variants interleaved round by round), in us, and each round's value."""
    for fn in variants.values():
        for _ in range(10):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            common.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
            common.synchronize(device)
    return {name: {"median_us": statistics.median(values), "rounds_us": values} for name, values in samples.items()}


def cases(
    device: torch.device, backend: str, compiled: bool | None = None, public: bool = True
) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per op: its timed variants on `backend` (tiny inputs on `device`: bf16 where Triton compiles, fp32 for the
    interpreter); `compiled` (default: on a GPU) adds the compiled-kernel and binder rows, `public` the public ops."""
    compiled = device.type == "cuda" if compiled is None else compiled
    dtype = torch.bfloat16 if compiled else torch.float32
    make = lambda *shape, grad=False: torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    x, dx = make(2, 64, 8, 8), make(2, 64, 8, 8)
    weight, bias, scale, shift = make(64), make(64), make(2, 64), make(2, 64)
    xg, weight_g, bias_g = make(2, 64, 8, 8, grad=True), make(64, grad=True), make(64, grad=True)
    q, k, v, dq = make(2, 2, 64, 32), make(2, 2, 64, 32), make(2, 2, 64, 32), make(2, 2, 64, 32)
    qg = make(2, 2, 64, 32, grad=True)
    gn = dispatch.family_module(backend, "group_norm_act")
    attention = dispatch.family_module(backend, "attention")
    ops = {
        "group_norm_act": (
            lambda: imf_kernels.group_norm_act(xg, 32, weight_g, bias_g, scale=scale, shift=shift, backend=backend),
            lambda: imf_kernels.group_norm_act(x, 32, weight, bias, scale=scale, shift=shift, backend=backend),
            lambda: gn.gn_act_fwd(x, 32, weight, bias, scale, shift, 1e-5, "silu"),
            (gn, ("_gn_fwd_kernel",)),
        ),
        "group_norm_act_jvp": (
            lambda: imf_kernels.group_norm_act_jvp(
                xg, dx, 32, weight_g, bias_g, scale=scale, shift=shift, backend=backend
            ),
            lambda: imf_kernels.group_norm_act_jvp(x, dx, 32, weight, bias, scale=scale, shift=shift, backend=backend),
            lambda: gn.gn_act_jvp_fwd(x, dx, 32, weight, bias, scale, shift, None, None, 1e-5, "silu"),
            (gn, ("_gn_fwd_kernel",)),
        ),
        "attention": (
            lambda: imf_kernels.attention(qg, k, v, backend=backend),
            lambda: imf_kernels.attention(q, k, v, backend=backend),
            lambda: attention.attention_fwd(q, k, v, 32**-0.5),
            (attention, ("_attn_fwd_kernel",)),
        ),
        "attention_jvp": (
            lambda: imf_kernels.attention_jvp(qg, k, v, dq, backend=backend),
            lambda: imf_kernels.attention_jvp(q, k, v, dq, backend=backend),
            lambda: attention.attention_jvp_fwd(q, k, v, dq, None, None, 32**-0.5),
            (attention, ("_attn_fwd_kernel",)),
        ),
    }
    out = {}
    with_public = public
    for op, (public_grad, public, launcher, (module, kernels)) in ops.items():
        variants = {"torch add": lambda: x + 1, "launcher": launcher}
        if with_public:
            variants["public grad"] = public_grad
            variants["public no_grad"] = lambda public=public: _no_grad(public)
        if backend == "triton":
            variants["launcher uncached"] = lambda launcher=launcher: _uncached(launcher)
            launches = captured_launches(module, kernels, launcher)
            variants["jit launch"] = jit_replay(launches)
            if compiled:
                variants["compiled launch"] = compiled_replay(launches)
                index = device.index if device.type == "cuda" and device.index is not None else 0
                variants["binder"] = binder_replay(launches, index)
        out[op] = variants
    return out


def _uncached(fn: Callable[[], Any]) -> Any:
    """fn() with the Triton launchers' compiled-kernel cache off (every launch through JITFunction.run)."""
    from imf_kernels.triton import _launch

    enabled, _launch.ENABLED = _launch.ENABLED, False
    try:
        return fn()
    finally:
        _launch.ENABLED = enabled


def _no_grad(fn: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return fn()


COLUMNS = (
    "torch add",
    "public grad",
    "public no_grad",
    "launcher",
    "launcher uncached",
    "jit launch",
    "compiled launch",
    "binder",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed run (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians reported (default 5)")
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated (default triton,cuda)")
    parser.add_argument("--out", default=None, help="default: bench/results/<device>-launch.json")
    parser.add_argument(
        "--stand-in-driver",
        action="store_true",
        help="without a GPU: the Triton rows under a stand-in CUDA driver (compiled, never run): Python only",
    )
    options = parser.parse_args(argv)
    if options.calls < 1 or options.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {options.calls} and {options.rounds}")
    backends = [name for name in options.backends.split(",") if name]
    unknown = [name for name in backends if name not in ("triton", "cuda", "torch")]
    if unknown:
        parser.error(f"--backends takes triton, cuda, torch; got {', '.join(unknown)}")
    if options.stand_in_driver:
        if torch.cuda.is_available():
            parser.error("--stand-in-driver is for a machine without a GPU (here, time the real launches)")
        return _stand_in(options)
    if not torch.cuda.is_available():
        parser.exit(
            2,
            "launch_overhead.py: needs a CUDA device (it measures the host's time per GPU launch); without one, "
            "--stand-in-driver times Triton's launch paths under a stand-in driver\n",
        )
    device = torch.device("cuda", torch.cuda.current_device())
    usable = {status.name: status for status in imf_kernels.backends()}
    result: dict[str, Any] = {**common.run_tags(device, "launch_overhead"), "calls": options.calls, "rows": []}
    _header(options, result["device"])
    for backend in backends:
        if not usable[backend].usable:
            print(f"{backend}: not usable here ({usable[backend].reason})")
            continue
        for op, variants in cases(device, backend).items():
            _row(result, backend, op, host_us(variants, options.calls, options.rounds, device))
    out = Path(options.out) if options.out else Path("bench/results") / f"{common.device_slug(device)}-launch.json"
    _write(out, result)
    return result


def _header(options: argparse.Namespace, device_label: str) -> None:
    print(f"host time per call, us (median of {options.rounds} rounds of {options.calls} calls), {device_label}")
    print(f"{'backend':<8}{'op':<20}" + "".join(f"{column:>19}" for column in COLUMNS))


def _row(result: dict, backend: str, op: str, times: dict) -> None:
    result["rows"].append({"backend": backend, "op": op, **times})
    cells = [f"{times[c]['median_us']:>19.1f}" if c in times else f"{'-':>19}" for c in COLUMNS]
    print(f"{backend:<8}{op:<20}" + "".join(cells))


def _write(out: Path, result: dict) -> None:
    from step import write_results

    write_results(out, result)
    print(f"written: {out}")


def _stand_in(options: argparse.Namespace) -> dict:
    """The Triton rows on this CPU under tests/triton_launch_check.py's stand-in CUDA driver: kernels compiled for
    sm_90, launches recorded and dropped, so each column is the Python of its launch path (no driver call)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("launch_overhead.py: --stand-in-driver compiles kernels: unset TRITON_INTERPRET")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import triton_launch_check

    triton_launch_check.RECORD = False
    device = torch.device("cpu")
    result: dict[str, Any] = {
        **common.run_tags(device, "launch_overhead"),
        "driver": "stand-in (tests/triton_launch_check.py): launches not run",
        "calls": options.calls,
        "rows": [],
    }
    _header(options, result["device"] + ", stand-in CUDA driver")
    for op, variants in cases(device, "triton", compiled=True, public=False).items():
        _row(result, "triton", op, host_us(variants, options.calls, options.rounds, device))
    out = Path(options.out) if options.out else Path("bench/results") / f"{common.device_slug(device)}-launch.json"
    _write(out, result)
    return result


if __name__ == "__main__":
    main()
