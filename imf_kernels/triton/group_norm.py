"""GroupNorm + modulation + SiLU in Triton (DESIGN 4.3): primal, forward-with-tangent and backward.

y = act(h), h = xh alpha + beta, xh = (x - mean_g) rstd_g, alpha = w (1 + s), beta = b (1 + s) + shift;
tangent dh = dxh alpha + xh (w ds) + (b ds + dshift), dxh = rstd (dx - mean_g(dx) - xh mean_g(xh dx)).
Memory floor: read x (and dx, or grad_y) once, write y (and dy, or grad_x) once, plus O(B C) per channel.

One program per (sample, group): the group is the contiguous slab x[b, g*C/G:(g+1)*C/G] seen as a
[channels, H*W] tile (or two stacked tiles, GNBlocks.block_c2, when C/G is a sum of two powers of two: no padded
rows). When it fits in registers it is loaded once (exact two-pass statistics in registers); otherwise a loop over
H*W chunks merges per-chunk two-pass statistics (Chan's formula), a second loop writes. Small single tiles may go
several to a program (GNBlocks.groups: consecutive slabs as one [groups, channels, H*W] tile, statistics per slab).
The launcher picks a split single tile for half-precision groups that fit one only unpadded (_MAX_SPLIT_TILE);
other split tiles and grouped tiles are candidates of bench/tune_gpu.py, not picked by the launcher.
"""

import dataclasses
import itertools
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
# One group of C/G channels is one program; its channel column must fit one tile (see pick_blocks).
MAX_CHANNELS_PER_GROUP = 1024

# Launch rules from bench/tune_gpu.py on an H200 (bf16, latent-b shapes, batch 256; 2026-11-26): a group of up to
# 4096 (padded) elements is one register tile, 32 bf16 elements of each input per thread (C512 16x16 forward 74% of
# copy bandwidth on 4 warps against 67% on 8). Larger groups loop over chunks: reading x twice from L2 beat one
# 8192-element register tile (C256 32x32 tangent pass 213 us against 314 us, backward 195 us against 244 us).
# Chunks are 2048 elements (16 per thread) for channel columns of up to 16, else 4096 on 16 warps (C768 32x32
# backward 584 us against 670 us; 8 warps spill in the tangent pass). fp32 keeps 8 elements per thread (not
# measured on a GPU; `tests/test_triton_aot.py` checks that nothing spills).
_MAX_SINGLE_TILE = 4096
# In half precision a group whose padded column does not fit one tile but whose channels are a sum of two powers of
# two (GNBlocks.block_c2) is one split register tile of up to 6144 elements, 24 per thread: C768 16x16 (24 = 16 + 8
# channels, 256 positions; the eighth H200 lease, 2026-11-27, bench/tune_gpu.py, bf16 batch 256) took 167 us in
# the tangent pass against 222 us chunked (c32 hw128 on 16 warps), and 120 us against 183 us in the backward;
# 16 warps 172 / 147 us, 4 warps 203 / 154 us.
_MAX_SPLIT_TILE = 6144
_CHUNK_TILE = 2048
_MIN_WARPS = 2
_MAX_WARPS = 16


@dataclass(frozen=True)
class GNBlocks:
    """Launch configuration of one GroupNorm pass."""

    block_c: int  # channels of one group, padded to a power of two (or the first block_c of them, see block_c2)
    block_hw: int  # spatial positions per tile (all of H*W when single_tile)
    single_tile: bool  # the whole group is one register tile: one read of each input
    num_warps: int
    # > 0: the group's channels are two tiles, block_c rows and block_c2 rows (48 = 32 + 16 instead of 64 with 16
    # masked: no padding for channel counts that are a sum of two powers of two)
    block_c2: int = 0
    # > 1 (single tiles only): each program takes this many consecutive (sample, group) slabs as one
    # [groups, block_c, block_hw] tile, so that small groups share a program's fixed costs (reduction barriers,
    # per-channel stores)
    groups: int = 1
    # chunked tiles only: the loops over chunks are software-pipelined with this many stages (Triton's tl.range
    # num_stages; 3: the next two chunks' loads are in flight, as asynchronous copies to shared memory, while a
    # chunk is reduced or written; 2: a chunk's x and dx are loaded together, after the previous chunk's work).
    # 1: plain loops, where ptxas waited for each chunk's x before issuing its dx (sm_90 SASS, Triton 3.6 and 3.8),
    # so a chunk cost two memory latencies plus its reductions' barriers.
    stages: int = 1


# tangents on the first m <= B samples (`imf_kernels.interface`): one launch on single tiles (PARTIAL_TANGENT), two
# into one output on chunked ones (`_forward`)
TANGENT_ROWS = True
# channels-last maps as they are (`imf_kernels.interface`): the kernels' CHANNELS_LAST variant addresses them
CHANNELS_LAST = True


def check_gpu_rules(blocks: GNBlocks) -> None:
    """Rules the interpreter does not enforce but a GPU compiler does: tl.arange needs power-of-2 sizes."""
    for name in ("block_c", "block_hw", "num_warps"):
        value = getattr(blocks, name)
        if value < 1 or value & (value - 1):
            raise AssertionError(f"group_norm triton: {name}={value} must be a power of two")
    if blocks.block_c2 < 0 or blocks.block_c2 & (blocks.block_c2 - 1):
        raise AssertionError(f"group_norm triton: block_c2={blocks.block_c2} must be a power of two (or 0: one tile)")
    if blocks.groups < 1 or blocks.groups & (blocks.groups - 1):
        raise AssertionError(f"group_norm triton: groups={blocks.groups} must be a power of two")
    if blocks.groups > 1 and (not blocks.single_tile or blocks.block_c2):
        raise AssertionError(f"group_norm triton: groups={blocks.groups} > 1 needs a single tile without a split")


def split_channels(channels_per_group: int) -> tuple[int, int] | None:
    """(2^a, 2^b), a > b, when channels_per_group = 2^a + 2^b (24 = 16 + 8, 40 = 32 + 8, 48 = 32 + 16): the two
    row counts of a split tile (GNBlocks.block_c2) that holds the group without padding; None otherwise."""
    high = 1 << (channels_per_group.bit_length() - 1)
    low = channels_per_group - high
    if low == 0 or low & (low - 1):
        return None
    return high, low


def split_tile(blocks: GNBlocks, channels_per_group: int) -> GNBlocks | None:
    """`blocks` (a padded channel column) with its column split in two unpadded tiles, the same positions per
    tile and warps; None when channels_per_group is not a sum of two powers of two or `blocks` takes several slabs
    per program (the two do not combine). pick_blocks picks split single tiles where only the unpadded group fits
    one (_MAX_SPLIT_TILE); this is bench/tune_gpu.py's candidate for the other shapes."""
    split = split_channels(channels_per_group)
    if split is None or blocks.groups > 1:
        return None
    # (at most 2 stages: four tiles a chunk; at 3, Triton 3.6 spilled the C/G = 40 forward (32 + 8 rows) and gave
    # the C/G = 24 forward-with-tangent (16 + 8) 111 registers on 16 warps, one program per SM)
    return dataclasses.replace(blocks, block_c=split[0], block_c2=split[1], stages=min(blocks.stages, 2))


def group_tile(blocks: GNBlocks, groups: int, num_warps: int | None = None) -> GNBlocks | None:
    """`blocks` (a single tile) taking `groups` consecutive (sample, group) slabs per program as one tile, on
    `num_warps` warps (default: as many more as slabs, the same elements per thread); None for a chunked or split
    tile. Not yet picked by pick_blocks: a bench/tune_gpu.py candidate for small groups (C512 8x8: 1024 elements,
    the slowest shape of the fourth lease, 15-57% of copy) until a GPU has timed it."""
    if not blocks.single_tile or blocks.block_c2:
        return None
    warps = num_warps if num_warps is not None else min(_MAX_WARPS, blocks.num_warps * groups)
    return dataclasses.replace(blocks, groups=groups, num_warps=warps)


# pick_blocks' answers by (its arguments, the rule constants): the rule costs ~5 us of Python per launch
_picked: dict[tuple, GNBlocks] = {}


def pick_blocks(channels_per_group: int, hw: int, dtype: torch.dtype) -> GNBlocks:
    """Deterministic launch configuration of every pass (fwd, jvp, bwd) from the group shape and the dtype.

    The rules and the measurements behind them are next to _MAX_SINGLE_TILE.
    """
    key = (channels_per_group, hw, dtype, _MAX_SINGLE_TILE, _MAX_SPLIT_TILE, _CHUNK_TILE, _MIN_WARPS, _MAX_WARPS)
    blocks = _picked.get(key)
    if blocks is None:
        blocks = _picked[key] = _pick_blocks(channels_per_group, hw, dtype)
    return blocks


def chunk_stages(dtype: torch.dtype, block_c: int) -> int:
    """Pipeline stages of a chunked tile's loops (GNBlocks.stages): 3 for half-precision channel columns of up to
    16, else 1 (plain loops). Measured on an H200 (2026-11-27, bf16, batch 256, 1 stage in the sixth lease against
    3 in the seventh, the attention kernels within 2%): 3 stages gained on the narrow 2048-element chunks (C256 32x32
    tangent pass 199 -> 178 us, C512 32x32 forward 211 -> 192 us, tangent 405 -> 384 us) and lost on the wide
    4096-element chunks on 16 warps (C768 16x16 forward 118 -> 166 us, tangent 222 -> 251 us, backward 188 -> 233
    us; the cause not measured). fp32 keeps plain loops: at 3 stages Triton 3.6 spilled its 16-warp
    forward, and the GPU runs (bf16) do not use it."""
    return 3 if dtype.itemsize == 2 and block_c <= 16 else 1


def _pick_blocks(channels_per_group: int, hw: int, dtype: torch.dtype) -> GNBlocks:
    block_c = triton.next_power_of_2(channels_per_group)
    hw_pow2 = triton.next_power_of_2(hw)
    single_tile = block_c * hw_pow2 <= _MAX_SINGLE_TILE
    half = dtype.itemsize == 2
    split = split_channels(channels_per_group)
    block_c2 = 0
    if single_tile:
        block_hw = hw_pow2
        elements_per_thread = 32 if half else 8
    elif half and split is not None and channels_per_group * hw_pow2 <= _MAX_SPLIT_TILE:
        # one split register tile (_MAX_SPLIT_TILE), 24 elements per thread at 6144
        (block_c, block_c2), block_hw, single_tile = split, hw_pow2, True
        elements_per_thread = 24
    else:
        wide = block_c > 16
        block_hw = max(1, (2 * _CHUNK_TILE if wide else _CHUNK_TILE) // block_c)
        elements_per_thread = (8 if wide else 16) if half else 8
    # a power of two of warps (the split tile's rows and its 24 per thread are not powers of two)
    warps = triton.next_power_of_2(cdiv((block_c + block_c2) * block_hw, 32 * elements_per_thread))
    num_warps = min(_MAX_WARPS, max(_MIN_WARPS, warps))
    stages = 1 if single_tile else chunk_stages(dtype, block_c)
    blocks = GNBlocks(block_c, block_hw, single_tile, num_warps, block_c2=block_c2, stages=stages)
    check_gpu_rules(blocks)
    return blocks


@triton.jit
def _channel_coefficients(
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    param_offs,
    sample_channel_offs,
    c_mask,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    # Per-channel w, b, (1 + s) and h = xh * alpha + beta, alpha = w (1 + s), beta = b (1 + s) + shift; the
    # offsets' shape: [rows] or, for several slabs per program, [groups, rows].
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + param_offs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full(param_offs.shape, 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + param_offs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(param_offs.shape, tl.float32)
    if HAS_SCALE:
        one_plus_s = 1.0 + tl.load(scale_ptr + sample_channel_offs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        one_plus_s = tl.full(param_offs.shape, 1.0, tl.float32)
    alpha = w * one_plus_s
    beta = b * one_plus_s
    if HAS_SHIFT:
        beta += tl.load(shift_ptr + sample_channel_offs, mask=c_mask, other=0.0).to(tl.float32)
    return w, b, one_plus_s, alpha, beta


@triton.jit
def _write_output_tile(
    y_ptr,
    dy_ptr,
    offs,
    mask,
    xh,
    dxh,
    alpha,
    beta,
    gamma,
    delta,
    WITH_TANGENT: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    # h = xh alpha + beta, y = h sigmoid(h); dh = dxh alpha + xh gamma + delta,
    # dy = dh sigmoid(h) (1 + h (1 - sigmoid(h))).
    # (per-channel vectors gain the positions axis: [rows] -> [rows, 1], [groups, rows] -> [groups, rows, 1])
    h = xh * tl.expand_dims(alpha, -1) + tl.expand_dims(beta, -1)
    if ACT_SILU:
        sig = tl.sigmoid(h)
        y = h * sig
    else:
        y = h
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WITH_TANGENT:
        dh = dxh * tl.expand_dims(alpha, -1) + xh * tl.expand_dims(gamma, -1) + tl.expand_dims(delta, -1)
        if ACT_SILU:
            dy = dh * sig * (1.0 + h * (1.0 - sig))
        else:
            dy = dh
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(hw0, rows, hw_offs, CPG, HW, G, CHANNELS_LAST: tl.constexpr):
    # offsets and mask of the tile of the group's channels `rows` by positions hw0 + hw_offs: a channel's
    # positions are consecutive (channels-first), or a position's channels are (CHANNELS_LAST: C = CPG G apart)
    hw = hw0 + hw_offs
    mask = (rows < CPG)[:, None] & (hw < HW)[None, :]
    if CHANNELS_LAST:
        return rows[:, None] + hw[None, :] * (CPG * G), mask
    return rows[:, None] * HW + hw[None, :], mask


@triton.jit
def _forward_coefficients(
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    dscale_ptr,
    dshift_ptr,
    param_offs,
    sample_channel_offs,
    c_mask,
    WITH_TANGENT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_DSCALE: tl.constexpr,
    HAS_DSHIFT: tl.constexpr,
):
    # alpha, beta of h = xh alpha + beta and gamma = w ds, delta = b ds + dshift of its tangent
    # dh = dxh alpha + xh gamma + delta, for the channels at `param_offs` (weight, bias) and `sample_channel_offs`
    # (scale, shift and their tangents) of one (sub-)tile.
    w, b, one_plus_s, alpha, beta = _channel_coefficients(
        weight_ptr,
        bias_ptr,
        scale_ptr,
        shift_ptr,
        param_offs,
        sample_channel_offs,
        c_mask,
        HAS_WEIGHT,
        HAS_BIAS,
        HAS_SCALE,
        HAS_SHIFT,
    )
    gamma = tl.zeros(param_offs.shape, tl.float32)
    delta = tl.zeros(param_offs.shape, tl.float32)
    if WITH_TANGENT:
        if HAS_DSCALE:
            dscale = tl.load(dscale_ptr + sample_channel_offs, mask=c_mask, other=0.0).to(tl.float32)
            gamma = w * dscale
            delta = b * dscale
        if HAS_DSHIFT:
            delta += tl.load(dshift_ptr + sample_channel_offs, mask=c_mask, other=0.0).to(tl.float32)
    return alpha, beta, gamma, delta


@triton.jit
def _normalize_and_write(
    y_ptr,
    dy_ptr,
    offs,
    mask,
    x_centered,
    dx,
    rstd,
    dx_mean,
    xh_dx_mean,
    alpha,
    beta,
    gamma,
    delta,
    WITH_TANGENT: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    # xh = (x - mean) rstd, dxh = rstd (dx - mean_g(dx) - xh mean_g(xh dx)); then modulate, activate, write.
    xh = x_centered * rstd
    if WITH_TANGENT:
        dxh = rstd * (dx - dx_mean - xh * xh_dx_mean)
    else:
        dxh = xh
    _write_output_tile(y_ptr, dy_ptr, offs, mask, xh, dxh, alpha, beta, gamma, delta, WITH_TANGENT, ACT_SILU)


@triton.jit
def _load_inputs(x_ptr, other_ptr, offs, mask, WITH_OTHER: tl.constexpr):
    # x and, with WITH_OTHER, the same tile of a second input (the tangent dx, or grad_y in the backward) in fp32,
    # both loads issued before either is used (without it the second is x, unused)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WITH_OTHER:
        other = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        other = x
    return x, other


@triton.jit
def _group_tile(GROUPS: tl.constexpr, rows, hw_offs, CPG, HW, G, CHANNELS_LAST: tl.constexpr):
    # offsets and mask of GROUPS consecutive slabs of one sample as one [GROUPS, rows, positions] tile (slab i's
    # channels start CPG channels after slab i - 1's; channels-first: CPG * HW elements after)
    slab = tl.arange(0, GROUPS)
    channels = (slab * CPG)[:, None, None] + rows[None, :, None]
    if CHANNELS_LAST:
        offs = channels + hw_offs[None, None, :] * (CPG * G)
    else:
        offs = channels * HW + hw_offs[None, None, :]
    mask = (slab >= 0)[:, None, None] & (rows < CPG)[None, :, None] & (hw_offs < HW)[None, None, :]
    return offs, mask


@triton.jit
def _channel_alignment(CPG, CHANNELS_LAST: tl.constexpr, C_ALIGN: tl.constexpr):
    # Channels-last, a group's channels are the contiguous run the loads vectorise along: CPG shown to be a multiple
    # of C_ALIGN (a power of two dividing it, from the launcher), so are the run's starts g CPG and the position
    # stride C = CPG G, and the mask rows < CPG is constant over each C_ALIGN rows (without it: one scalar load per
    # element, 230 registers in the bf16 tangent pass on sm_90)
    # (tl.multiple_of does not mark a scalar argument; a product with the constant does: the same value)
    if CHANNELS_LAST and C_ALIGN > 1:
        CPG = (CPG // C_ALIGN) * C_ALIGN
    return CPG


@triton.jit
def _group_base(pid, GROUPS: tl.constexpr, CPG, G, HW, CHANNELS_LAST: tl.constexpr, C_ALIGN: tl.constexpr):
    # The element offset of program pid's first slab (b, g), in 64 bits (the per-element offsets from it stay
    # 32-bit): (b G + g) CPG HW channels-first (the slabs one after the other), b C HW + g CPG channels-last. A
    # program's GROUPS slabs are groups of one sample (GROUPS divides G).
    slab = pid.to(tl.int64) * GROUPS
    if CHANNELS_LAST:
        sample = slab // G
        return tl.multiple_of(sample * G * CPG * HW + (slab - sample * G) * CPG, C_ALIGN)
    return slab * CPG * HW


@triton.jit
def _slabs(pid, GROUPS: tl.constexpr):
    # b * G + g of program pid's slab(s): a scalar for one slab per program, [GROUPS] for several
    slabs = pid * GROUPS
    if GROUPS > 1:
        slabs += tl.arange(0, GROUPS)
    return slabs


@triton.jit
def _per_group(value, GROUPS: tl.constexpr):
    # a statistic of each slab, shaped to broadcast against its tile: a scalar for one slab, [GROUPS, 1, 1] else
    if GROUPS > 1:
        value = value[:, None, None]
    return value


@triton.jit
def _group_sum(tile, GROUPS: tl.constexpr):
    # the sum of each slab's elements: the whole tile at once for one slab, [GROUPS] sums else
    if GROUPS > 1:
        total = tl.sum(tl.sum(tile, axis=2), axis=1)
    else:
        total = tl.sum(tile)
    return total


@triton.jit
def _moments(
    x, dx, mask, x2, dx2, mask2, count, BLOCK_C2: tl.constexpr, WITH_TANGENT: tl.constexpr, GROUPS: tl.constexpr
):
    # Two-pass moments of `count` elements held as one tile (x, dx) or, with BLOCK_C2 > 0, two (and x2, dx2), per
    # slab when the tile holds GROUPS > 1: mean, M2 = sum (x - mean)^2, the mean of dx, the co-moment
    # sum (x - mean) dx, and the centred tiles. The sums of x and dx come first, then the centred ones (this order
    # kept the jvp single tile at 128 registers with Triton 3.6 and 3.8; others spilled or took up to 168).
    sum_x = _group_sum(x, GROUPS)
    if BLOCK_C2 > 0:
        sum_x += tl.sum(x2)
    mean = sum_x / count
    dx_mean = mean * 0.0  # (unused without a tangent)
    if WITH_TANGENT:
        sum_dx = _group_sum(dx, GROUPS)
        if BLOCK_C2 > 0:
            sum_dx += tl.sum(dx2)
        dx_mean = sum_dx / count
    x_centered = tl.where(mask, x - _per_group(mean, GROUPS), 0.0)
    m2 = _group_sum(x_centered * x_centered, GROUPS)
    # the corrected two-pass mean (Bjorck): the sum of the deviations from the first mean recovers the rounding of
    # the first sum, which at a large mean (|mean| >> std) is most of the error of mean, M2 and the co-moment
    deviation = _group_sum(x_centered, GROUPS)
    x2_centered = x_centered  # unused without a second tile
    if BLOCK_C2 > 0:
        x2_centered = tl.where(mask2, x2 - mean, 0.0)
        m2 += tl.sum(x2_centered * x2_centered)
        deviation += tl.sum(x2_centered)
    correction = deviation / count
    m2 -= deviation * correction
    comoment = mean * 0.0
    if WITH_TANGENT:
        comoment = _group_sum(x_centered * dx, GROUPS)
        if BLOCK_C2 > 0:
            comoment += tl.sum(x2_centered * dx2)
        comoment -= correction * dx_mean * count
    mean += correction
    x_centered = tl.where(mask, x_centered - _per_group(correction, GROUPS), 0.0)
    if BLOCK_C2 > 0:
        x2_centered = tl.where(mask2, x2_centered - correction, 0.0)
    return mean, m2, dx_mean, comoment, x_centered, x2_centered


@triton.jit
def _coefficient_offsets(pid, rows, CPG, G, GROUPS: tl.constexpr):
    # Offsets of program pid's channels `rows` in weight/bias (g C/G + c) and in scale/shift ((b G + g) C/G + c,
    # = b C + g C/G + c), and their mask: [rows], or [GROUPS, rows] for GROUPS slabs per program.
    if GROUPS > 1:
        slab = _slabs(pid, GROUPS)
        param_offs = ((slab % G) * CPG)[:, None] + rows[None, :]
        sample_offs = (slab * CPG)[:, None] + rows[None, :]
        c_mask = (slab >= 0)[:, None] & (rows < CPG)[None, :]
    else:
        param_offs = (pid % G) * CPG + rows
        sample_offs = pid * CPG + rows
        c_mask = rows < CPG
    return param_offs, sample_offs, c_mask


@triton.jit
def _gn_fwd_program(
    pid,
    x_ptr,
    dx_ptr,
    y_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    dscale_ptr,
    dshift_ptr,
    HW,
    CPG,
    G,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_C2: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    GROUPS: tl.constexpr,
    STAGES: tl.constexpr,
    WITH_TANGENT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_DSCALE: tl.constexpr,
    HAS_DSHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    C_ALIGN: tl.constexpr,
):
    # The group's channels are one tile of BLOCK_C rows, or with BLOCK_C2 > 0 two: rows [0, BLOCK_C) and
    # [BLOCK_C, BLOCK_C + BLOCK_C2), so that e.g. 48 channels are 32 + 16 rows instead of 64 with 16 masked.
    # With GROUPS > 1 (single tiles) a program takes GROUPS consecutive slabs as one [GROUPS, BLOCK_C, BLOCK_HW] tile.
    # Channels-first maps (a channel's positions consecutive) or CHANNELS_LAST ones (a position's channels).
    # pid = (b * G + g) / GROUPS
    CPG = _channel_alignment(CPG, CHANNELS_LAST, C_ALIGN)
    group_base = _group_base(pid, GROUPS, CPG, G, HW, CHANNELS_LAST, C_ALIGN)
    x_ptr += group_base
    dx_ptr += group_base
    y_ptr += group_base
    dy_ptr += group_base
    rows = tl.arange(0, BLOCK_C)
    hw_offs = tl.arange(0, BLOCK_HW)
    n = (CPG * HW).to(tl.float32)
    param_offs, sample_offs, c_mask = _coefficient_offsets(pid, rows, CPG, G, GROUPS)
    pointers = (weight_ptr, bias_ptr, scale_ptr, shift_ptr, dscale_ptr, dshift_ptr)
    flags = (WITH_TANGENT, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_DSCALE, HAS_DSHIFT)
    alpha, beta, gamma, delta = _forward_coefficients(*pointers, param_offs, sample_offs, c_mask, *flags)
    if BLOCK_C2 > 0:
        rows2 = BLOCK_C + tl.arange(0, BLOCK_C2)
        param_offs2, sample_offs2, c_mask2 = _coefficient_offsets(pid, rows2, CPG, G, GROUPS)
        alpha2, beta2, gamma2, delta2 = _forward_coefficients(*pointers, param_offs2, sample_offs2, c_mask2, *flags)

    if SINGLE_TILE:
        # Every input of the group is loaded before the first reduction (its barriers would otherwise hold a later
        # load back a whole memory latency), and each sum runs over a whole tile at once (axis=None; per slab, axes 2
        # then 1, with GROUPS > 1).
        if GROUPS > 1:
            offs, mask = _group_tile(GROUPS, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        else:
            offs, mask = _tile(0, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        x, dx = _load_inputs(x_ptr, dx_ptr, offs, mask, WITH_TANGENT)
        offs2, mask2, x2, dx2 = offs, mask, x, dx  # the second tile's, when there is one
        if BLOCK_C2 > 0:
            offs2, mask2 = _tile(0, rows2, hw_offs, CPG, HW, G, CHANNELS_LAST)
            x2, dx2 = _load_inputs(x_ptr, dx_ptr, offs2, mask2, WITH_TANGENT)
        mean, m2, dx_mean, comoment, x_centered, x2_centered = _moments(
            x, dx, mask, x2, dx2, mask2, n, BLOCK_C2, WITH_TANGENT, GROUPS
        )
        rstd = 1.0 / tl.sqrt_rn(m2 / n + eps)
        # mean_g(xh dx) = rstd * mean_g((x - mean) dx)
        xh_dx_mean = rstd * comoment / n
        _normalize_and_write(y_ptr, dy_ptr, offs, mask, x_centered, dx, _per_group(rstd, GROUPS),
                             _per_group(dx_mean, GROUPS), _per_group(xh_dx_mean, GROUPS), alpha, beta, gamma, delta,
                             WITH_TANGENT, ACT_SILU)  # fmt: skip
        if BLOCK_C2 > 0:
            _normalize_and_write(y_ptr, dy_ptr, offs2, mask2, x2_centered, dx2, rstd, dx_mean, xh_dx_mean, alpha2,
                                 beta2, gamma2, delta2, WITH_TANGENT, ACT_SILU)  # fmt: skip
    else:
        # Pass 1: per-chunk two-pass moments merged with Chan's formula: mean, M2 = sum (x - mean)^2 and,
        # with a tangent, the mean of dx and the co-moment sum (x - mean)(dx - mean_dx).
        count = tl.full([], 0.0, tl.float32)
        mean = tl.full([], 0.0, tl.float32)
        m2 = tl.full([], 0.0, tl.float32)
        dx_mean = tl.full([], 0.0, tl.float32)
        comoment = tl.full([], 0.0, tl.float32)
        for start in tl.range(0, HW, BLOCK_HW, num_stages=STAGES):
            offs, mask = _tile(start, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
            x, dx = _load_inputs(x_ptr, dx_ptr, offs, mask, WITH_TANGENT)
            offs2, mask2, x2, dx2 = offs, mask, x, dx
            if BLOCK_C2 > 0:
                offs2, mask2 = _tile(start, rows2, hw_offs, CPG, HW, G, CHANNELS_LAST)
                x2, dx2 = _load_inputs(x_ptr, dx_ptr, offs2, mask2, WITH_TANGENT)
            chunk_count = (CPG * tl.minimum(HW - start, BLOCK_HW)).to(tl.float32)
            chunk_mean, chunk_m2, chunk_dx_mean, chunk_comoment, _, _ = _moments(
                x, dx, mask, x2, dx2, mask2, chunk_count, BLOCK_C2, WITH_TANGENT, 1
            )
            total = count + chunk_count
            mean_delta = chunk_mean - mean
            mean += mean_delta * (chunk_count / total)
            m2 += chunk_m2 + mean_delta * mean_delta * (count * chunk_count / total)
            if WITH_TANGENT:
                dx_mean_delta = chunk_dx_mean - dx_mean
                dx_mean += dx_mean_delta * (chunk_count / total)
                comoment += chunk_comoment + mean_delta * dx_mean_delta * (count * chunk_count / total)
            count = total
        rstd = 1.0 / tl.sqrt_rn(m2 / n + eps)
        xh_dx_mean = rstd * comoment / n
        # Pass 2: normalise, modulate, activate, write.
        for start in tl.range(0, HW, BLOCK_HW, num_stages=STAGES):
            offs, mask = _tile(start, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
            x, dx = _load_inputs(x_ptr, dx_ptr, offs, mask, WITH_TANGENT)
            if BLOCK_C2 > 0:
                offs2, mask2 = _tile(start, rows2, hw_offs, CPG, HW, G, CHANNELS_LAST)
                x2, dx2 = _load_inputs(x_ptr, dx_ptr, offs2, mask2, WITH_TANGENT)
            _normalize_and_write(y_ptr, dy_ptr, offs, mask, x - mean, dx, rstd, dx_mean, xh_dx_mean, alpha, beta,
                                 gamma, delta, WITH_TANGENT, ACT_SILU)  # fmt: skip
            if BLOCK_C2 > 0:
                _normalize_and_write(y_ptr, dy_ptr, offs2, mask2, x2 - mean, dx2, rstd, dx_mean, xh_dx_mean, alpha2,
                                     beta2, gamma2, delta2, WITH_TANGENT, ACT_SILU)  # fmt: skip
    slabs = _slabs(pid, GROUPS)
    tl.store(mean_ptr + slabs, mean)
    tl.store(rstd_ptr + slabs, rstd)


# tangent_rows varies from step to step in the iMF step (its r != t rows): not specialised, so a count divisible by
# 16 or equal to 1 compiles nothing new (Triton would otherwise compile a variant for each)
@triton.jit(do_not_specialize=["tangent_rows"])
def _gn_fwd_kernel(
    x_ptr,
    dx_ptr,
    y_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    dscale_ptr,
    dshift_ptr,
    HW,
    CPG,
    G,
    eps,
    tangent_rows,
    BLOCK_C: tl.constexpr,
    BLOCK_C2: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    GROUPS: tl.constexpr,
    STAGES: tl.constexpr,
    WITH_TANGENT: tl.constexpr,
    PARTIAL_TANGENT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_DSCALE: tl.constexpr,
    HAS_DSHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    C_ALIGN: tl.constexpr,
):
    # PARTIAL_TANGENT (single tiles): dx (and dy, dscale, dshift) hold the first `tangent_rows` samples only. A
    # program of those samples runs the forward with the tangent, the others the primal forward: one branch a
    # program, on a scalar, so each path keeps its own code (masking the tangent loads and stores instead took 154
    # registers where this takes 130: bf16, C/G 8 at 16x16, Triton 3.6 for sm_90).
    pid = tl.program_id(0)
    if PARTIAL_TANGENT:
        if (pid * GROUPS) // G < tangent_rows:
            _gn_fwd_program(pid, x_ptr, dx_ptr, y_ptr, dy_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, scale_ptr,
                            shift_ptr, dscale_ptr, dshift_ptr, HW, CPG, G, eps, BLOCK_C, BLOCK_C2, BLOCK_HW,
                            SINGLE_TILE, GROUPS, STAGES, True, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_DSCALE,
                            HAS_DSHIFT, ACT_SILU, CHANNELS_LAST, C_ALIGN)  # fmt: skip
        else:
            _gn_fwd_program(pid, x_ptr, dx_ptr, y_ptr, dy_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, scale_ptr,
                            shift_ptr, dscale_ptr, dshift_ptr, HW, CPG, G, eps, BLOCK_C, BLOCK_C2, BLOCK_HW,
                            SINGLE_TILE, GROUPS, STAGES, False, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, False,
                            False, ACT_SILU, CHANNELS_LAST, C_ALIGN)  # fmt: skip
    else:
        _gn_fwd_program(pid, x_ptr, dx_ptr, y_ptr, dy_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, scale_ptr,
                        shift_ptr, dscale_ptr, dshift_ptr, HW, CPG, G, eps, BLOCK_C, BLOCK_C2, BLOCK_HW, SINGLE_TILE,
                        GROUPS, STAGES, WITH_TANGENT, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_DSCALE,
                        HAS_DSHIFT, ACT_SILU, CHANNELS_LAST, C_ALIGN)  # fmt: skip


@triton.jit
def _recompute_grad_h(x, grad_y, mean, rstd, alpha, beta, ACT_SILU: tl.constexpr):
    # xh and dL/dh = grad_y * act'(h), act'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))) for SiLU.
    xh = (x - mean) * rstd
    if ACT_SILU:
        h = xh * tl.expand_dims(alpha, -1) + tl.expand_dims(beta, -1)
        sig = tl.sigmoid(h)
        grad_h = grad_y * sig * (1.0 + h * (1.0 - sig))
    else:
        grad_h = grad_y
    return xh, grad_h


@triton.jit
def _chunked_channel_sums(
    x_ptr, grad_y_ptr, rows, hw_offs, CPG, HW, G, CHANNELS_LAST: tl.constexpr, mean, rstd, alpha, beta,
    BLOCK: tl.constexpr, BLOCK_HW: tl.constexpr, ACT_SILU: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # Per channel of `rows`: S1 = sum_hw gh and S2 = sum_hw gh xh, gh = dL/dh, over chunks of BLOCK_HW positions.
    # Tile-shaped accumulators, reduced once after the loop. (Reducing inside the loop into [BLOCK] sums made
    # Triton 3.6's TritonGPUOptimizeThreadLocality pass assert `loopResult.hasOneUse()` on sm_90 for fp32 without
    # SiLU when a sum has several uses: seen on an H200, 2026-11-26, reproduced by the AOT test.)
    acc_grad_h = tl.zeros([BLOCK, BLOCK_HW], tl.float32)
    acc_grad_h_xh = tl.zeros([BLOCK, BLOCK_HW], tl.float32)
    for start in tl.range(0, HW, BLOCK_HW, num_stages=STAGES):
        offs, mask = _tile(start, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        x, grad_y = _load_inputs(x_ptr, grad_y_ptr, offs, mask, True)
        xh, grad_h = _recompute_grad_h(x, grad_y, mean, rstd, alpha, beta, ACT_SILU)
        acc_grad_h += grad_h
        acc_grad_h_xh += grad_h * xh
    return tl.sum(acc_grad_h, axis=1), tl.sum(acc_grad_h_xh, axis=1)


@triton.jit
def _store_channel_grads(
    grad_weight_partial_ptr, grad_bias_partial_ptr, grad_scale_ptr, grad_shift_ptr, sample_channel_offs, c_mask,
    w, b, one_plus_s, sum_grad_h, sum_grad_h_xh,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
):  # fmt: skip
    # grad_shift = S1, grad_scale = w S2 + b S1, grad_bias (per sample) = (1 + s) S1, grad_weight = (1 + s) S2.
    if HAS_SHIFT:
        tl.store(grad_shift_ptr + sample_channel_offs, sum_grad_h.to(grad_shift_ptr.dtype.element_ty), mask=c_mask)
    if HAS_SCALE:
        grad_scale = w * sum_grad_h_xh + b * sum_grad_h
        tl.store(grad_scale_ptr + sample_channel_offs, grad_scale.to(grad_scale_ptr.dtype.element_ty), mask=c_mask)
    if HAS_WEIGHT:
        tl.store(grad_weight_partial_ptr + sample_channel_offs, one_plus_s * sum_grad_h_xh, mask=c_mask)
    if HAS_BIAS:
        tl.store(grad_bias_partial_ptr + sample_channel_offs, one_plus_s * sum_grad_h, mask=c_mask)


@triton.jit
def _chunked_grad_x(
    x_ptr, grad_y_ptr, grad_x_ptr, residual_ptr, rows, hw_offs, CPG, HW, G, CHANNELS_LAST: tl.constexpr, mean, rstd,
    alpha, beta, g_mean, g_xh_mean,
    BLOCK_HW: tl.constexpr, ACT_SILU: tl.constexpr, STAGES: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    # grad_x = rstd (alpha gh - mean_g(alpha gh) - xh mean_g(alpha gh xh)) (+ grad_residual), chunk by chunk (read
    # again).
    for start in tl.range(0, HW, BLOCK_HW, num_stages=STAGES):
        offs, mask = _tile(start, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        x, grad_y = _load_inputs(x_ptr, grad_y_ptr, offs, mask, True)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xh, grad_h = _recompute_grad_h(x, grad_y, mean, rstd, alpha, beta, ACT_SILU)
        grad_x = rstd * (grad_h * tl.expand_dims(alpha, -1) - g_mean - xh * g_xh_mean)
        if HAS_RESIDUAL:
            grad_x += residual
        tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_residual(grad_x_ptr, residual_ptr, offs, mask):
    # The single tile's residual gradient, added to the grad_x the program has just stored (each thread reads back
    # its own elements: the same offsets' layout). Added in registers before the store (as the chunked loops do), it
    # made ptxas spill 8-16 bytes on the largest bf16 tiles of both Tritons; read after the store, the tile's x, gh
    # and xh are dead. In fp32 the same sum as in registers; in half precision grad_x is rounded before the add, as
    # when autograd adds the two gradients (the read-back is of lines the program just wrote).
    grad_x = tl.load(grad_x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (grad_x + residual).to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_kernel(
    grad_y_ptr,
    x_ptr,
    grad_x_ptr,
    residual_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    grad_weight_partial_ptr,
    grad_bias_partial_ptr,
    grad_scale_ptr,
    grad_shift_ptr,
    HW,
    CPG,
    G,
    BLOCK_C: tl.constexpr,
    BLOCK_C2: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    GROUPS: tl.constexpr,
    STAGES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    C_ALIGN: tl.constexpr,
):
    # With gh = dL/dh and per-channel sums S1 = sum_hw gh, S2 = sum_hw gh xh, and g = alpha gh (= dL/dxh):
    # grad_x = rstd (g - mean_g(g) - xh mean_g(g xh)), mean_g(g) = sum_c alpha S1 / n, mean_g(g xh) likewise.
    # Channels as in the forward: one tile of BLOCK_C rows, or two (BLOCK_C2 > 0); GROUPS slabs per program (single
    # tiles) as one [GROUPS, BLOCK_C, BLOCK_HW] tile, the per-channel sums then [GROUPS, BLOCK_C], the rest [GROUPS].
    pid = tl.program_id(0)
    CPG = _channel_alignment(CPG, CHANNELS_LAST, C_ALIGN)
    group_base = _group_base(pid, GROUPS, CPG, G, HW, CHANNELS_LAST, C_ALIGN)
    grad_y_ptr += group_base
    x_ptr += group_base
    grad_x_ptr += group_base
    residual_ptr += group_base  # (grad_residual, added into grad_x where HAS_RESIDUAL; x's when absent, never read)
    rows = tl.arange(0, BLOCK_C)
    hw_offs = tl.arange(0, BLOCK_HW)
    n = (CPG * HW).to(tl.float32)
    slabs = _slabs(pid, GROUPS)
    mean = _per_group(tl.load(mean_ptr + slabs), GROUPS)
    rstd = _per_group(tl.load(rstd_ptr + slabs), GROUPS)
    params = (weight_ptr, bias_ptr, scale_ptr, shift_ptr)
    outputs = (grad_weight_partial_ptr, grad_bias_partial_ptr, grad_scale_ptr, grad_shift_ptr)
    flags = (HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)

    param_offs, sample_offs, c_mask = _coefficient_offsets(pid, rows, CPG, G, GROUPS)
    w, b, one_plus_s, alpha, beta = _channel_coefficients(*params, param_offs, sample_offs, c_mask, *flags)
    if BLOCK_C2 > 0:
        rows2 = BLOCK_C + tl.arange(0, BLOCK_C2)
        param_offs2, sample_offs2, c_mask2 = _coefficient_offsets(pid, rows2, CPG, G, GROUPS)
        w2, b2, one_plus_s2, alpha2, beta2 = _channel_coefficients(*params, param_offs2, sample_offs2, c_mask2, *flags)

    if SINGLE_TILE:  # the group's x and grad_y stay in registers from the sums to grad_x
        if GROUPS > 1:
            offs, mask = _group_tile(GROUPS, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        else:
            offs, mask = _tile(0, rows, hw_offs, CPG, HW, G, CHANNELS_LAST)
        x, grad_y = _load_inputs(x_ptr, grad_y_ptr, offs, mask, True)
        if BLOCK_C2 > 0:
            offs2, mask2 = _tile(0, rows2, hw_offs, CPG, HW, G, CHANNELS_LAST)
            x2, grad_y2 = _load_inputs(x_ptr, grad_y_ptr, offs2, mask2, True)
        xh, grad_h = _recompute_grad_h(x, grad_y, mean, rstd, alpha, beta, ACT_SILU)
        sum_grad_h = tl.sum(grad_h, axis=-1)
        sum_grad_h_xh = tl.sum(grad_h * xh, axis=-1)
        if BLOCK_C2 > 0:
            xh2, grad_h2 = _recompute_grad_h(x2, grad_y2, mean, rstd, alpha2, beta2, ACT_SILU)
            sum_grad_h2 = tl.sum(grad_h2, axis=-1)
            sum_grad_h_xh2 = tl.sum(grad_h2 * xh2, axis=-1)
    else:
        sum_grad_h, sum_grad_h_xh = _chunked_channel_sums(x_ptr, grad_y_ptr, rows, hw_offs, CPG, HW, G,
                                                          CHANNELS_LAST, mean, rstd, alpha, beta, BLOCK_C, BLOCK_HW,
                                                          ACT_SILU, STAGES)  # fmt: skip
        if BLOCK_C2 > 0:
            sum_grad_h2, sum_grad_h_xh2 = _chunked_channel_sums(x_ptr, grad_y_ptr, rows2, hw_offs, CPG, HW, G,
                                                                CHANNELS_LAST, mean, rstd, alpha2, beta2, BLOCK_C2,
                                                                BLOCK_HW, ACT_SILU, STAGES)  # fmt: skip

    _store_channel_grads(*outputs, sample_offs, c_mask, w, b, one_plus_s, sum_grad_h, sum_grad_h_xh, *flags)
    # (sums over the channel axis, the last: a scalar for one slab, [GROUPS] for several)
    g_sum = tl.sum(tl.where(c_mask, alpha * sum_grad_h, 0.0), axis=-1)
    g_xh_sum = tl.sum(tl.where(c_mask, alpha * sum_grad_h_xh, 0.0), axis=-1)
    if BLOCK_C2 > 0:
        _store_channel_grads(*outputs, sample_offs2, c_mask2, w2, b2, one_plus_s2, sum_grad_h2, sum_grad_h_xh2,
                             *flags)  # fmt: skip
        g_sum += tl.sum(tl.where(c_mask2, alpha2 * sum_grad_h2, 0.0), axis=-1)
        g_xh_sum += tl.sum(tl.where(c_mask2, alpha2 * sum_grad_h_xh2, 0.0), axis=-1)
    g_mean = _per_group(g_sum / n, GROUPS)
    g_xh_mean = _per_group(g_xh_sum / n, GROUPS)
    if SINGLE_TILE:
        grad_x = rstd * (grad_h * tl.expand_dims(alpha, -1) - g_mean - xh * g_xh_mean)
        tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if BLOCK_C2 > 0:
            grad_x2 = rstd * (grad_h2 * tl.expand_dims(alpha2, -1) - g_mean - xh2 * g_xh_mean)
            tl.store(grad_x_ptr + offs2, grad_x2.to(grad_x_ptr.dtype.element_ty), mask=mask2)
        if HAS_RESIDUAL:
            _add_residual(grad_x_ptr, residual_ptr, offs, mask)
            if BLOCK_C2 > 0:
                _add_residual(grad_x_ptr, residual_ptr, offs2, mask2)
    else:
        _chunked_grad_x(x_ptr, grad_y_ptr, grad_x_ptr, residual_ptr, rows, hw_offs, CPG, HW, G, CHANNELS_LAST, mean,
                        rstd, alpha, beta, g_mean, g_xh_mean, BLOCK_HW, ACT_SILU, STAGES, HAS_RESIDUAL)  # fmt: skip
        if BLOCK_C2 > 0:
            _chunked_grad_x(x_ptr, grad_y_ptr, grad_x_ptr, residual_ptr, rows2, hw_offs, CPG, HW, G, CHANNELS_LAST,
                            mean, rstd, alpha2, beta2, g_mean, g_xh_mean, BLOCK_HW, ACT_SILU, STAGES,
                            HAS_RESIDUAL)  # fmt: skip


# The backward's second launch: grad_weight and grad_bias summed over the batch from their (B, C) fp32 partials,
# PARAM_BLOCK_C channels per program, up to PARAM_MAX_ROWS samples per step as one tile, in a fixed order (the same
# result every run). Its data is small (2 B C fp32: 512 KiB at latent-b's B256 C256), so its time is latency: the
# lease-5 Nsight Compute pages found the earlier rule (32 channels, 32 samples a step: 8 programs of 8 dependent
# steps at C256 B256) taking ~10 us at 6% occupancy, half of the C256 8x8 backward. This rule (8 channels a
# program, the latent-b batch of 256 in one straight-line step: 32 programs at C256, one 16-byte vector of each
# partial per thread on 16 warps, both loads issued at once) is not yet timed on a GPU; bench/tune_gpu.py's
# group_norm sweep times both, and other tiles, beside each other (its "bwd" pass). Batches above 256 loop.
PARAM_BLOCK_C = 8
PARAM_MAX_ROWS = 256
_PARAM_ELEMENTS_PER_THREAD = 4


@dataclass(frozen=True)
class ParamBlocks:
    """Launch configuration of the batch sums: BLOCK_B samples per step, BLOCK_C channels per program."""

    block_b: int
    block_c: int
    num_warps: int
    one_step: bool  # batch <= block_b: no loop


_picked_param_blocks: dict[tuple, ParamBlocks] = {}


def pick_param_blocks(batch: int) -> ParamBlocks:
    """The batch sums' tile for `batch` samples (power-of-2 blocks and warps, as a GPU compiler needs)."""
    key = (batch, PARAM_BLOCK_C, PARAM_MAX_ROWS)
    blocks = _picked_param_blocks.get(key)
    if blocks is None:
        block_b = min(PARAM_MAX_ROWS, triton.next_power_of_2(batch))
        num_warps = max(1, min(_MAX_WARPS, block_b * PARAM_BLOCK_C // (32 * _PARAM_ELEMENTS_PER_THREAD)))
        blocks = _picked_param_blocks[key] = ParamBlocks(block_b, PARAM_BLOCK_C, num_warps, batch <= block_b)
    return blocks


@triton.jit
def _param_tiles(
    grad_weight_partial_ptr,
    grad_bias_partial_ptr,
    start,
    batch,
    channels,
    columns,
    c_mask,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """The [BLOCK_B, BLOCK_C] tiles of both partials from sample `start` (zeros for an absent one)."""
    samples = start + tl.arange(0, BLOCK_B)
    offs = samples[:, None] * channels + columns[None, :]
    mask = (samples[:, None] < batch) & c_mask[None, :]
    weight_tile = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    bias_tile = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    if HAS_WEIGHT:
        weight_tile = tl.load(grad_weight_partial_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        bias_tile = tl.load(grad_bias_partial_ptr + offs, mask=mask, other=0.0)
    return weight_tile, bias_tile


@triton.jit
def _param_sums_kernel(
    grad_weight_partial_ptr,
    grad_bias_partial_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    batch,
    channels,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_STEP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = columns < channels
    if ONE_STEP:
        # batch <= BLOCK_B: straight-line code, where ptxas issues both tiles' loads at once (in the loop below it
        # waited for each 16-byte load before the next: sm_90 SASS of Triton 3.6 and 3.8)
        acc_weight, acc_bias = _param_tiles(grad_weight_partial_ptr, grad_bias_partial_ptr, 0, batch, channels,
                                            columns, c_mask, BLOCK_B, BLOCK_C, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
    else:
        acc_weight = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        acc_bias = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        for start in tl.range(0, batch, BLOCK_B, num_stages=3):  # (pipelined: the same wait as above otherwise)
            weight_tile, bias_tile = _param_tiles(grad_weight_partial_ptr, grad_bias_partial_ptr, start, batch,
                                                  channels, columns, c_mask, BLOCK_B, BLOCK_C, HAS_WEIGHT,
                                                  HAS_BIAS)  # fmt: skip
            acc_weight += weight_tile
            acc_bias += bias_tile
    if HAS_WEIGHT:
        grad_weight = tl.sum(acc_weight, axis=0)
        tl.store(grad_weight_ptr + columns, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        grad_bias = tl.sum(acc_bias, axis=0)
        tl.store(grad_bias_ptr + columns, grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(op: str, args: dict) -> list[str]:
    """Why the Triton GroupNorm launchers cannot take this call (empty list: they can)."""
    x = args["x"]
    reasons = []
    if x.device.type == "cuda":
        if x.dtype not in _GPU_DTYPES:
            reasons.append(f"{op}: dtype {x.dtype} not supported by triton (float32, float16, bfloat16)")
    elif x.device.type == "cpu" and _interpreter_on():
        if x.dtype not in _INTERPRETER_DTYPES:
            reasons.append(f"{op}: dtype {x.dtype} not supported by the triton interpreter (float32, float16)")
    else:
        reasons.append(f"{op}: device {x.device.type} needs CUDA (or CPU with TRITON_INTERPRET=1) for triton")
    if x.dim() == 4 and args["num_groups"] > 0 and x.shape[1] % args["num_groups"] == 0:
        channels_per_group = x.shape[1] // args["num_groups"]
        if channels_per_group > MAX_CHANNELS_PER_GROUP:
            reasons.append(f"{op}: C/num_groups={channels_per_group} > {MAX_CHANNELS_PER_GROUP} supported by triton")
    if args.get("act", "silu") not in ("silu", "none"):
        reasons.append(f"{op}: act={args['act']!r} not supported by triton (silu, none)")
    return reasons


def _flags(weight, bias, scale, shift, act: str) -> dict:
    return {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "ACT_SILU": act == "silu",
    }


def _forward(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act):
    """y (and dy), mean, rstd. A tangent on the first m < B samples only (TANGENT_ROWS): on single tiles one launch
    over the whole batch whose programs of those samples take the tangent (PARTIAL_TANGENT), dy of m samples; on
    chunked tiles the jvp kernel on those rows and the primal kernel on the rest (one kernel with both made ptxas
    spill the fp32 chunked loops, Triton 3.6 on sm_90: they sit at 64 registers). Chunked tiles are the large maps,
    where a launch more costs least; the small ones, bound by their launches, are single tiles."""
    batch, channels, height, width = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((batch, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((batch, num_groups), device=x.device, dtype=torch.float32)
    rows = batch if dx is None else dx.shape[0]
    if rows == batch or pick_blocks(channels // num_groups, height * width, x.dtype).single_tile:
        dy = _launch(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act, y, mean, rstd)
        return y, dy, mean, rstd
    dy = _launch(
        x[:rows], dx, num_groups, weight, bias, _rows(scale, 0, rows), _rows(shift, 0, rows), dscale, dshift, eps, act,
        y[:rows], mean[:rows], rstd[:rows],
    )  # fmt: skip
    _launch(
        x[rows:], None, num_groups, weight, bias, _rows(scale, rows, batch), _rows(shift, rows, batch), None, None,
        eps, act, y[rows:], mean[rows:], rstd[rows:],
    )  # fmt: skip
    return y, dy, mean, rstd


def _rows(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t[start:stop]


def _check_groups(blocks: GNBlocks, num_groups: int) -> None:
    """A program's slabs must be whole groups of one launch: groups divides num_groups (and so B * num_groups)."""
    if num_groups % blocks.groups:
        raise AssertionError(f"group_norm triton: groups={blocks.groups} per program must divide {num_groups} groups")


def channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels address a (B, C, H, W) map channels-last (`torch.channels_last`) or channels-first
    (contiguous; also a map that is both, e.g. 1x1). Every other map of a call (tangent, output, gradient) has x's
    layout (`imf_kernels.api` makes it so)."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    raise AssertionError(f"group_norm triton: x must be contiguous or channels-last, got strides {x.stride()}")


# the most channels a channels-last load vectorises over: 4 (16 bytes of fp32, 8 of bf16). At 8 (16 bytes of bf16)
# the bf16 tangent pass took 168 registers where the channels-first one takes 128 (sm_90, Triton 3.8).
_MAX_C_ALIGN = 4


def channel_alignment(channels_per_group: int, blocks: GNBlocks, dtype: torch.dtype, backward: bool) -> int:
    """The kernels' C_ALIGN for channels-last maps: the largest power of two dividing channels_per_group, at most
    _MAX_C_ALIGN; 2 where 4 made ptxas spill 8 bytes (tests/test_triton_aot.py, Triton 3.8 on sm_90): chunked
    tiles (the fp32 C/G 24 tangent pass at 16x16, 64 registers on 16 warps) and the half-precision backward of
    4-channel groups (C128 32x32, 128 registers on 4 warps)."""
    align = min(_MAX_C_ALIGN, channels_per_group & -channels_per_group)
    if not blocks.single_tile or (backward and dtype.itemsize == 2 and blocks.block_c <= 4):
        align = min(align, 2)
    return align


_CHANNELS_FIRST = {"CHANNELS_LAST": False, "C_ALIGN": 1}


def _layout_flags(x: torch.Tensor, blocks: GNBlocks, backward: bool, channels_per_group: int) -> dict:
    if not channels_last(x):
        return _CHANNELS_FIRST
    return {"CHANNELS_LAST": True, "C_ALIGN": channel_alignment(channels_per_group, blocks, x.dtype, backward)}


def _launch(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act, y, mean, rstd):
    """One launch over x's samples, writing y, mean, rstd (given) and returning dy (None without a tangent): dx
    (and dscale, dshift, dy) may hold the first samples only."""
    batch, channels, height, width = x.shape
    hw = height * width
    channels_per_group = channels // num_groups
    with_tangent = dx is not None
    tangent_rows = dx.shape[0] if with_tangent else 0
    blocks = pick_blocks(channels_per_group, hw, x.dtype)
    dy = torch.empty_like(dx) if with_tangent else y  # (x's layout, as dx's: the op lays the maps out alike)
    # Absent optional tensors are never read (their HAS_* flag is off); x stands in as a valid pointer.
    _check_groups(blocks, num_groups)
    launch_kernel(
        _gn_fwd_kernel,
        (batch * num_groups // blocks.groups,),
        x,
        dx if with_tangent else x,
        y,
        dy,
        mean,
        rstd,
        *(t if t is not None else x for t in (weight, bias, scale, shift, dscale, dshift)),
        hw,
        channels_per_group,
        num_groups,
        eps,
        tangent_rows,
        BLOCK_C=blocks.block_c,
        BLOCK_C2=blocks.block_c2,
        BLOCK_HW=blocks.block_hw,
        SINGLE_TILE=blocks.single_tile,
        GROUPS=blocks.groups,
        STAGES=blocks.stages,
        WITH_TANGENT=with_tangent,
        PARTIAL_TANGENT=with_tangent and tangent_rows < batch,
        HAS_DSCALE=with_tangent and dscale is not None,
        HAS_DSHIFT=with_tangent and dshift is not None,
        **_layout_flags(x, blocks, False, channels_per_group),
        num_warps=blocks.num_warps,
        **_flags(weight, bias, scale, shift, act),
    )
    return dy if with_tangent else None


def gn_act_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(GN(x) * weight + bias) * (1 + scale) + shift); returns (y, mean, rstd), stats (B, G) fp32."""
    y, _, mean, rstd = _forward(x, None, num_groups, weight, bias, scale, shift, None, None, eps, act)
    return y, mean, rstd


def gn_act_jvp_fwd(
    x: torch.Tensor,
    dx: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    dscale: torch.Tensor | None,
    dshift: torch.Tensor | None,
    eps: float,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dy, mean, rstd) in one pass over x and dx; dscale/dshift None mean a zero tangent."""
    return _forward(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act)


def gn_act_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    act: str,
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift), None where the input is None.

    Two launches and no other work: grad_weight and grad_bias are written per (sample, channel) in fp32 and
    summed over the batch by a second kernel in a fixed order (deterministic, no atomics). grad_residual (x's
    shape, dtype and layout) is added to grad_x by the same kernel: in fp32 before its rounding in the chunked
    loops, to the stored grad_x read back by a single tile (`_add_residual`).
    """
    batch, channels, height, width = x.shape
    hw = height * width
    channels_per_group = channels // num_groups
    blocks = pick_blocks(channels_per_group, hw, x.dtype)
    grad_x = torch.empty_like(x)

    # grad_weight and grad_bias partials share one (2, B, C) fp32 buffer, summed over the batch by one launch;
    # grad_scale and grad_shift are per sample and written by the kernel directly in their own dtype. Absent
    # outputs are never written (their HAS_* flag is off): x fills the slot.
    partials = None
    if weight is not None or bias is not None:
        partials = torch.empty((2, batch, channels), device=x.device, dtype=torch.float32)
    grad_weight_partial = partials[0] if weight is not None else x
    grad_bias_partial = partials[1] if bias is not None else x
    grad_scale = torch.empty((batch, channels), device=x.device, dtype=scale.dtype) if scale is not None else x
    grad_shift = torch.empty((batch, channels), device=x.device, dtype=shift.dtype) if shift is not None else x
    _check_groups(blocks, num_groups)
    launch_kernel(
        _gn_bwd_kernel,
        (batch * num_groups // blocks.groups,),
        grad_y,
        x,
        grad_x,
        x if grad_residual is None else grad_residual,
        mean,
        rstd,
        *(t if t is not None else x for t in (weight, bias, scale, shift)),
        grad_weight_partial,
        grad_bias_partial,
        grad_scale,
        grad_shift,
        hw,
        channels_per_group,
        num_groups,
        BLOCK_C=blocks.block_c,
        BLOCK_C2=blocks.block_c2,
        BLOCK_HW=blocks.block_hw,
        SINGLE_TILE=blocks.single_tile,
        GROUPS=blocks.groups,
        STAGES=blocks.stages,
        num_warps=blocks.num_warps,
        HAS_RESIDUAL=grad_residual is not None,
        **_layout_flags(x, blocks, True, channels_per_group),
        **_flags(weight, bias, scale, shift, act),
    )
    grad_weight = None if weight is None else torch.empty((channels,), device=x.device, dtype=weight.dtype)
    grad_bias = None if bias is None else torch.empty((channels,), device=x.device, dtype=bias.dtype)
    if partials is not None:
        param_blocks = pick_param_blocks(batch)
        launch_kernel(
            _param_sums_kernel,
            (cdiv(channels, param_blocks.block_c),),
            grad_weight_partial,
            grad_bias_partial,
            x if grad_weight is None else grad_weight,
            x if grad_bias is None else grad_bias,
            batch,
            channels,
            BLOCK_B=param_blocks.block_b,
            BLOCK_C=param_blocks.block_c,
            ONE_STEP=param_blocks.one_step,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            num_warps=param_blocks.num_warps,
        )
    return (
        grad_x,
        grad_weight,
        grad_bias,
        None if scale is None else grad_scale,
        None if shift is None else grad_shift,
    )


# (C, resolution) of the GroupNorm inputs of the U-Net (imf/model.py, 2 ResBlocks per level; decoder inputs
# concatenate a skip) for the `latent-b` (width 256, mults (1, 1, 2)) and `cifar` (width 128, mults (1, 2, 2))
# presets, all with 32 groups; at batch 8 and 64 (bench/test_bench_ops.py checks them against the presets). "wide":
# latent-b as it was until 2026-11-26 (mults (1, 2, 3), 188M parameters, the model of the first four GPU leases),
# kept for its 40 and 48 channels per group and its chunked padded tiles, which the presets no longer reach.
PRESET_LAYERS = {
    "latent-b": (
        (256, 32),
        (512, 32),
        (256, 16),
        (512, 16),
        (768, 16),
        (256, 8),
        (512, 8),
        (768, 8),
        (1024, 8),
    ),
    "cifar": (
        (128, 32),
        (256, 32),
        (384, 32),
        (128, 16),
        (256, 16),
        (384, 16),
        (512, 16),
        (256, 8),
        (512, 8),
    ),
    "wide": (
        (768, 32),
        (1024, 16),
        (1280, 16),
        (1280, 8),
        (1536, 8),
    ),
}
AOT_SHAPES = tuple(
    (batch, channels, res, res, 32)
    for layers in PRESET_LAYERS.values()
    for channels, res in layers
    for batch in (8, 64)
)


# the shapes only the "wide" model has
_WIDE_SHAPES = {
    (batch, channels, res, res)
    for channels, res in set(PRESET_LAYERS["wide"]) - set(PRESET_LAYERS["latent-b"]) - set(PRESET_LAYERS["cifar"])
    for batch in (8, 64)
}


def aot_specs(shapes=AOT_SHAPES) -> list[dict]:
    """Ahead-of-time compile specs for every launch configuration the launchers pick for `shapes`.

    `shapes`: iterable of (B, C, H, W, num_groups). One spec per (pass, dtype, blocks, H*W % 16 == 0,
    activation), with every other option on (weight, bias, scale, shift, their tangents, the backward's residual
    gradient on the launcher's picks): with SiLU, the variant
    with the most live registers; without, the one whose simpler loop body Triton 3.6's
    TritonGPUOptimizeThreadLocality pass once failed to compile (the chunked backward, fp32). `divisible_by_16`
    names the arguments the JIT would specialise as multiples of 16 (torch's allocations are 16-byte aligned), so
    the compiled code vectorises as it will at run time.
    """
    all_options = {
        "HAS_WEIGHT": True,
        "HAS_BIAS": True,
        "HAS_SCALE": True,
        "HAS_SHIFT": True,
    }
    specs = {}
    for batch, channels, height, width, num_groups in shapes:
        for dtype, type_name in _AOT_DTYPE_NAMES.items():
            picked = pick_blocks(channels // num_groups, height * width, dtype)
            hw_aligned = height * width % 16 == 0
            # the launcher's pick and, in bf16, for channel counts that are a sum of two powers of two, its split
            # twin: a bench/tune_gpu.py candidate (the sweep runs bf16), and what a sweep times must compile without
            # spills too. (fp32 split twins are not candidates: Triton 3.8 gave the chunked C768 backward a 16-byte
            # stack frame at 40 registers.)
            candidates = [picked, split_tile(picked, channels // num_groups) if dtype == torch.bfloat16 else None]
            # and, for small bf16 single tiles, the several-slabs-per-program candidate at 4096 elements
            tile = picked.block_c * picked.block_hw
            if dtype == torch.bfloat16 and picked.single_tile and tile <= _MAX_SINGLE_TILE // 2:
                candidates.append(group_tile(picked, min(num_groups, _MAX_SINGLE_TILE // tile)))
            # and, for chunked bf16 picks, the other pipeline depths of 1 (plain loops), 2 and 3 stages,
            # bench/tune_gpu.py's candidates
            if dtype == torch.bfloat16 and not picked.single_tile:
                candidates += [dataclasses.replace(picked, stages=s) for s in (1, 2, 3) if s != picked.stages]
            for blocks, pass_name, act_silu, layout in itertools.product(
                [b for b in candidates if b is not None],
                ("fwd", "jvp", "jvp_rows", "bwd"),
                (True, False),
                ("nchw", "nhwc"),
            ):
                # a tangent on the first samples only (PARTIAL_TANGENT, the training step's forward: the tangent's
                # and the primal code in one kernel): the launcher's single-tile picks with SiLU, both layouts
                if pass_name == "jvp_rows" and (blocks != picked or not blocks.single_tile or not act_silu):
                    continue
                # channels-last maps: the launcher's picks at the presets' shapes (not "wide": Triton 3.6 and 3.8
                # spill 4-16 bytes in its C/G 40-48 chunked backward, c64 hw64, whose sums over positions run
                # across the threads of a tile laid out along channels)
                if layout == "nhwc" and (blocks != picked or (batch, channels, height, width) in _WIDE_SHAPES):
                    continue
                c_align = channel_alignment(channels // num_groups, blocks, dtype, pass_name == "bwd")
                c_align = c_align if layout == "nhwc" else 1
                key = (pass_name, type_name, blocks, hw_aligned, act_silu, layout, c_align)
                if key in specs:
                    continue
                constexprs = {
                    "BLOCK_C": blocks.block_c,
                    "BLOCK_C2": blocks.block_c2,
                    "BLOCK_HW": blocks.block_hw,
                    "GROUPS": blocks.groups,
                    "SINGLE_TILE": blocks.single_tile,
                    "STAGES": blocks.stages,
                    **all_options,
                    "ACT_SILU": act_silu,
                    "CHANNELS_LAST": layout == "nhwc",
                    "C_ALIGN": c_align,
                }
                if pass_name == "bwd":
                    fn = _gn_bwd_kernel
                    # the launcher's pick with a residual branch's gradient read and added too (what the model's
                    # blocks run); the sweep's candidates as bench/tune_gpu.py times them, without
                    constexprs["HAS_RESIDUAL"] = blocks == picked
                else:
                    fn = _gn_fwd_kernel
                    with_tangent = pass_name != "fwd"
                    constexprs.update(WITH_TANGENT=with_tangent, HAS_DSCALE=with_tangent, HAS_DSHIFT=with_tangent)
                    constexprs["PARTIAL_TANGENT"] = pass_name == "jvp_rows"
                # Statistics and the grad_weight / grad_bias partials are fp32, the scalars i32/fp32, every
                # other pointer (grad_scale, grad_shift included) has the input's dtype.
                runtime_types = {
                    "mean_ptr": "*fp32",
                    "rstd_ptr": "*fp32",
                    "grad_weight_partial_ptr": "*fp32",
                    "grad_bias_partial_ptr": "*fp32",
                    "HW": "i32",
                    "CPG": "i32",
                    "G": "i32",
                    "eps": "fp32",
                    "tangent_rows": "i32",
                }
                tile = "single" if blocks.single_tile else "chunked"
                split = f"s{blocks.block_c2}" if blocks.block_c2 else ""
                split += f"g{blocks.groups}" if blocks.groups > 1 else ""
                split += f"_s{blocks.stages}" if not blocks.single_tile and blocks.stages != GNBlocks.stages else ""
                specs[key] = compile_spec(
                    f"gn_{pass_name.removesuffix('_rows')}_{type_name}_c{blocks.block_c}{split}_hw{blocks.block_hw}"
                    f"_{tile}_{'silu' if act_silu else 'none'}{f'_nhwc{c_align}' if layout == 'nhwc' else ''}"
                    f"{'_rows' if pass_name == 'jvp_rows' else ''}",
                    fn,
                    constexprs,
                    runtime_types,
                    blocks.num_warps,
                    ["HW"] if hw_aligned else [],
                    pointer_type=f"*{type_name}",
                )
        # the backward's batch sums of grad_weight, grad_bias (both present), for this batch's tile, the largest
        # (PARAM_MAX_ROWS samples at once: the bench's batch of 256) and the loop over larger batches
        for param_blocks in {pick_param_blocks(b) for b in (batch, PARAM_MAX_ROWS, 2 * PARAM_MAX_ROWS)}:
            for type_name in _AOT_DTYPE_NAMES.values():
                key = ("param_sums", type_name, channels % 16 == 0, param_blocks)
                if key in specs:
                    continue
                specs[key] = compile_spec(
                    f"gn_param_sums_{type_name}{'_c16' if channels % 16 == 0 else ''}_b{param_blocks.block_b}"
                    f"_c{param_blocks.block_c}{'_one' if param_blocks.one_step else ''}",
                    _param_sums_kernel,
                    {"BLOCK_B": param_blocks.block_b, "BLOCK_C": param_blocks.block_c,
                     "ONE_STEP": param_blocks.one_step, "HAS_WEIGHT": True, "HAS_BIAS": True},
                    {"grad_weight_partial_ptr": "*fp32", "grad_bias_partial_ptr": "*fp32", "batch": "i32",
                     "channels": "i32"},
                    param_blocks.num_warps,
                    ["channels"] if channels % 16 == 0 else [],
                    pointer_type=f"*{type_name}",
                )  # fmt: skip
    return list(specs.values())
