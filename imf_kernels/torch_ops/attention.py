"""Softmax attention with its tangent, composite PyTorch (DESIGN 4.3).

s = scale q k^T, p = softmax(s), o = p v; tangent ds = scale (dq k^T + q dk^T),
do = (p * ds) v - rowsum(p * ds) o + p dv. The score matrix (B, H, Lq, Lk) is materialised: this is the CPU
path, where Lq Lk floats are cheap next to the matmuls. Floor: read q, k, v (and tangents), write o (and do).
"""

from typing import Any

import torch
from torch import Tensor


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here, at any context length."""
    return []


def _probabilities(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """p = softmax(scale q k^T) in the compute dtype, and its log-sum-exp."""
    dtype = _compute_dtype(q)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(scores, dim=-1)
    return scores.sub_(lse[..., None]).exp_(), lse


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    p, lse = _probabilities(q, k, scale)
    o = torch.matmul(p, v.to(p.dtype))
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
    p, lse = _probabilities(q, k, scale)
    dtype = p.dtype
    vf = v.to(dtype)
    o = torch.matmul(p, vf)
    # ds = scale (dq k^T + q dk^T): the tangent of the scores uses the plain scale, no exponent.
    ds = torch.matmul(dq.to(dtype), k.to(dtype).transpose(-1, -2))
    if dk is not None:
        ds.add_(torch.matmul(q.to(dtype), dk.to(dtype).transpose(-1, -2)))
    p_ds = ds.mul_(p).mul_(scale)
    # do = (p ds) v - rowsum(p ds) o + p dv
    do = torch.matmul(p_ds, vf)
    do.addcmul_(p_ds.sum(-1, keepdim=True), o, value=-1)
    if dv is not None:
        do.add_(torch.matmul(p, dv.to(dtype)))
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
    p = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale).sub_(lse[..., None]).exp_()
    grad_v = torch.matmul(p.transpose(-1, -2), grad_of)
    # grad_s = p (grad_p - rowsum(p grad_p)); rowsum(p grad_p) = rowsum(grad_o o), taken from p and grad_p
    # in the compute dtype rather than from the rounded o.
    grad_p = torch.matmul(grad_of, vf.transpose(-1, -2))
    grad_s = grad_p.sub_(torch.linalg.vecdot(p, grad_p)[..., None]).mul_(p).mul_(scale)
    grad_q = torch.matmul(grad_s, kf)
    grad_k = torch.matmul(grad_s.transpose(-1, -2), qf)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
