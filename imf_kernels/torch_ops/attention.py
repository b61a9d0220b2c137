"""Softmax attention with its tangent, composite PyTorch (DESIGN 4.3).

s = scale q k^T, p = softmax(s), o = p v; tangent ds = scale (dq k^T + q dk^T),
do = (p * ds) v - rowsum(p * ds) o + p dv. The score matrix is materialised: this is the CPU path, where
Lq Lk floats are cheap next to the matmuls. Floor: read q, k, v (and tangents), write o (and do).

The scores are held transposed, s^T = scale k q^T of shape (B, H, Lk, Lq): the softmax reductions then run
over a strided dimension, vectorised across queries, where ATen's last-dimension reductions pay per row (with
Lk = 24 keys, amax over the last dimension took 16x the time); the matmuls take the transposed views as they are.
"""

from typing import Any

import torch
from torch import Tensor


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here, at any context length."""
    return []


def _probabilities_t(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """p^T = softmax over keys of scale k q^T, (B, H, Lk, Lq) in the compute dtype, and lse (B, H, Lq)."""
    dtype = _compute_dtype(q)
    scores_t = torch.matmul(k.to(dtype), q.to(dtype).transpose(-1, -2)).mul_(scale)
    row_max = scores_t.amax(-2, keepdim=True)
    e = scores_t.sub_(row_max).exp_()
    total = e.sum(-2, keepdim=True)
    return e.div_(total), total.log_().add_(row_max).squeeze(-2)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    p_t, lse = _probabilities_t(q, k, scale)
    o = torch.matmul(p_t.transpose(-1, -2), v.to(p_t.dtype))
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
    p_t, lse = _probabilities_t(q, k, scale)
    dtype = p_t.dtype
    vf = v.to(dtype)
    o = torch.matmul(p_t.transpose(-1, -2), vf)
    # ds = scale (dq k^T + q dk^T): the tangent of the scores uses the plain scale, no exponent.
    ds_t = torch.matmul(k.to(dtype), dq.to(dtype).transpose(-1, -2))
    if dk is not None:
        ds_t.add_(torch.matmul(dk.to(dtype), q.to(dtype).transpose(-1, -2)))
    p_ds_t = ds_t.mul_(p_t).mul_(scale)
    # do = (p ds) v - rowsum(p ds) o + p dv
    do = torch.matmul(p_ds_t.transpose(-1, -2), vf)
    do.addcmul_(p_ds_t.sum(-2)[..., None], o, value=-1)
    if dv is not None:
        do.add_(torch.matmul(p_t.transpose(-1, -2), dv.to(dtype)))
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
    grad_q = torch.matmul(grad_s_t.transpose(-1, -2), kf)
    grad_k = torch.matmul(grad_s_t, qf)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
