"""The oracles: every public op in plain PyTorch, with the same signature (without `backend`).

Primal ops are written with the textbook functions (`torch.group_norm`, `F.silu`, softmax attention written out,
the loss formulas of DESIGN 2.2 / 2.3); tangents come from `torch.func.jvp` of those, never from a
hand-written formula, so they check the kernels' formulas rather than repeat them. Everything works in any
floating dtype; the tests run it in float64 for the truth and in the kernel's dtype for the error baseline.
`check_parity` is the tolerance rule of DESIGN 5 that every parity test applies.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_act(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    eps: float = 1e-5,
    act: str = "silu",
) -> Tensor:
    """y = act((GN(x) * weight + bias) * (1 + scale) + shift)."""
    # The ATen op behind F.group_norm, without its training-mode refusal of one value per group at batch 1
    # ("Expected more than 1 value per channel"): GN of a single value is 0 (variance 0), so y = act(beta).
    # Under torch.func.jvp torch 2.11-2.13 failed on a channels-last x ("view size is not compatible with input
    # tensor's size and stride") and, in the backward, on a bias without a weight ("tensor does not have a
    # device"): the op takes x contiguous (a no-op for a contiguous map) and such a bias is added after it.
    bias_inside = bias if weight is not None else None
    h = torch.group_norm(x.contiguous(), num_groups, weight, bias_inside, eps, torch.backends.cudnn.enabled)
    if weight is None and bias is not None:
        h = h + bias[:, None, None]
    if scale is not None:
        h = h * (1 + scale[:, :, None, None])
    if shift is not None:
        h = h + shift[:, :, None, None]
    return F.silu(h) if act == "silu" else h


def _jvp_over(fn: Callable[..., Tensor], named: dict[str, tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """torch.func.jvp of fn(**inputs) along the given tangents (zero where a tangent is None)."""
    names = list(named)
    primals = tuple(named[name][0] for name in names)
    tangents = tuple(torch.zeros_like(primal) if tangent is None else tangent for primal, tangent in named.values())
    return torch.func.jvp(lambda *values: fn(**dict(zip(names, values, strict=True))), primals, tangents)


def group_norm_act_jvp(
    x: Tensor,
    dx: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    dscale: Tensor | None = None,
    dshift: Tensor | None = None,
    eps: float = 1e-5,
    act: str = "silu",
) -> tuple[Tensor, Tensor]:
    """(y, dy): group_norm_act and its tangent along (dx, dscale, dshift)."""
    named = {"x": (x, dx)}
    if scale is not None:
        named["scale"] = (scale, dscale)
    if shift is not None:
        named["shift"] = (shift, dshift)

    def fn(x: Tensor, **modulation: Tensor) -> Tensor:
        return group_norm_act(x, num_groups, weight, bias, eps=eps, act=act, **modulation)

    return _jvp_over(fn, named)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """o = softmax(scale q k^T) v, scale = 1 / sqrt(D) by default."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, v)


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(o, do): attention and its tangent along (dq, dk, dv)."""
    return _jvp_over(lambda q, k, v: attention(q, k, v, scale=scale), {"q": (q, dq), "k": (k, dk), "v": (v, dv)})


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def imf_loss(
    u: Tensor,
    du: Tensor,
    v: Tensor,
    v_target: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    c: float = 0.01,
    p: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """mean_b(L_u / sg(L_u + c)^p + L_v / sg(L_v + c)^p), V = u + (t - r) sg(du) (DESIGN 2.2)."""
    du, v_target = du.detach(), v_target.detach()
    big_v = u + _per_sample(t - r, u) * du
    loss_u = ((big_v - v_target) ** 2).flatten(1).sum(1)
    loss_v = ((v - v_target) ** 2).flatten(1).sum(1)
    loss = (loss_u / (loss_u.detach() + c) ** p + loss_v / (loss_v.detach() + c) ** p).mean()
    return loss, {"loss_u": loss_u.detach().mean(), "loss_v": loss_v.detach().mean()}


def meanflow_loss(
    u: Tensor,
    du: Tensor,
    v_target: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    c: float = 0.01,
    p: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """mean_b(L / sg(L + c)^p), L = sum (u - sg(v_target - clip(t - r, 0, 1) du))^2 (DESIGN 2.3)."""
    u_target = (v_target - _per_sample((t - r).clamp(0, 1), u) * du).detach()
    loss_per_sample = ((u - u_target) ** 2).flatten(1).sum(1)
    loss = (loss_per_sample / (loss_per_sample.detach() + c) ** p).mean()
    return loss, {"loss": loss_per_sample.detach().mean()}


def max_error(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference, computed in float64 (NaN if either holds a NaN)."""
    difference = (actual.double() - expected.double()).abs()
    return float("nan") if difference.isnan().any() else difference.max().item()


# check_parity's floor, relative to the largest |expected| of the output: half a unit in the last place of float16 /
# bfloat16 at that magnitude (the rounding of the output itself) and about 8 of float32 (whose kernels sum in other
# orders than PyTorch's: ATen's own CPU flash attention's grad_q is 5x the math path's error), so that a kernel as
# exact as PyTorch by luck of the inputs still passes. A floor above PyTorch's own error lets a wrong kernel by.
FLOOR = {torch.float64: 1e-15, torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def check_parity(
    name: str, actual: Tensor, expected: Tensor, baseline: Tensor, atol: float, scale: float | None = None
) -> None:
    """Raise AssertionError unless error(actual) <= 2 error(baseline) + atol * scale, scale = max |expected|.

    `expected` is the reference in float64, `baseline` the same reference computed in the dtype of `actual`:
    a kernel may be as wrong as PyTorch in its own precision, times two (FlashAttention's rule). The floor is
    relative to the output's own magnitude (`FLOOR` holds the dtypes' values); `scale` replaces that magnitude
    where an output is a difference of larger terms (a gradient that cancels to ~0: the terms' magnitude).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        raise AssertionError(f"{name}: empty output: nothing to compare")
    error = max_error(actual, expected)
    baseline_error = max_error(baseline, expected)
    floor = atol * (expected.abs().max().item() if scale is None else scale)
    allowed = 2 * baseline_error + floor
    if not error <= allowed:
        raise AssertionError(
            f"{name}: max error {error:.3g} > allowed {allowed:.3g} "
            f"(2 x same-dtype reference error {baseline_error:.3g} + floor {floor:.3g})"
        )
