"""Where one training step's time goes: device time by kernel and by kind, and whether the host keeps ahead.

    python bench/profile_step.py                                   # CPU: digits, fused-torch, batch 128
    python bench/profile_step.py --preset latent-b --variant fused-triton   # GPU: bf16 targets, batch 64
    python bench/profile_step.py --variant fm --trace /tmp/fm.json # also a chrome trace (chrome://tracing)

The step is `bench/step.py`'s (same model, inputs, draws and variants). After warm-up it answers two questions:
- Is the step bound by the host? Each of `--steps` steps is timed twice: until `step()` returns (the host has
  queued it) and until the device finishes. Host time close to the wall time, and device busy (kernel time / wall)
  well under 1, mean the GPU waits on Python: launches, checks, dispatch. On a CPU there is no queue; "busy" is the
  share of the step spent inside aten operators, the rest is Python around them.
- Which kernels cost what? One profiled step (torch.profiler): the top kernels by device time (GPU) or aten
  operators by self CPU time (CPU), and the totals by kind (matmul/conv, our GroupNorm, attention and loss kernels,
  PyTorch's norms, elementwise and reductions, copies and casts), each as a share of the step's device time.
- GPU: where does the host's time go? The same profiled step's CPU-side events by self CPU time (aten operators,
  CUDA runtime and driver calls, autograd nodes) and what no event covers (Python: the model's, torch's, Triton's
  launchers; and the profiler's own cost), as shares of that step's host time.
Results: a rich table and bench/results/<device>-profile-<variant>.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from step import GPU_BATCH, build, make_step, usable_backends, warmup_calls, write_results  # noqa: E402

from imf_kernels import dispatch  # noqa: E402

# (kind, pattern) in order, first match wins, case-insensitive; patterns match GPU kernel names (Triton's are the
# kernel function's name; PyTorch's and cuDNN's/cuBLAS's their C++ names) and CPU aten operator names.
KINDS = (
    # the backward's batch sums of grad_weight / grad_bias, and of grad_k / grad_v partials, count with their op
    (
        "GroupNorm (ours)",
        r"_gn_(fwd|bwd)_kernel|_param_sums_kernel|group_norm_act_(fwd|bwd)_kernel|group_norm_param_grads_kernel",
    ),
    ("attention (ours)", r"_attn_|attention_(fwd|bwd)_kernel|attention_bwd_reduce_kernel"),
    ("loss (ours)", r"_loss_(partial|finish|bwd)_kernel|loss_(fwd|bwd|totals)_kernel"),
    ("attention (PyTorch)", r"flash|fmha|efficient_attention|scaled_dot_product"),
    ("norms (PyTorch)", r"layer_?norm|group_?norm|batch_?norm|RowwiseMoments|FusedParams|InternalGradients|GammaBeta"),
    # cuDNN's conversions of NCHW activations for its NHWC tensor-core convolutions (and back): the cost of the
    # model's channels-first layout, apart from the convolutions themselves
    ("layout transposes (cuDNN)", r"nchwToNhwc|nhwcToNchw"),
    (
        "matmul / conv",
        r"gemm|gemv|cutlass|xmma|cudnn|conv|nvjet|wgmma|sm90_|implicit_|aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b",
    ),
    ("copies / casts", r"copy|Memcpy|Memset|CatArray|aten::(to|clone|contiguous|zero_|cat|fill_)\b"),
    ("softmax (PyTorch)", r"softmax"),
    (
        "views / allocation",
        r"aten::(view|_unsafe_view|reshape|as_strided|expand|slice|select|permute|transpose|t|unsqueeze|squeeze|"
        r"detach|alias|empty|empty_like|empty_strided|new_empty|resize_|unbind|split|chunk|narrow)\b",
    ),
    ("elementwise / reductions (PyTorch)", r"elementwise|vectorized|reduce|aten::"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profiled_rows(prof, on_gpu: bool) -> list[dict]:
    """One row per kernel (GPU) or aten operator (CPU) of the profiled region: name, calls, self time in us."""
    rows = []
    for event in prof.key_averages():
        if on_gpu:
            if event.device_type != DeviceType.CUDA:
                continue
            self_us = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            self_us = event.self_cpu_time_total
        if self_us > 0:
            rows.append(
                {"name": event.key, "calls": event.count, "self_us": float(self_us), "kind": kind_of(event.key)}
            )
    return sorted(rows, key=lambda row: -row["self_us"])


def host_and_wall(step, steps: int, device: str) -> tuple[list[float], list[float]]:
    """Per step: seconds until step() returned (host), and until the device finished (wall)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    host, wall = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        sync()
        wall.append(time.perf_counter() - start)
    return host, wall


