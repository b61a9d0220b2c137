"""cuda launchers of the fused iMF and MeanFlow losses (csrc/loss.cu); interface in imf_kernels.interface.

Per sample: loss_u = sum (u + coef du - v_target)^2 (coef = t - r for iMF, clip(t - r, 0, 1) for MF),
loss_v = sum (v - v_target)^2, w = (L + c)^-p, and the batch totals (interface.py): two launches forward (the
per-sample sums, then one block for the totals), one backward. Memory floor: read the inputs once (and write the
gradients).
"""

from typing import Any

import torch

from imf_kernels.cuda import _common

MAX_BATCH = 2**31 - 1


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Why the cuda kernels cannot take this call (devices and dtypes are checked by the package)."""
    u = args.get("u")
    if isinstance(u, torch.Tensor) and u.dim() >= 1 and u.shape[0] > MAX_BATCH:
        return [f"{op}: B={u.shape[0]} > {MAX_BATCH} supported by cuda (one block per sample)"]
    return []


def _per_sample(u: torch.Tensor) -> torch.Tensor:
    return _common.empty((u.shape[0],), torch.float32, u.device)


def _grad_total(grad_total: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The 0-d float32 gradient of the mean on the kernels' device, read there (no host synchronisation)."""
    return grad_total.to(device=device, dtype=torch.float32).reshape(())


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
    """(loss_u, loss_v, w_u, w_v, totals), each (B,) float32 but totals (3,) float32; V = u + (t - r) du."""
    loss_u, loss_v, w_u, w_v = (_per_sample(u) for _ in range(4))
    totals = _common.empty((3,), torch.float32, u.device)
    _common.extension().loss_fwd(u, du, v, v_target, t, r, float(c), float(p), loss_u, loss_v, w_u, w_v, totals)
    return loss_u, loss_v, w_u, w_v, totals


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
    """(grad_u, grad_v): grad_total * 2 w (residual) / B, elementwise."""
    grad_u = _common.empty(tuple(u.shape), u.dtype, u.device)
    grad_v = _common.empty(tuple(v.shape), v.dtype, v.device)
    _common.extension().loss_bwd(_grad_total(grad_total, u.device), u, du, v, v_target, t, r, w_u, w_v, grad_u, grad_v)
    return grad_u, grad_v


def meanflow_loss_fwd(
    u: torch.Tensor,
    du: torch.Tensor,
    v_target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    c: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, w, totals), each (B,) float32 but totals (2,) float32 [mean_b(w loss), mean_b loss];
    u_tgt = v_target - clip(t - r, 0, 1) du."""
    loss, w = _per_sample(u), _per_sample(u)
    totals = _common.empty((2,), torch.float32, u.device)
    _common.extension().loss_fwd(u, du, None, v_target, t, r, float(c), float(p), loss, None, w, None, totals)
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
    """grad_u = grad_total * 2 w (u - u_tgt) / B."""
    grad_u = _common.empty(tuple(u.shape), u.dtype, u.device)
    _common.extension().loss_bwd(_grad_total(grad_total, u.device), u, du, None, v_target, t, r, w, None, grad_u, None)
    return grad_u
