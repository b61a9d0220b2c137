"""Timing, device and results helpers shared by the benchmarks (`bench/ops.py`, `bench/step.py`).

    from common import measure, copy_bandwidth, device_name, run_tags, results_path, append_results
    timing = measure(lambda: model_step(), device)          # Timing(median_ms, reps)
    append_results(results_path(device), rows, run_tags(device, bench="step"))

Timing rules (DESIGN 7): medians after warm-up. On a GPU each repetition is timed by its own pair of CUDA events
after the L2 cache is flushed (a 256 MiB write, as `triton.testing.do_bench` does) and the GPU is held busy
(`torch.cuda._sleep`) for twice the host's time to queue one call (at least ~0.5 ms, at most ~50 ms), so the host
has queued the whole call before its first kernel starts: the time is the GPU's, not Python's launch overhead, for
every variant alike (torch.func.jvp's many tiny kernels included). `Timing.host_ms` keeps the host's side: a call
whose host_ms exceeds its median_ms runs at the host's pace when nothing else is queued.
On a CPU, `clock` (default `time.perf_counter`) around each call; on a shared machine, run torch on one thread and
pass `clock=time.thread_time`: that is the call's own work, what it would take alone on a core, where wall-clock
medians swing with the other processes' load.

Results: one JSON file per device, `bench/results/<device-slug>.json`, a list of rows (one per line), each row
tagged with the device, date, commit and library versions, so numbers from different cards and runs never mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
# This checkout's imf and imf_kernels, whatever the editable install points at: the rows are stamped with its commit
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from imf.checkpoint import atomic_write  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"

# Larger than any GPU's L2 (H100: 50 MB, H200: 50 MB), so each repetition reads its inputs from HBM.
L2_FLUSH_BYTES = 256 * 2**20
# GPU busy-wait before each timed call, so the host has queued the whole call before its first kernel starts and
# launch overhead stays out of the measured interval: at least ~0.5 ms at 1.5-2 GHz, and twice the host time of one
# call where that is longer (an autograd backward of several small kernels can take the host longer than 0.5 ms on
# a slow host; the GPU would then wait on each launch, and the gaps would be timed), at most ~50 ms.
QUEUE_FILL_CYCLES = 1_000_000
MAX_QUEUE_FILL_CYCLES = 100_000_000


@dataclasses.dataclass(frozen=True)
class Timing:
    """The median of `reps` timed calls, in milliseconds; on a GPU also the host's time to queue one call."""

    median_ms: float
    reps: int
    host_ms: float | None = None


def queue_fill_cycles(host_s: float, cycles_per_s: float) -> int:
    """Busy-wait cycles before a timed call whose host side takes host_s: twice that, within the bounds above."""
    return int(min(MAX_QUEUE_FILL_CYCLES, max(QUEUE_FILL_CYCLES, math.ceil(2 * host_s * cycles_per_s))))


_SLEEP_RATES: dict[str, float] = {}


def sleep_cycles_per_s(device: torch.device) -> float:
    """torch.cuda._sleep's cycles per second on `device`, timed once with CUDA events."""
    key = str(device)
    if key not in _SLEEP_RATES:
        cycles = 10 * QUEUE_FILL_CYCLES
        torch.cuda._sleep(cycles)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize(device)
        _SLEEP_RATES[key] = cycles / (start.elapsed_time(end) * 1e-3)
    return _SLEEP_RATES[key]


@contextlib.contextmanager
def launch_config(module, picker: str, config):
    """Inside the block, `module.<picker>` (a Triton launcher's block choice, e.g. group_norm.pick_blocks) returns
    `config` for every call: how bench/tune_gpu.py and bench/ncu_kernels.py run a candidate configuration."""
    original = getattr(module, picker)
    setattr(module, picker, lambda *_, **__: config)
    try:
        yield
    finally:
        setattr(module, picker, original)


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The card's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's model and core count."""
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """A file-name form of the device name: "nvidia-h100-80gb-hbm3", "cpu-amd-epyc"."""
    name = device_name(device)
    if not is_cuda(device):
        name = name.rsplit(" (", 1)[0]  # the core count is a property of the machine, not of the device kind
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_tags(device: torch.device, bench: str) -> dict[str, Any]:
    """What every row of one run is tagged with: which benchmark, device, date, commit, library versions."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "bench": bench,
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short=12", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),  # uncommitted changes to tracked files
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _measure_cpu(
    fn: Callable[[], Any], budget_s: float, warmup: int, min_reps: int, max_reps: int, clock: Callable[[], float]
) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    started = clock()
    while len(times) < max_reps and (len(times) < min_reps or clock() - started < budget_s):
        begin = clock()
        fn()
        times.append((clock() - begin) * 1e3)
    return Timing(statistics.median(times), len(times))


def _measure_cuda(
    fn: Callable[[], Any], device: torch.device, budget_s: float, warmup: int, min_reps: int, max_reps: int
) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    # one call, to size the number of repetitions to the budget and the busy-wait to the host's time per call
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    host_start = time.perf_counter()
    start.record()
    fn()
    end.record()
    host_s = time.perf_counter() - host_start
    torch.cuda.synchronize(device)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    fill_cycles = queue_fill_cycles(host_s, sleep_cycles_per_s(device))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        torch.cuda._sleep(fill_cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    median = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return Timing(median, reps, host_ms=host_s * 1e3)


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    budget_s: float = 0.3,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 100,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """The median time of fn() after `warmup` calls: min_reps to max_reps timed calls, about budget_s in all.

    `fn` must queue all its work on the current stream (GPU) or finish it (CPU); the rules are in the module
    docstring; `clock` is the CPU's clock (a GPU is timed by CUDA events). Compilation (torch.compile, Triton's
    JIT) belongs in the warm-up.
    """
    if is_cuda(device):
        return _measure_cuda(fn, torch.device(device), budget_s, warmup, min_reps, max_reps)
    return _measure_cpu(fn, budget_s, warmup, min_reps, max_reps, clock)


def copy_bandwidth(
    device: torch.device,
    nbytes: int | None = None,
    budget_s: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, Timing]:
    """(GB/s, timing) of dst.copy_(src) on `device`: nbytes read plus nbytes written, 1 GB = 1e9 bytes.

    The default size (512 MiB on a GPU, 64 MiB on a CPU) is far above any cache, so this is the memory
    bandwidth a streaming kernel can reach on this device, measured in the same run as the kernels.
    """
    if nbytes is None:
        nbytes = 512 * 2**20 if is_cuda(device) else 64 * 2**20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget_s=budget_s, clock=clock)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9, timing


def results_path(device: torch.device) -> Path:
    """bench/results/<device-slug>.json: the one results file of this kind of device."""
    return RESULTS_DIR / f"{device_slug(device)}.json"


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (empty when it does not exist)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else []


def append_results(path: Path, rows: list[dict[str, Any]], tags: dict[str, Any]) -> None:
    """Append rows, each merged with `tags`, to the results file at `path` (earlier runs are kept).

    The file is a JSON list with one row per line, so a new run is a readable diff.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_rows = read_results(path) + [{**tags, **row} for row in rows]
    text = "[\n" + ",\n".join(json.dumps(row, sort_keys=False) for row in all_rows) + "\n]\n"
    # through a temporary file renamed over it: a run killed mid-write (a lease's deadline) leaves the old file
    atomic_write(path, lambda name: Path(name).write_text(text))
