"""Fused iMF and MeanFlow losses in Triton (DESIGN 2.2, 2.3, 4.3), forward and backward.

iMF: e_u = u + (t - r) du - v_target, e_v = v - v_target, L_u = sum e_u^2, L_v = sum e_v^2, w = 1 / (L + c)^p,
totals = [mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v]. MF: e_u = u - (v_target - clip(t - r, 0, 1) du),
L = sum e_u^2, totals = [mean_b(w L), mean_b L]. Backward: grad_u = grad_total 2 w_u e_u / B (and grad_v).
Memory floor: forward reads u, du, (v,) v_target once and writes O(B) (here also <= 16 fp32 partial sums per
sample and loss, written and read back once); backward also writes grad_u (, grad_v).

Forward, two launches: a (sample, chunk) grid where each program reduces one chunk of a sample to fp32 partial
sums, then one "finish" program that walks the batch in blocks (fixed order, no atomics), sums each sample's
partials and writes L, w and the batch totals, so the public op needs no further kernel. Backward is
elementwise: one program per (sample, block).
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from imf_kernels.triton._aot import compile_spec
from imf_kernels.triton._launch import cdiv, launch_kernel

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
# AOT specs: fp16 picks the same blocks as bf16 and differs only in its conversions, so bf16 stands for both.
_AOT_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# Launch rules (not yet tuned on a GPU; tests/test_triton_aot.py checks that they compile for sm_90 without
# spills). A program's tile is BLOCK <= 1024 elements of each input, one 16-byte vector per thread (4 fp32 or
# 8 fp16/bf16 elements): 8 warps for fp32, 4 for bf16. At latent-b (B256 x 4x32x32) the forward's first launch
# and the backward each run 256 samples x 4 chunks = 1024 programs, ~8 per SM on an H100/H200 (132 SMs), all
# resident in one wave: ~60 KB (bf16) of loads in flight per SM, where HBM needs ~25 KB (4.8 TB/s x ~700 ns
# of latency over 132 SMs).
_MAX_BLOCK = 1024
# Longer samples get chunks of several tiles (a loop), so a sample never has more than 16 partial sums: the
# single finish program reads 8 bytes per partial, which stays small next to the inputs it summarises.
_MAX_CHUNKS = 16
# The finish program takes up to 256 samples per iteration (the latent-b batch in one) with all their partials
# as one [samples, chunks] tile of up to 4096 fp32, 2 per thread up to 8 warps: its float64 weights take registers,
# and at 4 per thread (2 warps for 64 samples) Triton 3.6, the GPU image's, spilled one register to the stack.
_MAX_FINISH_SAMPLES = 256
_MAX_WARPS = 8


def check_gpu_rules(block: int, num_warps: int, block_name: str = "BLOCK") -> None:
    """Rules the interpreter does not enforce but a GPU compiler does: tl.arange needs power-of-2 sizes."""
    for name, value in ((block_name, block), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise AssertionError(f"loss triton: {name}={value} must be a power of two")


def _warps_for(elements: int, elements_per_thread: int) -> int:
    return min(_MAX_WARPS, max(1, elements // (32 * elements_per_thread)))


@functools.lru_cache(maxsize=256)  # (triton's cdiv and next_power_of_2 cost ~2 us each from Python)
def pick_block(numel_per_sample: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of one program's tile, for the backward and the forward's first launch."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(numel_per_sample))
    num_warps = _warps_for(block, 16 // dtype.itemsize)
    check_gpu_rules(block, num_warps)
    return block, num_warps


@dataclass(frozen=True)
class ForwardLaunch:
    """Launch configuration of the forward's two kernels."""

    chunk: int  # elements of one sample reduced by one program of the first launch: a multiple of block
    block: int  # elements of each input per loop iteration
    num_warps: int
    num_chunks: int  # programs per sample = partial sums per sample
    finish_block_b: int  # samples per iteration of the finish program
    finish_block_c: int  # partials per sample, padded to a power of two
    finish_num_warps: int
    # the chunk loop's software-pipeline stages (Triton's tl.range num_stages): 3 where a chunk is several blocks,
    # so the next blocks' loads are in flight while one is summed (in a plain loop ptxas waited for a block's
    # loads before the next block's: sm_90 SASS, samples above 16384 elements); 1 for one block a chunk (latent-b)
    stages: int = 1


