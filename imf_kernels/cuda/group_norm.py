"""cuda launchers of GroupNorm + modulation + SiLU (csrc/group_norm.cu); interface in imf_kernels.interface.

y = act(h), h = (weight * xh + bias) * (1 + scale) + shift, xh = (x - mean_g) * rstd_g, one block or one warp per
(sample, group), the group held in registers where it fits (`pick_kernel`, `KERNELS`). Memory floor: read x (and dx,
or grad_y) once, write y (and dy, or grad_x) once.
"""

from typing import Any

import torch

from imf_kernels.cuda import _common

ACTIVATIONS = ("silu", "none")
# dx, dscale and dshift may cover the first m <= B samples only: the jvp kernel runs on those samples and the primal
# kernel on the rest, into one y, mean and rstd (`imf_kernels.interface`)
TANGENT_ROWS = True
# The backward keeps two floats per channel of a group in shared memory, within the default 48 KiB.
MAX_CHANNELS_PER_GROUP = 48 * 1024 // 8
MAX_BLOCKS = 2**31 - 1
# The kernels csrc/group_norm.cu runs: "auto" its launch rule (`_C.group_norm_launch`: the register-resident kernels
# where a group fits them, a warp per group of at most 128 16-byte chunks, a block per larger one; else the looped
# ones), or one kind ("resident": a block per group, "warp": a warp per group; each refuses a group it cannot hold).
KERNELS = ("auto", "looped", "resident", "warp")


def pick_kernel(hw: int, channels_per_group: int, dtype: torch.dtype) -> str:
    """The kernel kind of a launch: the launch rule's. bench/tune_gpu.py and the tests replace it to time or check
    the kinds side by side."""
    return "auto"


def _kernel(x: torch.Tensor, num_groups: int) -> int:
    kind = pick_kernel(x.shape[2] * x.shape[3], x.shape[1] // num_groups, x.dtype)
    if kind not in KERNELS:
        raise ValueError(f"group_norm: pick_kernel returned {kind!r}, accepted: {', '.join(map(repr, KERNELS))}")
    return KERNELS.index(kind)


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Why the cuda kernels cannot take this call (devices and dtypes are checked by the package)."""
    reasons = []
    if args.get("act") not in ACTIVATIONS:
        reasons.append(f"{op}: act={args.get('act')!r} not supported by cuda ({', '.join(ACTIVATIONS)})")
    x, num_groups = args.get("x"), args.get("num_groups")
    if isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(num_groups, int) and num_groups > 0:
        channels_per_group = x.shape[1] // num_groups
        if channels_per_group > MAX_CHANNELS_PER_GROUP:
            reasons.append(
                f"{op}: C/num_groups={channels_per_group} > {MAX_CHANNELS_PER_GROUP} channels per group "
                "supported by cuda (the backward holds per-channel sums in shared memory)"
            )
        if x.shape[0] * num_groups > MAX_BLOCKS:
            reasons.append(f"{op}: B * num_groups={x.shape[0] * num_groups} > {MAX_BLOCKS} blocks")
    return reasons


def _forward(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act):
    batch = x.shape[0]
    rows = batch if dx is None else dx.shape[0]
    y = _common.empty(tuple(x.shape), x.dtype, x.device)
    dy = None if dx is None else _common.empty(tuple(dx.shape), x.dtype, x.device)
    mean = _common.empty((batch, num_groups), torch.float32, x.device)
    rstd = _common.empty((batch, num_groups), torch.float32, x.device)
    f32 = _common.as_float32
    weight, bias, scale, shift, dscale, dshift = map(f32, (weight, bias, scale, shift, dscale, dshift))
    kernel = _kernel(x, num_groups)
    for span, tangent in _common.tangent_row_spans(batch, rows):
        tangent = tangent and dx is not None
        _common.extension().group_norm_act_fwd(
            x[span],
            dx if tangent else None,
            weight,
            bias,
            None if scale is None else scale[span],
            None if shift is None else shift[span],
            dscale if tangent else None,
            dshift if tangent else None,
            num_groups,
            float(eps),
            act == "silu",
            y[span],
            dy if tangent else None,
            mean[span],
            rstd[span],
            kernel,
        )
    return y, dy, mean, rstd


def gn_act_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd (B, G) float32."""
    y, _, mean, rstd = _forward(x, None, num_groups, weight, bias, scale, shift, None, None, eps, act)
    return y, mean, rstd


def gn_act_jvp_fwd(
    x: torch.Tensor,
    dx: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    dscale: torch.Tensor | None,
    dshift: torch.Tensor | None,
    eps: float,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dy, mean, rstd) in one pass; dscale/dshift None are zero tangents. dx (dscale, dshift) of m < B rows:
    dy has m rows, y and the statistics all B (the primal kernel on the other samples)."""
    return _forward(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act)


def gn_act_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, ...]:
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift), None where the input is None.

    The kernel writes grad_x and the per-(sample, channel) sums S1 = sum_hw gh, S3 = sum_hw gh * xh of the
    gradient gh at h; with ga = (1 + scale) gh and a = weight * xh + bias the parameter gradients are
    grad_shift = S1, grad_scale = weight S3 + bias S1, grad_bias = sum_b (1 + scale) S1,
    grad_weight = sum_b (1 + scale) S3: O(B C) work left to torch on the same stream.
    """
    batch, channels = x.shape[:2]
    grad_x = _common.empty(tuple(x.shape), x.dtype, x.device)
    sum_gh = _common.empty((batch, channels), torch.float32, x.device)
    sum_gh_xh = _common.empty((batch, channels), torch.float32, x.device)
    weight32, bias32, scale32, shift32 = map(_common.as_float32, (weight, bias, scale, shift))
    _common.extension().group_norm_act_bwd(
        grad_y,
        x,
        weight32,
        bias32,
        scale32,
        shift32,
        mean,
        rstd,
        num_groups,
        act == "silu",
        grad_x,
        sum_gh,
        sum_gh_xh,
        _kernel(x, num_groups),
    )
    sum_ga, sum_ga_xh = (sum_gh, sum_gh_xh) if scale32 is None else (sum_gh * (1 + scale32), sum_gh_xh * (1 + scale32))
    grad_weight = None if weight is None else sum_ga_xh.sum(0).to(weight.dtype)
    grad_bias = None if bias is None else sum_ga.sum(0).to(bias.dtype)
    grad_shift = None if shift is None else sum_gh.to(shift.dtype)
    grad_scale = None
    if scale is not None:
        sum_gh_a = sum_gh_xh if weight32 is None else sum_gh_xh * weight32
        if bias32 is not None:
            sum_gh_a = sum_gh_a + sum_gh * bias32
        grad_scale = sum_gh_a.to(scale.dtype)
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift
