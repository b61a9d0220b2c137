"""Kernel microbenchmarks (DESIGN 7): each op x backend x shape against the plain-PyTorch baselines.

    python bench/ops.py            # GPU: latent-b + cifar layer shapes + a sweep, bf16; CPU: digits + gauss, fp32
    python bench/ops.py --quick    # GPU: the latent-b shapes; CPU: the digits shapes; both: the sweep's losses
    python bench/ops.py --no-compile                       # without the torch.compile baselines (compile time)
    python bench/ops.py --markdown bench/results/<device>.json   # the latest run as markdown, for BENCHMARKS.md

Ops (rows): `gn.fwd` group_norm_act, `gn.jvp` group_norm_act_jvp, `gn.bwd` the backward of group_norm_act
(`gn.jvp.cl`, `gn.bwd.cl`: the same on channels-last maps, ModelConfig.channels_last, against the same baselines;
`gn.jvp.half`: the tangent on the first half of the samples only, as the iMF training step's forward has it);
`attn.fwd|jvp|bwd` the same for attention; `imf_loss.fwd|bwd`, `mf_loss.fwd|bwd` the fused losses. GroupNorm runs
the ResBlock's FiLM form (weight, bias, scale, shift, SiLU; tangents dx, dscale, dshift), attention has tangents
on q, k and v. Each backend row is the public op with `backend=` (what a user gets, dispatch included).

Baselines (rows too), all plain PyTorch on the same inputs:
  eager       the reference op of `imf_kernels.reference` (primal forward for .fwd/.jvp rows, its autograd
              backward for .bwd rows): the cost of one unfused primal
  func.jvp    torch.func.jvp of the reference (.jvp rows): the slow path the fused tangent replaces
  compile     torch.compile of the primal reference (.fwd/.jvp rows; compile time is not timed)
  sdpa-flash  F.scaled_dot_product_attention on the flash backend (attention, GPU, fp16/bf16): the primal-only floor
  math-jvp    torch.func.jvp of F.scaled_dot_product_attention on the math backend (attn.jvp)

Columns: median time; GB/s = floor bytes (every input read once + every output written once, formulas next to
each op below) / time; that as a fraction of a device-to-device copy measured in the same run (512 MiB on a GPU:
the memory's streaming bandwidth, what the targets use) and of a copy of the op's own floor bytes (what a kernel
of that size can get, launch and tail included; small ops cannot reach the large copy's rate); TFLOP/s for
attention (forward 4 B H Lq Lk D, forward-with-tangent 3x that, backward 2.5x); speed-up = baseline time /
backend time. The GPU targets of the issue are checked at the end from the same rows (bf16, latent-b shapes).
On a CPU the torch backend runs on one thread, timed by that thread's CPU time (the machine is shared; see
bench/common.py); the Triton interpreter is for tests, not timings. Results are appended to
bench/results/<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import append_results, copy_bandwidth, is_cuda, measure, read_results, results_path, run_tags
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

import imf_kernels as K
from imf_kernels import dispatch
from imf_kernels import reference as R

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINES = ("eager", "func.jvp", "compile", "sdpa-flash", "math-jvp")
GPU_BACKENDS = ("cuda", "triton")
# The CPU's clock: the calling thread's CPU time, which is all of a call's work on one torch thread.
CPU_CLOCK = time.thread_time


# ------------------------------------------------------------------------------------------------ layer shapes


@dataclasses.dataclass(frozen=True)
class GroupNormShape:
    batch: int
    channels: int
    height: int
    width: int
    groups: int

    @property
    def label(self) -> str:
        return f"B{self.batch} C{self.channels} {self.height}x{self.width} G{self.groups}"


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    lq: int
    lk: int
    head_dim: int
    kind: str  # "cross" (keys from the context tokens) or "self"

    @property
    def label(self) -> str:
        return f"{self.kind} B{self.batch} H{self.heads} Lq{self.lq} Lk{self.lk} D{self.head_dim}"


@dataclasses.dataclass(frozen=True)
class LossShape:
    batch: int
    channels: int
    size: int

    @property
    def label(self) -> str:
        return f"B{self.batch} {self.channels}x{self.size}x{self.size}"


@dataclasses.dataclass
class Layers:
    """The distinct layer shapes of one model, each with how many layers of the forward pass have it."""

    group_norm: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    attention: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    loss: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def model_layers(cfg: Any, batch: int) -> Layers:
    """The GroupNorm, attention and loss shapes of one forward pass of `imf.model.IMFNet(cfg)` at this batch.

    Walks the U-Net of DESIGN 3.2 as IMFNet builds it (bench/test_bench_ops.py checks it against a traced
    forward): every ResBlock has two GroupNorms (in and out channels), every attention block one GroupNorm and one
    attention (cross: Lk = the context tokens; self: Lk = Lq), the decoder's ResBlocks read [h, skip], the aux
    v-head repeats the last decoder level and the output layer.
    """
    from imf.model import num_groups_for

    layers = Layers()
    tokens = sum(n for name, n in cfg.tokens.items() if name != "t" or cfg.condition_on_t)

    def res_block(in_ch: int, out_ch: int, res: int, record: list) -> None:
        for ch in (in_ch, out_ch):
            record.append(GroupNormShape(batch, ch, res, res, num_groups_for(ch)))

    def attn_block(ch: int, res: int, lk: int | None, record: list) -> None:
        heads = max(1, ch // cfg.head_dim)
        record.append(GroupNormShape(batch, ch, res, res, num_groups_for(ch)))
        kind = "self" if lk is None else "cross"
        record.append(AttentionShape(batch, heads, res * res, res * res if lk is None else lk, ch // heads, kind))

    record: list = []
    chs = [cfg.width * mult for mult in cfg.channel_mult]
    ch, res, skip_chs = cfg.width, cfg.image_size, [cfg.width]
    for i, out_ch in enumerate(chs):
        for j in range(cfg.num_res_blocks):
            res_block(ch if j == 0 else out_ch, out_ch, res, record)
            if res in cfg.cross_attn_resolutions:
                attn_block(out_ch, res, tokens, record)
        ch = out_ch
        skip_chs += [ch] * cfg.num_res_blocks
        if i < len(chs) - 1:
            skip_chs.append(ch)
            res //= 2
    res_block(ch, ch, res, record)
    if res in cfg.self_attn_resolutions:
        attn_block(ch, res, None, record)
    attn_block(ch, res, tokens, record)
    res_block(ch, ch, res, record)
    last_level: list = []
    for i, out_ch in reversed(list(enumerate(chs))):
        level: list = []
        for _ in range(cfg.num_res_blocks + 1):
            res_block(ch + skip_chs.pop(), out_ch, res, level)
            ch = out_ch
            if res in cfg.cross_attn_resolutions:
                attn_block(out_ch, res, tokens, level)
        record += level
        last_level = level
        if i > 0:
            res *= 2
    output_norm = [GroupNormShape(batch, ch, res, res, num_groups_for(ch))]
    record += output_norm
    if cfg.v_head == "aux":
        record += last_level + output_norm
    for shape in record:
        (layers.group_norm if isinstance(shape, GroupNormShape) else layers.attention)[shape] += 1
    layers.loss[LossShape(batch, cfg.image_channels, cfg.image_size)] += 1
    return layers


def preset_layers(name: str) -> dict[str, Layers]:
    """{source label: layers} of a preset at its training batch size.

    For latent-b also "latent-b(t)": its cross-attention with the 24 context tokens of condition_on_t, the
    shape the issue's cross-attention target names.
    """
    from imf.config import get_preset

    preset = get_preset(name)
    out = {name: model_layers(preset.model, preset.train.batch_size)}
    if name == "latent-b":
        with_t = dataclasses.replace(preset.model, condition_on_t=True)
        cross = model_layers(with_t, preset.train.batch_size).attention
        out["latent-b(t)"] = Layers(
            attention=collections.Counter({s: n for s, n in cross.items() if s.kind == "cross"})
        )
    return out


def sweep_layers(device: torch.device) -> Layers:
    """Shapes beyond the presets: large feature maps (chunked GroupNorm), long self-attention, big losses."""
    if is_cuda(device):
        return Layers(
            group_norm=collections.Counter(
                {GroupNormShape(64, 256, 64, 64, 32): 1, GroupNormShape(16, 128, 128, 128, 32): 1}
            ),
            attention=collections.Counter(
                {
                    AttentionShape(8, 8, 1024, 1024, 64, "self"): 1,
                    AttentionShape(2, 8, 4096, 4096, 64, "self"): 1,
                    AttentionShape(64, 8, 4096, 24, 64, "cross"): 1,
                }
            ),
            loss=collections.Counter({LossShape(256, 4, 64): 1, LossShape(256, 16, 64): 1}),
        )
    return Layers(
        group_norm=collections.Counter({GroupNormShape(8, 64, 32, 32, 16): 1}),
        attention=collections.Counter({AttentionShape(4, 4, 256, 256, 32, "self"): 1}),
        loss=collections.Counter({LossShape(128, 3, 32): 1}),
    )


# ----------------------------------------------------------------------------------------------------- cases


def _bytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


Thunk = Callable[[], Any]


@dataclasses.dataclass
class Case:
    """One op at one shape: how to run it on a backend, its baselines, and its floor bytes and FLOPs."""

    op: str
    shape: str
    dims: dict[str, Any]
    sources: tuple[str, ...]
    nbytes: int
    flops: float | None
    run: Callable[[str], Thunk]  # backend name -> the timed call
    # name -> (key, builder); cases of one shape share inputs, so a baseline key is timed once per shape
    baselines: dict[str, tuple[str, Callable[[], Thunk]]]


def _compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Thunk:
    """torch.compile(fn) called once here, so compilation stays out of the timed calls.

    Dynamo is reset first: every shape compiles afresh, specialised (no dynamic shapes, no recompile limit).
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    compiled(*args, **kwargs)
    return lambda: compiled(*args, **kwargs)


