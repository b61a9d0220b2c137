"""Tangent-aware layers for the fused forward-with-tangent of the U-Net (DESIGN 3.3).

Each function takes a primal input `x` (with an autograd graph) and an optional tangent `dx` (no graph) and
returns `(y, dy)`, `dy` None when `dx` is None. Tangents are MeanFlow's stop-gradient quantity: they are computed
under `torch.no_grad()` (or by the `imf_kernels` `*_jvp` ops, whose tangents are non-differentiable), from
detached weights, so the tangent half never reaches a weight gradient and no tangent graph is kept.
The tangent may cover only the first m rows of the batch (`dx.shape[0] = m <= x.shape[0]`): `dy` then has m rows
(the objectives need du only where h = t - r != 0, about half the batch); the fused ops take such tangents as they
are (`imf_kernels`: one call on backends with TANGENT_ROWS, else the op splits the batch).

- linear / conv: y = W x + b, dy = W dx (no bias on the tangent); FiLM's linear as two contiguous halves, and
  the FiLM layers of every block of a pass from one matmul (`film_bank`);
- GroupNorm + modulation + SiLU and attention: the fused `imf_kernels` ops (backend by `imf_kernels` dispatch);
- LayerNorm: dy = weight * rstd * (dx - mean(dx) - xh mean(xh dx)) (the context norm), and SiLU's tangent: aten's
  backward kernels applied to the tangent (both Jacobians are symmetric);
- sinusoidal embedding: d/dx [cos(f x), sin(f x)] = [-f sin(f x), f cos(f x)] dx (tangent only).

Under bf16 autocast, linear and conv outputs are bf16; the kernels get weights cast to the activations' dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import imf_kernels

Tensor = torch.Tensor
MaybeTensor = Tensor | None


def linear(x: Tensor, layer: nn.Linear, dx: MaybeTensor = None) -> tuple[Tensor, MaybeTensor]:
    """(W x + b, W dx)."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        return y, F.linear(dx.to(y.dtype), layer.weight.to(y.dtype))


def _weight_halves(weight: Tensor) -> Tensor:
    """(2, P, C): the (2C, P) FiLM weight's scale and shift halves, transposed for a batched matmul (a view)."""
    two_c, features = weight.shape
    return weight.view(2, two_c // 2, features).transpose(1, 2)


def _film_halves(x: Tensor, weight: Tensor, bias: MaybeTensor) -> Tensor:
    """(2, B, C): [scale; shift] = the two halves of x W^T + b from one batched matmul over the weight's halves."""
    halves = _weight_halves(weight)
    inputs = x.expand(2, -1, -1)
    return torch.bmm(inputs, halves) if bias is None else torch.baddbmm(bias.view(2, 1, -1), inputs, halves)


class _FiLM(torch.autograd.Function):
    """FiLM's (scale, shift) with an autograd graph: the forward is `_film_halves`; the backward works in the
    weight's own (2C, P) layout from one concatenation of the two output gradients: dx = g W, dW = g^T x,
    db = sum_b g (4 kernels, where autograd's backward of the batched form launches 6: a sum for the expanded input
    and one for the broadcast bias, a copy for the transposed weight view, a stack for the unbind)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: MaybeTensor):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        scale, shift = _film_halves(x, weight, bias).unbind(0)
        return scale, shift

    @staticmethod
    def backward(ctx, grad_scale: Tensor, grad_shift: Tensor):
        x, weight = ctx.saved_tensors
        grad = torch.cat((grad_scale, grad_shift), dim=1)  # (B, 2C), like the linear layer's output
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def film(x: Tensor, layer: nn.Linear, dx: MaybeTensor = None) -> tuple[Tensor, Tensor, MaybeTensor, MaybeTensor]:
    """(scale, shift, dscale, dshift) of a FiLM layer, whose 2C outputs are [scale; shift]: one batched matmul over
    the weight's two halves gives (2, B, C), so each part is a contiguous (B, C) tensor, where `linear`'s (B, 2C)
    halves are strided views the GroupNorm kernels would copy (two launches each; ~100 a latent-b step). With an
    autograd graph (and no autocast, whose casts the backward would have to mirror) through `_FiLM`, whose
    backward launches 4 kernels instead of 6."""
    weight, bias = layer.weight, layer.bias
    graded = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if graded and not torch.is_autocast_enabled(x.device.type):
        scale, shift = _FiLM.apply(x, weight, bias)
        dtype = scale.dtype
    else:
        out = _film_halves(x, weight, bias)
        scale, shift = out.unbind(0)
        dtype = out.dtype
    if dx is None:
        return scale, shift, None, None
    with torch.no_grad():
        halves = _weight_halves(weight.to(dtype))
        dscale, dshift = torch.bmm(dx.to(dtype).expand(2, -1, -1), halves).unbind(0)
        return scale, shift, dscale, dshift


@functools.lru_cache(maxsize=8)
def _film_bank_order(widths: tuple[int, ...], rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(order, inverse): `order` indexes the flattened (rows, T) output of the FiLM layers' joint matmul, T = the
    sum of their 2 C_i outputs, so that gathering by it lays the layers out one after another, each as its scale
    then its shift, contiguous (rows, C_i) blocks; `inverse` maps that layout back. int32 where it fits (half the
    bytes a gather reads). Built on the device (kernels, no host-to-device copy: a CUDA graph may be capturing),
    once per shape (one per batch size: tangents of fewer rows are padded to the batch, see `film_bank`)."""
    total = 2 * sum(widths)
    dtype = torch.int32 if rows * total < 2**31 else torch.int64
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, even if first built for a sampler's call
        return _build_film_bank_order(widths, rows, total, dtype, device)


def _build_film_bank_order(widths, rows, total, dtype, device) -> tuple[Tensor, Tensor]:
    row_starts = torch.arange(rows, device=device, dtype=dtype).view(1, rows, 1) * total
    pieces, start = [], 0
    for width in widths:
        columns = torch.arange(start, start + 2 * width, device=device, dtype=dtype).view(2, 1, width)
        pieces.append((columns + row_starts).reshape(-1))
        start += 2 * width
    order = torch.cat(pieces)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device, dtype=dtype)
    return order, inverse


