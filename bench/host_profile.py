"""Where the eager fused step's host time goes, measured on this CPU: the Python and dispatch work of one training step
with every Triton kernel stubbed out (its launches return at once), so what is timed is the host's side of the step a
GPU runs: our Python (imf, imf_kernels), torch's Python, the C++ calls into torch and the autograd engine.

    PYTHONPATH=. python bench/host_profile.py                  # latent-b's structure at width 32, 8x8, batch 2
    PYTHONPATH=. python bench/host_profile.py --steps 10 --top 40 --width 64
    env -u TRITON_INTERPRET PYTHONPATH=. python bench/host_profile.py --cached-launch-ab 8
        # the step with Triton's real launch path (kernels compiled for sm_90 under tests/triton_launch_check.py's
        # stand-in CUDA driver, launches dropped), the launchers' compiled-kernel cache on and off, interleaved

On a GPU the eager fused step is bound by its host (an H200: device busy 63%, ~150 ms of host time a step), and its
host time can only be profiled during a lease; this is the stand-in. What it cannot show: Triton's own launch path
(stubbed here; `bench/launch_overhead.py` measures it on a GPU), the CUDA driver, and the tensor work of torch's
CPU kernels, which is real compute here (small at this width) but a queued launch there. Columns of the split:
  ours: imf / imf_kernels     Python time (cProfile's own time) in this repository's packages
  torch (Python)              torch's Python (nn.Module call machinery, autograd.Function plumbing, ...)
  torch (C calls)             time inside torch's C++ functions called from Python (dispatch + the CPU kernels)
  autograd engine             the backward's C++ engine (its nodes, and the CPU kernels they run)
  other                       the standard library (e.g. inspect) and everything else
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = str(Path(__file__).resolve().parents[1])
# (module, kernel names) of every Triton kernel the fused step launches
TRITON_KERNELS = {
    "imf_kernels.triton.group_norm": ("_gn_fwd_kernel", "_gn_bwd_kernel", "_param_sums_kernel"),
    "imf_kernels.triton.attention": (
        "_attn_fwd_kernel",
        "_attn_bwd_delta_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
    ),
    "imf_kernels.triton.loss": ("_loss_partial_kernel", "_loss_finish_kernel", "_loss_bwd_kernel"),
}


class _StubKernel:
    """A Triton kernel that launches nothing: `kernel[grid](*args, **kwargs)` counts the launch and returns."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.launches += 1


