"""The public ops (DESIGN 4.1) and the autograd contract shared by every backend (DESIGN 4.2).

Each op checks its arguments, asks `imf_kernels.dispatch` for a backend, and runs that backend's launchers
(`imf_kernels.interface`) inside one of the autograd Functions below. The Functions take the backend's
family module as their first argument, so the contract is written once:
- primal outputs are differentiable in every primal input and parameter; tangents, statistics (mean, rstd,
  lse) and per-sample losses are outputs marked non-differentiable (MeanFlow's stop-gradient);
- `group_norm_act` and `attention` are ctx-free Functions (`forward`, `setup_context`, `jvp`), so they also
  work inside `torch.func.jvp` and `torch.autograd.forward_ad`;
- the fused `*_jvp` ops save what the primal backward needs (x or q, k, v and mean/rstd or o/lse), nothing
  for the tangent;
- first derivatives only: a backward runs the kernels once and records no graph, so a gradient taken with
  create_graph=True cannot be differentiated again (GroupNorm's backward is `once_differentiable`);
- under torch.compile each op runs inside the compiled function but breaks its graph (backend selection is
  Python that dynamo does not trace: `tests/test_torch_compile.py`).
A call with nothing for autograd to record (e.g. sampling under torch.no_grad) runs the Function's forward
directly (`_apply`): the same outputs without Function.apply's per-call Python. The checks build no message
unless one fails, and dispatch caches its selections, so a call costs microseconds before its launcher.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C import _functorch
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from imf_kernels import dispatch

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = ("silu", "none")


# ---------------------------------------------------------------------------------------------- input checks


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_tensor(
    op: str,
    name: str,
    value: Any,
    layout: str,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    like: tuple[str, torch.dtype, torch.device] | None = None,
    contiguous: bool = True,
) -> Tensor:
    """A non-empty floating tensor of `ndim` dims (`layout` names them, e.g. "(B, C, H, W)"), contiguous unless
    contiguous=False, or, with like = (anchor name, its dtype, its device), of exactly `shape` with that dtype
    and device. One pass over the tensor's properties; a message is built only when a check fails."""
    if (  # the common case of a tensor checked against its anchor, in one expression (a batch-1 call is ~20 us)
        like is not None
        and isinstance(value, Tensor)
        and value.shape == shape
        and value.dtype == like[1]
        and value.device == like[2]
        and (not contiguous or value.is_contiguous())
    ):
        return value  # the anchor's dtype was accepted, and its shape is non-empty
    if not isinstance(value, Tensor):
        _fail(op, f"{name} must be a tensor {layout}, got {type(value).__name__}")
    if value.layout != torch.strided:
        _fail(op, f"{name} must be a dense (strided) tensor, got layout {value.layout} (call .to_dense())")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and value.dim() != ndim:
        _fail(op, f"{name} must be {ndim}-D {layout}, got shape {tuple(value.shape)}")
    dtype = value.dtype
    if dtype not in ACCEPTED_DTYPES:
        accepted = ", ".join(str(accepted).removeprefix("torch.") for accepted in ACCEPTED_DTYPES)
        _fail(op, f"{name} must have dtype {accepted}, got {str(dtype).removeprefix('torch.')}")
    if value.numel() == 0:
        _fail(op, f"{name} must not be empty, got shape {tuple(value.shape)}")
    if like is not None:  # what the tensor must be before how it is laid out
        anchor_name, anchor_dtype, anchor_device = like
        if value.shape != shape:
            _fail(op, f"{name} must have shape {layout} = {shape}, got {tuple(value.shape)}")
        if dtype != anchor_dtype:
            _fail(op, f"{name} must have the dtype of {anchor_name} ({anchor_dtype}), got {dtype}")
        device = value.device
        if device != anchor_device:
            _fail(op, f"{name} must be on the device of {anchor_name} ({anchor_device}), got {device}")
    if contiguous and not value.is_contiguous():
        _fail(op, f"{name} must be contiguous (call .contiguous()), got strides {value.stride()}")
    return value