class _FiLMBank(torch.autograd.Function):
    """The FiLM layers of several blocks from one matmul over their concatenated weights, laid out per layer by
    one gather (`_film_bank_order`); the backward: the inverse gather, then dx = g W, dW = g^T x, db = sum_b g."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, order: Tensor, inverse: Tensor):
        ctx.save_for_backward(x, weight, inverse)
        return torch.addmm(bias, x, weight.t()).view(-1).index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, inverse = ctx.saved_tensors
        grad = grad.index_select(0, inverse).view(x.shape[0], -1)  # (B, T), the matmul's output layout
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


FiLMOutputs = tuple[Tensor, Tensor, MaybeTensor, MaybeTensor]


def _film_parts(flat: Tensor, widths: tuple[int, ...], rows: int) -> list[tuple[Tensor, Tensor]]:
    """[(scale, shift), ...]: (rows, C_i) views of `_FiLMBank`'s layout, from one split (whose backward is one
    concatenation: views of views of it, e.g. unbind's, would add a stack per layer)."""
    halves = [width for width in widths for _ in range(2)]  # each layer's scale, then its shift
    parts = flat.split([rows * width for width in halves])
    views = [part.view(rows, width) for part, width in zip(parts, halves, strict=True)]
    return list(zip(views[0::2], views[1::2], strict=True))


def _joinable(layers: list[nn.Linear]) -> tuple[list[Tensor], list[Tensor]] | None:
    """(weights, biases) of layers a bank can concatenate: some, each with a bias, every parameter a plain tensor
    (not, e.g., a DTensor shard of FSDP2, which gathers each block's parameters only around that block's own
    call); else None."""
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    if not layers or any(bias is None for bias in biases):
        return None
    if any(type(param) not in (nn.Parameter, torch.Tensor) for param in weights + biases):
        return None
    return weights, biases