def _grad(outputs: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_outputs: torch.Tensor | None) -> Thunk:
    """The backward alone: the graph is built once, each call differentiates it again."""
    return lambda: torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)


def group_norm_cases(shape: GroupNormShape, sources: tuple[str, ...], device, dtype) -> list[Case]:
    b, c, g = shape.batch, shape.channels, shape.groups
    n = b * c * shape.height * shape.width

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype) * std

    x, dx, grad_y = (randn(b, c, shape.height, shape.width) for _ in range(3))
    weight, bias = 1 + randn(c, std=0.1), randn(c, std=0.1)
    scale, shift, dscale, dshift = (randn(b, c, std=0.1) for _ in range(4))
    modulation = dict(scale=scale, shift=shift)
    params = (x, weight, bias, scale, shift)
    leaves = tuple(p.detach().clone().requires_grad_() for p in params)
    e, e32 = _bytes(1, dtype), 4
    dims = dataclasses.asdict(shape)

    def eager() -> Thunk:
        return lambda: R.group_norm_act(x, g, weight, bias, **modulation)

    def compiled() -> Thunk:
        return _compiled(R.group_norm_act, x, g, weight, bias, **modulation)

    def func_jvp() -> Thunk:
        return lambda: R.group_norm_act_jvp(x, dx, g, weight, bias, **modulation, dscale=dscale, dshift=dshift)

    # a tangent on the first half of the samples only (the iMF step's r = t rows have none)
    half = max(1, b // 2)
    x_half, dx_half, dscale_half, dshift_half = x[:half], dx[:half], dscale[:half], dshift[:half]
    modulation_half = dict(scale=scale[:half], shift=shift[:half], dscale=dscale_half, dshift=dshift_half)

    def func_jvp_half() -> Thunk:  # the primal of every sample, torch.func.jvp of the first half's
        def run():
            y = R.group_norm_act(x, g, weight, bias, **modulation)
            return y, R.group_norm_act_jvp(x_half, dx_half, g, weight, bias, **modulation_half)[1]

        return run

    def eager_backward() -> Thunk:
        leaf_x, leaf_w, leaf_b, leaf_s, leaf_sh = leaves
        y = R.group_norm_act(leaf_x, g, leaf_w, leaf_b, scale=leaf_s, shift=leaf_sh)
        return _grad(y, leaves, grad_y)

    def backend_backward(leaves: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> Callable[[str], Thunk]:
        def run(name: str) -> Thunk:
            leaf_x, leaf_w, leaf_b, leaf_s, leaf_sh = leaves
            y = K.group_norm_act(leaf_x, g, leaf_w, leaf_b, scale=leaf_s, shift=leaf_sh, backend=name)
            return _grad(y, leaves, grad_y)

        return run

    # the same maps channels-last (ModelConfig.channels_last), the same baselines (on the contiguous maps)
    x_cl, dx_cl, grad_y_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, dx, grad_y))
    leaves_cl = (leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(), *leaves[1:])

    forward_baselines = {"eager": ("eager", eager), "compile": ("compile", compiled)}
    shared = dict(shape=shape.label, dims=dims, sources=sources, flops=None)
    cases = [
        # read x + weight, bias + scale, shift; write y + mean, rstd (fp32)
        Case(
            op="gn.fwd",
            nbytes=2 * n * e + 2 * c * e + 2 * b * c * e + 2 * b * g * e32,
            run=lambda name: lambda: K.group_norm_act(x, g, weight, bias, **modulation, backend=name),
            baselines=forward_baselines,
            **shared,
        ),
    ]
    # read x, dx + weight, bias + scale, shift, dscale, dshift; write y, dy + mean, rstd (fp32);
    # the backward: read grad_y, x + weight, bias + scale, shift + mean, rstd (fp32);
    # write grad_x + grad_weight, grad_bias + grad_scale, grad_shift. Both also on channels-last maps (.cl: the same
    # bytes, the same baselines).
    layouts = (
        ("", (x, dx), backend_backward(leaves, grad_y)),
        (".cl", (x_cl, dx_cl), backend_backward(leaves_cl, grad_y_cl)),
    )
    for suffix, maps, backward in layouts:
        cases += [
            Case(
                op="gn.jvp" + suffix,
                nbytes=4 * n * e + 2 * c * e + 4 * b * c * e + 2 * b * g * e32,
                run=lambda name, maps=maps: (
                    lambda: K.group_norm_act_jvp(
                        *maps, g, weight, bias, **modulation, dscale=dscale, dshift=dshift, backend=name
                    )
                ),
                baselines={**forward_baselines, "func.jvp": ("func.jvp", func_jvp)},
                **shared,
            ),
            Case(
                op="gn.bwd" + suffix,
                nbytes=3 * n * e + 4 * c * e + 4 * b * c * e + 2 * b * g * e32,
                run=backward,
                baselines={"eager": ("eager-bwd", eager_backward)},
                **shared,
            ),
        ]
    # gn.jvp.half: read x + dx, dscale, dshift of half the samples, write y + dy of half; the other reads and writes
    # as gn.jvp's
    cases.append(
        Case(
            op="gn.jvp.half",
            nbytes=2 * n * e + 2 * (n // b) * half * e + 2 * c * e + 2 * b * c * e + 2 * half * c * e + 2 * b * g * e32,
            run=lambda name: (
                lambda: K.group_norm_act_jvp(
                    x, dx_half, g, weight, bias, **modulation, dscale=dscale_half, dshift=dshift_half, backend=name
                )
            ),
            baselines={**forward_baselines, "func.jvp": ("func.jvp", func_jvp_half)},
            **shared,
        )
    )
    return cases


def attention_cases(shape: AttentionShape, sources: tuple[str, ...], device, dtype) -> list[Case]:
    b, h, lq, lk, d = shape.batch, shape.heads, shape.lq, shape.lk, shape.head_dim
    q, dq, grad_o = (torch.randn(b, h, lq, d, device=device, dtype=dtype) for _ in range(3))
    k, v, dk, dv = (torch.randn(b, h, lk, d, device=device, dtype=dtype) for _ in range(4))
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    query_elems, key_elems, lse_bytes = b * h * lq * d, b * h * lk * d, b * h * lq * 4
    e = _bytes(1, dtype)
    forward_flops = 4 * b * h * lq * lk * d  # q k^T and p v: 2 B H Lq Lk D each

    def eager() -> Thunk:
        return lambda: R.attention(q, k, v)

    def compiled() -> Thunk:
        return _compiled(R.attention, q, k, v)

    def sdpa_flash() -> Thunk:
        def call() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return call

    def func_jvp() -> Thunk:
        return lambda: R.attention_jvp(q, k, v, dq, dk, dv)

    def math_jvp() -> Thunk:
        def call() -> tuple[torch.Tensor, torch.Tensor]:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))

        return call

    def eager_backward() -> Thunk:
        return _grad(R.attention(*leaves), leaves, grad_o)

    def backend_backward(name: str) -> Thunk:
        return _grad(K.attention(*leaves, backend=name), leaves, grad_o)

    forward_baselines = {"eager": ("eager", eager), "compile": ("compile", compiled)}
    if is_cuda(device):
        forward_baselines["sdpa-flash"] = ("sdpa-flash", sdpa_flash)
    shared = dict(shape=shape.label, dims=dataclasses.asdict(shape), sources=sources)
    return [
        # read q, k, v; write o + lse (fp32)
        Case(
            op="attn.fwd",
            nbytes=(2 * query_elems + 2 * key_elems) * e + lse_bytes,
            flops=forward_flops,
            run=lambda name: lambda: K.attention(q, k, v, backend=name),
            baselines=forward_baselines,
            **shared,
        ),
        # read q, k, v, dq, dk, dv; write o, do + lse (fp32)
        Case(
            op="attn.jvp",
            nbytes=(4 * query_elems + 4 * key_elems) * e + lse_bytes,
            flops=3 * forward_flops,
            run=lambda name: lambda: K.attention_jvp(q, k, v, dq, dk, dv, backend=name),
            baselines={
                **forward_baselines,
                "func.jvp": ("func.jvp", func_jvp),
                "math-jvp": ("math-jvp", math_jvp),
            },
            **shared,
        ),
        # read grad_o, q, o + k, v + lse (fp32); write grad_q + grad_k, grad_v. FLOPs: recompute q k^T, then
        # grad_o v^T, p^T grad_o, ds k, ds^T q: five matmuls = 2.5x the forward
        Case(
            op="attn.bwd",
            nbytes=(4 * query_elems + 4 * key_elems) * e + lse_bytes,
            flops=2.5 * forward_flops,
            run=backend_backward,
            baselines={"eager": ("eager-bwd", eager_backward)},
            **shared,
        ),
    ]


