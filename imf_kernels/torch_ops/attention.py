"""Softmax attention with its tangent, composite PyTorch (DESIGN 4.3).

s = scale q k^T, p = softmax(s), o = p v; tangent ds = scale (dq k^T + q dk^T),
do = (p * ds) v - rowsum(p * ds) o + p dv. The score matrix is materialised: this is the CPU path, where
Lq Lk floats are cheap next to the matmuls. Floor: read q, k, v (and tangents), write o (and do).

The scores are held transposed, s^T = scale k q^T of shape (B, H, Lk, Lq): the softmax reductions then run
over a strided dimension, vectorised across queries, where ATen's last-dimension reductions pay per row (with
Lk = 24 keys, amax over the last dimension took 16x the time); the matmuls take the transposed views as they are.
"""

import math
from typing import Any

import torch
from torch import Tensor

# q, k, v, the tangents and grad_o are read with any strides (the matmuls take transposed and permuted views as
# they are), so the public ops pass them without a copy (`imf_kernels.interface`). Outputs of q's shape (o, do,
# grad_q) are laid out like q: (B, H, D, Lq)-major when q is a transposed view (a channels-first feature map's
# pixels, `imf.model.AttnBlock.fused`), so that the caller's view back to channels-first needs no copy either.
STRIDED_INPUTS = True
# the tangents may cover the first m <= B samples only; the outputs' tangent then has m rows
TANGENT_ROWS = True


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here, at any context length."""
    return []


def _d_major(q: Tensor) -> bool:
    """Whether q (B, H, Lq, D) is stored (B, H, D, Lq)-major (a transposed view)."""
    return q.stride(-2) == 1 and q.stride(-1) != 1


def _times(p_t: Tensor, x: Tensor, d_major: bool) -> Tensor:
    """p x for p (B, H, Lq, Lk) given as p^T, x (B, H, Lk, D): (B, H, Lq, D), stored (B, H, D, Lq)-major when
    d_major (computed as (x^T p^T)^T: the same products and sums)."""
    if d_major:
        return torch.matmul(x.transpose(-1, -2), p_t).transpose(-1, -2)
    return torch.matmul(p_t.transpose(-1, -2), x)


def _probabilities_t(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """p^T = softmax over keys of scale k q^T, (B, H, Lk, Lq) in the compute dtype, and lse (B, H, Lq)."""
    dtype = _compute_dtype(q)
    scores_t = torch.matmul(k.to(dtype), q.to(dtype).transpose(-1, -2)).mul_(scale)
    row_max = scores_t.amax(-2, keepdim=True)
    e = scores_t.sub_(row_max).exp_()
    total = e.sum(-2, keepdim=True)
    return e.div_(total), total.log_().add_(row_max).squeeze(-2)


# Up to this much work (B H Lq Lk D multiply-adds of q k^T) a CPU forward runs ATen's fused flash kernel, one op
# where the written-out softmax takes eight: small calls are set by the ops' fixed costs (this CPU, one thread,
# fp32: digits' cross-attention at batch 1, (1, 1, 64, 24, 32), 17 us against 41; at batch 4 45 against 56; at
# batch 16 155 against 124, and 2x slower with D = 64 and Lq = 256, past the limit). Its lse is ours (the compute
# dtype's log-sum-exp of the scaled scores), so the backward is the same.
FLASH_CPU_MAX_WORK = 1 << 18
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _flash_takes(q: Tensor, k: Tensor) -> bool:
    """Whether ATen's CPU flash kernel computes this call: a CPU call of at most FLASH_CPU_MAX_WORK, outside a
    torch.compile trace (which the data-dependent check below would break), with no NaN in q. The kernel returns
    o = 0 and lse = 0 for a query row holding a NaN at a short context (torch 2.14, 4 keys; 20 or more gave NaN; a
    NaN in k or v, an inf anywhere come out NaN as in the reference): a silent zero a NaN check on the activations
    misses. A NaN in q is seen in q's sum (~2 us at the sizes the kernel takes; 5-20 us for isnan().any()); an
    inf + -inf sum sends a call to the written-out path, which is right for any input."""
    return (
        q.device.type == "cpu"
        and q.numel() * k.shape[-2] <= FLASH_CPU_MAX_WORK
        and not torch.compiler.is_compiling()
        and not math.isnan(q.sum().item())
    )


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    if _flash_takes(q, k):
        # torch 2.11-2.13 read k and v as if their last dim were contiguous (a transposed k or v, the channels-first
        # self-attention block's, gave wrong values; 2.14 reads them right): such a k or v is copied (Lk rows).
        k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
        if q.stride(-1) == 1:  # o is laid out like q
            return _flash_cpu(q, k, v, scale=scale)
        # ATen allocates o with q's strides but writes it as if its last dim were contiguous (torch 2.14: a
        # transposed q, the channels-first attention block's, gave wrong values): q is copied, and o laid out
        # like q again (STRIDED_INPUTS).
        o, lse = _flash_cpu(q.contiguous(), k, v, scale=scale)
        return o.transpose(-1, -2).contiguous().transpose(-1, -2) if _d_major(q) else o, lse
    p_t, lse = _probabilities_t(q, k, scale)
    o = _times(p_t, v.to(p_t.dtype), _d_major(q))
    return o.to(q.dtype), lse


def attention_jvp_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor,
    dk: Tensor | None,
    dv: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq (and dk, dv) may cover the first m <= B samples only (TANGENT_ROWS): o and lse are those of every
    sample, do those of the first m."""
    p_t, lse = _probabilities_t(q, k, scale)
    dtype = p_t.dtype
    vf = v.to(dtype)
    d_major = _d_major(q)
    o = _times(p_t, vf, d_major)
    rows = dq.shape[0]
    q, k, vf, p_t, o_rows = q[:rows], k[:rows], vf[:rows], p_t[:rows], o[:rows]
    # ds = scale (dq k^T + q dk^T): the tangent of the scores uses the plain scale, no exponent.
    ds_t = torch.matmul(k.to(dtype), dq.to(dtype).transpose(-1, -2))
    if dk is not None:
        ds_t.add_(torch.matmul(dk.to(dtype), q.to(dtype).transpose(-1, -2)))
    p_ds_t = ds_t.mul_(p_t).mul_(scale)
    # do = (p ds) v - rowsum(p ds) o + p dv
    do = _times(p_ds_t, vf, d_major)
    do.addcmul_(p_ds_t.sum(-2)[..., None], o_rows, value=-1)
    if dv is not None:
        do.add_(_times(p_t, dv.to(dtype), d_major))
    if o.dtype == q.dtype:
        # o itself, not o.to(q.dtype): torch 2.11's trace of the Function (torch.compile) took the no-op .to as an
        # alias of the intermediate o and gave the alias o's gradient (compiled grad_q, grad_k, grad_v all zero)
        return o, do, lse
    return o.to(q.dtype), do.to(q.dtype), lse


def attention_bwd(
    grad_o: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = lse.dtype
    qf, kf, vf, grad_of = (tensor.to(dtype) for tensor in (q, k, v, grad_o))
    p_t = torch.matmul(kf, qf.transpose(-1, -2)).mul_(scale).sub_(lse[..., None, :]).exp_()
    grad_v = torch.matmul(p_t, grad_of)
    # grad_s = p (grad_p - rowsum(p grad_p)); rowsum(p grad_p) = rowsum(grad_o o), taken from p and grad_p
    # in the compute dtype rather than from the rounded o.
    grad_p_t = torch.matmul(vf, grad_of.transpose(-1, -2))
    grad_s_t = grad_p_t.sub_(torch.linalg.vecdot(p_t, grad_p_t, dim=-2)[..., None, :]).mul_(p_t).mul_(scale)
    grad_q = _times(grad_s_t, kf, _d_major(q))
    grad_k = torch.matmul(grad_s_t, qf)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