def film_bank(
    x: Tensor, layers: list[nn.Linear], dx: MaybeTensor = None, tangent_layers: int | None = None
) -> list[FiLMOutputs] | None:
    """`film` of every layer in `layers` (each nn.Linear(P, 2 C_i) with a bias, all reading the same x (B, P)):
    [(scale, shift, dscale, dshift), ...], from one matmul over the concatenated weights and one gather that lays
    each layer's scale and shift out as contiguous (B, C_i) tensors: 4 kernels (the weights' and biases'
    concatenations, the matmul, the gather) where one `film` call per layer launches one, and the backward 5 (a
    concatenation of the gradients, the inverse gather, two matmuls, the bias sum) where each layer's launched 4
    and the shared input's gradient was summed over the layers. Tangents (one matmul, one gather, no bias; a pad
    first where dx has fewer rows than x) for the first `tangent_layers` layers (default all; dx None: none), of
    dx's rows: contiguous (m, C_i) views of the first m rows.

    None where the layers cannot be concatenated (a parameter that is not a plain tensor, e.g. a DTensor shard of
    FSDP2, which gathers each block's parameters only around that block's own call; a layer without a bias):
    callers fall back to `film` per layer."""
    joinable = _joinable(layers)
    if joinable is None:
        return None
    weights, biases = joinable
    rows = x.shape[0]
    if dx is not None and not 0 < dx.shape[0] <= rows:
        raise ValueError(f"film_bank: dx must have 1 to {rows} rows (those of x, or its first m), got {dx.shape[0]}")
    widths = tuple(weight.shape[0] // 2 for weight in weights)
    tangent_layers = len(layers) if tangent_layers is None else tangent_layers
    weight, bias = torch.cat(weights), torch.cat(biases)
    order, inverse = _film_bank_order(widths, rows, x.device)
    graded = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if graded and not torch.is_autocast_enabled(x.device.type):
        flat = _FiLMBank.apply(x, weight, bias, order, inverse)
    else:
        flat = torch.addmm(bias, x, weight.t()).view(-1).index_select(0, order)
    outputs = _film_parts(flat, widths, rows)
    tangents: list[tuple[MaybeTensor, MaybeTensor]] = [(None, None)] * len(layers)
    if dx is not None and tangent_layers > 0:
        with torch.no_grad():
            dtype, moving = flat.dtype, dx.shape[0]
            # every layer's tangent, of all rows: the tangent of the first m rows padded with zero rows, so the
            # gather is the primal's (one order per batch size, where m changes from step to step)
            padded = F.pad(dx.to(dtype), (0, 0, 0, rows - moving)) if moving < rows else dx.to(dtype)
            dflat = (padded @ weight.detach().to(dtype).t()).view(-1).index_select(0, order)
            parts = _film_parts(dflat, widths, rows)[:tangent_layers]
            tangents[:tangent_layers] = [(dscale[:moving], dshift[:moving]) for dscale, dshift in parts]
    return [(scale, shift, dscale, dshift) for (scale, shift), (dscale, dshift) in zip(outputs, tangents, strict=True)]


KVOutputs = tuple[Tensor, Tensor, MaybeTensor, MaybeTensor]


def _kv_parts(out: Tensor, heads: tuple[int, ...], head_dim: int) -> list[tuple[Tensor, Tensor]]:
    """[(k, v), ...]: (B, h_i, Lk, d) views of the joint key/value projection (B, Lk, T), T = sum 2 h_i d, each
    layer's k heads then its v heads, from one split (whose backward is one concatenation of the gradients)."""
    rows, tokens = out.shape[:2]
    parts = out.view(rows, tokens, -1, head_dim).split([h for h in heads for _ in range(2)], dim=2)
    views = [part.permute(0, 2, 1, 3) for part in parts]
    return list(zip(views[0::2], views[1::2], strict=True))


def kv_bank(
    ctx: Tensor,
    layers: list[nn.Linear],
    heads: list[int],
    dctx: MaybeTensor = None,
    tangent_layers: int | None = None,
) -> list[KVOutputs] | None:
    """The keys and values of several cross-attention layers reading the same context ctx (B, Lk, P): each
    layer's `to_kv` (nn.Linear(P, 2 C_i), [k; v] with C_i = heads_i d) gives [(k, v, dk, dv), ...], k and v
    (B, heads_i, Lk, d) views, from one matmul over the concatenated weights, where a `linear` per layer launched
    one (and one for its tangent). The attention kernels read the views as they are (strided inputs). The
    backward: one concatenation of every layer's key and value gradients, two matmuls and the bias sum, where
    each layer's launched a stack (unbind's), a copy (its view of a permuted gradient), two matmuls, a sum, and
    an add for the shared context's gradient. Tangents (one matmul, no bias) for the first `tangent_layers`
    layers (default all; dctx None: none), of dctx's rows.

    None where the layers cannot be concatenated (as `film_bank`), or their head dims differ: callers fall back
    to `linear` per layer. A heads list of another length than layers is a caller's error (ValueError)."""
    if len(heads) != len(layers):
        raise ValueError(f"kv_bank: heads must give one count per layer ({len(layers)}), got {len(heads)}")
    joinable = _joinable(layers)
    if joinable is None:
        return None
    weights, biases = joinable
    shapes = [(weight.shape[0], 2 * count) for weight, count in zip(weights, heads, strict=True)]
    head_dims = {outputs // parts for outputs, parts in shapes}
    if len(head_dims) != 1 or any(outputs % parts for outputs, parts in shapes):
        return None
    head_dim, heads = head_dims.pop(), tuple(heads)
    tangent_layers = len(layers) if tangent_layers is None else tangent_layers
    weight, bias = torch.cat(weights), torch.cat(biases)
    out = F.linear(ctx, weight, bias)
    outputs = _kv_parts(out, heads, head_dim)
    tangents: list[tuple[MaybeTensor, MaybeTensor]] = [(None, None)] * len(layers)
    if dctx is not None and tangent_layers > 0:
        moving = heads[:tangent_layers]
        with torch.no_grad():
            dweight = weight.detach()[: 2 * head_dim * sum(moving)].to(out.dtype)
            tangents[:tangent_layers] = _kv_parts(F.linear(dctx.to(out.dtype), dweight), moving, head_dim)
    return [(k, v, dk, dv) for (k, v), (dk, dv) in zip(outputs, tangents, strict=True)]


def token_major(a: Tensor) -> bool:
    """Whether a (B, C, L) view of a feature map holds each position's C channels together (a channels-last map's
    view: strides (L C, 1, C)), not each channel's L positions (a contiguous map's)."""
    return a.stride(1) == 1 and a.stride(2) == a.shape[1] and not a.is_contiguous()


def channel_linear(
    x: Tensor, layer: nn.Linear, dx: MaybeTensor = None, dresidual: MaybeTensor = None
) -> tuple[Tensor, MaybeTensor]:
    """(W x + b, W dx) over the channels of x (B, C, L): `linear` on the tokens x^T without transposing, so a
    feature map's pixels go in and come out as (B, C, L), and a (B, heads, L, d) view of either side is a
    transposed view the attention op reads as it is (the batched matmul takes any strides). A token-major x (a
    channels-last map's view, `token_major`) goes through `linear` on its tokens as they lie, (B L, C) rows of one
    matmul, and comes out token-major too (a channels-last map again).

    `dresidual` (dx's rows, the output's shape): a residual branch's tangent to add, dy = dresidual + W dx, by the
    matmul itself where the dtypes agree (baddbmm: one kernel, not a matmul and an add), else by an add."""
    if token_major(x):
        return _token_linear(x, layer, dx, dresidual)
    weight = layer.weight.expand(x.shape[0], -1, -1)
    y = torch.bmm(weight, x) if layer.bias is None else torch.baddbmm(layer.bias[:, None], weight, x)
    if dx is None:
        return y, None
    with torch.no_grad():
        weight = layer.weight.to(y.dtype).expand(dx.shape[0], -1, -1)
        if dresidual is not None and dresidual.dtype == y.dtype and not torch.is_autocast_enabled(y.device.type):
            return y, torch.baddbmm(dresidual, weight, dx.to(y.dtype))
        dy = torch.bmm(weight, dx.to(y.dtype))
        return y, dy if dresidual is None else dresidual + dy


def _token_linear(x: Tensor, layer: nn.Linear, dx: MaybeTensor, dresidual: MaybeTensor) -> tuple[Tensor, MaybeTensor]:
    """`channel_linear` of a token-major x (B, C, L): x^T (B, L, C) is contiguous, so y^T = x^T W^T + b is one
    matmul over B L rows (its weight gradient one more, where the channels-first form sums B per-sample products),
    and y = (y^T)^T a token-major view."""
    y = F.linear(x.transpose(1, 2), layer.weight, layer.bias).transpose(1, 2)
    if dx is None:
        return y, None
    with torch.no_grad():
        weight = layer.weight.to(y.dtype)
        dx_tokens = dx.to(y.dtype).transpose(1, 2)
        fused_add = dresidual is not None and dresidual.dtype == y.dtype and token_major(dresidual)
        if fused_add and dx_tokens.is_contiguous() and not torch.is_autocast_enabled(y.device.type):
            rows, outputs = dx.shape[0] * dx.shape[2], weight.shape[0]
            residual_tokens = dresidual.transpose(1, 2).reshape(rows, outputs)  # (a view: token-major)
            dy = torch.addmm(residual_tokens, dx_tokens.reshape(rows, -1), weight.t())
            return y, dy.view(dx.shape[0], dx.shape[2], outputs).transpose(1, 2)
        dy = F.linear(dx_tokens, weight).transpose(1, 2)
        return y, dy if dresidual is None else dresidual + dy


def conv2d(x: Tensor, layer: nn.Conv2d, dx: MaybeTensor = None) -> tuple[Tensor, MaybeTensor]:
    """(conv(x, W) + b, conv(dx, W)): the tangent is its own no-grad call, so the weight gradient of the backward
    pass covers the primal batch only."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        weight = layer.weight.to(y.dtype)
        return y, F.conv2d(dx.to(y.dtype), weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _laid_out_like(t: Tensor, x: Tensor) -> Tensor:
    """A map t as dense as the GroupNorm ops take it, in x's layout (channels-first or channels-last, ModelConfig.
    channels_last): t itself where it is, else a copy."""
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return t if t.is_contiguous(memory_format=layout) else t.contiguous(memory_format=layout)


def _cast(param: MaybeTensor, like: Tensor) -> MaybeTensor:
    """param in like's dtype (itself when it has it: no Tensor.to call, whose argument parsing is most of a
    batch-1 call's cost)."""
    return param if param is None or param.dtype == like.dtype else param.to(like.dtype)


def group_norm_act(
    x: Tensor,
    norm: nn.GroupNorm,
    dx: MaybeTensor = None,
    *,
    scale: MaybeTensor = None,
    shift: MaybeTensor = None,
    dscale: MaybeTensor = None,
    dshift: MaybeTensor = None,
    act: str = "silu",
    return_input: bool = False,
) -> tuple[Tensor, MaybeTensor] | tuple[Tensor, MaybeTensor, Tensor]:
    """act((GN(x) * weight + bias) * (1 + scale) + shift) and its tangent, one `imf_kernels` call.

    return_input=True: (y, dy, x_out), x_out being x as an output of the op, for the block's residual branch to
    add: its gradient then enters grad_x inside the op's backward (`imf_kernels.group_norm_act`)."""
    weight, bias = _cast(norm.weight, x), _cast(norm.bias, x)
    scale, shift = _cast(scale, x), _cast(shift, x)
    if dx is None:
        out = imf_kernels.group_norm_act(
            x, norm.num_groups, weight, bias, scale=scale, shift=shift, eps=norm.eps, act=act, return_input=return_input
        )
        return (out[0], None, out[1]) if return_input else (out, None)
    return imf_kernels.group_norm_act_jvp(
        x,
        _laid_out_like(dx.to(x.dtype), x),
        norm.num_groups,
        weight,
        bias,
        scale=scale,
        shift=shift,
        dscale=_cast(dscale, x),
        dshift=_cast(dshift, x),
        eps=norm.eps,
        act=act,
        return_input=return_input,
    )


def attention(
    q: Tensor, k: Tensor, v: Tensor, dq: MaybeTensor = None, dk: MaybeTensor = None, dv: MaybeTensor = None
) -> tuple[Tensor, MaybeTensor]:
    """softmax(q k^T / sqrt(d)) v over (B, heads, L, d) and its tangent, one `imf_kernels` call."""
    if dq is None:
        return imf_kernels.attention(q, k, v), None
    return imf_kernels.attention_jvp(q, k, v, dq, dk, dv)


def layer_norm(x: Tensor, norm: nn.LayerNorm, dx: MaybeTensor = None) -> tuple[Tensor, MaybeTensor]:
    """LayerNorm over the last dims; tangent dy = weight * rstd * (dx - mean(dx) - xh * mean(xh * dx)).

    The normalisation's Jacobian rstd (I - 1 1^T / N - xh xh^T / N) is symmetric, so its product with dx is aten's
    LayerNorm backward of dx (no weight): the tangent in 3 kernels (the rows' statistics, that backward, the
    weight), where the formula written out launched 12."""
    y = norm(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        xd = x.detach()[: dx.shape[0]]
        shape = norm.normalized_shape
        _, mean, rstd = torch.native_layer_norm(xd, shape, None, None, norm.eps)
        mask = [True, False, False]
        dxh = torch.ops.aten.native_layer_norm_backward(dx.to(xd.dtype), xd, shape, mean, rstd, None, None, mask)[0]
        return y, dxh if norm.weight is None else dxh * norm.weight.to(dxh.dtype)


def silu(x: Tensor, dx: MaybeTensor = None) -> tuple[Tensor, MaybeTensor]:
    """silu(x) = x sigmoid(x); d silu = dx * sigmoid(x) * (1 + x (1 - sigmoid(x)))."""
    y = F.silu(x)
    return y, None if dx is None else silu_tangent(x.detach()[: dx.shape[0]], dx)


def silu_tangent(x: Tensor, dx: Tensor) -> Tensor:
    """d silu = dx * sigmoid(x) * (1 + x (1 - sigmoid(x))), of x and dx of the same shape (no graph): silu's
    Jacobian is diagonal, so this is aten's silu backward of dx, one kernel (the formula written out launched 6)."""
    with torch.no_grad():
        dtype = x.dtype if x.dtype == dx.dtype else torch.promote_types(x.dtype, dx.dtype)
        return torch.ops.aten.silu_backward(dx.to(dtype), x.detach().to(dtype))


def embedding_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sinusoidal embedding's dtype: float64 for float64 inputs (exact checks), else float32 (what
    torch.promote_types(dtype, float32) gives for real dtypes, without its dispatcher call)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _frequency_values(half: int, max_period: float, dtype: torch.dtype, device: torch.device, signed: bool) -> Tensor:
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=device) / half)
    return torch.cat([-freqs, freqs]) if signed else freqs


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: float, dtype: torch.dtype, device: torch.device, signed: bool) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode the first call ran in
        return _frequency_values(half, max_period, dtype, device, signed)


