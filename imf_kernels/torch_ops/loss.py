"""The iMF and MeanFlow losses, composite PyTorch (DESIGN 2.2, 2.3).

iMF: V = u + (t - r) du, L_u = sum (V - v_target)^2, L_v = sum (v - v_target)^2 per sample, weights
w = 1 / (L + c)^p as constants; MF: u_tgt = v_target - clip(t - r, 0, 1) du, L = sum (u - u_tgt)^2.
Batch totals: mean_b of w L (summed over both losses) and of each L.
Floor: read u, du, v, v_target once forward and once backward, write grad_u, grad_v.
"""

from typing import Any

import torch
from torch import Tensor


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here."""
    return []


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over a per-sample tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _sum_of_squares(diff: Tensor) -> Tensor:
    flat = diff.flatten(1)
    return torch.linalg.vecdot(flat, flat)


def _imf_residuals(u: Tensor, du: Tensor, v: Tensor, v_target: Tensor, t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(V - v_target, v - v_target) in the compute dtype."""
    dtype = _compute_dtype(u)
    target = v_target.to(dtype)
    residual_u = torch.addcmul(u.to(dtype) - target, _per_sample(t.to(dtype) - r.to(dtype), u), du.to(dtype))
    return residual_u, v.to(dtype) - target


def imf_loss_fwd(
    u: Tensor, du: Tensor, v: Tensor, v_target: Tensor, t: Tensor, r: Tensor, c: float, p: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    residual_u, residual_v = _imf_residuals(u, du, v, v_target, t, r)
    loss_u = _sum_of_squares(residual_u)
    loss_v = _sum_of_squares(residual_v)
    w_u, w_v = (loss_u + c).pow(-p), (loss_v + c).pow(-p)
    return loss_u, loss_v, w_u, w_v, imf_totals(loss_u, loss_v, w_u, w_v)


def imf_totals(loss_u: Tensor, loss_v: Tensor, w_u: Tensor, w_v: Tensor) -> Tensor:
    """[mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v] from the per-sample values."""
    return torch.stack((torch.addcmul(w_u * loss_u, w_v, loss_v), loss_u, loss_v)).mean(1)


def imf_loss_bwd(
    grad_total: Tensor,
    u: Tensor,
    du: Tensor,
    v: Tensor,
    v_target: Tensor,
    t: Tensor,
    r: Tensor,
    w_u: Tensor,
    w_v: Tensor,
) -> tuple[Tensor, Tensor]:
    residual_u, residual_v = _imf_residuals(u, du, v, v_target, t, r)
    # d/du mean_b(w_u L_u) = 2 w_u (V - v_target) / B, and the same for v
    factor = 2 * grad_total.to(residual_u.dtype) / u.shape[0]
    grad_u = residual_u.mul_(_per_sample(factor * w_u, u))
    grad_v = residual_v.mul_(_per_sample(factor * w_v, v))
    return grad_u.to(u.dtype), grad_v.to(v.dtype)


def _meanflow_residual(u: Tensor, du: Tensor, v_target: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """u - u_tgt = u - v_target + clip(t - r, 0, 1) du in the compute dtype."""
    dtype = _compute_dtype(u)
    interval = _per_sample((t.to(dtype) - r.to(dtype)).clamp(0, 1), u)
    return torch.addcmul(u.to(dtype) - v_target.to(dtype), interval, du.to(dtype))


def meanflow_loss_fwd(
    u: Tensor, du: Tensor, v_target: Tensor, t: Tensor, r: Tensor, c: float, p: float
) -> tuple[Tensor, Tensor, Tensor]:
    loss = _sum_of_squares(_meanflow_residual(u, du, v_target, t, r))
    w = (loss + c).pow(-p)
    return loss, w, meanflow_totals(loss, w)


def meanflow_totals(loss: Tensor, w: Tensor) -> Tensor:
    """[mean_b(w L), mean_b L] from the per-sample values."""
    return torch.stack((w * loss, loss)).mean(1)


def meanflow_loss_bwd(
    grad_total: Tensor, u: Tensor, du: Tensor, v_target: Tensor, t: Tensor, r: Tensor, w: Tensor
) -> Tensor:
    residual = _meanflow_residual(u, du, v_target, t, r)
    factor = 2 * grad_total.to(residual.dtype) / u.shape[0]
    return residual.mul_(_per_sample(factor * w, u)).to(u.dtype)