def _check_flag(op: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(op, f"{name} must be True or False, got {value!r}")


def _check_number(op: str, name: str, value: Any, minimum: float, strict: bool) -> float:
    """A finite real number >= minimum (> minimum when strict); NumPy's scalars are real numbers too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(op, f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        _fail(op, f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _check_tangent_rows(
    op: str,
    name: str,
    value: Any,
    layout: str,
    full_shape: tuple[int, ...],
    like: tuple[str, torch.dtype, torch.device],
    contiguous: bool = True,
) -> int:
    """A tangent of the primal's shape (B, ...), or of its first m rows (m, ...), 1 <= m <= B (the objectives
    need du only where h != 0); returns m."""
    tangent = _check_tensor(op, name, value, layout, ndim=len(full_shape), contiguous=contiguous)
    rows = tangent.shape[0] if 0 < tangent.shape[0] <= full_shape[0] else full_shape[0]
    _check_tensor(op, name, tangent, layout, shape=(rows, *full_shape[1:]), like=like, contiguous=contiguous)
    return rows


def _dense_map(t: Tensor) -> bool:
    """Whether a (B, C, H, W) map is laid out as the GroupNorm ops take it: contiguous (channels-first) or
    channels-last (`torch.channels_last`)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _check_map(op: str, name: str, value: Tensor) -> None:
    if not _dense_map(value):
        _fail(op, f"{name} must be contiguous or channels-last (call .contiguous()), got strides {value.stride()}")


def _check_group_norm(op: str, args: dict[str, Any]) -> None:
    x = _check_tensor(op, "x", args["x"], "(B, C, H, W)", ndim=4, contiguous=False)
    _check_map(op, "x", x)
    batch, channels = x.shape[:2]
    num_groups = args["num_groups"]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        _fail(op, f"num_groups must be a positive int, got {num_groups!r}")
    num_groups = args["num_groups"] = int(num_groups)
    if channels % num_groups:
        _fail(op, f"num_groups={num_groups} must divide the {channels} channels of x")
    per_channel, per_sample, like = (channels,), (batch, channels), ("x", x.dtype, x.device)
    for name in ("weight", "bias"):
        if args[name] is not None:
            _check_tensor(op, name, args[name], "(C,)", shape=per_channel, like=like)
    for name in ("scale", "shift"):
        if args[name] is not None:
            _check_tensor(op, name, args[name], "(B, C)", shape=per_sample, like=like)
    args["eps"] = _check_number(op, "eps", args["eps"], 0.0, strict=True)
    if args["act"] not in ACTIVATIONS:
        _fail(op, f"act must be one of {', '.join(map(repr, ACTIVATIONS))}, got {args['act']!r}")
    if "dx" in args:
        layout = "(B, C, H, W) like x, or its first m rows (m, C, H, W)"
        rows = _check_tangent_rows(op, "dx", args["dx"], layout, tuple(x.shape), like, contiguous=False)
        _check_map(op, "dx", args["dx"])
        for name in ("scale", "shift"):
            tangent = args["d" + name]
            if tangent is None:
                continue
            if args[name] is None:
                _fail(op, f"d{name} needs {name} (pass {name}=torch.zeros(B, C) for a zero {name})")
            _check_tensor(op, "d" + name, tangent, "(m, C), m rows like dx", shape=(rows, channels), like=like)


def _check_attention(op: str, args: dict[str, Any]) -> None:
    q = _check_tensor(op, "q", args["q"], "(B, H, Lq, D)", ndim=4, contiguous=False)
    batch, heads, _, head_dim = q.shape
    k = _check_tensor(op, "k", args["k"], "(B, H, Lk, D)", ndim=4, contiguous=False)
    key_shape, like = (batch, heads, k.shape[2], head_dim), ("q", q.dtype, q.device)
    _check_tensor(op, "k", k, "(B, H, Lk, D) with B, H, D of q", shape=key_shape, like=like, contiguous=False)
    _check_tensor(op, "v", args["v"], "(B, H, Lk, D) like k", shape=key_shape, like=like, contiguous=False)
    scale = args["scale"]
    args["scale"] = head_dim**-0.5 if scale is None else _check_number(op, "scale", scale, 0.0, strict=True)
    if "dq" in args:
        layout = "(B, H, Lq, D) like q, or its first m rows (m, H, Lq, D)"
        rows = _check_tangent_rows(op, "dq", args["dq"], layout, tuple(q.shape), like, contiguous=False)
        for name, layout in (
            ("dk", "(m, H, Lk, D) like k, m rows like dq"),
            ("dv", "(m, H, Lk, D) like v, m rows like dq"),
        ):
            if args[name] is not None:
                shape = (rows, *key_shape[1:])
                _check_tensor(op, name, args[name], layout, shape=shape, like=like, contiguous=False)