# (kind, pattern): where the host's time inside the profiler's CPU-side events goes; first match wins
HOST_KINDS = (
    ("CUDA runtime / driver calls (launches, copies, allocation)", r"^cu(da)?[A-Z]"),
    ("autograd engine (backward nodes)", r"^autograd::|Backward\d*$|^torch::autograd::"),
    ("aten operators (dispatch, checks, kernel setup)", r"^aten::"),
)
# the profiler's own wait for the device after the step (torch.cuda.synchronize), not the step's host time
HOST_EXCLUDED = re.compile(r"^cuda(Device|Stream)Synchronize$")


def host_kind(name: str) -> str:
    for kind, pattern in HOST_KINDS:
        if re.search(pattern, name):
            return kind
    return "other profiled events"


def host_rows(prof) -> list[dict]:
    """One row per CPU-side event of the profiled step (aten operator, CUDA runtime or driver call, autograd node,
    ...), with its self CPU time in us, largest first: the host's time inside C++ that the profiler sees. The rest of
    the host's time is Python (the model's, torch's and Triton's launchers) and the profiler's own overhead."""
    rows = [
        {"name": event.key, "calls": event.count, "self_us": float(event.self_cpu_time_total),
         "kind": host_kind(event.key)}
        for event in prof.key_averages()
        if event.device_type == DeviceType.CPU and event.self_cpu_time_total > 0 and not HOST_EXCLUDED.match(event.key)
    ]  # fmt: skip
    return sorted(rows, key=lambda row: -row["self_us"])


def host_summary(rows: list[dict], profiled_host_ms: float) -> dict:
    """The profiled step's host time split by HOST_KINDS, and what no event covers ("Python and the profiler")."""
    kinds: dict[str, float] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["self_us"] / 1e3
    in_events = sum(kinds.values())
    kinds = dict(sorted(kinds.items(), key=lambda item: -item[1]))
    kinds["outside profiled events: Python, the profiler"] = max(profiled_host_ms - in_events, 0.0)
    return {"profiled_host_ms": profiled_host_ms, "kinds_ms": kinds, "rows": rows}


def launching_ops(prof) -> list[dict]:
    """GPU: one row per aten operator that launched kernels, with the device time of the kernels it launched itself
    (not its children's), largest first: which calls the copies, casts and elementwise kernels come from."""
    rows = [
        {"name": event.key, "calls": event.count, "device_us": float(event.self_device_time_total)}
        for event in prof.key_averages()
        if event.device_type == DeviceType.CPU and event.key.startswith("aten::") and event.self_device_time_total > 0
    ]
    return sorted(rows, key=lambda row: -row["device_us"])


# torch's sync debug mode warns "called a synchronizing CUDA operation" at each sync; setting the mode warns once that
# it "is a prototype feature and does not yet detect all synchronizing operations" (counted as a sync until 2026-11-27)
SYNC_WARNING = "called a synchronizing cuda operation"