@functools.lru_cache(maxsize=256)
def pick_forward(batch: int, numel_per_sample: int, dtype: torch.dtype) -> ForwardLaunch:
    """The forward's launch configuration from the batch, the per-sample size and the dtype (rules above)."""
    block, num_warps = pick_block(numel_per_sample, dtype)
    chunk = block * triton.next_power_of_2(triton.cdiv(numel_per_sample, block * _MAX_CHUNKS))
    num_chunks = triton.cdiv(numel_per_sample, chunk)
    finish_block_b = min(_MAX_FINISH_SAMPLES, triton.next_power_of_2(batch))
    finish_block_c = triton.next_power_of_2(num_chunks)
    finish_num_warps = _warps_for(finish_block_b * finish_block_c, 2)
    check_gpu_rules(chunk, num_warps, "CHUNK")
    check_gpu_rules(finish_block_b, finish_num_warps, "BLOCK_B")
    check_gpu_rules(finish_block_c, finish_num_warps, "BLOCK_C")
    stages = 3 if chunk > block else 1
    return ForwardLaunch(chunk, block, num_warps, num_chunks, finish_block_b, finish_block_c, finish_num_warps, stages)


@triton.jit
def _time_gap(t_ptr, r_ptr, sample, CLIP_GAP: tl.constexpr):
    gap = tl.load(t_ptr + sample) - tl.load(r_ptr + sample)
    if CLIP_GAP:
        gap = tl.minimum(tl.maximum(gap, 0.0), 1.0)
    return gap


@triton.jit
def _loss_weight(loss, c, p):
    # w = 1 / (L + c)^p = exp(-p log(L + c)) of a float64 L, in float64, so the GPU's approximate fp32 exp/log
    # (~1e-6 relative here) do not reach the weight.
    return tl.exp(-tl.cast(p, tl.float64) * tl.log(loss + tl.cast(c, tl.float64)))