def _check_loss(op: str, args: dict[str, Any], names: tuple[str, ...]) -> None:
    u = _check_tensor(op, "u", args["u"], "(B, ...)")
    if u.dim() < 2:
        _fail(op, f"u must be (B, ...) with at least one dim after the batch, got shape {tuple(u.shape)}")
    shape, batch, device = tuple(u.shape), u.shape[0], u.device
    like = ("u", u.dtype, device)
    for name in names[1:]:
        _check_tensor(op, name, args[name], "(B, ...) like u", shape=shape, like=like)
    times_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    for name in ("t", "r"):
        time = args[name]
        if not isinstance(time, Tensor) or time.shape != (batch,) or not time.is_floating_point():
            got = f"{tuple(time.shape)} {time.dtype}" if isinstance(time, Tensor) else type(time).__name__
            _fail(op, f"{name} must be a floating tensor of shape (B,) = ({batch},), got {got}")
        if time.device != device:
            _fail(op, f"{name} must be on the device of u ({device}), got {time.device}")
        time = time.detach()  # a constant of the loss, in the accumulation dtype (float64 for float64 u)
        if time.dtype != times_dtype:
            time = time.to(times_dtype)
        args[name] = time.contiguous()
    args["c"] = _check_number(op, "c", args["c"], 0.0, strict=False)
    args["p"] = _check_number(op, "p", args["p"], 0.0, strict=False)


# ----------------------------------------------------------------------------------------- autograd Functions


def _on_plain_tensors(launcher: Callable[..., Any], *args: Any) -> Any:
    """launcher(*args), run below the innermost torch.func transform when one is active.

    Inside torch.func.jvp / grad, `jvp` and `backward` see functorch wrappers (GradTrackingTensor), which a
    Triton or CUDA kernel cannot read, and tensors the launcher allocates would be wrapped too. So the
    launcher runs one level down on the tensors underneath, and its results are wrapped into the current
    level again, as functorch does for a Function's forward (they need no derivative there: the rule is it).
    """
    if _functorch.maybe_current_level() is None:
        return launcher(*args)
    interpreter = retrieve_current_functorch_interpreter()
    level = interpreter.level()
    unwrapped = [_functorch._unwrap_for_grad(arg, level) if isinstance(arg, Tensor) else arg for arg in args]
    with interpreter.lower():
        results = launcher(*unwrapped)
    if isinstance(results, Tensor):
        return _functorch._wrap_for_grad(results, level)
    return tuple(
        _functorch._wrap_for_grad(result, level) if isinstance(result, Tensor) else result for result in results
    )