@contextlib.contextmanager
def stubbed_triton_kernels() -> Iterator[dict[str, _StubKernel]]:
    """Every kernel of TRITON_KERNELS replaced by a stub for the block (restored after it); yields the stubs."""
    import importlib

    saved, stubs = [], {}
    try:
        for module_name, names in TRITON_KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                saved.append((module, name, getattr(module, name)))
                stubs[name] = _StubKernel()
                setattr(module, name, stubs[name])
        yield stubs
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def build_step(preset: str, width: int, resolution: int, batch: int, objective: str, seed: int = 0):
    """step(): one fused training step (zero_grad, loss, backward) of the preset's structure at `width` channels and
    `resolution` pixels (its attention at the same levels: the attention resolutions scaled alike), on fixed random
    inputs and draws."""
    from imf.config import get_preset
    from imf.model import IMFNet
    from imf.objectives import make_objective

    cfg = get_preset(preset).model
    scaled = lambda sizes: tuple(size * resolution // cfg.image_size for size in sizes)  # noqa: E731
    cfg.cross_attn_resolutions, cfg.self_attn_resolutions = (
        scaled(cfg.cross_attn_resolutions),
        scaled(cfg.self_attn_resolutions),
    )
    cfg.width, cfg.image_size = width, resolution
    cfg.__post_init__()
    torch.manual_seed(seed)
    model = IMFNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.image_channels, resolution, resolution, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    obj = make_objective(objective)
    draws = obj.draw(x, torch.Generator().manual_seed(seed + 1))
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        obj.loss_from_draws(model, x, y, draws)[0].backward()

    return step


def cached_launch_ab(options: argparse.Namespace) -> dict:
    """The step's thread CPU time with the Triton launchers' compiled-kernel cache on and off, `rounds` interleaved
    rounds of two steps each, under the stand-in CUDA driver (kernels compiled for sm_90, launches dropped; the
    triton backend told to take CPU tensors as it does under the interpreter)."""
    import statistics

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import triton_launch_check

    import imf_kernels
    import imf_kernels.triton as triton_backend
    from imf_kernels.triton import _launch, attention, group_norm, loss

    triton_launch_check.RECORD = False
    on_cpu = lambda: True  # noqa: E731
    triton_backend._interpreting = group_norm._interpreter_on = loss._interpreter_on = attention._interpreted = on_cpu
    threads, enabled = torch.get_num_threads(), _launch.ENABLED
    torch.set_num_threads(1)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        step = build_step(options.preset, options.width, options.resolution, options.batch, options.objective)
        with imf_kernels.use_backend("triton"):
            for _ in range(3):
                step()
            for _ in range(options.cached_launch_ab):
                for cached in (True, False):
                    _launch.ENABLED = cached
                    started = time.thread_time()
                    step()
                    step()
                    times[cached].append((time.thread_time() - started) * 1e3 / 2)
    finally:
        torch.set_num_threads(threads)
        _launch.ENABLED = enabled
    savings = [off - on for on, off in zip(times[True], times[False], strict=True)]
    result = {
        "cached_ms": statistics.median(times[True]),
        "triton_ms": statistics.median(times[False]),
        "saving_ms": statistics.median(savings),
        "rounds": {"cached": times[True], "triton": times[False]},
    }
    label = f"{options.preset} structure, width {options.width}, {options.resolution}x{options.resolution}"
    print(f"{label}, batch {options.batch}, {options.objective}; stand-in CUDA driver, thread CPU time a step:")
    print(f"  cached launch {result['cached_ms']:.2f} ms, Triton's launch {result['triton_ms']:.2f} ms (medians)")
    print(f"  saving per round: median {result['saving_ms']:.2f} ms ({', '.join(f'{d:.1f}' for d in savings)})")
    return result


def category(filename: str, name: str) -> str:
    """The split's row of one cProfile entry (its file and function name)."""
    if filename.startswith(os.path.join(REPO, "imf_kernels")):
        return "ours: imf_kernels"
    if filename.startswith(os.path.join(REPO, "imf")):
        return "ours: imf"
    if filename == "~":  # a C function
        if "run_backward" in name:
            return "autograd engine"
        return "torch (C calls)" if "torch" in name or "method" in name else "other"
    if f"{os.sep}torch{os.sep}" in filename:
        return "torch (Python)"
    return "other"


def split(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """ms per step of each category, largest first."""
    totals: collections.Counter = collections.Counter()
    for (filename, _, name), (_, _, own, _, _) in stats.stats.items():
        totals[category(filename, name)] += own
    return {name: 1e3 * seconds / steps for name, seconds in totals.most_common()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="latent-b")
    parser.add_argument("--width", type=int, default=32, help="base channels (the preset's structure, narrower)")
    parser.add_argument("--resolution", type=int, default=8, help="image size (default 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objective", default="imf", choices=("imf", "mf"))
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--top", type=int, default=25, help="functions to list by own time (0: none)")
    parser.add_argument(
        "--cached-launch-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: ROUNDS interleaved rounds of the step with the Triton launch cache on and off, under a "
        "stand-in CUDA driver (TRITON_INTERPRET unset)",
    )
    options = parser.parse_args(argv)
    for name in ("width", "resolution", "batch", "steps"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(options, name)}")
    if options.width % 32:
        parser.error(f"--width must be a multiple of 32 (GroupNorm's 32 groups), got {options.width}")
    if options.cached_launch_ab < 0:
        parser.error(f"--cached-launch-ab must be >= 0, got {options.cached_launch_ab}")
    if options.cached_launch_ab:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            parser.error("--cached-launch-ab compiles the kernels: unset TRITON_INTERPRET")
        return cached_launch_ab(options)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the launchers take CPU tensors
    import imf_kernels
    from imf.train import frozen_heap

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (restored after: main() also runs inside the test session)
    try:
        step = build_step(options.preset, options.width, options.resolution, options.batch, options.objective)
        with imf_kernels.use_backend("triton"), stubbed_triton_kernels() as stubs:
            for _ in range(3):
                step()
            launches = sum(stub.launches for stub in stubs.values())
            # the heap frozen for the garbage collector as Trainer.run freezes it: the full collection that follows
            # building the model (~130 ms here, within the first ~60 steps) landed on whichever function was running
            with frozen_heap():
                started = time.thread_time()
                for _ in range(options.steps):
                    step()
                unprofiled_ms = (time.thread_time() - started) * 1e3 / options.steps
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(options.steps):
                    step()
                profiler.disable()
    finally:
        torch.set_num_threads(threads)
    stats = pstats.Stats(profiler)
    calls = sum(count for (count, _, _, _, _) in stats.stats.values()) / options.steps
    rows = split(stats, options.steps)
    label = f"{options.preset} structure, width {options.width}, {options.resolution}x{options.resolution}"
    print(f"{label}, batch {options.batch}, {options.objective}: {unprofiled_ms:.1f} ms of thread CPU time a step")
    print(f"  ({launches // 3} Triton launches stubbed a step; {calls:.0f} Python-level calls a step under cProfile)")
    profiled_total = sum(rows.values())
    for name, ms in rows.items():
        print(f"  {name:<20} {ms:8.2f} ms  {ms / profiled_total:5.1%}  (profiled)")
    if options.top:
        stats.sort_stats("tottime").print_stats(options.top)
    return {"step_ms": unprofiled_ms, "calls": calls, "split_ms": rows, "triton_launches": launches // 3}


if __name__ == "__main__":
    main()
