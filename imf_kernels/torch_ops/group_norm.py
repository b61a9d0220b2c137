"""GroupNorm + modulation + SiLU, composite PyTorch (DESIGN 4.3).

y = act(h), h = xh * alpha + beta with xh = (x - mean_g) * rstd_g, alpha = weight * (1 + scale),
beta = bias * (1 + scale) + shift (per sample and channel). Floor: read x (and dx), write y (and dy); here two
passes forward (ATen's group norm with alpha, beta folded in, then SiLU in place), four back, seven with the tangent.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ATen's kernels, called directly: they return (and take back) the statistics, which F.group_norm hides.
_native_group_norm = torch.ops.aten.native_group_norm.default
_native_group_norm_backward = torch.ops.aten.native_group_norm_backward.default
_silu_backward = torch.ops.aten.silu_backward.default


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here."""
    return []


def _channel_coefficients(
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    batch: int,
    channels: int,
    dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(1 + scale, alpha, beta) as flat (B * C,) tensors, h = xh * alpha + beta; None where it is absent
    (alpha = 1, beta = 0), so ATen's group norm skips it."""
    one_plus_s = None if scale is None else (1 + scale.to(dtype)).reshape(-1)
    alpha = None if weight is None else weight.to(dtype).repeat(batch)
    beta = None if bias is None else bias.to(dtype).repeat(batch)
    if one_plus_s is not None:
        alpha = one_plus_s if alpha is None else alpha * one_plus_s
        beta = None if beta is None else beta * one_plus_s
    if shift is not None:
        beta = shift.to(dtype).reshape(-1) if beta is None else beta + shift.to(dtype).reshape(-1)
    return one_plus_s, alpha, beta


def _as_channels(x: Tensor) -> tuple[Tensor, int, int]:
    """x in the compute dtype as (1, B * C, H * W): GroupNorm of B samples of C channels in G groups is GroupNorm
    of one sample of B * C channels in B * G groups, whose per-channel affine is then per (sample, channel)."""
    batch, channels = x.shape[:2]
    flat = x.to(_compute_dtype(x)).reshape(1, batch * channels, -1)
    return flat, batch * channels, flat.shape[-1]


def _group_norm(
    flat: Tensor, batch: int, num_groups: int, alpha: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(xh * alpha + beta as (1, B * C, H * W), mean, rstd as (B, G)) by one ATen group norm of `flat`."""
    _, rows, count = flat.shape
    groups = batch * num_groups
    if rows * count > groups:
        h, mean, rstd = _native_group_norm(flat, alpha, beta, 1, rows, count, groups, eps)
    else:
        # One value per group: xh = 0 exactly, but ATen's folded x (rstd alpha) + (beta - mean rstd alpha) is
        # off by rstd = 1 / sqrt(eps) times a rounding; apply alpha and beta to the exact xh (B * C values).
        h, mean, rstd = _native_group_norm(flat, None, None, 1, rows, count, groups, eps)
        h = h if alpha is None else h * alpha[:, None]
        h = h if beta is None else h + beta[:, None]
    return h, mean.view(batch, num_groups), rstd.view(batch, num_groups)


def _slope_of_xh(rstd: Tensor, rows: int, count: int) -> Tensor:
    """rstd as (1, B * G) for ATen's backward, or zeros when each group holds one value: then xh = 0 for every x,
    so its derivative is 0, and rstd = 0 gives exactly that (with 1 / sqrt(eps) ATen's c1 g + c2 x + c3 leaves
    noise of rstd times the rounding of x)."""
    flat = rstd.reshape(1, -1)
    return torch.zeros_like(flat) if rows * count == flat.numel() else flat


def gn_act_fwd(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, channels = x.shape[:2]
    _, alpha, beta = _channel_coefficients(weight, bias, scale, shift, batch, channels, _compute_dtype(x))
    h, mean, rstd = _group_norm(_as_channels(x)[0], batch, num_groups, alpha, beta, eps)
    y = F.silu(h.view(x.shape), inplace=True) if act == "silu" else h.view(x.shape)
    return y.to(x.dtype), mean, rstd


def gn_act_jvp_fwd(
    x: Tensor,
    dx: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    dscale: Tensor | None,
    dshift: Tensor | None,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, channels = x.shape[:2]
    dtype = _compute_dtype(x)
    _, alpha, beta = _channel_coefficients(weight, bias, scale, shift, batch, channels, dtype)
    # dh = dxh * alpha + xh * (w dscale) + (b dscale + dshift); the last two terms need xh itself.
    per_channel = dscale is not None or dshift is not None
    flat, rows, count = _as_channels(x)
    if per_channel:
        xh, mean, rstd = _group_norm(flat, batch, num_groups, None, None, eps)
    else:  # dh = dxh * alpha: no xh needed, GN gives h directly
        h, mean, rstd = _group_norm(flat, batch, num_groups, alpha, beta, eps)
    # dxh = rstd (dx - mean_g(dx) - xh mean_g(xh dx)): the Jacobian of xh is symmetric, so it is GN's backward
    # (weight 1) applied to dx.
    mean_flat, rstd_flat = mean.view(1, -1), _slope_of_xh(rstd, rows, count)
    groups = mean_flat.numel()
    dxc = dx.to(dtype).reshape(flat.shape)
    dxh, _, _ = _native_group_norm_backward(
        dxc, flat, mean_flat, rstd_flat, None, 1, rows, count, groups, [True, False, False]
    )
    if per_channel:
        ds = None if dscale is None else dscale.to(dtype).reshape(-1)
        w = None if weight is None else weight.to(dtype).repeat(batch)
        b = None if bias is None else bias.to(dtype).repeat(batch)
        # offset = b dscale + dshift, slope = w dscale (w = 1 without a weight)
        offset = torch.zeros(rows, dtype=dtype, device=x.device) if dshift is None else dshift.to(dtype).reshape(-1)
        if ds is not None and b is not None:
            offset = torch.addcmul(offset, b, ds)
        slope = None if ds is None else (ds if w is None else w * ds)
        dh = (
            offset[:, None].expand(rows, count)
            if slope is None
            else torch.addcmul(offset[:, None], xh[0], slope[:, None])
        )
        dh = dh + dxh[0] if alpha is None else torch.addcmul(dh, dxh[0], alpha[:, None])
        h = xh[0] if alpha is None else xh[0].mul_(alpha[:, None])
        if beta is not None:
            h.add_(beta[:, None])
    else:
        h = h[0]
        dh = dxh[0] if alpha is None else dxh[0].mul_(alpha[:, None])

    if act == "silu":
        # dy = dh silu'(h), silu'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))): SiLU's backward applied to dh
        dy = _silu_backward(dh, h)
        y = F.silu(h, inplace=True)
    else:
        y, dy = h, dh
    return y.view(x.shape).to(x.dtype), dy.view(x.shape).to(x.dtype), mean, rstd


def gn_act_bwd(
    grad_y: Tensor,
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    act: str,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    batch, channels = x.shape[:2]
    dtype = _compute_dtype(x)
    one_plus_s, alpha, beta = _channel_coefficients(weight, bias, scale, shift, batch, channels, dtype)
    flat, rows, count = _as_channels(x)
    mean_flat, rstd_flat = mean.reshape(1, -1), _slope_of_xh(rstd, rows, count)
    grad_h = grad_y.to(dtype).reshape(flat.shape)
    if act == "silu":
        # h = x a + c per (sample, channel), a = rstd alpha, c = beta - mean a (ATen's group norm forms it so)
        group_size = channels // num_groups
        a = rstd_flat.repeat_interleave(group_size, dim=1)[0]
        if alpha is not None:
            a = a * alpha
        c = -mean_flat.repeat_interleave(group_size, dim=1)[0] * a
        if beta is not None:
            c = c + beta
        h = torch.addcmul(c[:, None], flat[0], a[:, None])
        grad_h = _silu_backward(grad_h, h[None])

    # ATen's backward also returns the per (sample, channel) sums S2 = sum g_h xh (its "weight" gradient, of
    # alpha) and S1 = sum g_h (of beta). With a = w xh + b: d shift = S1, d scale = w S2 + b S1,
    # d weight = sum_b (1 + s) S2, d bias = sum_b (1 + s) S1.
    grad_x, sum_gx, sum_g = _native_group_norm_backward(
        grad_h, flat, mean_flat, rstd_flat, alpha, 1, rows, count, mean_flat.numel(), [True, True, True]
    )
    sum_gx, sum_g = sum_gx.view(batch, channels), sum_g.view(batch, channels)
    if one_plus_s is not None:
        scaled_gx, scaled_g = one_plus_s.view(batch, channels) * sum_gx, one_plus_s.view(batch, channels) * sum_g
    else:
        scaled_gx, scaled_g = sum_gx, sum_g
    grad_weight = None if weight is None else scaled_gx.sum(0).to(weight.dtype)
    grad_bias = None if bias is None else scaled_g.sum(0).to(bias.dtype)
    grad_scale = None
    if scale is not None:
        grad_scale = sum_gx if weight is None else sum_gx * weight.to(dtype)
        if bias is not None:
            grad_scale = grad_scale + sum_g * bias.to(dtype)
        grad_scale = grad_scale.to(scale.dtype)
    grad_shift = None if shift is None else sum_g.to(shift.dtype)
    return grad_x.view(x.shape).to(x.dtype), grad_weight, grad_bias, grad_scale, grad_shift