def loss_cases(shape: LossShape, sources: tuple[str, ...], device, dtype) -> list[Case]:
    b = shape.batch
    size = (b, shape.channels, shape.size, shape.size)
    u, du, v, v_target = (torch.randn(size, device=device, dtype=dtype) for _ in range(4))
    t = torch.rand(b, device=device)
    r = t * torch.rand(b, device=device)
    leaf_u, leaf_v = u.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    n, e, e32 = u.numel(), _bytes(1, dtype), 4

    def imf_backward(loss_fn: Callable[..., Any], **kwargs: Any) -> Thunk:
        loss, _ = loss_fn(leaf_u, du, leaf_v, v_target, t, r, **kwargs)
        return _grad(loss, (leaf_u, leaf_v), None)

    def mf_backward(loss_fn: Callable[..., Any], **kwargs: Any) -> Thunk:
        loss, _ = loss_fn(leaf_u, du, v_target, t, r, **kwargs)
        return _grad(loss, (leaf_u,), None)

    shared = dict(shape=shape.label, dims=dataclasses.asdict(shape), sources=sources, flops=None)
    return [
        # read u, du, v, v_target + t, r (fp32); write loss_u, loss_v, w_u, w_v (fp32, per sample)
        Case(
            op="imf_loss.fwd",
            nbytes=4 * n * e + 2 * b * e32 + 4 * b * e32,
            run=lambda name: lambda: K.imf_loss(u, du, v, v_target, t, r, backend=name),
            baselines={
                "eager": ("imf-eager", lambda: lambda: R.imf_loss(u, du, v, v_target, t, r)),
                "compile": ("imf-compile", lambda: _compiled(R.imf_loss, u, du, v, v_target, t, r)),
            },
            **shared,
        ),
        # read u, du, v, v_target + t, r, w_u, w_v (fp32); write grad_u, grad_v
        Case(
            op="imf_loss.bwd",
            nbytes=6 * n * e + 4 * b * e32,
            run=lambda name: imf_backward(K.imf_loss, backend=name),
            baselines={"eager": ("imf-eager-bwd", lambda: imf_backward(R.imf_loss))},
            **shared,
        ),
        # read u, du, v_target + t, r (fp32); write loss, w (fp32, per sample)
        Case(
            op="mf_loss.fwd",
            nbytes=3 * n * e + 2 * b * e32 + 2 * b * e32,
            run=lambda name: lambda: K.meanflow_loss(u, du, v_target, t, r, backend=name),
            baselines={
                "eager": ("mf-eager", lambda: lambda: R.meanflow_loss(u, du, v_target, t, r)),
                "compile": ("mf-compile", lambda: _compiled(R.meanflow_loss, u, du, v_target, t, r)),
            },
            **shared,
        ),
        # read u, du, v_target + t, r, w (fp32); write grad_u
        Case(
            op="mf_loss.bwd",
            nbytes=4 * n * e + 3 * b * e32,
            run=lambda name: mf_backward(K.meanflow_loss, backend=name),
            baselines={"eager": ("mf-eager-bwd", lambda: mf_backward(R.meanflow_loss))},
            **shared,
        ),
    ]


CASE_BUILDERS = {"group_norm": group_norm_cases, "attention": attention_cases, "loss": loss_cases}


# ------------------------------------------------------------------------------------------------------- run


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _time(build: Callable[[], Thunk], device: torch.device, budget_s: float) -> tuple[Any, str | None]:
    """(timing, None), or (None, why not): a variant that cannot run is a row with its reason, not a crash."""
    try:
        return measure(build(), device, budget_s=budget_s, clock=CPU_CLOCK), None
    except Exception as error:  # noqa: BLE001 - any failure of one variant is reported in its row
        return None, _first_line(error)


_SAME_SIZE_COPY: dict[tuple[str, int], float] = {}


def same_size_copy_gbps(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy that moves the case's floor bytes (nbytes / 2 read + nbytes / 2 written),
    measured once per size: what the memory system gives a kernel of this size, launch and tail included. A few
    MB (the loss at latent-b shapes) cannot reach the bandwidth of the 512 MiB reference copy."""
    key = (str(device), nbytes)
    if key not in _SAME_SIZE_COPY:
        _SAME_SIZE_COPY[key] = copy_bandwidth(device, nbytes=max(1, nbytes // 2), budget_s=0.1, clock=CPU_CLOCK)[0]
    return _SAME_SIZE_COPY[key]


def make_row(
    case: Case, variant: str, kind: str, timing: Any, note: str | None, copy_gbps: float, same_copy_gbps: float
) -> dict:
    """One results row; GB/s, copy fractions and TFLOP/s from the case's floor bytes and FLOPs."""
    row = {
        "op": case.op,
        "shape": case.shape,
        "dims": case.dims,
        "sources": list(case.sources),
        "variant": variant,
        "kind": kind,
        "median_ms": None,
        "host_ms": None,
        "reps": None,
        "bytes": case.nbytes,
        "gbps": None,
        "copy_fraction": None,
        "same_copy_fraction": None,
        "tflops": None,
        "speedup": {},
        "note": note,
    }
    if timing is not None:
        seconds = timing.median_ms * 1e-3
        gbps = case.nbytes / seconds / 1e9
        row.update(
            median_ms=timing.median_ms,
            host_ms=getattr(timing, "host_ms", None),  # GPU: the host's time to queue one call
            reps=timing.reps,
            gbps=gbps,
            copy_fraction=gbps / copy_gbps,
            same_copy_fraction=gbps / same_copy_gbps,
        )
        if case.flops is not None:
            row["tflops"] = case.flops / seconds / 1e12
    return row


def run_cases(
    cases: list[Case],
    backends: list[str],
    device: torch.device,
    budget_s: float,
    copy_gbps: float,
    skip_baselines: tuple[str, ...] = (),
) -> list[dict]:
    """Rows of every baseline and backend of the cases of one problem (baselines shared by key are timed once)."""
    rows, timed = [], {}
    for case in cases:
        same_copy = same_size_copy_gbps(device, case.nbytes)
        baseline_ms = {}
        for name, (key, build) in case.baselines.items():
            if name in skip_baselines:
                continue
            if key not in timed:
                timed[key] = _time(build, device, budget_s)
            timing, note = timed[key]
            rows.append(make_row(case, name, "baseline", timing, note, copy_gbps, same_copy))
            if timing is not None:
                baseline_ms[name] = timing.median_ms
        for name in backends:
            timing, note = _time(lambda name=name, case=case: case.run(name), device, budget_s)
            row = make_row(case, name, "backend", timing, note, copy_gbps, same_copy)
            if timing is not None:
                row["speedup"] = {base: ms / timing.median_ms for base, ms in baseline_ms.items()}
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU target of the issue: the minimum over the matching rows of one backend must reach `minimum`."""

    text: str
    op: str
    source: str
    metric: str  # "copy_fraction", "same_copy_fraction" or "speedup:<baseline>"
    minimum: float
    dims: tuple[tuple[str, Any], ...] = ()

    def matches(self, row: dict) -> bool:
        return (
            row["op"] == self.op
            and self.source in row["sources"]
            and all(row["dims"].get(name) == value for name, value in self.dims)
        )

    def value(self, row: dict) -> float | None:
        if self.metric in ("copy_fraction", "same_copy_fraction"):
            return row.get(self.metric)
        return row["speedup"].get(self.metric.removeprefix("speedup:"))

    def format(self, value: float) -> str:
        return f"{value:.0%}" if self.metric.endswith("copy_fraction") else f"{value:.2f}x"


def with_same_size_twins(targets: tuple[Target, ...]) -> tuple[Target, ...]:
    """Each copy-bandwidth target followed by its twin against a copy of the same bytes (`same_copy_fraction`).

    The issue's fraction is of the copy bandwidth measured in the same run (`copy_fraction`: a 512 MiB copy). At the
    small latent-b shapes a copy of the op's own bytes does not reach that either (lease d: a 34 MB copy at about
    half of it, launch and L2 write-back included): the twin says how far the op is from what a copy of its size
    does, next to the verdict of the issue's target, which stays as it is."""
    twins = []
    for target in targets:
        twins.append(target)
        if target.metric == "copy_fraction":
            twins.append(
                dataclasses.replace(target, text=f"{target.text}, of a same-size copy", metric="same_copy_fraction")
            )
    return tuple(twins)