@triton.jit
def _loss_partial_kernel(
    u_ptr,
    du_ptr,
    v_ptr,
    v_target_ptr,
    t_ptr,
    r_ptr,
    partials_u_ptr,
    partials_v_ptr,
    numel_per_sample,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    WITH_V: tl.constexpr,
    CLIP_GAP: tl.constexpr,
    STAGES: tl.constexpr,
):
    # partials[sample, chunk] = sum of e^2 over elements [chunk CHUNK, (chunk + 1) CHUNK) of the sample.
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    base = sample.to(tl.int64) * numel_per_sample
    u_ptr += base
    du_ptr += base
    v_ptr += base
    v_target_ptr += base
    gap = _time_gap(t_ptr, r_ptr, sample, CLIP_GAP)
    acc_u = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for offset in tl.range(0, CHUNK, BLOCK, num_stages=STAGES):
        offs = chunk * CHUNK + offset + tl.arange(0, BLOCK)
        mask = offs < numel_per_sample
        v_target = tl.load(v_target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        err_u = u + gap * du - v_target
        acc_u += err_u * err_u
        if WITH_V:
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            err_v = v - v_target
            acc_v += err_v * err_v
    partial = sample * tl.num_programs(1) + chunk
    tl.store(partials_u_ptr + partial, tl.sum(acc_u, axis=0))
    if WITH_V:
        tl.store(partials_v_ptr + partial, tl.sum(acc_v, axis=0))


@triton.jit
def _finish_one_loss(partials, loss_ptr, w_ptr, samples, in_batch, c, p):
    """L = sum of a sample's partials (a loaded [samples, chunks] tile) and w = 1 / (L + c)^p for a block of
    samples, stored in float32; returns (L, w L) in float64, 0 outside the batch, for the batch totals."""
    loss = tl.sum(partials.to(tl.float64), axis=1)
    weight = _loss_weight(loss, c, p)
    tl.store(loss_ptr + samples, loss.to(tl.float32), mask=in_batch)
    tl.store(w_ptr + samples, weight.to(tl.float32), mask=in_batch)
    # outside the batch L = 0, and w L would be 0 inf = NaN when c = 0
    return loss, tl.where(in_batch, weight * loss, 0.0)


@triton.jit
def _loss_finish_kernel(
    partials_u_ptr,
    partials_v_ptr,
    loss_u_ptr,
    loss_v_ptr,
    w_u_ptr,
    w_v_ptr,
    totals_ptr,
    batch,
    num_chunks,
    c,
    p,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WITH_V: tl.constexpr,
):
    # One program, blocks of samples in order, float64 sums: the totals are reproducible run to run.
    # totals = [mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v]
    chunks = tl.arange(0, BLOCK_C)
    weighted_sum = tl.zeros([BLOCK_B], tl.float64)
    loss_u_sum = tl.zeros([BLOCK_B], tl.float64)
    loss_v_sum = tl.zeros([BLOCK_B], tl.float64)
    for start in range(0, batch, BLOCK_B):
        samples = start + tl.arange(0, BLOCK_B)
        in_batch = samples < batch
        tile = samples[:, None] * num_chunks + chunks[None, :]
        tile_mask = in_batch[:, None] & (chunks[None, :] < num_chunks)
        # both losses' partials are loaded before either is summed: the sums' barriers would otherwise hold the
        # second load back a whole memory latency (sm_90 SASS: the v partials were loaded after the u loss's
        # reductions)
        partials_u = tl.load(partials_u_ptr + tile, mask=tile_mask, other=0.0)
        partials_v = partials_u
        if WITH_V:
            partials_v = tl.load(partials_v_ptr + tile, mask=tile_mask, other=0.0)
        loss_u, weighted_u = _finish_one_loss(partials_u, loss_u_ptr, w_u_ptr, samples, in_batch, c, p)
        loss_u_sum += loss_u
        weighted_sum += weighted_u
        if WITH_V:
            loss_v, weighted_v = _finish_one_loss(partials_v, loss_v_ptr, w_v_ptr, samples, in_batch, c, p)
            loss_v_sum += loss_v
            weighted_sum += weighted_v
    tl.store(totals_ptr, (tl.sum(weighted_sum, axis=0) / batch).to(tl.float32))
    tl.store(totals_ptr + 1, (tl.sum(loss_u_sum, axis=0) / batch).to(tl.float32))
    if WITH_V:
        tl.store(totals_ptr + 2, (tl.sum(loss_v_sum, axis=0) / batch).to(tl.float32))


@triton.jit
def _loss_bwd_kernel(
    grad_total_ptr,
    u_ptr,
    du_ptr,
    v_ptr,
    v_target_ptr,
    t_ptr,
    r_ptr,
    w_u_ptr,
    w_v_ptr,
    grad_u_ptr,
    grad_v_ptr,
    numel_per_sample,
    batch,
    BLOCK: tl.constexpr,
    WITH_V: tl.constexpr,
    CLIP_GAP: tl.constexpr,
):
    # total = mean_b(w_u L_u + w_v L_v) with w constant: d total / d u = 2 w_u e_u / B.
    sample = tl.program_id(0)
    base = sample.to(tl.int64) * numel_per_sample
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_per_sample
    gap = _time_gap(t_ptr, r_ptr, sample, CLIP_GAP)
    coefficient = tl.load(grad_total_ptr) * 2.0 / batch
    v_target = tl.load(v_target_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    du = tl.load(du_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    grad_u = coefficient * tl.load(w_u_ptr + sample) * (u + gap * du - v_target)
    tl.store(grad_u_ptr + base + offs, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask)
    if WITH_V:
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        grad_v = coefficient * tl.load(w_v_ptr + sample) * (v - v_target)
        tl.store(grad_v_ptr + base + offs, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(op: str, args: dict) -> list[str]:
    """Why the Triton loss launchers cannot take this call (empty list: they can)."""
    u = args["u"]
    if u.device.type == "cuda":
        if u.dtype not in _GPU_DTYPES:
            return [f"{op}: dtype {u.dtype} not supported by triton (float32, float16, bfloat16)"]
    elif u.device.type == "cpu" and _interpreter_on():
        if u.dtype not in _INTERPRETER_DTYPES:
            return [f"{op}: dtype {u.dtype} not supported by the triton interpreter (float32, float16)"]
    else:
        return [f"{op}: device {u.device.type} needs CUDA (or CPU with TRITON_INTERPRET=1) for triton"]
    return []


def _forward(u, du, v, v_target, t, r, c, p, with_v: bool, clip_gap: bool):
    """(loss_u, loss_v, w_u, w_v, totals); without v, loss_v and w_v are loss_u and w_u and totals has 2 entries."""
    batch = u.shape[0]
    numel_per_sample = u.numel() // batch
    launch = pick_forward(batch, numel_per_sample, u.dtype)
    num_losses = 2 if with_v else 1
    partials = torch.empty((num_losses, batch, launch.num_chunks), device=u.device, dtype=torch.float32)
    # One allocation for every output: rows loss_u, w_u (, loss_v, w_v), then the totals.
    outputs = torch.empty(2 * num_losses * batch + num_losses + 1, device=u.device, dtype=torch.float32)
    per_sample = outputs[: 2 * num_losses * batch].view(2 * num_losses, batch)
    totals = outputs[2 * num_losses * batch :]
    loss_u, w_u = per_sample[0], per_sample[1]
    loss_v, w_v = (per_sample[2], per_sample[3]) if with_v else (loss_u, w_u)
    partials_u, partials_v = partials[0], partials[-1]  # without v: one plane, partials_v is never used
    launch_kernel(
        _loss_partial_kernel,
        (batch, launch.num_chunks),
        u,
        du,
        v if with_v else u,  # never read without WITH_V
        v_target,
        t,
        r,
        partials_u,
        partials_v,
        numel_per_sample,
        CHUNK=launch.chunk,
        BLOCK=launch.block,
        WITH_V=with_v,
        CLIP_GAP=clip_gap,
        STAGES=launch.stages,
        num_warps=launch.num_warps,
    )
    launch_kernel(
        _loss_finish_kernel,
        (1,),
        partials_u,
        partials_v,
        loss_u,
        loss_v,
        w_u,
        w_v,
        totals,
        batch,
        launch.num_chunks,
        c,
        p,
        BLOCK_B=launch.finish_block_b,
        BLOCK_C=launch.finish_block_c,
        WITH_V=with_v,
        num_warps=launch.finish_num_warps,
    )
    return loss_u, loss_v, w_u, w_v, totals


def _backward(grad_total, u, du, v, v_target, t, r, w_u, w_v, with_v: bool, clip_gap: bool):
    batch = u.shape[0]
    numel_per_sample = u.numel() // batch
    block, num_warps = pick_block(numel_per_sample, u.dtype)
    grad_u = torch.empty_like(u)
    grad_v = torch.empty_like(v) if with_v else grad_u
    launch_kernel(
        _loss_bwd_kernel,
        (batch, cdiv(numel_per_sample, block)),
        grad_total,
        u,
        du,
        v if with_v else u,
        v_target,
        t,
        r,
        w_u,
        w_v if with_v else w_u,
        grad_u,
        grad_v,
        numel_per_sample,
        batch,
        BLOCK=block,
        WITH_V=with_v,
        CLIP_GAP=clip_gap,
        num_warps=num_warps,
    )
    return grad_u, grad_v


def imf_loss_fwd(
    u: torch.Tensor,
    du: torch.Tensor,
    v: torch.Tensor,
    v_target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    c: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_u, loss_v, w_u, w_v, totals), each (B,) float32 but totals (3,) float32
    [mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v]: L_u = sum((u + (t - r) du - v_target)^2),
    L_v = sum((v - v_target)^2), w = 1 / (L + c)^p."""
    return _forward(u, du, v, v_target, t, r, c, p, with_v=True, clip_gap=False)


def imf_loss_bwd(
    grad_total: torch.Tensor,
    u: torch.Tensor,
    du: torch.Tensor,
    v: torch.Tensor,
    v_target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    w_u: torch.Tensor,
    w_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_u, grad_v) of total = mean_b(w_u L_u + w_v L_v), weights held constant."""
    return _backward(grad_total, u, du, v, v_target, t, r, w_u, w_v, with_v=True, clip_gap=False)


def meanflow_loss_fwd(
    u: torch.Tensor,
    du: torch.Tensor,
    v_target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    c: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, w, totals), each (B,) float32 but totals (2,) float32 [mean_b(w loss), mean_b loss]:
    loss = sum((u - (v_target - clip(t - r, 0, 1) du))^2)."""
    loss, _, w, _, totals = _forward(u, du, None, v_target, t, r, c, p, with_v=False, clip_gap=True)
    return loss, w, totals


def meanflow_loss_bwd(
    grad_total: torch.Tensor,
    u: torch.Tensor,
    du: torch.Tensor,
    v_target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """grad_u of total = mean_b(w loss), w held constant."""
    grad_u, _ = _backward(grad_total, u, du, None, v_target, t, r, w, None, with_v=False, clip_gap=True)
    return grad_u


# Per-tensor shapes of the losses of the `latent-b` (4x32x32) and `cifar` (3x32x32) presets, at the training
# batches and at the benchmark's batch 256 (the finish program's block follows the batch), and bench/ops.py's big
# loss (16x64x64: chunks of 4 blocks, the pipelined loop).
AOT_SHAPES = (
    *((batch, *sample) for sample in ((4, 32, 32), (3, 32, 32)) for batch in (8, 64, 256)),
    (256, 16, 64, 64),
)
_LOSSES = (("imf", True, False), ("meanflow", False, True))  # (name, WITH_V, CLIP_GAP)


def aot_specs(shapes=AOT_SHAPES) -> list[dict]:
    """Ahead-of-time compile specs for every launch configuration the launchers pick for `shapes`.

    `shapes`: iterable of per-tensor shapes (B, ...). One spec per (kernel, loss, dtype, constexprs, num_warps,
    integer alignment); the finish kernel reads only fp32 partials, so it has no dtype. Integer arguments the
    JIT would specialise as multiples of 16 are listed in `divisible_by_16` (see group_norm.aot_specs).
    """
    scalars = {"numel_per_sample": "i32", "batch": "i32", "num_chunks": "i32", "c": "fp32", "p": "fp32"}
    specs = {}
    for batch, *sample in shapes:
        numel_per_sample = 1
        for size in sample:
            numel_per_sample *= size
        aligned_numel = ["numel_per_sample"] if numel_per_sample % 16 == 0 else []
        for dtype, type_name in _AOT_DTYPE_NAMES.items():
            launch = pick_forward(batch, numel_per_sample, dtype)
            block, num_warps = pick_block(numel_per_sample, dtype)
            inputs = ("u_ptr", "du_ptr", "v_ptr", "v_target_ptr", "grad_u_ptr", "grad_v_ptr")
            runtime_types = {**scalars, **{arg: f"*{type_name}" for arg in inputs}}
            integers = (("batch", batch), ("num_chunks", launch.num_chunks))
            aligned_finish = [arg for arg, value in integers if value % 16 == 0]
            for loss_name, with_v, clip_gap in _LOSSES:
                flags = {"WITH_V": with_v, "CLIP_GAP": clip_gap}
                configs = (
                    (
                        f"{loss_name}_loss_fwd_{type_name}_chunk{launch.chunk}_block{launch.block}",
                        _loss_partial_kernel,
                        {"CHUNK": launch.chunk, "BLOCK": launch.block, **flags, "STAGES": launch.stages},
                        runtime_types,
                        launch.num_warps,
                        aligned_numel,
                    ),
                    (
                        f"{loss_name}_loss_finish_b{launch.finish_block_b}_c{launch.finish_block_c}",
                        _loss_finish_kernel,
                        {"BLOCK_B": launch.finish_block_b, "BLOCK_C": launch.finish_block_c, "WITH_V": with_v},
                        scalars,
                        launch.finish_num_warps,
                        aligned_finish,
                    ),
                    (
                        f"{loss_name}_loss_bwd_{type_name}_block{block}",
                        _loss_bwd_kernel,
                        {"BLOCK": block, **flags},
                        runtime_types,
                        num_warps,
                        aligned_numel,
                    ),
                )
                for name, fn, constexprs, types, warps, aligned_ints in configs:
                    key = (name, warps, tuple(aligned_ints))
                    if key not in specs:
                        specs[key] = compile_spec(name, fn, constexprs, types, warps, aligned_ints)
    return list(specs.values())
