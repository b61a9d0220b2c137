"""Why a kernel misses its bandwidth target: one launch of each chosen kernel under Nsight Compute (ncu).

    python bench/ncu_kernels.py --list                       # the cases, runs anywhere
    bash bench/ncu_kernels.sh [DIR]                          # on a GPU machine with ncu: the report in DIR
    python bench/ncu_kernels.py --summarize DIR/ncu-*.csv    # a table of a report's key metrics, runs anywhere

bench/ops.py and bench/tune_gpu.py say how far the Triton GroupNorm and loss kernels are from a device-to-device
copy (40-74% and 14-20% on an H200, 2026-11-26); they cannot say why. Under ncu this script warms every case up
(Triton compiles, autotuning and allocation stay outside the profile), then opens the profiler window
(cudaProfilerStart, for `ncu --profile-from-start off`) and calls each case once, so ncu sees exactly one launch
of each of our kernels. The sections asked for by bench/ncu_kernels.sh: SpeedOfLight (DRAM and SM throughput as a
share of peak), Occupancy (theoretical and achieved, and what limits them: registers, warps, shared memory),
LaunchStats (registers per thread, waves), WarpStateStats and SchedulerStats (what the warps wait on: memory,
barriers, ...). A plain tensor copy of the same bytes runs first as the yardstick.

Shapes are the latent-b layers of bench/tune_gpu.py at batch 256, bf16 (the sizes of the bandwidth targets).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launch_config  # noqa: E402

# (pass, C, H = W) at latent-b shapes: unpadded single tile (C512 16x16), padded single tile (C768 8x8: 24 channels
# per group in a 32-row tile), chunked (C256 32x32), chunked and padded (C768 16x16), the smallest groups (C256 8x8:
# 512 elements, C512 8x8: 1024), the forward, and the backward at the smallest groups and at C512 16x16.
# "-split": the same pass with the launcher's tile split in two unpadded ones (group_norm.split_tile, a candidate no
# GPU has timed): 24 rows as 16 + 8. "-groups4": 4 (sample, group) slabs per program (group_norm.group_tile,
# likewise untimed) at the smallest groups.
GN_CASES = (
    ("jvp", 512, 16),
    ("jvp", 768, 8),
    ("jvp-split", 768, 8),
    ("jvp", 256, 32),
    ("jvp", 768, 16),
    ("jvp-split", 768, 16),
    ("jvp", 256, 8),
    ("jvp-groups4", 256, 8),
    ("jvp", 512, 8),
    ("jvp-groups4", 512, 8),
    ("fwd", 512, 16),
    ("bwd", 256, 8),
    ("bwd-groups4", 256, 8),
    ("bwd", 512, 16),
)
LOSS_SHAPE = (256, 4, 32, 32)  # latent-b targets, batch 256 (bench/ops.py's loss row)


def gn_case(pass_name: str, channels: int, res: int, device, dtype, batch: int = 256, groups: int = 32):
    """(label, bytes moved at the floor, the call) of one Triton GroupNorm pass."""
    from imf_kernels.triton import group_norm as gn

    x, dx, grad_y = (torch.randn(batch, channels, res, res, device=device, dtype=dtype) for _ in range(3))
    weight = 1 + 0.1 * torch.randn(channels, device=device, dtype=dtype)
    bias = 0.1 * torch.randn(channels, device=device, dtype=dtype)
    scale, shift, dscale, dshift = (0.1 * torch.randn(batch, channels, device=device, dtype=dtype) for _ in range(4))
    params = (weight, bias, scale, shift)
    n = x.numel() * x.element_size()
    cpg = channels // groups
    blocks = gn.pick_blocks(cpg, res * res, dtype)
    if pass_name.endswith("-split"):
        blocks = gn.split_tile(blocks, cpg)
        assert blocks is not None, f"C/G={cpg} is not a sum of two powers of two"
    elif pass_name.endswith("-groups4"):
        blocks = gn.group_tile(blocks, 4)
        assert blocks is not None, f"C{channels} {res}x{res} is not a single tile"
    label = f"gn_{pass_name} B{batch} C{channels} {res}x{res} G{groups} ({blocks})"

    def with_blocks(fn, *args):  # the launcher's pick replaced by `blocks` for the call
        def call():
            with launch_config(gn, "pick_blocks", blocks):
                return fn(*args)

        return call

    if pass_name == "fwd":
        return label, 2 * n, with_blocks(gn.gn_act_fwd, x, groups, *params, 1e-5, "silu")
    if pass_name.startswith("jvp"):
        return label, 4 * n, with_blocks(gn.gn_act_jvp_fwd, x, dx, groups, *params, dscale, dshift, 1e-5, "silu")
    _, mean, rstd = gn.gn_act_fwd(x, groups, *params, 1e-5, "silu")
    return label, 3 * n, with_blocks(gn.gn_act_bwd, grad_y, x, groups, *params, mean, rstd, "silu")


def loss_cases(device, dtype, shape=LOSS_SHAPE) -> list[tuple[str, int, Callable[[], object]]]:
    """The fused iMF loss forward, and forward plus backward (Triton), at bench/ops.py's loss row's shape."""
    from imf_kernels import api

    batch = shape[0]
    u, du, v, v_target = (torch.randn(*shape, device=device, dtype=dtype) for _ in range(4))
    t = torch.rand(batch, device=device)
    r = t * torch.rand(batch, device=device)
    leaf_u, leaf_v = u.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    n = u.numel() * u.element_size()

    def forward_backward():
        loss, _ = api.imf_loss(leaf_u, du, leaf_v, v_target, t, r, backend="triton")
        torch.autograd.grad(loss, (leaf_u, leaf_v))

    forward = partial(api.imf_loss, u, du, v, v_target, t, r, backend="triton")
    sizes = "x".join(map(str, shape[1:]))
    # floor bytes: the forward reads u, du, v, v_target; the backward reads them again and writes grad u, grad v
    return [
        (f"imf_loss forward B{batch} {sizes}", 4 * n, forward),
        (f"imf_loss forward+backward B{batch} {sizes}", 10 * n, forward_backward),
    ]


def build_cases(device, dtype, batch=256, loss_shape=LOSS_SHAPE) -> list[tuple[str, int, Callable[[], object]]]:
    """(label, floor bytes, call) of the copy yardstick, every GroupNorm case and the loss cases."""
    cases = [gn_case(p, c, r, device, dtype, batch=batch) for p, c, r in GN_CASES]
    cases += loss_cases(device, dtype, loss_shape)
    # the yardstick: a copy moving as many bytes as the first GroupNorm case (read + write)
    nbytes = cases[0][1]
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return [(f"copy {nbytes / 2**20:.0f} MiB read+write", nbytes, partial(dst.copy_, src)), *cases]


# Columns of ncu's raw page (`ncu --import R --page raw --csv`) summarised per kernel: (heading, metric, scale).
SUMMARY_METRICS = (
    ("us", "gpu__time_duration.sum", 1e-3),  # ns
    ("DRAM % peak", "dram__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active", 1.0),
    ("theoretical %", "sm__maximum_warps_per_active_cycle_pct", 1.0),
    ("regs", "launch__registers_per_thread", 1.0),
    ("block", "launch__block_size", 1.0),
    ("grid", "launch__grid_size", 1.0),
)
# the WarpStateStats section's smsp__average_warp_latency_issue_stalled_<reason>[_per_...].ratio, or the PC sampling
# family smsp__pcsamp_warps_issue_stalled_<reason>
STALL_PATTERN = re.compile(r"issue_stalled_(?P<reason>[a-z_]+?)(?:_per_\w+)?(?:\.\w+)?$")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize_ncu_csv(path: Path) -> list[dict]:
    """One dict per profiled kernel of ncu's raw CSV page: its name, the SUMMARY_METRICS (None where the report
    lacks one) and the three largest warp-stall reasons ("long_scoreboard 12.3", from the WarpStateStats
    section's issue_stalled_* metrics)."""
    lines = path.read_text().splitlines()
    # ncu may print "==PROF==" lines before the table; the header is the first row naming "Kernel Name"
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if start is None:
        raise ValueError(f"{path}: no ncu raw CSV table (no 'Kernel Name' header)")
    reader = csv.DictReader(lines[start:])
    kernels = []
    for row in reader:
        if not row.get("ID", "").strip():  # the units row under the header
            continue
        summary = {"kernel": row["Kernel Name"]}
        for heading, metric, scale in SUMMARY_METRICS:
            value = _number(row.get(metric, "") or "")
            summary[heading] = None if value is None else value * scale
        stalls = []
        for column, text in row.items():
            match = STALL_PATTERN.search(column or "")
            value = _number(text or "")
            if match and value is not None and "not_issued" not in column:
                stalls.append((value, match["reason"]))
        stalls.sort(reverse=True)
        summary["top stalls"] = ", ".join(f"{reason} {value:.1f}" for value, reason in stalls[:3])
        kernels.append(summary)
    return kernels


def print_summary(kernels: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Nsight Compute, one launch per kernel (clocks not locked: read shares, not times)")
    columns = ["kernel", *(heading for heading, _, _ in SUMMARY_METRICS), "top stalls"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("kernel", "top stalls") else "right")
    for summary in kernels:
        cells = []
        for column in columns:
            value = summary[column]
            cells.append("-" if value is None else value if isinstance(value, str) else f"{value:.4g}")
        cells[0] = cells[0][:48]
        table.add_row(*cells)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument(
        "--summarize", metavar="CSV", default=None, help="print a table of an ncu raw CSV export (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        path = Path(args.summarize)
        if not path.is_file():
            parser.error(f"--summarize: no file {path}")
        try:
            kernels = summarize_ncu_csv(path)
        except ValueError as error:
            parser.error(f"--summarize: {error}")
        print_summary(kernels)
        return 0
    if args.list:
        for pass_name, channels, res in GN_CASES:
            print(f"gn_{pass_name} B256 C{channels} {res}x{res} G32 bf16")
        print(f"imf_loss forward, forward+backward {'x'.join(map(str, LOSS_SHAPE))} bf16")
        return 0
    if not torch.cuda.is_available():
        print("ncu_kernels.py: needs a CUDA device (run it under ncu through bench/ncu_kernels.sh)", file=sys.stderr)
        return 1
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    cases = build_cases(device, dtype)
    for _, _, call in cases:  # compile and allocate outside the profiled window
        call()
        call()
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    cudart.cudaProfilerStart()
    for label, _, call in cases:
        torch.cuda.nvtx.range_push(label)
        call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    cudart.cudaProfilerStop()
    for label, nbytes, _ in cases:
        print(f"{label}: {nbytes / 2**20:.0f} MiB at the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