CROSS_1024_24 = (("kind", "cross"), ("lq", 1024), ("lk", 24))
TARGETS = (
    Target("GroupNorm+SiLU forward-with-tangent >= 80% of copy bandwidth", "gn.jvp", "latent-b", "copy_fraction", 0.8),
    Target(
        "GroupNorm+SiLU forward-with-tangent >= 4x eager torch.func.jvp", "gn.jvp", "latent-b", "speedup:func.jvp", 4
    ),
    Target("GroupNorm+SiLU backward >= 70% of copy bandwidth", "gn.bwd", "latent-b", "copy_fraction", 0.7),
    Target(
        "cross-attention forward-with-tangent (Lq 1024, 24 tokens) >= 60% of copy bandwidth",
        "attn.jvp",
        "latent-b(t)",
        "copy_fraction",
        0.6,
        CROSS_1024_24,
    ),
    Target(
        "cross-attention forward-with-tangent (Lq 1024, 24 tokens) >= 5x torch.func.jvp of math attention",
        "attn.jvp",
        "latent-b(t)",
        "speedup:math-jvp",
        5,
        CROSS_1024_24,
    ),
    Target(
        "self-attention forward-with-tangent >= 3x math attention under torch.func.jvp",
        "attn.jvp",
        "latent-b",
        "speedup:math-jvp",
        3,
        (("kind", "self"),),
    ),
    Target("fused iMF loss forward >= 80% of copy bandwidth", "imf_loss.fwd", "latent-b", "copy_fraction", 0.8),
    Target("fused iMF loss backward >= 80% of copy bandwidth", "imf_loss.bwd", "latent-b", "copy_fraction", 0.8),
)
TARGETS = with_same_size_twins(TARGETS)


def evaluate_targets(rows: list[dict], backends: tuple[str, ...] = GPU_BACKENDS) -> list[dict]:
    """One verdict per target and backend: the worst matching row's value against the minimum.

    A target is measured only when every matching row ran; a shape that failed makes it "not measured".
    """
    verdicts = []
    for target in TARGETS:
        for backend in backends:
            matching = [row for row in rows if row.get("variant") == backend and target.matches(row)]
            verdict = {"target": target.text, "backend": backend, "value": None, "shape": None, "met": None}
            if not matching:
                verdict["status"] = "not measured (no matching row in this run)"
            elif any(target.value(row) is None for row in matching):
                failed = next(row for row in matching if target.value(row) is None)
                verdict["status"] = f"not measured ({failed['shape']}: {failed['note'] or 'no baseline time'})"
            else:
                worst = min(matching, key=target.value)
                value = target.value(worst)
                met = value >= target.minimum
                verdict.update(value=value, shape=worst["shape"], met=met)
                verdict["status"] = f"{target.format(value)} at {worst['shape']} ({'met' if met else 'MISSED'})"
            verdicts.append(verdict)
    return verdicts


# ------------------------------------------------------------------------------------------------------ print


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_tables(console: Console, rows: list[dict]) -> None:
    """One rich table per op family; baselines first, then backends with their speed-ups."""
    families = collections.OrderedDict()
    for row in rows:
        if row.get("kind") in ("backend", "baseline"):
            families.setdefault(row["op"].split(".")[0], []).append(row)
    for family, family_rows in families.items():
        baselines = [name for name in BASELINES if any(row["variant"] == name for row in family_rows)]
        has_flops = any(row["tflops"] is not None for row in family_rows)
        table = Table(title=family, show_lines=False)
        for column in ("op", "shape", "variant", "ms", "GB/s", "of copy", "of same-size copy"):
            table.add_column(column, justify="left" if column in ("op", "shape", "variant") else "right")
        if has_flops:
            table.add_column("TFLOP/s", justify="right")
        for name in baselines:
            table.add_column(f"vs {name}", justify="right")
        previous = None
        for row in family_rows:
            if previous is not None and (row["op"], row["shape"]) != previous:
                table.add_section()
            previous = (row["op"], row["shape"])
            if row["median_ms"] is None:
                cells = ["not run", "", "", ""]
            else:
                cells = [
                    _fmt(row["median_ms"], ".3f"),
                    _fmt(row["gbps"], ".1f"),
                    _fmt(row["copy_fraction"], ".0%"),
                    _fmt(row.get("same_copy_fraction"), ".0%"),
                ]
            if has_flops:
                cells.append(_fmt(row["tflops"], ".1f"))
            cells += [
                _fmt(row["speedup"].get(name), ".2f") + ("x" if name in row["speedup"] else "") for name in baselines
            ]
            shape = f"{row['shape']} [{','.join(row['sources'])}]"
            table.add_row(row["op"], shape, row["variant"], *cells)
        console.print(table)
    notes = [row for row in rows if row.get("note")]
    if notes:
        console.print("[bold]not run:[/bold]")
        for row in notes:
            console.print(f"  {row['op']} {row['shape']} {row.get('variant', '')}: {row['note']}", markup=False)


