"""Launch-configuration sweep of the Triton GroupNorm and attention kernels on a GPU (bf16 unless --dtype float32;
latent-b shapes).

    python bench/tune_gpu.py [--out sweep.json] [--budget 0.05]
    python bench/tune_gpu.py --families cuda_group_norm   # the cuda GroupNorm kernel kinds side by side
    python bench/tune_gpu.py --families group_norm --gn-shapes 768x16 256x8 --passes jvp bwd   # a lease's minute

For each layer shape and pass it times every candidate block configuration (the launcher's own choice marked
`*`; GroupNorm in two rounds over the shapes: the pick and its variants, then the rest) with the same rules as
bench/ops.py (CUDA events after an L2 flush, medians; bench/common.py), calling the
launchers in `imf_kernels.triton` directly with their `pick_blocks` / `pick_config` replaced for the call. Prints
the time, GB/s and fraction of a 512 MiB device-to-device copy of each, best first; writes every row as JSON.
What the sweep finds goes into the launchers' tables by hand (and through tests/test_triton_aot.py's spill check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

# --smoke runs the kernels under Triton's interpreter, which reads TRITON_INTERPRET when triton is imported
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_name, launch_config, measure  # noqa: E402

from imf_kernels.triton import group_norm  # noqa: E402

# (C, H = W) of every latent-b GroupNorm layer (its distinct C/G and H*W: the shapes the AOT test compiles), batch 256,
# 32 groups.
GN_SHAPES = group_norm.PRESET_LAYERS["latent-b"]
# (B, H, Lq, Lk, D): latent-b cross-attention at 32x32 and self-attention at 8x8 (bench/ops.py's rows).
ATTN_SHAPES = ((256, 4, 1024, 24, 64), (256, 8, 64, 64, 64))


@dataclasses.dataclass
class Sweep:
    """Times candidate launch configurations and collects one row per configuration."""

    device: torch.device
    budget_s: float
    copy_gbps: float
    deadline: float | None  # perf_counter time after which no new config starts (--max-seconds)
    rows: list[dict] = dataclasses.field(default_factory=list)

    def time_configs(self, module, picker: str, configs, default, fn, nbytes: int, label, **row) -> None:
        """fn() under each config: `module.<picker>` (the launcher's block choice) returns the config for the
        call. A config that fails (e.g. does not compile) is a row with its reason, not a stop."""
        for config in configs:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                return
            try:
                with launch_config(module, picker, config):
                    ms, note = measure(fn, self.device, budget_s=self.budget_s).median_ms, None
            except Exception as error:  # noqa: BLE001
                ms, note = None, f"{type(error).__name__}: {str(error)[:200]}"
            gbps = None if ms is None else nbytes / ms / 1e6
            self.rows.append(
                dict(
                    **row,
                    config=label(config),
                    default=config == default,
                    ms=ms,
                    gbps=gbps,
                    copy_fraction=None if gbps is None else gbps / self.copy_gbps,
                    note=note,
                )
            )


def gn_candidates(cpg: int, hw: int, dtype: torch.dtype) -> list:
    """Every candidate of gn_candidate_groups, the pick and its variants first."""
    first, rest = gn_candidate_groups(cpg, hw, dtype)
    return [*first, *rest]


def gn_candidate_groups(cpg: int, hw: int, dtype: torch.dtype) -> tuple[list, list]:
    """Single register tiles on 1-32 warps (a 16-byte vector to 256 elements of each input per thread) and chunked
    tiles; the launcher's own pick always among them; for channel counts that are a sum of two powers of two, each
    configuration again with its channel column split in two unpadded tiles; for small single tiles, the launcher's
    pick with 2-8 slabs per program; for chunked picks, the pick with fewer pipeline stages. (the pick and its
    variants, every other candidate): a sweep cut at a lease's deadline should have timed the first group."""
    from imf_kernels.triton import group_norm as gn

    block_c = triton.next_power_of_2(cpg)
    hw2 = triton.next_power_of_2(hw)
    total = block_c * hw2
    vector = 16 // dtype.itemsize
    out = []
    if total <= 32768:
        for warps in (1, 2, 4, 8, 16, 32):
            # (the launcher picks 1-2 warps for small groups; fewer than 4 warps holding over 64 elements of
            # each input per thread would spill)
            if vector <= total // (32 * warps) <= (256 if warps >= 4 else 64):
                out.append(gn.GNBlocks(block_c, hw2, True, warps))
    for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
        block_hw = tile // block_c
        if tile < total and 1 <= block_hw <= hw2 and tile // (32 * warps) >= vector:
            out.append(gn.GNBlocks(block_c, block_hw, False, warps, stages=gn.chunk_stages(dtype, block_c)))
    default = gn.pick_blocks(cpg, hw, dtype)
    # each padded column's split twin (e.g. 48 channels as 32 + 16 rows): the same tiles without the padding
    # (the launcher picks only the half-precision single one where the padded column fits no tile)
    out += [split for blocks in out if (split := gn.split_tile(blocks, cpg)) is not None]
    # the launcher's chunked pick with 1 (plain loops: the kernels before 2026-11-27), 2 and 3 pipeline stages, its
    # split twin with 1 and 2 (split_tile's limit); each configuration's own among them
    default_split = gn.split_tile(default, cpg)
    first = [default] if default_split is None else [default, default_split]
    if not default.single_tile:
        for blocks, stages in ((default, (1, 2, 3)), (default_split, (1, 2))):
            if blocks is not None:
                first += [dataclasses.replace(blocks, stages=s) for s in stages if s != blocks.stages]
        # and the whole group as one register tile of up to 8192 elements, 16 of each input per thread, padded and
        # split: one read of x where the chunks read it twice (C768 16x16, 24 x 256, the worst forward-with-tangent
        # of the seventh lease at 39% of copy; the fourth lease timed 8192-element single tiles slower only at C256
        # 32x32, 8 x 1024)
        if total <= 8192:
            whole = gn.GNBlocks(block_c, hw2, True, min(16, max(1, total // (32 * 16))))
            first += [whole] + ([split] if (split := gn.split_tile(whole, cpg)) is not None else [])
    # small single tiles: 2-8 (sample, group) slabs per program, up to 8192 elements, on the launcher's warps times
    # the slabs (its elements per thread) or half that (no GPU has timed them yet; the launcher picks none)
    tile = default.block_c * default.block_hw
    if default.single_tile and tile <= 2048:
        for groups in (2, 4, 8):
            for warps in sorted({default.num_warps * groups, max(1, default.num_warps * groups // 2)}):
                if tile * groups <= 8192 and warps <= 16 and tile * groups // (32 * warps) >= vector:
                    first.append(gn.group_tile(default, groups, num_warps=warps))
    first = list(dict.fromkeys(first))
    return first, [blocks for blocks in dict.fromkeys(out) if blocks not in first]


def param_candidates(batch: int) -> list:
    """Tiles of the GroupNorm backward's batch sums: the rule before 2026-11-27 (32 channels, 32 samples a step, 4
    warps: the ~10 us of lease 5's Nsight Compute pages), and one step over the whole batch (up to 256 samples) at
    4-32 channels a program with one to four 16-byte vectors of each partial per thread."""
    from imf_kernels.triton import group_norm as gn

    rows = min(gn.PARAM_MAX_ROWS, triton.next_power_of_2(batch))
    candidates = [gn.pick_param_blocks(batch), gn.ParamBlocks(32, 32, 4, batch <= 32)]
    for block_c in (4, 8, 16, 32):
        for per_thread in (4, 8, 16):
            warps = rows * block_c // (32 * per_thread)
            if 1 <= warps <= 16:
                candidates.append(gn.ParamBlocks(rows, block_c, warps, batch <= rows))
    return list(dict.fromkeys(candidates))


def param_label(blocks) -> str:
    return f"sums b{blocks.block_b} c{blocks.block_c} w{blocks.num_warps}{'' if blocks.one_step else ' loop'}"


def gn_label(blocks) -> str:
    rows = f"c{blocks.block_c}" + (f"+{blocks.block_c2}" if blocks.block_c2 else "")
    slabs = f" x{blocks.groups}" if blocks.groups > 1 else ""
    layout = "single" if blocks.single_tile else f"chunk s{blocks.stages}"
    return f"{rows}{slabs} hw{blocks.block_hw} {layout} w{blocks.num_warps}"


def attention_label(cfg) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{' single' if cfg.single_tile else ''}"


def gn_passes(module, device, dtype, batch: int, channels: int, res: int, groups: int = 32) -> dict:
    """{pass: (floor bytes, the call)} of one GroupNorm shape for a backend's family module (every option on)."""
    b, g = batch, groups
    x, dx, grad_y = (torch.randn(b, channels, res, res, device=device, dtype=dtype) for _ in range(3))
    weight = 1 + 0.1 * torch.randn(channels, device=device, dtype=dtype)
    bias = 0.1 * torch.randn(channels, device=device, dtype=dtype)
    scale, shift, dscale, dshift = (0.1 * torch.randn(b, channels, device=device, dtype=dtype) for _ in range(4))
    n, e = x.numel(), x.element_size()
    _, mean, rstd = module.gn_act_fwd(x, g, weight, bias, scale, shift, 1e-5, "silu")
    return {
        "fwd": (2 * n * e, partial(module.gn_act_fwd, x, g, weight, bias, scale, shift, 1e-5, "silu")),
        "jvp": (
            4 * n * e,
            partial(module.gn_act_jvp_fwd, x, dx, g, weight, bias, scale, shift, dscale, dshift, 1e-5, "silu"),
        ),
        "bwd": (3 * n * e, partial(module.gn_act_bwd, grad_y, x, g, weight, bias, scale, shift, mean, rstd, "silu")),
    }


GN_PASSES = ("fwd", "jvp", "bwd")
ATTN_PASSES = ("fwd", "jvp")


def only(passes: dict, names: tuple[str, ...]) -> dict:
    """The passes (name -> (bytes, fn)) among `names` (--passes), in their own order."""
    return {name: value for name, value in passes.items() if name in names}


def gn_shape(text: str) -> tuple[int, int]:
    """'CxRES' (e.g. 768x16: C768 at 16x16, 32 groups) for --gn-shapes."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not CxRES (channels x height = width, e.g. 768x16)")
    channels, res = map(int, parts)
    if channels < 32 or channels % 32 or res < 1:
        raise argparse.ArgumentTypeError(f"'{text}': channels must be a positive multiple of 32 (32 groups), res >= 1")
    return channels, res


def sweep_group_norm(sweep: Sweep, dtype, batch=256, shapes=GN_SHAPES, passes_=GN_PASSES):
    """Two rounds over the shapes: first the launcher's pick and its variants (and the batch sums' rule beside the
    tile it replaced), then every other candidate, so that a sweep cut at a lease's deadline has the comparisons
    that decide the rules on every shape asked for."""
    from imf_kernels.triton import group_norm as gn

    for first_round in (True, False):
        for channels, res in shapes:
            cpg, hw = channels // 32, res * res
            candidates = gn_candidate_groups(cpg, hw, dtype)[0 if first_round else 1]
            sums = param_candidates(batch)
            sums = sums[:2] if first_round else sums[2:]
            passes = only(gn_passes(gn, sweep.device, dtype, batch, channels, res), passes_)
            shape = f"B{batch} C{channels} {res}x{res} G32"
            for pass_name, (nbytes, fn) in passes.items():
                sweep.time_configs(
                    gn, "pick_blocks", candidates, gn.pick_blocks(cpg, hw, dtype), fn, nbytes, gn_label,
                    family="group_norm", shape=shape, pass_=pass_name,
                )  # fmt: skip
            if "bwd" in passes:  # the backward again, under each tile of its second launch (the batch sums)
                nbytes, fn = passes["bwd"]
                sweep.time_configs(
                    gn, "pick_param_blocks", sums, gn.pick_param_blocks(batch), fn, nbytes, param_label,
                    family="group_norm_param_sums", shape=shape, pass_="bwd",
                )  # fmt: skip
            del passes
            if sweep.device.type == "cuda":
                torch.cuda.empty_cache()


def sweep_cuda_group_norm(sweep: Sweep, dtype, batch=256, shapes=GN_SHAPES, passes_=GN_PASSES):
    """The cuda backend's GroupNorm kernel kinds side by side: "auto" (its launch rule) against "looped" (the kernels
    lease d timed), "resident" (a block per group) and "warp" (a warp per group; new since lease d, both); a kind
    that cannot take a shape is a row with its reason."""
    from imf_kernels.cuda import group_norm as cuda_gn

    for channels, res in shapes:
        passes = only(gn_passes(cuda_gn, sweep.device, dtype, batch, channels, res), passes_)
        for pass_name, (nbytes, fn) in passes.items():
            sweep.time_configs(
                cuda_gn, "pick_kernel", list(cuda_gn.KERNELS), "auto", fn, nbytes, str,
                family="cuda_group_norm", shape=f"B{batch} C{channels} {res}x{res} G32", pass_=pass_name,
            )  # fmt: skip
        del passes
        if sweep.device.type == "cuda":
            torch.cuda.empty_cache()


def sweep_attention(sweep: Sweep, dtype, shapes=ATTN_SHAPES, passes_=ATTN_PASSES):
    from imf_kernels.triton import attention as attn

    device = sweep.device
    for b, h, lq, lk, d in shapes:
        q, dq = (torch.randn(b, h, lq, d, device=device, dtype=dtype) for _ in range(2))
        k, v, dk, dv = (torch.randn(b, h, lk, d, device=device, dtype=dtype) for _ in range(4))
        scale = d**-0.5
        e = q.element_size()
        qn, kn = q.numel(), k.numel()
        passes = {
            "fwd": ((2 * qn + 2 * kn) * e, partial(attn.attention_fwd, q, k, v, scale)),
            "jvp": ((4 * qn + 4 * kn) * e, partial(attn.attention_jvp_fwd, q, k, v, dq, dk, dv, scale)),
        }
        padded = attn.padded_length(lk, dtype)
        candidates = [
            attn.BlockConfig(bm, padded, warps, 1, single_tile=True)
            for bm in (32, 64, 128)
            for warps in (2, 4, 8)
            if padded <= attn.SHORT_CONTEXT_MAX
        ]
        candidates += [attn.BlockConfig(bm, bn, warps, stages) for bm, bn, warps, stages in (
            (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3))
            if bn <= padded]  # fmt: skip
        passes = only(passes, passes_)
        for pass_name, (nbytes, fn) in passes.items():
            default = attn.pick_config(pass_name, lq, lk, d, dtype)
            sweep.time_configs(
                attn, "pick_config", candidates, default, fn, nbytes, attention_label,
                family="attention", shape=f"B{b} H{h} Lq{lq} Lk{lk} D{d}", pass_=pass_name,
            )  # fmt: skip
        del q, dq, k, v, dk, dv
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --dtype's choices
TUNE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON rows (default: print only)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds of timed calls per config")
    parser.add_argument(
        "--families",
        nargs="+",
        default=["group_norm", "attention"],
        choices=["group_norm", "attention", "cuda_group_norm"],
        help="Triton launch sweeps (group_norm, attention) and the cuda GroupNorm kernel kinds (cuda_group_norm: "
        "needs imf_kernels._C; not with --smoke)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="stop starting new configs after this long (device leases)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, fp32, tiny shapes: checks the script runs"
    )
    parser.add_argument(
        "--gn-shapes",
        nargs="+",
        type=gn_shape,
        default=None,
        metavar="CxRES",
        help="GroupNorm shapes to sweep, e.g. 768x16 256x8 (batch 256, 32 groups; default: every latent-b layer)",
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=GN_PASSES,
        default=list(GN_PASSES),
        help="passes to sweep (attention has fwd and jvp; default: all)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(TUNE_DTYPES),
        default="bfloat16",
        help="the inputs' dtype on a GPU (default bfloat16, the kernel benchmark's; float32: the training step's "
        "graded forward-with-tangent and backward, which run in float32 also with --bf16 targets); --smoke: float32",
    )
    args = parser.parse_args()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        gn_kwargs, attn_kwargs = dict(batch=1, shapes=((256, 16),)), dict(shapes=((1, 1, 40, 24, 32),))
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), TUNE_DTYPES[args.dtype]
        gn_kwargs, attn_kwargs = {}, {}
    else:
        print("tune_gpu.py: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 1
    if args.gn_shapes:
        gn_kwargs["shapes"] = tuple(args.gn_shapes)
    gn_kwargs["passes_"] = attn_kwargs["passes_"] = tuple(args.passes)
    torch.manual_seed(0)
    copy_gbps, _ = copy_bandwidth(device)
    print(f"{device_name(device)}: device-to-device copy {copy_gbps:.1f} GB/s", flush=True)
    started = time.perf_counter()
    deadline = None if args.max_seconds is None else started + args.max_seconds
    sweep = Sweep(device, args.budget, copy_gbps, deadline)
    if "group_norm" in args.families:
        sweep_group_norm(sweep, dtype, **gn_kwargs)
    if "attention" in args.families:
        sweep_attention(sweep, dtype, **attn_kwargs)
    if "cuda_group_norm" in args.families:
        sweep_cuda_group_norm(sweep, dtype, **gn_kwargs)
    rows = sweep.rows
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["shape"], row["pass_"]), []).append(row)
    for (family, shape, pass_name), group in groups.items():
        print(f"\n{family} {pass_name} {shape}")
        for row in sorted(group, key=lambda r: float("inf") if r["ms"] is None else r["ms"]):
            mark = "*" if row["default"] else " "
            if row["ms"] is None:
                print(f"  {mark} {row['config']:32s} failed: {row['note']}")
            else:
                print(
                    f"  {mark} {row['config']:32s} {row['ms'] * 1e3:8.1f} us {row['gbps']:7.0f} GB/s "
                    f"{row['copy_fraction']:5.0%} of copy"
                )
    print(f"\nsweep took {time.perf_counter() - started:.0f} s")
    if args.out:
        dtype_name = str(dtype).removeprefix("torch.")
        Path(args.out).write_text(
            json.dumps({"device": device_name(device), "dtype": dtype_name, "copy_gbps": copy_gbps, "rows": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