def step_syncs(step, set_mode=None) -> list[str]:
    """The host-device synchronisations of one step, each as "file:line: message" of the code that asked for it:
    torch's sync debug mode warns at each (a `.item()`, `torch.nonzero`, a blocking copy); the host waits there for
    everything queued before it, and the device idles while the host then queues the rest."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            step()
        finally:
            set_mode("default")
    return [
        f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
        for w in caught
        if SYNC_WARNING in str(w.message).lower()
    ]


def profile(preset: str, variant: str, batch: int, steps: int, bf16: bool, device: str, trace: str | None) -> dict:
    model, x, y, draws = build(preset, batch, device)
    step = make_step(variant, model, x, y, draws, bf16)
    for _ in range(max(2, warmup_calls(variant))):  # at least two: the allocator's pool is warm too
        step()
    host, wall = host_and_wall(step, steps, device)
    on_gpu = device == "cuda"
    syncs = step_syncs(step) if on_gpu else None
    if on_gpu:
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        profiled_host_ms = (time.perf_counter() - start) * 1e3  # the profiler slows the host: a share, not a time
        if on_gpu:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    rows = profiled_rows(prof, on_gpu)
    total_us = sum(row["self_us"] for row in rows)
    if total_us <= 0:
        kind = "CUDA kernel" if on_gpu else "aten operator"
        raise RuntimeError(f"profile_step: the profiler recorded no {kind} time in one {variant} step")
    kinds: dict[str, float] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["self_us"]
    wall_ms = statistics.median(wall) * 1e3
    return {
        "preset": preset,
        "variant": variant,
        "batch": batch,
        "bf16": bf16,
        "steps": steps,
        "host_ms": statistics.median(host) * 1e3,
        "wall_ms": wall_ms,
        "device_ms": total_us / 1e3,
        "busy": total_us / 1e3 / wall_ms,
        "syncs": syncs,  # GPU: where one step made the host wait for the device (None on a CPU)
        "ops": launching_ops(prof) if on_gpu else None,  # GPU: device time by the aten operator that launched it
        # GPU: where the host's time goes (on a CPU the rows above are already the aten operators' CPU time)
        "host": host_summary(host_rows(prof), profiled_host_ms) if on_gpu else None,
        "kinds_ms": {kind: us / 1e3 for kind, us in sorted(kinds.items(), key=lambda item: -item[1])},
        "rows": rows,
    }


def print_report(result: dict, device_label: str, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    on_gpu = result["on_gpu"]
    unit = "device" if on_gpu else "aten self-CPU"
    table = Table(title=f"{device_label} {result['preset']} {result['variant']} batch {result['batch']}: top {top}")
    for column in ("kernel" if on_gpu else "operator", "kind", "calls", "ms", "share"):
        table.add_column(column, justify="left" if column in ("kernel", "operator", "kind") else "right")
    total = result["device_ms"]
    for row in result["rows"][:top]:
        name = row["name"] if len(row["name"]) <= 70 else row["name"][:67] + "..."
        ms = row["self_us"] / 1e3
        table.add_row(name, row["kind"], str(row["calls"]), f"{ms:.3f}", f"{ms / total:.1%}")
    console.print(table)
    kinds = Table(title=f"{unit} time by kind (one step)")
    for column in ("kind", "ms", "share"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, ms in result["kinds_ms"].items():
        kinds.add_row(kind, f"{ms:.3f}", f"{ms / total:.1%}")
    kinds.add_row("total", f"{total:.3f}", "100%")
    console.print(kinds)
    console.print(
        f"per step (median of {result['steps']}): wall {result['wall_ms']:.1f} ms, host returns after "
        f"{result['host_ms']:.1f} ms, {unit} time {total:.1f} ms = {result['busy']:.0%} of the wall"
        + (
            " (host-bound: the host takes about as long as the step)"
            if on_gpu and result["host_ms"] > 0.9 * result["wall_ms"]
            else ""
        )
    )
    if result.get("ops"):
        ops = Table(title="aten operators by the device time of the kernels they launch (one step)")
        for column in ("operator", "calls", "ms", "share"):
            ops.add_column(column, justify="left" if column == "operator" else "right")
        for row in result["ops"][:top]:
            ms = row["device_us"] / 1e3
            ops.add_row(row["name"], str(row["calls"]), f"{ms:.3f}", f"{ms / total:.1%}")
        console.print(ops)
    if result.get("host"):
        host = result["host"]
        profiled = host["profiled_host_ms"]
        by_kind = Table(
            title=f"host time by kind (the profiled step: {profiled:.1f} ms of host time under the profiler)"
        )
        for column in ("kind", "ms", "share"):
            by_kind.add_column(column, justify="left" if column == "kind" else "right")
        for kind, ms in host["kinds_ms"].items():
            by_kind.add_row(kind, f"{ms:.3f}", f"{ms / profiled:.1%}")
        console.print(by_kind)
        events = Table(title="host time by profiled event (self CPU time, one step)")
        for column in ("event", "kind", "calls", "ms", "us per call"):
            events.add_column(column, justify="left" if column in ("event", "kind") else "right")
        for row in host["rows"][:top]:
            name = row["name"] if len(row["name"]) <= 60 else row["name"][:57] + "..."
            ms = row["self_us"] / 1e3
            events.add_row(name, row["kind"], str(row["calls"]), f"{ms:.3f}", f"{row['self_us'] / row['calls']:.1f}")
        console.print(events)
    if result.get("syncs") is not None:
        syncs = result["syncs"]
        console.print(f"host-device synchronisations in one step: {len(syncs)}")
        for where in sorted(set(syncs)):
            console.print(f"  {syncs.count(where)}x {where}")


PLAIN_VARIANTS = (
    "reference", "trainer", "trainer-pipelined", "fm", "mf", "fwd-bwd", "fwd-tan-bwd", "ref-fwd-bwd",
    "ref-fwd-tan-bwd", "compiled", "compiled-modules",
)  # fmt: skip


def check_variant(parser: argparse.ArgumentParser, variant: str, usable: list[str], on_gpu: bool) -> None:
    """One line for a variant this machine cannot run, before the model is built (bench/step.py's names)."""
    match = re.fullmatch(r"(fused|graph)-(\w+?)(-cl|-jit)?", variant)
    if variant not in PLAIN_VARIANTS and match is None:
        names = ", ".join((*PLAIN_VARIANTS, "fused-BACKEND[-cl]", "graph-BACKEND[-cl]"))
        parser.error(f"--variant {variant}: not a bench/step.py variant ({names})")
    if match is None:
        return
    kind, backend = match.group(1), match.group(2)
    if kind == "graph" and not on_gpu:
        parser.error(f"--variant {variant}: a CUDA graph needs a GPU")
    if backend not in usable:
        parser.error(f"--variant {variant}: the {backend} backend does not run here (usable: {', '.join(usable)})")


def main(argv: list[str] | None = None) -> dict:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="latent-b" if on_gpu else "digits")
    parser.add_argument(
        "--variant",
        default=None,
        help="a bench/step.py variant (default: the fused step on the backend `auto` tries first: triton on GPU, "
        "torch on CPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help=f"default: {GPU_BATCH} on GPU, 128 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps for the host/wall medians")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=on_gpu, help="bf16 targets")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default=None, help="also write a chrome trace to this file")
    parser.add_argument("--out", default=None, help="default: bench/results/<device>-profile-<variant>.json")
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=on_gpu,
        help="torch.backends.cudnn.benchmark (default: on on a GPU, as bench/step.py runs its fixed-draw variants)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: at least 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch: at least 1, got {args.batch}")
    if not on_gpu:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    usable = usable_backends(device)
    variant = args.variant or f"fused-{next(name for name in dispatch.auto_order(on_gpu) if name in usable)}"
    check_variant(parser, variant, usable, on_gpu)
    batch = args.batch or (GPU_BATCH if on_gpu else 128)
    result = profile(args.preset, variant, batch, args.steps, args.bf16, device, args.trace)
    torch_device = torch.device(device)
    result.update(
        on_gpu=on_gpu, cudnn_benchmark=args.cudnn_benchmark, **common.run_tags(torch_device, bench="profile_step")
    )
    label = common.device_name(torch_device)
    out = (
        Path(args.out)
        if args.out
        else common.RESULTS_DIR / f"{common.device_slug(torch_device)}-profile-{variant}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, result)
    print_report(result, label, args.top)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