def sinusoidal_frequencies(
    half: int, max_period: float, dtype: torch.dtype, device: torch.device, signed: bool = False
) -> Tensor:
    """f_k = max_period^(-k / half), k < half, of `imf.model.sinusoidal_embedding` ([-f, f] with `signed`, its
    tangent's factors): computed once per (half, period, dtype, device) and kept (4 kernels a call otherwise, ~10
    calls a training step); under torch.compile computed in the traced code (dynamo would skip the cache anyway,
    with a warning)."""
    if torch.compiler.is_compiling():
        return _frequency_values(half, max_period, dtype, device, signed)
    return _frequencies(half, float(max_period), dtype, device, signed)


def sinusoidal_embedding_tangent(
    x: Tensor, dx: Tensor, dim: int = 256, max_period: float = 10000.0, emb: MaybeTensor = None
) -> Tensor:
    """The tangent of `imf.model.sinusoidal_embedding` [cos(f x), sin(f x)]: [-f sin(f x), f cos(f x)] dx. x (..., B)
    and dx (..., m): the tangent of the first m values of each row of x (e.g. several scalars' values, stacked),
    (..., m, dim). `emb`: that embedding of x, already computed (its first values' sines and cosines are the
    tangent's: 3 kernels, the same numbers)."""
    half = dim // 2
    dtype = embedding_dtype(x.dtype)
    with torch.no_grad():
        rows = dx.shape[-1]
        if emb is not None and emb.dtype == dtype and emb.shape == (*x.shape, 2 * half):
            rate = dx.to(dtype)[..., None] * sinusoidal_frequencies(half, max_period, dtype, x.device, signed=True)
            return emb[..., :rows, :].roll(half, dims=-1) * rate  # [sin, cos] * [-f dx, f dx]
        freqs = sinusoidal_frequencies(half, max_period, dtype, x.device)
        args = x.detach()[..., :rows].to(dtype)[..., None] * freqs
        rate = dx.to(dtype)[..., None] * freqs
        return torch.cat([-torch.sin(args) * rate, torch.cos(args) * rate], dim=-1)