def markdown_summary(rows: list[dict]) -> str:
    """The latest ops run in a results file, as markdown for BENCHMARKS.md: its tags, the targets (GPU) and
    every backend row with its speed-ups (a baseline's time is the backend's time times that speed-up)."""
    runs = [row for row in rows if row.get("bench") == "ops"]
    if not runs:
        raise ValueError("markdown_summary: the results hold no rows of bench/ops.py")
    latest = max(row["date"] for row in runs)
    run = [row for row in runs if row["date"] == latest]
    tags, copy = run[0], next(row for row in run if row["op"] == "copy")
    cases = [row for row in run if row.get("kind") in ("backend", "baseline")]
    dirty = " (+ uncommitted changes)" if tags["dirty"] else ""
    lines = [
        f"{tags['device']}, {tags['date']}, commit {tags['commit']}{dirty}, torch {tags['torch']}, "
        f"triton {tags['triton']}, {cases[0]['dtype'] if cases else ''}; device-to-device copy "
        f"{copy['gbps']:.1f} GB/s.",
        "",
    ]
    targets = [row for row in run if row["op"] == "target"]
    if targets:
        lines += ["| target | backend | measured |", "|---|---|---|"]
        lines += [f"| {row['target']} | {row['backend']} | {row['status']} |" for row in targets]
        lines.append("")
    baselines = [name for name in BASELINES if any(row["variant"] == name for row in cases)]
    header = ["op", "shape", "from", "backend", "ms", "GB/s", "of copy", "of same-size copy", "TFLOP/s"]
    header += [f"vs {b}" for b in baselines]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in cases:
        if row["kind"] != "backend":
            continue
        cells = [row["op"], row["shape"], ",".join(row["sources"]), row["variant"]]
        if row["median_ms"] is None:
            cells += [f"not run: {row['note']}", "", "", "", ""]
        else:
            cells += [
                _fmt(row["median_ms"], ".3f"),
                _fmt(row["gbps"], ".1f"),
                _fmt(row["copy_fraction"], ".0%"),
                _fmt(row.get("same_copy_fraction"), ".0%"),
                _fmt(row["tflops"], ".2f"),
            ]
        cells += [_fmt(row["speedup"].get(name), ".2f") + ("x" if name in row["speedup"] else "") for name in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- main


def collect_problems(layer_sets: dict[str, Layers]) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(family, shape, sources) for every distinct shape, in first-seen order, with every source that has it."""
    sources: dict[tuple[str, Any], list[str]] = {}
    for source, layers in layer_sets.items():
        for family, counter in (
            ("group_norm", layers.group_norm),
            ("attention", layers.attention),
            ("loss", layers.loss),
        ):
            for shape in counter:
                sources.setdefault((family, shape), []).append(source)
    return [(family, shape, tuple(names)) for (family, shape), names in sources.items()]


def run_layer_sets(presets: list[str], device: torch.device, quick: bool, no_sweep: bool) -> dict[str, Layers]:
    """The layer shapes a run times, by source: the presets', then the sweep's (with `quick` only its losses)."""
    layer_sets = {}
    for name in presets:
        layer_sets.update(preset_layers(name))
    if not no_sweep:
        sweep = sweep_layers(device)
        # --quick keeps the sweep's losses: they take seconds, and at their size (GPU: 34 and 134 MB of inputs) they
        # show what the loss kernels reach where the launches do not set the time (the latent-b loss moves 8 MB).
        layer_sets["sweep"] = Layers(loss=sweep.loss) if quick else sweep
    return layer_sets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes: latent-b (GPU) or digits (CPU), of the sweep only its losses (a few seconds)",
    )
    parser.add_argument("--presets", nargs="+", help="presets whose layer shapes to run (default: by device)")
    parser.add_argument("--no-sweep", action="store_true", help="only the presets' layer shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--backends", nargs="+", help="default: every usable backend on a GPU, torch on a CPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (compile time)")
    parser.add_argument("--budget", type=float, help="seconds of timed calls per variant (default 0.2 GPU, 0.3 CPU)")
    parser.add_argument("--out", help="results file (default bench/results/<device>.json)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no results file")
    parser.add_argument("--markdown", metavar="RESULTS", help="print the latest run in a results file as markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        if not os.path.isfile(args.markdown):
            print(f"ops.py: error: --markdown {args.markdown}: no such file", file=sys.stderr)
            return 2
        print(markdown_summary(read_results(args.markdown)), end="")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    on_gpu = is_cuda(device)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    # The Triton interpreter is for tests, not timings: on a CPU only the torch backend runs.
    backends = args.backends or ([s.name for s in dispatch.backends() if s.usable] if on_gpu else ["torch"])
    statuses = {status.name: status for status in dispatch.backends()}
    refused = [
        f"{name} ({statuses[name].reason if name in statuses else 'no such backend'})"
        for name in backends
        if name not in statuses or not statuses[name].usable
    ]
    if refused:
        print(f"ops.py: error: --backends: {'; '.join(refused)}", file=sys.stderr)
        return 2
    if args.presets:
        presets = args.presets
    elif on_gpu:
        presets = ["latent-b"] if args.quick else ["latent-b", "cifar"]
    else:
        presets = ["digits"] if args.quick else ["digits", "gauss"]
    budget_s = args.budget or (0.2 if on_gpu else 0.3)
    if not on_gpu:
        # One thread, timed by its own CPU time (CPU_CLOCK): on a shared machine a second thread's barrier
        # waits for a descheduled peer, and wall-clock medians swing with the other processes' load.
        torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 200)

    tags = run_tags(device, bench="ops")
    console.print(
        f"[bold]{tags['device']}[/bold]  {dtype_name}  torch {tags['torch']}  triton {tags['triton']}  "
        f"commit {tags['commit']}{' (dirty)' if tags['dirty'] else ''}  presets {', '.join(presets)}"
    )
    for status in dispatch.backends():
        console.print(f"  backend {status.name}: {'usable' if status.usable else status.reason}", markup=False)

    path = args.out or results_path(device)

    def save(new_rows: list[dict]) -> None:
        # after the copy, after each shape and after the verdicts: a run cut short (a lease's deadline) keeps what
        # it measured, as rows of one run (the same tags)
        if not args.no_save:
            append_results(path, new_rows, tags)

    torch.manual_seed(0)
    copy_gbps, copy_timing = copy_bandwidth(device, clock=CPU_CLOCK)
    console.print(f"device-to-device copy: {copy_gbps:.1f} GB/s ({copy_timing.median_ms:.3f} ms)")
    rows = [
        {
            "op": "copy",
            "variant": "dst.copy_(src)",
            "kind": "reference",
            "median_ms": copy_timing.median_ms,
            "reps": copy_timing.reps,
            "gbps": copy_gbps,
        }
    ]
    save(rows)

    problems = collect_problems(run_layer_sets(presets, device, args.quick, args.no_sweep))
    for index, (family, shape, sources) in enumerate(problems, 1):
        console.print(f"[{index}/{len(problems)}] {family} {shape.label} [{','.join(sources)}]", markup=False)
        try:
            cases = CASE_BUILDERS[family](shape, sources, device, dtype)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory for the inputs: say so, go on
            note = _first_line(error)
            console.print(f"  not run: {note}", markup=False)
            failed = {"op": family, "kind": "failed", "shape": shape.label, "dtype": dtype_name, "note": note}
            rows.append(failed)
            save([failed])
            continue
        skip = ("compile",) if args.no_compile else ()
        shape_rows = [
            {**row, "dtype": dtype_name} for row in run_cases(cases, backends, device, budget_s, copy_gbps, skip)
        ]
        rows += shape_rows
        save(shape_rows)
        del cases
        if on_gpu:
            torch.cuda.empty_cache()
    torch._dynamo.reset()

    print_tables(console, rows)
    if on_gpu and dtype == torch.bfloat16:
        verdicts = evaluate_targets(rows, tuple(b for b in GPU_BACKENDS if b in backends))
        console.print("[bold]GPU targets (bf16, latent-b layer shapes, worst shape shown):[/bold]")
        for verdict in verdicts:
            console.print(f"target: {verdict['target']} [{verdict['backend']}]: {verdict['status']}", markup=False)
        save([{"op": "target", "kind": "target", **verdict} for verdict in verdicts])
    else:
        console.print(
            f"GPU targets: not evaluated (they are for bf16 on a GPU; this run: {dtype_name} on {device.type})"
        )

    if not args.no_save:
        console.print(f"results appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