def _signature_once(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Store the signature of `function.forward` on it, and give it a `_plain` twin (see `_plain_twin`).

    Function.apply binds its arguments with inspect.signature(forward) on every call (about 20 us of Python);
    inspect returns a stored `__signature__` without building it again.
    """
    function.forward.__signature__ = inspect.signature(function.forward)
    function._plain = _plain_twin(function)
    return function


def _plain_twin(function: type[torch.autograd.Function], with_input: bool = False) -> type[torch.autograd.Function]:
    """The same Function in the old style (ctx the first argument of forward, no setup_context), for `_apply`
    to record a graph with when no torch.func transform, forward-AD level or compile trace is active.

    Function.apply binds a ctx-free Function's arguments to its forward's signature through inspect on every
    call, even with the signature stored (`_bind_default_args`: 14 us of the 18 us a 10-argument apply costs on
    this repository's CPU, against 4 us for the old style); the op's arguments are always complete and
    positional, so the binding does nothing. The twin runs the same forward, setup_context and backward.

    with_input: its forward also returns x (the second argument) as an output of the node (`_with_input_twin`).
    """

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return (*output, args[1]) if with_input else output

    body = {"forward": staticmethod(forward), "backward": staticmethod(function.backward), "__doc__": function.__doc__}
    return type(function.__name__ + ("WithInput" if with_input else "Plain"), (torch.autograd.Function,), body)


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """function.apply(*args), or function.forward(*args) when autograd has nothing to record.

    Function.apply costs tens of microseconds of Python per call (binding, setup_context, saving tensors)
    even when no output will need a gradient, more than the kernels take at batch 1. With grad mode off or no
    tensor argument requiring grad, and no forward-AD level, torch.func transform or torch.compile trace
    active, it returns what forward returns, without a graph; so forward is called directly. A graph without
    any of those active is recorded by the old-style twin (`_plain_twin`), which skips apply's binding.
    """
    if _transformed():
        return function.apply(*args)
    if torch.is_grad_enabled() and any(isinstance(arg, Tensor) and arg.requires_grad for arg in args):
        return function._plain.apply(*args)
    return function.forward(*args)


def _transformed() -> bool:
    """Whether a torch.func transform, a forward-AD level or a torch.compile trace is active."""
    return (
        _functorch.maybe_current_level() is not None
        or getattr(forward_ad, "_current_level", 0) >= 0  # -1 when no dual level is open
        or torch.compiler.is_compiling()
    )


def _input_output(function: type[torch.autograd.Function], *args: Any) -> tuple:
    """A GroupNorm Function's outputs for its arguments (family, x, ...), then x itself as one more output of its
    node (`return_input=True`).

    Where x requires grad and a graph is recorded without transforms, `function._with_input` (the old-style twin
    whose forward also returns x, and whose backward adds that output's gradient into grad_x in the kernel) runs:
    a residual branch that reads the returned x sends its gradient into the op's backward, where autograd would
    otherwise add x's two gradients with a launch and a pass of its own. Elsewhere (no grad, torch.func, forward
    AD, torch.compile) the outputs are the plain ones and x is returned as it is."""
    x = args[1]
    if x.requires_grad and torch.is_grad_enabled() and not _transformed():
        return function._with_input.apply(*args)
    return (*_apply(function, *args), x)


def _in_layout(family: Any, tensor: Tensor | None) -> Tensor | None:
    """`tensor` as the backend's attention launchers take it: as it is where they read any strides
    (`STRIDED_INPUTS`), else contiguous (a copy only when it is not)."""
    if tensor is None or getattr(family, "STRIDED_INPUTS", False):
        return tensor
    return tensor.contiguous()


def _as_map(t: Tensor | None, x: Tensor) -> Tensor | None:
    """t (a map of x's shape, or of its first rows) in x's layout, channels-first or channels-last: itself when it
    is (no copy), else a copy."""
    if t is None:
        return None
    contiguous = x.is_contiguous()
    if contiguous and t.is_contiguous():  # the common case, without memory_format's argument parsing
        return t
    layout = torch.contiguous_format if contiguous else torch.channels_last
    return t if t.is_contiguous(memory_format=layout) else t.contiguous(memory_format=layout)


def _maps_for(family: Any, x: Tensor, dx: Tensor | None = None) -> tuple[Tensor, Tensor | None, bool]:
    """(x, dx, relaid) as the GroupNorm launchers of `family` take them: a family that reads channels-last maps
    (`CHANNELS_LAST`) gets x as it is and dx in x's layout; the others contiguous maps, `relaid` True where x was
    channels-last and is now a contiguous copy (the op then lays its maps out as x was, `_as_channels_last`)."""
    if x.is_contiguous():
        return x, None if dx is None else dx.contiguous(), False  # (a contiguous dx: itself)
    if getattr(family, "CHANNELS_LAST", False):
        return x, _as_map(dx, x), False
    return x.contiguous(), None if dx is None else dx.contiguous(), True


def _as_channels_last(relaid: bool, *maps: Tensor) -> tuple[Tensor, ...]:
    """The op's output maps laid out channels-last where `_maps_for` relaid x (else as they are)."""
    if not relaid:
        return maps
    return tuple(t.contiguous(memory_format=torch.channels_last) for t in maps)


def _split_rows(rows: int, *tensors: Tensor | None) -> list[tuple[Tensor | None, Tensor | None]]:
    """(first `rows` samples, the rest) of each tensor (None: (None, None)), by `Tensor.split`, whose backward
    is one concatenation (two slices' would each fill a zero tensor of the whole batch, then be added)."""
    return [(None, None) if a is None else a.split([rows, a.shape[0] - rows]) for a in tensors]


def _zero_if_none(tangent: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if tangent is None else tangent


def _gn_weight_tangent(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dweight: Tensor,
    act: str,
) -> Tensor:
    """The part of dy that comes from a tangent of weight: act'(h) * xh * dweight * (1 + scale).

    Only forward-mode AD over the parameters needs it (e.g. torch.func.jvp over a whole module), so it is
    plain composite PyTorch rather than a launcher.
    """
    batch, channels = x.shape[:2]
    xg = x.reshape(batch, num_groups, -1).to(mean.dtype)
    xh = ((xg - mean[..., None]) * rstd[..., None]).view(batch, channels, -1)
    dh = xh * dweight.to(xh.dtype)[:, None]
    a = xh if weight is None else xh * weight.to(xh.dtype)[:, None]
    if bias is not None:
        a = a + bias.to(xh.dtype)[:, None]
    if scale is not None:
        one_plus_s = 1 + scale.to(xh.dtype)[..., None]
        dh, a = dh * one_plus_s, a * one_plus_s
    if act == "silu":
        h = a if shift is None else a + shift.to(xh.dtype)[..., None]
        sig = torch.sigmoid(h)
        dh = dh * sig * (1 + h * (1 - sig))
    return dh.view_as(x)


def _gn_grads(ctx: Any, grad_y: Tensor | None, grad_residual: Tensor | None) -> tuple:
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift) of a GroupNorm node; grad_residual (the gradient
    of the x a `_with_input` twin returned, or None) is added into grad_x by the launcher."""
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    if grad_y is None:  # only the returned x was used
        return grad_residual, None, None, None, None
    # (x is as the family took it: the gradients in its layout)
    extra = () if grad_residual is None else (_as_map(grad_residual, x),)
    args = (_as_map(grad_y, x), x, ctx.num_groups, weight, bias, scale, shift, mean, rstd, ctx.act, *extra)
    return _on_plain_tensors(ctx.family.gn_act_bwd, *args)


def _with_input_twin(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Give `function` (a GroupNorm Function: x its second input, its backward taking a last grad_residual) a
    `_with_input` twin, `_plain_twin`'s with x returned too, as an output of the node: autograd hands that
    output's gradient to the backward as its last argument, grad_residual (`_input_output`)."""
    function._with_input = _plain_twin(function, with_input=True)
    return function


@_with_input_twin
@_signature_once
class _GroupNormAct(torch.autograd.Function):
    """(y, mean, rstd) = launcher(x, ...); differentiable in x, weight, bias, scale, shift."""

    @staticmethod
    def forward(family, x, num_groups, weight, bias, scale, shift, eps, act):
        return family.gn_act_fwd(x, num_groups, weight, bias, scale, shift, eps, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, x, num_groups, weight, bias, scale, shift, eps, act = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family, ctx.num_groups, ctx.eps, ctx.act = family, num_groups, eps, act
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.save_for_forward(x, weight, bias, scale, shift, mean, rstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_rstd, grad_residual=None):
        grad_x, grad_weight, grad_bias, grad_scale, grad_shift = _gn_grads(ctx, grad_y, grad_residual)
        return None, grad_x, None, grad_weight, grad_bias, grad_scale, grad_shift, None, None

    @staticmethod
    def jvp(ctx, _family, dx, _num_groups, dweight, dbias, dscale, dshift, _eps, _act):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        if dbias is not None:
            # a bias tangent enters h like a shift tangent, times (1 + scale)
            dbias_h = dbias.expand(x.shape[0], -1) if scale is None else dbias * (1 + scale)
            dshift = dbias_h if dshift is None else dshift + dbias_h
            shift = torch.zeros_like(dbias_h) if shift is None else shift
        _, dy, _, _ = _on_plain_tensors(
            ctx.family.gn_act_jvp_fwd,
            x,
            _as_map(_zero_if_none(dx, x), x),
            ctx.num_groups,
            weight,
            bias,
            scale,
            shift,
            None if dscale is None else dscale.contiguous(),
            None if dshift is None else dshift.contiguous(),
            ctx.eps,
            ctx.act,
        )
        if dweight is not None:
            weight_part = _gn_weight_tangent(
                x, ctx.num_groups, weight, bias, scale, shift, mean, rstd, dweight, ctx.act
            )
            dy = (dy.to(weight_part.dtype) + weight_part).to(x.dtype)
        return dy, None, None


@_with_input_twin
@_signature_once
class _GroupNormActJvp(torch.autograd.Function):
    """(y, dy, mean, rstd) = launcher(x, dx, ...); y differentiable as in _GroupNormAct, dy constant."""

    @staticmethod
    def forward(family, x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act):
        return family.gn_act_jvp_fwd(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, x, _, num_groups, weight, bias, scale, shift, _, _, _, act = inputs
        _, dy, mean, rstd = output
        ctx.mark_non_differentiable(dy, mean, rstd)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family, ctx.num_groups, ctx.act = family, num_groups, act
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_dy, _grad_mean, _grad_rstd, grad_residual=None):
        grad_x, grad_weight, grad_bias, grad_scale, grad_shift = _gn_grads(ctx, grad_y, grad_residual)
        return (
            None,
            grad_x,
            None,
            None,
            grad_weight,
            grad_bias,
            grad_scale,
            grad_shift,
            None,
            None,
            None,
            None,
        )


@_signature_once
class _Attention(torch.autograd.Function):
    """(o, lse) = launcher(q, k, v); differentiable in q, k, v."""

    @staticmethod
    def forward(family, q, k, v, scale):
        return family.attention_fwd(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, q, k, v, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family, ctx.scale = family, scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = _on_plain_tensors(
            ctx.family.attention_bwd, _in_layout(ctx.family, grad_o), q, k, v, o, lse, ctx.scale
        )
        return None, grad_q, grad_k, grad_v, None

    @staticmethod
    def jvp(ctx, _family, dq, dk, dv, _scale):
        q, k, v = ctx.saved_tensors
        _, do, _ = _on_plain_tensors(
            ctx.family.attention_jvp_fwd,
            q,
            k,
            v,
            _in_layout(ctx.family, _zero_if_none(dq, q)),
            _in_layout(ctx.family, dk),
            _in_layout(ctx.family, dv),
            ctx.scale,
        )
        return do, None


@_signature_once
class _AttentionJvp(torch.autograd.Function):
    """(o, do, lse) = launcher(q, k, v, dq, dk, dv); o differentiable in q, k, v, do constant."""

    @staticmethod
    def forward(family, q, k, v, dq, dk, dv, scale):
        return family.attention_jvp_fwd(q, k, v, dq, dk, dv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, q, k, v, _, _, _, scale = inputs
        o, do, lse = output
        ctx.mark_non_differentiable(do, lse)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family, ctx.scale = family, scale
        ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o, _grad_do, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = _on_plain_tensors(
            ctx.family.attention_bwd, _in_layout(ctx.family, grad_o), q, k, v, o, lse, ctx.scale
        )
        return None, grad_q, grad_k, grad_v, None, None, None, None


@_signature_once
class _ImfLoss(torch.autograd.Function):
    """(loss, stats, w_u, w_v) with loss = mean_b(w_u loss_u + w_v loss_v) and stats = [mean_b loss_u,
    mean_b loss_v]; loss and stats are views of the launcher's totals (no kernel of their own). Differentiable
    in u and v only."""

    @staticmethod
    def forward(family, u, du, v, v_target, t, r, c, p):
        _, _, w_u, w_v, totals = family.imf_loss_fwd(u, du, v, v_target, t, r, c, p)
        return totals[0], totals[1:], w_u, w_v

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, u, du, v, v_target, t, r, _, _ = inputs
        _, stats, w_u, w_v = output
        ctx.mark_non_differentiable(stats, w_u, w_v)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family = family
        ctx.save_for_backward(u, du, v, v_target, t, r, w_u, w_v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_constants):
        u, du, v, v_target, t, r, w_u, w_v = ctx.saved_tensors
        grad_total = grad_loss.to(w_u.dtype).reshape(())
        grad_u, grad_v = _on_plain_tensors(ctx.family.imf_loss_bwd, grad_total, u, du, v, v_target, t, r, w_u, w_v)
        return None, grad_u, None, grad_v, None, None, None, None, None


@_signature_once
class _MeanflowLoss(torch.autograd.Function):
    """(loss, stats, w) with loss = mean_b(w L) and stats = [mean_b L], views of the launcher's totals;
    differentiable in u only."""

    @staticmethod
    def forward(family, u, du, v_target, t, r, c, p):
        _, w, totals = family.meanflow_loss_fwd(u, du, v_target, t, r, c, p)
        return totals[0], totals[1:], w

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, u, du, v_target, t, r, _, _ = inputs
        _, stats, w = output
        ctx.mark_non_differentiable(stats, w)
        ctx.set_materialize_grads(False)  # their gradients arrive as None, not as zero-filled tensors
        ctx.family = family
        ctx.save_for_backward(u, du, v_target, t, r, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_constants):
        u, du, v_target, t, r, w = ctx.saved_tensors
        grad_total = grad_loss.to(w.dtype).reshape(())
        grad_u = _on_plain_tensors(ctx.family.meanflow_loss_bwd, grad_total, u, du, v_target, t, r, w)
        return None, grad_u, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public ops


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
    backend: str | None = None,
    return_input: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift), x (B, C, H, W), scale/shift (B, C).

    act is "silu" or "none". Works under autograd, torch.func.jvp and torch.autograd.forward_ad.

    return_input=True returns (y, x_out), x_out being x itself (its values, a view: no copy) as an output of the
    op. For a residual connection that adds x to what follows the norm: given x_out instead of x, its gradient
    reaches the op's backward, which adds it into grad_x as it writes it (no add of x's two gradients by
    autograd: a launch and a pass over grad_x fewer).
    """
    op = "group_norm_act"
    args = dict(x=x, num_groups=num_groups, weight=weight, bias=bias, scale=scale, shift=shift, eps=eps, act=act)
    _check_group_norm(op, args)
    _check_flag(op, "return_input", return_input)
    _, family = dispatch.select(op, args, backend)
    x, _, relaid = _maps_for(family, x)
    inputs = (family, x, args["num_groups"], weight, bias, scale, shift, args["eps"], act)
    if return_input:
        y, _, _, x_out = _input_output(_GroupNormAct, *inputs)
        return _as_channels_last(relaid, y, x_out)
    y, _, _ = _apply(_GroupNormAct, *inputs)
    return _as_channels_last(relaid, y)[0]


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
    backend: str | None = None,
    return_input: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """(y, dy): group_norm_act and its tangent along (dx, dscale, dshift) in one pass; dy has no graph.

    The tangent may cover the first m <= B samples only (dx (m, C, H, W), dscale/dshift (m, C)): y is that of
    all B samples, dy that of the first m (one launch on backends with TANGENT_ROWS, else two).

    return_input=True: (y, dy, x_out), x_out as in `group_norm_act` (on a backend without TANGENT_ROWS and a
    tangent of fewer rows, x itself: there autograd adds the residual branch's gradient)."""
    op = "group_norm_act_jvp"
    args = dict(
        x=x,
        dx=dx,
        num_groups=num_groups,
        weight=weight,
        bias=bias,
        scale=scale,
        shift=shift,
        dscale=dscale,
        dshift=dshift,
        eps=eps,
        act=act,
    )
    _check_group_norm(op, args)
    _check_flag(op, "return_input", return_input)
    _, family = dispatch.select(op, args, backend)
    x, dx, relaid = _maps_for(family, x, dx)
    eps, rows, num_groups = args["eps"], dx.shape[0], args["num_groups"]
    if rows == x.shape[0] or getattr(family, "TANGENT_ROWS", False):
        inputs = (family, x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act)
        if return_input:
            y, dy, _, _, x_out = _input_output(_GroupNormActJvp, *inputs)
            return _as_channels_last(relaid, y, dy, x_out)
        y, dy, _, _ = _apply(_GroupNormActJvp, *inputs)
        return _as_channels_last(relaid, y, dy)
    # a tangent on the first rows, on a backend that takes the whole batch only: the jvp op on those rows, the
    # primal op on the rest
    (x_head, x_rest), (scale_head, scale_rest), (shift_head, shift_rest) = _split_rows(rows, x, scale, shift)
    y_head, dy, _, _ = _apply(
        _GroupNormActJvp, family, x_head, dx, num_groups, weight, bias, scale_head, shift_head, dscale, dshift, eps, act
    )
    rest = dict(x=x_rest, num_groups=num_groups, weight=weight, bias=bias, scale=scale_rest, shift=shift_rest)
    _, rest_family = dispatch.select("group_norm_act", {**rest, "eps": eps, "act": act}, backend)
    y_rest, _, _ = _apply(_GroupNormAct, rest_family, *rest.values(), eps, act)
    y = torch.cat([y_head, y_rest])
    return _as_channels_last(relaid, y, dy, x) if return_input else _as_channels_last(relaid, y, dy)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str | None = None) -> Tensor:
    """o = softmax(scale q k^T) v, q (B, H, Lq, D), k and v (B, H, Lk, D); scale 1/sqrt(D) by default.

    q, k, v may have any strides: backends with STRIDED_INPUTS read them as they are, the others get contiguous
    copies. o is contiguous, or on backends with STRIDED_INPUTS laid out like a (B, H, D, Lq)-major q (a
    transposed view of a channels-first map's pixels; triton keeps any layout of q).

    Works under autograd (first derivatives), torch.func.jvp and torch.autograd.forward_ad.
    """
    op = "attention"
    args = dict(q=q, k=k, v=v, scale=scale)
    _check_attention(op, args)
    _, family = dispatch.select(op, args, backend)
    q, k, v = (_in_layout(family, tensor) for tensor in (q, k, v))
    o, _ = _apply(_Attention, family, q, k, v, args["scale"])
    return o


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(o, do): attention and its tangent along (dq, dk, dv) in one pass (None: zero); do has no graph.

    The tangent may cover the first m <= B samples only (dq (m, H, Lq, D), dk/dv (m, H, Lk, D)): o is that of
    all B samples, do that of the first m. Strides as `attention`."""
    op = "attention_jvp"
    args = dict(q=q, k=k, v=v, dq=dq, dk=dk, dv=dv, scale=scale)
    _check_attention(op, args)
    _, family = dispatch.select(op, args, backend)
    scale, rows = args["scale"], dq.shape[0]
    if rows == q.shape[0] or getattr(family, "TANGENT_ROWS", False):
        q, k, v, dq, dk, dv = (_in_layout(family, tensor) for tensor in (q, k, v, dq, dk, dv))
        o, do, _ = _apply(_AttentionJvp, family, q, k, v, dq, dk, dv, scale)
        return o, do
    # a tangent on the first rows, on a backend that takes the whole batch only: the jvp op on those rows, the
    # primal op on the rest
    (q_head, q_rest), (k_head, k_rest), (v_head, v_rest) = _split_rows(rows, q, k, v)
    head = (_in_layout(family, tensor) for tensor in (q_head, k_head, v_head, dq, dk, dv))
    o_head, do, _ = _apply(_AttentionJvp, family, *head, scale)
    _, rest_family = dispatch.select("attention", dict(q=q_rest, k=k_rest, v=v_rest, scale=scale), backend)
    o_rest, _ = _apply(_Attention, rest_family, *(_in_layout(rest_family, t) for t in (q_rest, k_rest, v_rest)), scale)
    return torch.cat([o_head, o_rest]), do


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
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The iMF loss of DESIGN 2.2: mean_b(L_u / sg(L_u + c)^p + L_v / sg(L_v + c)^p), V = u + (t - r) du.

    Returns (loss, stats): loss a 0-d tensor with gradients into u and v only (du, v_target, t, r are
    constants), float32 for float16, bfloat16 and float32 inputs and float64 for float64 inputs (the
    accumulation dtype); stats {"loss_u", "loss_v"}: batch means of the per-sample sums, detached, same dtype.
    loss and stats are views of one buffer the kernels write: clone a stat before changing it in place.
    """
    op = "imf_loss"
    args = dict(u=u, du=du, v=v, v_target=v_target, t=t, r=r, c=c, p=p)
    _check_loss(op, args, ("u", "du", "v", "v_target"))
    _, family = dispatch.select(op, args, backend)
    loss, stats, _, _ = _apply(_ImfLoss, family, u, du, v, v_target, args["t"], args["r"], args["c"], args["p"])
    return loss, {"loss_u": stats[0], "loss_v": stats[1]}


def meanflow_loss(
    u: Tensor,
    du: Tensor,
    v_target: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    c: float = 0.01,
    p: float = 1.0,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The MeanFlow loss of DESIGN 2.3: mean_b(L / sg(L + c)^p), L = sum (u - sg(v_target - h du))^2.

    Here h = clip(t - r, 0, 1). Returns (loss, stats): loss a 0-d tensor with gradients into u only,
    float32 for float16, bfloat16 and float32 inputs and float64 for float64 inputs (the accumulation
    dtype); stats {"loss"}: the batch mean of the per-sample sums, detached, same dtype. loss and stats are
    views of one buffer the kernels write: clone a stat before changing it in place.
    """
    op = "meanflow_loss"
    args = dict(u=u, du=du, v_target=v_target, t=t, r=r, c=c, p=p)
    _check_loss(op, args, ("u", "du", "v_target"))
    _, family = dispatch.select(op, args, backend)
    loss, stats, _ = _apply(_MeanflowLoss, family, u, du, v_target, args["t"], args["r"], args["c"], args["p"])
    return loss, {"loss": stats[0]}
