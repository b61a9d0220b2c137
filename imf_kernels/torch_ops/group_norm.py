"""GroupNorm + modulation + SiLU, composite PyTorch (DESIGN 4.3).

y = act(h), h = xh * alpha + beta with xh = (x - mean_g) * rstd_g, alpha = weight * (1 + scale),
beta = bias * (1 + scale) + shift (per sample and channel). Floor: read x (and dx), write y (and dy); here two
passes forward (ATen's group norm with alpha, beta folded in, then SiLU in place), about four back (SiLU's slope
on h = x a + c, ATen's group norm backward), and five more for the tangent (x - mean_g, ATen's backward applied
to dx, dh, dy).
"""

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# ATen's kernels, called directly: they return (and take back) the statistics, which F.group_norm hides.
_native_group_norm = torch.ops.aten.native_group_norm.default
_native_group_norm_backward = torch.ops.aten.native_group_norm_backward.default
_silu_backward_into = torch.ops.aten.silu_backward.grad_input


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`: t itself when it has it (Tensor.to would return t too, after ~1 us of argument parsing, which
    adds up over a batch-1 forward's hundreds of calls)."""
    return t if t.dtype == dtype else t.to(dtype)


# dx, dscale and dshift may cover the first m <= B samples only; dy then has m rows (`imf_kernels.interface`)
TANGENT_ROWS = True


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Every call that passes the public checks runs here."""
    return []


class _Layout(NamedTuple):
    """x as ATen's group norm takes it, (N, C', H * W) in G' groups, with its per-channel affine gamma, beta (C',).

    Without modulation that is x itself with weight and bias. With it, alpha = weight (1 + scale) and
    beta = bias (1 + scale) + shift vary per sample; GroupNorm of B samples of C channels in G groups is GroupNorm
    of one sample of B * C channels in B * G groups, whose per-channel affine is then per (sample, channel).
    """

    x: Tensor
    groups: int
    gamma: Tensor | None  # None: 1
    beta: Tensor | None  # None: 0
    one_plus_s: Tensor | None  # (B, C), None without a scale


def _per_sample_affine(
    w: Tensor | None, b: Tensor | None, scale: Tensor | None, shift: Tensor | None, batch: int, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(gamma, beta, 1 + scale): alpha = w (1 + scale) and beta = b (1 + scale) + shift flattened to (B * C,),
    the per-channel affine of the per-sample layout (w, b already in `dtype`; None: 1, 0, no scale)."""
    one_plus_s = None if scale is None else 1 + _as(scale, dtype)
    if one_plus_s is None:
        alpha = None if w is None else w.expand(batch, -1)
        beta = None if b is None else b.expand(batch, -1)
    else:
        alpha = one_plus_s if w is None else w * one_plus_s
        beta = None if b is None else b * one_plus_s
    if shift is not None:
        beta = _as(shift, dtype) if beta is None else beta + _as(shift, dtype)
    return None if alpha is None else alpha.reshape(-1), None if beta is None else beta.reshape(-1), one_plus_s


def _layout(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    per_sample: bool,
) -> _Layout:
    batch, channels = x.shape[:2]
    dtype = _compute_dtype(x)
    w = None if weight is None else _as(weight, dtype)
    b = None if bias is None else _as(bias, dtype)
    if not per_sample:
        return _Layout(_as(x, dtype).reshape(batch, channels, -1), num_groups, w, b, None)
    gamma, beta, one_plus_s = _per_sample_affine(w, b, scale, shift, batch, dtype)
    return _Layout(_as(x, dtype).reshape(1, batch * channels, -1), batch * num_groups, gamma, beta, one_plus_s)


def _group_norm(layout: _Layout, affine: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(xh * gamma + beta, or xh without `affine`, shaped like layout.x, and mean, rstd (N, G')) by ATen."""
    n, rows, count = layout.x.shape
    gamma, beta = (layout.gamma, layout.beta) if affine else (None, None)
    if rows * count > layout.groups:
        return _native_group_norm(layout.x, gamma, beta, n, rows, count, layout.groups, eps)
    # One value per group: xh = 0 exactly, but ATen's folded x (rstd gamma) + (beta - mean rstd gamma) is off
    # by rstd = 1 / sqrt(eps) times a rounding; apply gamma and beta to the exact xh (N * C' values).
    h, mean, rstd = _native_group_norm(layout.x, None, None, n, rows, count, layout.groups, eps)
    h = h if gamma is None else h * gamma[:, None]
    h = h if beta is None else h + beta[:, None]
    return h, mean, rstd


def _slope_of_xh(rstd: Tensor, layout: _Layout) -> Tensor:
    """rstd as (N, G') for ATen's backward, or zeros when each group holds one value: then xh = 0 for every x,
    so its derivative is 0, and rstd = 0 gives exactly that (with 1 / sqrt(eps) ATen's c1 g + c2 x + c3 leaves
    noise of rstd times the rounding of x)."""
    n, rows, count = layout.x.shape
    rstd = rstd.reshape(n, layout.groups)
    return torch.zeros_like(rstd) if rows * count == layout.groups else rstd


def _centered(x: Tensor, mean: Tensor, groups: int) -> Tensor:
    """x (N, C', count) minus its group means (N, G'), in a fresh buffer shaped like x. ATen's backward takes it
    with mean 0: on x itself it sums g x and subtracts mean sum g, which loses |mean| / std digits (grad_scale had
    2.7x PyTorch's float32 error at mean 10, std 1; the tangent's dy 263x in groups of two close values)."""
    n = x.shape[0]
    out = torch.empty_like(x)
    torch.sub(x.view(n, groups, -1), mean.reshape(n, groups, 1), out=out.view(n, groups, -1))
    return out


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
    # `_layout` and `_group_norm` without their views: a batch-1 call is set by its op count (each op, view or
    # not, a few us on a CPU), and ATen's kernel is called through its function binding (about 1 us less than
    # through torch.ops).
    batch, channels = x.shape[:2]
    dtype = _compute_dtype(x)
    w = None if weight is None else _as(weight, dtype)
    b = None if bias is None else _as(bias, dtype)
    n, rows, groups = batch, channels, num_groups
    if scale is not None or shift is not None:  # per sample: (1, B * C) channels in B * G groups
        n, rows, groups = 1, batch * channels, batch * num_groups
        w, b, _ = _per_sample_affine(w, b, scale, shift, batch, dtype)
    count = x.numel() // (batch * channels)
    xc = _as(x, dtype)
    if rows * count > groups:
        # ATen's CPU and CUDA kernels read x as (n, rows, count) from these sizes: no view in or out. Its shape
        # function (meta, fake tensors: torch.compile's trace) broadcasts the weight over x's own dim 1, so the
        # per-sample layout of several samples is viewed as (1, B * C, count) there.
        if n != batch:
            h, mean, rstd = torch.native_group_norm(xc.view(n, rows, count), w, b, n, rows, count, groups, eps)
            h = h.view(x.shape)
        else:
            h, mean, rstd = torch.native_group_norm(xc, w, b, n, rows, count, groups, eps)
    else:  # one value per group (see _group_norm)
        h, mean, rstd = _group_norm(_Layout(xc.view(n, rows, count), groups, w, b, None), True, eps)
        h = h.view(x.shape)
    y = torch._C._nn.silu_(h) if act == "silu" else h
    if n == 1 and batch > 1:  # per sample: (1, B * G) statistics
        mean, rstd = mean.view(batch, num_groups), rstd.view(batch, num_groups)
    return _as(y, x.dtype), mean, rstd


def _first_rows(t: Tensor, batch: int, rows: int) -> Tensor:
    """The first `rows` samples of a tensor laid out like a _Layout's x (N, C', count) or its statistics (N, G'):
    per channel (N = batch) the leading rows, per sample (N = 1, C' = batch * C) the leading rows * C columns."""
    if rows == batch:
        return t
    if t.shape[0] == batch:
        return t[:rows]
    return t[:, : t.shape[1] // batch * rows]


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
    """dx (and dscale, dshift) may cover the first m <= B samples only (TANGENT_ROWS): y and the statistics are
    those of every sample, dy those of the first m."""
    batch, rows = x.shape[0], dx.shape[0]
    dtype = _compute_dtype(x)
    # dh = dxh * alpha + xh * (w dscale) + (b dscale + dshift); the last two terms need xh itself.
    modulated_tangent = dscale is not None or dshift is not None
    per_sample = modulated_tangent or scale is not None or shift is not None
    layout = _layout(x, num_groups, weight, bias, scale, shift, per_sample)
    normed, mean, rstd = _group_norm(layout, not modulated_tangent, eps)
    # dxh = rstd (dx - mean_g(dx) - xh mean_g(xh dx)): the Jacobian of xh is symmetric, so it is GN's backward
    # (weight 1) applied to dx, here on the first `rows` samples.
    head = _first_rows(layout.x, batch, rows)
    n, width, count = head.shape
    head_rstd = _first_rows(rstd, batch, rows)  # (N, G') of the first rows: G' is their group count
    groups = head_rstd.shape[1]
    rstd_slope = _slope_of_xh(head_rstd, _Layout(head, groups, None, None, None))
    # On x - mean_g (`_centered`); its buffer then takes dy from SiLU's backward below, no temporary more: with
    # one more the op took 1.1-1.3x its time on this CPU at B128 C64 8x8, this way 1.07x.
    centered = _centered(head, _first_rows(mean, batch, rows), groups)
    dxh, _, _ = _native_group_norm_backward(
        dx.to(dtype).reshape(head.shape),
        centered,
        torch.zeros_like(rstd_slope),
        rstd_slope,
        None,
        n,
        width,
        count,
        groups,
        [True, False, False],
    )
    gamma = None if layout.gamma is None else layout.gamma[:, None]
    head_gamma = None if gamma is None else gamma[:width]  # per sample: the first rows * C channels
    if modulated_tangent:  # the per-sample layout: (1, B * C, count)
        ds = None if dscale is None else dscale.to(dtype)
        # offset = b dscale + dshift, slope = w dscale (w = 1 without a weight), per (sample, channel)
        offset = torch.zeros(rows, x.shape[1], dtype=dtype, device=x.device) if dshift is None else dshift.to(dtype)
        if ds is not None and bias is not None:
            offset = torch.addcmul(offset, ds, bias.to(dtype))
        slope = None if ds is None else (ds if weight is None else ds * weight.to(dtype))
        # in place on ATen's fresh dxh: addcmul with two broadcast operands is 3x slower than mul then add
        dh = dxh if head_gamma is None else dxh.mul_(head_gamma)
        if slope is not None:
            dh.addcmul_(_first_rows(normed, batch, rows), slope.reshape(1, width, 1))
        dh.add_(offset.reshape(1, width, 1))
        h = normed if gamma is None else normed.mul_(gamma)
        if layout.beta is not None:
            h.add_(layout.beta[:, None])
    else:
        h = normed
        dh = dxh if head_gamma is None else dxh.mul_(head_gamma)

    if act == "silu":
        # dy = dh silu'(h), silu'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))): SiLU's backward applied to dh
        dy = _silu_backward_into(dh, _first_rows(h, batch, rows), grad_input=centered)
        y = F.silu(h, inplace=True)
    else:
        y, dy = h, dh
    stats = mean.view(batch, num_groups), rstd.view(batch, num_groups)
    dy = _as(dy.view(dx.shape), x.dtype)
    if torch.compiler.is_compiling():
        # torch 2.11 (fixed by 2.14): a traced autograd.Function whose non-differentiable output is a view of an
        # intermediate failed in AOTAutograd ("element 1 of tensors does not require grad"): a fresh tensor
        dy = dy.clone()
    return _as(y.view(x.shape), x.dtype), dy, *stats


def _unmodulated_bwd(
    grad_y: Tensor,
    x: Tensor,
    layout: _Layout,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    act: str,
) -> tuple[Tensor, Tensor | None, Tensor | None, None, None]:
    """gn_act_bwd without scale and shift: ATen's backward on x itself, as PyTorch's own GroupNorm backward runs
    (its sums lose what PyTorch's lose; the centring the modulated backward needs for grad_scale would be a pass
    and a temporary more), after SiLU's backward at h = x a + c per channel, a = rstd gamma, c = beta - mean a,
    the form ATen's forward computes h in (with one value per group rstd is 0 here, `_slope_of_xh`: h = beta, and
    grad_x and grad_weight are 0). Without the centred copy of x the backward takes 0.69x the time at
    B128 C64 8x8 and B256 C32 8x8 (this CPU, one thread, interleaved with the centred one: a 2 MB temporary and its
    pass fewer)."""
    n, rows, count = layout.x.shape
    groups = layout.groups
    grad_h = grad_y.to(layout.x.dtype).reshape(layout.x.shape)
    if act == "silu":
        a = rstd.view(n, groups, 1).expand(n, groups, rows // groups)
        if layout.gamma is not None:
            a = a * layout.gamma.view(groups, -1)
        c = -mean.view(n, groups, 1) * a
        if layout.beta is not None:
            c = c + layout.beta.view(groups, -1)
        h = layout.x * a.reshape(n, rows, 1)
        h.add_(c.reshape(n, rows, 1))  # mul then add: addcmul with two broadcast operands is 3x slower
        grad_h = _silu_backward_into(grad_h, h, grad_input=h)
    mask = [True, weight is not None, bias is not None]
    grad_x, grad_gamma, grad_beta = _native_group_norm_backward(
        grad_h, layout.x, mean.view(n, groups), rstd, layout.gamma, n, rows, count, groups, mask
    )
    grad_weight = None if weight is None else grad_gamma.to(weight.dtype)
    grad_bias = None if bias is None else grad_beta.to(bias.dtype)
    return grad_x.view(x.shape).to(x.dtype), grad_weight, grad_bias, None, None


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
    grad_residual: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    batch, channels = x.shape[:2]
    dtype = _compute_dtype(x)
    per_sample = scale is not None or shift is not None
    layout = _layout(x, num_groups, weight, bias, scale, shift, per_sample)
    n, rows, count = layout.x.shape
    groups, group_size = layout.groups, rows // layout.groups
    rstd_slope = _slope_of_xh(rstd, layout)
    if not per_sample:
        return _with_residual(_unmodulated_bwd(grad_y, x, layout, weight, bias, mean, rstd_slope, act), grad_residual)
    centered = _centered(layout.x, mean, groups)  # one pass, for precision (`_centered`)
    grad_h = grad_y.to(dtype).reshape(layout.x.shape)
    if act == "silu":
        # h = (x - mean) a + beta per channel, a = rstd gamma
        a = rstd_slope[..., None].expand(n, groups, group_size)
        if layout.gamma is not None:
            a = a * layout.gamma.view(groups, group_size)
        a = a.reshape(n, rows, 1)
        h = centered * a
        if layout.beta is not None:
            h.add_(layout.beta[:, None])  # mul then add: addcmul with two broadcast operands is 3x slower
        grad_h = _silu_backward_into(grad_h, h, grad_input=h)  # into h: one buffer fewer, elementwise

    # ATen's backward also returns the sums over (samples and) pixels of g_h xh and g_h, the gradients of gamma
    # and beta. Per sample, S2 = sum g_h xh, S1 = sum g_h per (b, c), and with a = w xh + b: d shift = S1,
    # d scale = w S2 + b S1, d weight = sum_b (1 + s) S2, d bias = sum_b (1 + s) S1.
    zero_mean = torch.zeros_like(rstd_slope)
    grad_x, grad_gamma, grad_beta = _native_group_norm_backward(
        grad_h, centered, zero_mean, rstd_slope, layout.gamma, n, rows, count, groups, [True, True, True]
    )
    grad_x = grad_x.view(x.shape).to(x.dtype)
    sum_gx, sum_g = grad_gamma.view(batch, channels), grad_beta.view(batch, channels)
    one_plus_s = layout.one_plus_s
    scaled_gx, scaled_g = (sum_gx, sum_g) if one_plus_s is None else (one_plus_s * sum_gx, one_plus_s * sum_g)
    grad_weight = None if weight is None else scaled_gx.sum(0).to(weight.dtype)
    grad_bias = None if bias is None else scaled_g.sum(0).to(bias.dtype)
    grad_scale = None
    if scale is not None:
        grad_scale = sum_gx if weight is None else sum_gx * weight.to(dtype)
        if bias is not None:
            grad_scale = grad_scale + sum_g * bias.to(dtype)
        grad_scale = grad_scale.to(scale.dtype)
    grad_shift = None if shift is None else sum_g.to(shift.dtype)
    return _with_residual((grad_x, grad_weight, grad_bias, grad_scale, grad_shift), grad_residual)


def _with_residual(grads: tuple, grad_residual: Tensor | None) -> tuple:
    """gn_act_bwd's gradients with grad_residual added into grad_x, a tensor of its own here (ATen's backward's
    result, or its cast to x's dtype): in place."""
    return grads if grad_residual is None else (grads[0].add_(grad_residual), *grads[1:])
