"""Fused iMF and MeanFlow losses in Triton (DESIGN 2.2, 2.3, 4.3), forward and backward.

iMF: e_u = u + (t - r) du - v_target, e_v = v - v_target, L_u = sum e_u^2, L_v = sum e_v^2, w = 1 / (L + c)^p.
MF: e_u = u - (v_target - clip(t - r, 0, 1) du), L = sum e_u^2. Backward: grad_u = grad_total 2 w_u e_u / B.
Memory floor: forward reads u, du, (v,) v_target once and writes O(B); backward also writes grad_u (, grad_v).

Forward: one program per sample, chunked over the flattened non-batch dims with a vector accumulator.
Backward is elementwise, so it is one program per (sample, chunk).
"""

import os

import torch
import triton
import triton.language as tl

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
# AOT specs: fp16 picks the same blocks as bf16 and differs only in its conversions, so bf16 stands for both.
_AOT_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_MAX_BLOCK = {"fwd": 2048, "bwd": 1024}


def check_gpu_rules(block: int, num_warps: int) -> None:
    """Rules the interpreter does not enforce but a GPU compiler does: tl.arange needs power-of-2 sizes."""
    for name, value in (("BLOCK", block), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise AssertionError(f"loss triton: {name}={value} must be a power of two")


def pick_block(numel_per_sample: int, dtype: torch.dtype, pass_name: str) -> tuple[int, int]:
    """(BLOCK, num_warps) from the per-sample size, the dtype and the pass (fwd/bwd).

    A thread owns one 16-byte vector of each input (4 fp32 or 8 fp16/bf16 elements), which sets num_warps.
    """
    block = min(_MAX_BLOCK[pass_name], triton.next_power_of_2(numel_per_sample))
    elements_per_thread = 16 // dtype.itemsize
    num_warps = min(8, max(1, block // (32 * elements_per_thread)))
    check_gpu_rules(block, num_warps)
    return block, num_warps


@triton.jit
def _time_gap(t_ptr, r_ptr, sample, CLIP_GAP: tl.constexpr):
    gap = tl.load(t_ptr + sample) - tl.load(r_ptr + sample)
    if CLIP_GAP:
        gap = tl.minimum(tl.maximum(gap, 0.0), 1.0)
    return gap


@triton.jit
def _loss_weight(loss, c, p):
    # w = 1 / (L + c)^p = exp(-p log(L + c)), one scalar per sample: in float64, so the GPU's approximate
    # fp32 exp/log (~1e-6 relative here) do not reach the weight.
    return tl.exp(-tl.cast(p, tl.float64) * tl.log(loss.to(tl.float64) + tl.cast(c, tl.float64))).to(tl.float32)


@triton.jit
def _loss_fwd_kernel(
    u_ptr,
    du_ptr,
    v_ptr,
    v_target_ptr,
    t_ptr,
    r_ptr,
    loss_u_ptr,
    loss_v_ptr,
    w_u_ptr,
    w_v_ptr,
    numel_per_sample,
    c,
    p,
    BLOCK: tl.constexpr,
    WITH_V: tl.constexpr,
    CLIP_GAP: tl.constexpr,
):
    sample = tl.program_id(0)
    base = sample.to(tl.int64) * numel_per_sample
    u_ptr += base
    du_ptr += base
    v_ptr += base
    v_target_ptr += base
    gap = _time_gap(t_ptr, r_ptr, sample, CLIP_GAP)
    acc_u = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, numel_per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
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
    loss_u = tl.sum(acc_u, axis=0)
    tl.store(loss_u_ptr + sample, loss_u)
    tl.store(w_u_ptr + sample, _loss_weight(loss_u, c, p))
    if WITH_V:
        loss_v = tl.sum(acc_v, axis=0)
        tl.store(loss_v_ptr + sample, loss_v)
        tl.store(w_v_ptr + sample, _loss_weight(loss_v, c, p))


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
    batch = u.shape[0]
    numel_per_sample = u.numel() // batch
    block, num_warps = pick_block(numel_per_sample, u.dtype, "fwd")
    stats = torch.empty((4 if with_v else 2, batch), device=u.device, dtype=torch.float32)
    loss_u, w_u = stats[0], stats[1]
    loss_v, w_v = (stats[2], stats[3]) if with_v else (loss_u, w_u)
    _loss_fwd_kernel[(batch,)](
        u,
        du,
        v if with_v else u,  # never read without WITH_V
        v_target,
        t,
        r,
        loss_u,
        loss_v,
        w_u,
        w_v,
        numel_per_sample,
        c,
        p,
        BLOCK=block,
        WITH_V=with_v,
        CLIP_GAP=clip_gap,
        num_warps=num_warps,
    )
    return loss_u, loss_v, w_u, w_v


def _backward(grad_total, u, du, v, v_target, t, r, w_u, w_v, with_v: bool, clip_gap: bool):
    batch = u.shape[0]
    numel_per_sample = u.numel() // batch
    block, num_warps = pick_block(numel_per_sample, u.dtype, "bwd")
    grad_u = torch.empty_like(u)
    grad_v = torch.empty_like(v) if with_v else grad_u
    _loss_bwd_kernel[(batch, triton.cdiv(numel_per_sample, block))](
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_u, loss_v, w_u, w_v), each (B,) float32: L_u = sum((u + (t - r) du - v_target)^2),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, w), each (B,) float32: loss = sum((u - (v_target - clip(t - r, 0, 1) du))^2)."""
    loss, _, w, _ = _forward(u, du, None, v_target, t, r, c, p, with_v=False, clip_gap=True)
    return loss, w


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


# Per-tensor shapes of the losses of the `latent-b` (4x32x32) and `cifar` (3x32x32) presets.
AOT_SHAPES = tuple((batch, *sample) for sample in ((4, 32, 32), (3, 32, 32)) for batch in (8, 64))


def aot_specs(shapes=AOT_SHAPES) -> list[dict]:
    """Ahead-of-time compile specs for every launch configuration the launchers pick for `shapes`.

    `shapes`: iterable of per-tensor shapes (B, ...). One spec per (kernel, loss, dtype, BLOCK); arguments the
    JIT would specialise as multiples of 16 are listed in `divisible_by_16` (see group_norm.aot_specs).
    """
    specs = {}
    for shape in shapes:
        numel_per_sample = 1
        for size in shape[1:]:
            numel_per_sample *= size
        for dtype, type_name in _AOT_DTYPE_NAMES.items():
            for pass_name, fn in (("fwd", _loss_fwd_kernel), ("bwd", _loss_bwd_kernel)):
                block, num_warps = pick_block(numel_per_sample, dtype, pass_name)
                for loss_name, with_v, clip_gap in (("imf", True, False), ("meanflow", False, True)):
                    aligned_numel = numel_per_sample % 16 == 0
                    key = (pass_name, loss_name, type_name, block, aligned_numel)
                    if key in specs:
                        continue
                    constexprs = {"BLOCK": block, "WITH_V": with_v, "CLIP_GAP": clip_gap}
                    runtime_types = {
                        "numel_per_sample": "i32",
                        "batch": "i32",
                        "c": "fp32",
                        "p": "fp32",
                        "u_ptr": f"*{type_name}",
                        "du_ptr": f"*{type_name}",
                        "v_ptr": f"*{type_name}",
                        "v_target_ptr": f"*{type_name}",
                        "grad_u_ptr": f"*{type_name}",
                        "grad_v_ptr": f"*{type_name}",
                    }
                    signature = {
                        arg: "constexpr" if arg in constexprs else runtime_types.get(arg, "*fp32")
                        for arg in fn.arg_names
                    }
                    aligned = [arg for arg, kind in signature.items() if kind.startswith("*")]
                    if aligned_numel:
                        aligned.append("numel_per_sample")
                    specs[key] = {
                        "name": f"{loss_name}_loss_{pass_name}_{type_name}_block{block}",
                        "fn": fn,
                        "signature": signature,
                        "constexprs": constexprs,
                        "num_warps": num_warps,
                        "num_stages": 1,
                        "divisible_by_16": aligned,
                    }
    return list(specs.values())
