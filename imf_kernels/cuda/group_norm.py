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
# for groups of at most 512 16-byte chunks that fit them, a warp per group of at most 128 chunks, a block per larger
# one; else the looped ones, which an H200 timed faster for larger groups), or one kind ("resident": a block per
# group, up to 2048 chunks, "warp": a warp per group; each refuses a group it cannot hold).
KERNELS = ("auto", "looped", "resident", "warp")


def pick_kernel(hw: int, channels_per_group: int, dtype: torch.dtype) -> str:
    """The kernel kind of a launch: the launch rule's. bench/tune_gpu.py and the tests replace it to time or check
    the kinds side by side."""
    return "auto"


def _kernel(x: torch.Tensor, num_groups: int) -> int:
    hw, channels_per_group = x.shape[2] * x.shape[3], x.shape[1] // num_groups
    kind = pick_kernel(hw, channels_per_group, x.dtype)
    if kind not in KERNELS:
        raise ValueError(f"group_norm: pick_kernel returned {kind!r}, accepted: {', '.join(map(repr, KERNELS))}")
    kernel = KERNELS.index(kind)
    if kind in ("resident", "warp"):
        # refused here, before the extension (which checks it again): bench/tune_gpu.py asks every kind of every shape
        width = 16 // x.element_size()
        vectorized = hw % width == 0 and x.data_ptr() % 16 == 0
        items = _common.extension().group_norm_launch(hw, channels_per_group, x.element_size(), vectorized, kernel)[0]
        if items < 0:
            raise ValueError(
                f"group_norm: the {kind} kernels need the vector path (H*W a multiple of {width}, 16-byte aligned "
                "tensors), a power-of-two number of 16-byte chunks per channel and at most "
                f"{2048 if kind == 'resident' else 128} per group; got H*W={hw}, C/G={channels_per_group}"
            )
    return kernel


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
    weight, bias, scale, shift, dscale, dshift = map(_common.contiguous, (weight, bias, scale, shift, dscale, dshift))
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
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift), None where the input is None.

    Two launches and no other work: the kernel writes grad_x, grad_scale and grad_shift, and (1 + scale)-weighted
    per-(sample, channel) partials of grad_weight and grad_bias, which a second kernel sums over the batch in a fixed
    order (deterministic, no atomics). Parameters are of x's dtype (the package checks it) and read as they are.
    grad_residual (x's shape, dtype, contiguous) is added into grad_x in float before its one rounding.
    """
    batch, channels = x.shape[:2]
    weight, bias, scale, shift = map(_common.contiguous, (weight, bias, scale, shift))

    def like(parameter: torch.Tensor | None) -> torch.Tensor | None:
        return None if parameter is None else _common.empty(tuple(parameter.shape), x.dtype, x.device)

    grad_x = _common.empty(tuple(x.shape), x.dtype, x.device)
    grad_weight, grad_bias, grad_scale, grad_shift = map(like, (weight, bias, scale, shift))
    partials = None
    if weight is not None or bias is not None:
        partials = _common.empty((2, batch, channels), torch.float32, x.device)
    _common.extension().group_norm_act_bwd(
        grad_y,
        x,
        weight,
        bias,
        scale,
        shift,
        mean,
        rstd,
        num_groups,
        act == "silu",
        grad_x,
        grad_weight,
        grad_bias,
        grad_scale,
        grad_shift,
        partials,
        grad_residual,
        _kernel(x, num_groups),
    )
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift
