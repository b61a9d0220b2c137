"""The iMF network: a U-Net whose conditions enter as context tokens read by cross-attention (DESIGN 3).

u_theta(z, h, y, omega, t_min, t_max[, t]) predicts the average velocity over [r, t] with h = t - r; the auxiliary
v-head predicts the instantaneous velocity v(z, t) from the same trunk features.

Two paths through the same modules and weights:
- the reference path (`trunk`, `u_head`, `v_head`, `u`, `v`, and each module's `forward`): plain PyTorch
  (`F.group_norm`, `F.silu`, `F.conv2d`, softmax attention written out), so `torch.func.jvp` runs through it; it is
  the oracle every fused kernel is checked against;
- the fused path (`IMFNet.forward`, `fused_u`, `fused_v`, and each module's `fused`): every layer takes an optional
  tangent and returns (y, dy) in one pass (DESIGN 3.3), through `imf_kernels` ops and `imf.layers`. The primal
  carries the autograd graph, the tangent none (it is MeanFlow's stop-gradient).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from imf import layers
from imf.checks import check_int

try:  # FSDP2's units (imf.distributed.shard_fsdp); absent from torch builds without torch.distributed
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:
    _FSDPModule = None


@dataclass
class ModelConfig:
    image_channels: int = 1
    image_size: int = 8
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    cross_attn_resolutions: tuple[int, ...] = (
        8,
        4,
    )  # feature-map sizes with a CrossAttnBlock after each ResBlock
    self_attn_resolutions: tuple[int, ...] = ()  # feature-map sizes with self-attention (lowest ones)
    head_dim: int = 32  # the heads' target size: an attention block of C channels has max(1, C // head_dim) heads
    context_dim: int = 128
    num_classes: int = 10
    condition_on_t: bool = False  # also feed t as tokens (needed for low-dimensional data, DESIGN 2.1)
    v_head: str = "aux"  # "aux": a copy of the last decoder level; "boundary": v = u(z, h=0)
    # feature maps channels-last (`torch.channels_last`): the convolutions' weights are, so their outputs are and
    # cuDNN's NHWC kernels need no transposes; the GroupNorm kernels and the attention blocks read such maps as
    # they are. Outputs (u, du, v) are contiguous either way.
    channels_last: bool = False
    tokens: dict[str, int] = field(
        default_factory=lambda: {"class": 8, "omega": 4, "t_min": 2, "t_max": 2, "h": 4, "t": 4}
    )

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.cross_attn_resolutions = tuple(self.cross_attn_resolutions)
        self.self_attn_resolutions = tuple(self.self_attn_resolutions)
        for name in (
            "image_channels",
            "image_size",
            "width",
            "num_res_blocks",
            "head_dim",
            "context_dim",
            "num_classes",
        ):
            check_int("ModelConfig", name, getattr(self, name), 1)
        if not self.channel_mult:
            raise ValueError("ModelConfig: channel_mult needs at least one level, got ()")
        for m in self.channel_mult:
            check_int("ModelConfig", "channel_mult's entries", m, 1)
        if self.v_head not in ("aux", "boundary"):
            raise ValueError(f"ModelConfig: v_head must be 'aux' or 'boundary', got {self.v_head!r}")
        if self.image_size % (2 ** (len(self.channel_mult) - 1)) != 0:
            raise ValueError(
                f"ModelConfig: image_size {self.image_size} must be divisible by 2^(levels - 1) = "
                f"{2 ** (len(self.channel_mult) - 1)}"
            )
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        if not set(self.cross_attn_resolutions) <= set(resolutions):
            raise ValueError(
                f"ModelConfig: cross_attn_resolutions {self.cross_attn_resolutions} must be among the levels' "
                f"feature-map sizes {tuple(resolutions)}"
            )
        if not set(self.self_attn_resolutions) <= {resolutions[-1]}:
            raise ValueError(
                f"ModelConfig: self_attn_resolutions {self.self_attn_resolutions} can only hold the lowest "
                f"feature-map size, {resolutions[-1]} (self-attention runs in the middle block)"
            )
        needed = ["class", "omega", "t_min", "t_max", "h"] + (["t"] if self.condition_on_t else [])
        missing = [key for key in needed if key not in self.tokens]
        if missing:
            raise ValueError(f"ModelConfig: tokens needs a count for {', '.join(missing)}; got {self.tokens}")
        for key, count in self.tokens.items():
            check_int("ModelConfig", f"tokens[{key!r}]", count, 1)
        # the attention blocks' channels: every level with cross-attention, and the middle block's; head_dim is the
        # heads' target size: C // head_dim heads (at least one), which must split C evenly
        channels = {self.width * self.channel_mult[-1]}
        channels |= {
            self.width * m
            for m, res in zip(self.channel_mult, resolutions, strict=True)
            if res in self.cross_attn_resolutions
        }
        for c in sorted(channels):
            heads = max(1, c // self.head_dim)
            if c % heads:
                raise ValueError(
                    f"ModelConfig: head_dim {self.head_dim} gives {heads} heads for an attention block's {c} channels, "
                    f"which they do not split evenly; choose a head_dim that divides {c}"
                )


class Cond(NamedTuple):
    """The conditions of one call, each of shape (B,): h = t - r, class id (null = num_classes), guidance scale
    omega >= 1, guidance interval [t_min, t_max], and t (used only when the model has condition_on_t)."""

    h: torch.Tensor
    y: torch.Tensor
    omega: torch.Tensor
    t_min: torch.Tensor
    t_max: torch.Tensor
    t: torch.Tensor | None = None


class CondTangent(NamedTuple):
    """The tangent of the conditions: only h (and t, with condition_on_t) move under the JVP (DESIGN 3.1); the
    class, omega and the guidance interval are held fixed. None is a zero tangent."""

    h: torch.Tensor | None = None
    t: torch.Tensor | None = None


class Features(NamedTuple):
    """The fused trunk's outputs and their tangents (None without tangents): features entering the last decoder
    level, the skips that level reads as (skip, dskip) pairs, the context and its mean over tokens."""

    h: torch.Tensor
    dh: torch.Tensor | None
    skips: list[tuple[torch.Tensor, torch.Tensor | None]]
    ctx: torch.Tensor
    dctx: torch.Tensor | None
    pooled: torch.Tensor
    dpooled: torch.Tensor | None
    banked: dict = {}  # block -> its FiLM (ResBlock) or keys and values (cross-attention), `IMFNet._banks`


def check_batch(
    cfg: ModelConfig,
    x,
    y,
    *,
    dtype: torch.dtype | None = None,
    names: tuple[str, str] = ("x", "y"),
    class_range: bool = False,
    same_device: bool = True,
) -> None:
    """Clear errors for a batch of images and its class ids against a model's config (the entry points call it:
    the sampler, the objectives' losses): x a tensor (B, C, H, W) of the config's channels and size, B >= 1, of
    `dtype` (the model's parameters') where given, else floating; y an integer tensor (B,), on x's device with
    `same_device`. With `class_range`, also the ids in [0, num_classes] (num_classes is the null class:
    unconditional) where y is on the CPU: on a GPU reading them would wait for all the queued work (a sampling loop
    would lose its overlap), so there an id out of range is the embedding's device-side assert, as in PyTorch. The
    losses leave it off (a read every training step; the training data's own checks hold the ids' range)."""
    x_name, y_name = names
    want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{x_name} must be a torch.Tensor of shape (B, {', '.join(map(str, want))}), got {type(x)}")
    if x.dim() != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(
            f"{x_name} must have shape (B, {', '.join(map(str, want))}) (the model's image_channels, image_size), "
            f"got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} must hold at least one image, got batch 0")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{x_name} must be {dtype} (the model's parameters' dtype), got {x.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"{x_name} must be a floating tensor, got {x.dtype}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = y.dtype if isinstance(y, torch.Tensor) else type(y)
        raise TypeError(f"{y_name} must be an integer tensor of class ids, got {got}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"{y_name} must have shape (B,) = ({x.shape[0]},), one class id per image, got {tuple(y.shape)}"
        )
    if same_device and y.device != x.device:
        raise ValueError(f"{y_name} is on {y.device} but {x_name} on {x.device}")
    if class_range and y.device.type == "cpu":
        low, high = torch.stack(torch.aminmax(y)).tolist()  # one read
        if low < 0 or high > cfg.num_classes:
            raise ValueError(
                f"{y_name} must hold class ids in [0, {cfg.num_classes}] ({cfg.num_classes} = the null class, "
                f"unconditional), got min {low}, max {high}"
            )


def check_model_batch(model: nn.Module, x, y, **options) -> None:
    """`check_batch` against `model`'s own config and its parameters' dtype, for a model with a ModelConfig (a
    stand-in without one, e.g. a test's, is taken as it is); `options` as check_batch's."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        check_batch(cfg, x, y, dtype=next(model.parameters()).dtype, **options)


def num_groups_for(channels: int) -> int:
    """32 groups, or fewer when channels are few: the largest divisor of C that is <= min(32, C // 4)."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


def sinusoidal_embedding(x: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(f x), sin(f x)] with f = max_period^(-k / (dim/2)); raw value, no x1000 scaling (DESIGN 3.1). x of any
    shape (..., dim) out, e.g. (B,) or several scalars' values stacked (S, B)."""
    half = dim // 2
    dtype = layers.embedding_dtype(x.dtype)  # float32, or float64 for exact checks
    freqs = layers.sinusoidal_frequencies(half, max_period, dtype, x.device)
    args = x.to(dtype)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarTokens(nn.Module):
    """scalar -> sinusoidal(256) -> MLP(256 -> D, SiLU, D -> D) -> added to K learned tokens."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) / math.sqrt(dim))
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        emb = self.mlp(sinusoidal_embedding(value).to(self.tokens.dtype))
        return self.tokens[None] + emb[:, None]

    def fused(self, value: torch.Tensor, dvalue: torch.Tensor | None = None):
        """(tokens, dtokens): the tangent is d/dvalue of the embedding pushed through the MLP, the same for all K."""
        emb = sinusoidal_embedding(value)
        demb_in = None if dvalue is None else layers.sinusoidal_embedding_tangent(value, dvalue, emb=emb)
        emb_in = emb.to(self.tokens.dtype)
        demb_in = None if demb_in is None else demb_in.to(emb_in.dtype)
        first, _, second = self.mlp
        a, da = layers.linear(emb_in, first, demb_in)
        a, da = layers.silu(a, da)
        emb, demb = layers.linear(a, second, da)
        tokens = self.tokens[None] + emb[:, None]
        return tokens, None if demb is None else demb[:, None].expand(-1, self.tokens.shape[0], -1)


@functools.lru_cache(maxsize=8)
def _token_scalars(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(sum counts,) int64: the index of the scalar each token reads, counts[i] tokens of scalar i in turn. Built on
    the device (kernels, no host-to-device copy: a CUDA graph may be capturing), once per counts."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, even if first built for a sampler's call
        return torch.cat([torch.full((count,), i, dtype=torch.long, device=device) for i, count in enumerate(counts)])


def _scalar_mlp_bank(x, first_weight, first_bias, second_weight, second_bias):
    """(a, silu(a), out): S MLPs (P -> D, SiLU, D -> D) on their own inputs x (S, B, P) from two batched matmuls
    over their stacked weights (S, D, P), (S, D, D) and biases (S, D); a is the first layer's output (S, B, D)."""
    first = torch.baddbmm(first_bias[:, None], x, first_weight.mT)
    hidden = F.silu(first)
    return first, hidden, torch.baddbmm(second_bias[:, None], hidden, second_weight.mT)


class _ScalarMLPBank(torch.autograd.Function):
    """`_scalar_mlp_bank` with an autograd graph whose weight gradients come out of their matmuls in the weights'
    own (S, D, P) layout, g^T x, so autograd hands each block its slice as it is (autograd's own backward of x W^T
    gives W^T's gradient, transposed slices: a copy each), and no gradient of x (the embeddings)."""

    @staticmethod
    def forward(ctx, x, first_weight, first_bias, second_weight, second_bias):
        first, hidden, out = _scalar_mlp_bank(x, first_weight, first_bias, second_weight, second_bias)
        ctx.save_for_backward(x, first, hidden, second_weight)
        ctx.mark_non_differentiable(first)
        ctx.set_materialize_grads(False)  # first's gradient (there is none) stays None, not a zero fill
        return first, out

    @staticmethod
    def backward(ctx, _, grad):
        x, first, hidden, second_weight = ctx.saved_tensors
        grad_hidden = torch.bmm(grad, second_weight)
        grad_first = torch.ops.aten.silu_backward(grad_hidden, first)
        return None, grad_first.mT @ x, grad_first.sum(1), grad.mT @ hidden, grad.sum(1)


def scalar_tokens_bank(
    blocks: list[ScalarTokens], values: list[torch.Tensor], dvalues: list[torch.Tensor | None] = ()
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`ScalarTokens.fused` of several blocks, block i reading values[i] (B,): their tokens side by side, (B, sum
    K_i, D), from one sinusoidal embedding of every value and two batched matmuls over the blocks' stacked MLP
    weights, then one gather of each token's embedding, for any number of blocks (the latent-b conditioning's
    forward: 21 kernels where its four blocks' own calls made it 38; 32 against 52 with h's tangent; its backward
    13 against 36). `dvalues`: tangents of the last len(dvalues) blocks' values, of their first m rows (None: zero);
    the second output is those blocks' tokens' tangent (m, their K, D), None without dvalues or where every one is
    None (the other blocks' tokens do not move).

    None where the blocks cannot be stacked (a parameter that is not a plain tensor, e.g. an FSDP2 shard; MLPs of
    other shapes): callers take each block's own call."""
    joinable = layers._joinable([b.mlp[0] for b in blocks] + [b.mlp[2] for b in blocks])
    token_params = [b.tokens for b in blocks]
    if joinable is None or any(type(p) not in (nn.Parameter, torch.Tensor) for p in token_params):
        return None
    weights, biases = joinable
    count = len(blocks)
    if len({w.shape for w in weights[:count]}) != 1 or len({w.shape for w in weights[count:]}) != 1:
        return None
    if len(dvalues) > count:
        raise ValueError(f"scalar_tokens_bank: dvalues must have at most {count} entries, got {len(dvalues)}")
    stacked = torch.stack(values)  # (S, B)
    emb = sinusoidal_embedding(stacked)  # (S, B, 256)
    first_weight, second_weight = torch.stack(weights[:count]), torch.stack(weights[count:])
    params = (first_weight, torch.stack(biases[:count]), second_weight, torch.stack(biases[count:]))
    x = emb.to(first_weight.dtype)
    graded = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if graded and not torch.is_autocast_enabled(x.device.type):
        first, out = _ScalarMLPBank.apply(x, *params)
    else:
        first, _, out = _scalar_mlp_bank(x, *params)
    counts = tuple(p.shape[0] for p in token_params)
    gathered = out.index_select(0, _token_scalars(counts, out.device))  # (K, B, D): each token's block's output
    tokens = (gathered + torch.cat(token_params)[:, None]).transpose(0, 1)
    given = [dv for dv in dvalues if dv is not None]
    if not given:
        return tokens, None
    with torch.no_grad():
        start, rows = count - len(dvalues), given[0].shape[0]
        dv_moving = [dv if dv is not None else stacked.new_zeros(rows) for dv in dvalues]
        dv_moving = dv_moving[0][None] if len(dv_moving) == 1 else torch.stack(dv_moving)
        demb = layers.sinusoidal_embedding_tangent(stacked[start:], dv_moving, emb=emb[start:])  # (M, m, 256)
        dfirst = torch.bmm(demb.to(first.dtype), first_weight.detach()[start:].mT)  # (M, m, D)
        dsilu = layers.silu_tangent(first.detach()[start:, :rows], dfirst)
        dout = torch.bmm(dsilu, second_weight.detach()[start:].to(dsilu.dtype).mT)
        dtokens = dout.index_select(0, _token_scalars(counts[start:], out.device)).transpose(0, 1)
    return tokens, dtokens


class ClassTokens(nn.Module):
    """class id -> embedding table (num_classes + 1 rows, the last is the null class) -> added to K tokens."""

    def __init__(self, num_tokens: int, num_classes: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) / math.sqrt(dim))
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.tokens[None] + self.embed(y)[:, None]


class Conditioning(nn.Module):
    """All conditions as one context sequence (20 tokens, 24 with t), normalised once."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, k = cfg.context_dim, cfg.tokens
        self.condition_on_t = cfg.condition_on_t
        self.class_tokens = ClassTokens(k["class"], cfg.num_classes, d)
        self.omega_tokens = ScalarTokens(k["omega"], d)
        self.t_min_tokens = ScalarTokens(k["t_min"], d)
        self.t_max_tokens = ScalarTokens(k["t_max"], d)
        self.h_tokens = ScalarTokens(k["h"], d)
        self.t_tokens = ScalarTokens(k["t"], d) if cfg.condition_on_t else None
        self.norm = nn.LayerNorm(d)

    def forward(self, cond: Cond) -> torch.Tensor:
        parts = [
            self.class_tokens(cond.y),
            self.omega_tokens(1.0 - 1.0 / cond.omega),
            self.t_min_tokens(cond.t_min),
            self.t_max_tokens(cond.t_max),
            self.h_tokens(cond.h),
        ]
        if self.t_tokens is not None:
            if cond.t is None:
                raise ValueError("model: this model has condition_on_t=True, so Cond.t must be given")
            parts.append(self.t_tokens(cond.t))
        return self.norm(torch.cat(parts, dim=1))

    def fused(self, cond: Cond, dcond: CondTangent | None = None):
        """(ctx, dctx): only the h and t tokens have a tangent; LayerNorm's tangent from `imf.layers.layer_norm`. The
        scalar tokens from one `scalar_tokens_bank` where the blocks can be stacked, else each block's own call."""
        if self.t_tokens is not None and cond.t is None:
            raise ValueError("model: this model has condition_on_t=True, so Cond.t must be given")
        fixed = [(self.omega_tokens, 1.0 - cond.omega.reciprocal()), (self.t_min_tokens, cond.t_min)]
        fixed.append((self.t_max_tokens, cond.t_max))
        moving = [(self.h_tokens, cond.h, None if dcond is None else dcond.h)]
        if self.t_tokens is not None:
            moving.append((self.t_tokens, cond.t, None if dcond is None else dcond.t))
        class_tokens = self.class_tokens(cond.y)
        blocks = [block for block, *_ in fixed + moving]
        banked = scalar_tokens_bank(blocks, [value for _, value, *_ in fixed + moving], [dv for *_, dv in moving])
        if banked is not None:
            scalar_tokens, dmoving = banked
            tokens = torch.cat([class_tokens, scalar_tokens], dim=1)
            if dmoving is None:
                return self.norm(tokens), None
            # the fixed tokens' tangent is zero: padded in front of the moving ones'
            return layers.layer_norm(tokens, self.norm, F.pad(dmoving, (0, 0, tokens.shape[1] - dmoving.shape[1], 0)))
        fixed_parts = [class_tokens] + [block(value) for block, value in fixed]
        moving_parts = [block.fused(value, dvalue) for block, value, dvalue in moving]
        tokens = torch.cat(fixed_parts + [part for part, _ in moving_parts], dim=1)
        moving_tangents = [dpart for _, dpart in moving_parts if dpart is not None]
        if not moving_tangents:  # nothing moves: a zero tangent
            return self.norm(tokens), None
        rows = moving_tangents[0].shape[0]  # the tangent may cover only the first rows (imf.layers)
        zeros = lambda part: part.new_zeros(rows, *part.shape[1:])
        dtokens = [zeros(part) for part in fixed_parts]
        dtokens += [zeros(part) if dpart is None else dpart for part, dpart in moving_parts]
        return layers.layer_norm(tokens, self.norm, torch.cat(dtokens, dim=1))


# torch 2.11-2.13 under torch.func.jvp: GroupNorm's forward-mode derivative viewed a channels-last map as if it were
# contiguous and failed ("view size is not compatible with input tensor's size and stride"): the plain path hands
# it a contiguous copy there (2.14 takes the map as it is).
_GROUP_NORM_INPUT_CONTIGUOUS = torch.torch_version.TorchVersion(torch.__version__) < (2, 14)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """F.group_norm with norm's groups, affine and eps (the plain path's; `F` is looked up on each call)."""
    if _GROUP_NORM_INPUT_CONTIGUOUS:
        x = x.contiguous()
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, scale=None, shift=None) -> torch.Tensor:
    """y = silu((GN(x) * weight + bias) * (1 + scale) + shift), the op `imf_kernels.group_norm_act` fuses."""
    h = group_norm(x, norm)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, L, d), written out so that torch.func.jvp runs through it."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)


class ResBlock(nn.Module):
    """GN -> FiLM(pooled context) -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus skip (1x1 when C changes)."""

    def __init__(self, in_ch: int, out_ch: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups_for(in_ch), in_ch)
        self.film = nn.Linear(context_dim, 2 * in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups_for(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # FiLM starts as the identity and the residual branch as zero: the block starts as its skip path.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, ctx_pooled: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(ctx_pooled).chunk(2, dim=1)
        h = self.conv1(group_norm_silu(x, self.norm1, scale, shift))
        h = self.conv2(F.silu(group_norm(h, self.norm2)))
        return self.skip(x) + h

    def fused(self, x, pooled, dx=None, dpooled=None, film: layers.FiLMOutputs | None = None):
        """(y, dy); dscale/dshift = W_film dpooled (no bias). `film`: this block's (scale, shift, dscale, dshift)
        where the model computed them with every other block's (`layers.film_bank`), else its own `layers.film`."""
        scale, shift, dscale, dshift = layers.film(pooled, self.film, dpooled) if film is None else film
        # x from the norm (itself, as the op's output): the skip branch's gradient is added in the norm's backward
        h, dh, x = layers.group_norm_act(
            x, self.norm1, dx, scale=scale, shift=shift, dscale=dscale, dshift=dshift, return_input=True
        )
        h, dh = layers.conv2d(h, self.conv1, dh)
        h, dh = layers.group_norm_act(h, self.norm2, dh)
        h, dh = layers.conv2d(h, self.conv2, dh)
        skip, dskip = (x, dx) if isinstance(self.skip, nn.Identity) else layers.conv2d(x, self.skip, dx)
        return skip + h, None if dh is None else dskip + dh


class AttnBlock(nn.Module):
    """GN -> q from feature-map tokens, k/v from the context (cross) or the map itself (self) -> multi-head
    attention -> zero-initialised output projection, added as a residual."""

    def __init__(self, channels: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(num_groups_for(channels), channels)
        self.to_q = nn.Linear(channels, channels)
        kv_dim = channels if context_dim is None else context_dim
        self.to_kv = nn.Linear(kv_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = group_norm(x, self.norm).flatten(2).transpose(1, 2)
        source = tokens if ctx is None else ctx
        q = self.to_q(tokens).view(b, hh * ww, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(source).view(b, source.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, c)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, hh, ww)

    def fused(self, x, ctx, dx=None, dctx=None, kv: layers.KVOutputs | None = None):
        """(y, dy); for cross-attention dk = W_k dctx, dv = W_v dctx (None when the context does not move). `kv`:
        this block's (k, v, dk, dv) where the model computed them with every other cross-attention block's
        (`layers.kv_bank`), else its own.

        The feature map stays channels-first, (B, C, L) with L = H W: q^T = W_q x and the output projection are
        batched matmuls on it (`layers.channel_linear`), and q, k, v enter the attention op as (B, heads, L, d)
        views, so no token-major copy is made (the torch and triton backends read strided inputs and lay o out
        like q; the op makes them contiguous for the cuda kernels)."""
        b, c, hh, ww = x.shape
        length = hh * ww
        # x from the norm (itself, as the op's output): the residual's gradient is added in the norm's backward
        normed, dnormed, x = layers.group_norm_act(x, self.norm, dx, act="none", return_input=True)
        flat = lambda a: None if a is None else a.view(a.shape[0], c, length)
        heads_of = lambda a: None if a is None else a.view(a.shape[0], self.heads, -1, length).transpose(-1, -2)
        qt, dqt = layers.channel_linear(flat(normed), self.to_q, flat(dnormed))
        q, dq = heads_of(qt), heads_of(dqt)
        if ctx is None:  # self-attention: k and v from the same pixels
            kvt, dkvt = layers.channel_linear(flat(normed), self.to_kv, flat(dnormed))
            k, v = (heads_of(part) for part in kvt.chunk(2, dim=1))
            dk, dv = (None, None) if dkvt is None else (heads_of(part) for part in dkvt.chunk(2, dim=1))
        else:  # the context's few tokens: (B, Lk, 2C) -> k, v (B, heads, Lk, d) views, read as they are by the
            # triton kernels (the torch backend's batched matmuls copy them, B and heads not merging: Lk = 20-24
            # tokens; the cuda backend gets contiguous copies from the op)

            def split(a):
                return a.view(a.shape[0], a.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)

            if kv is not None:
                k, v, dk, dv = kv
            else:
                kv, dkv = layers.linear(ctx, self.to_kv, dctx)
                k, v = split(kv).unbind(0)
                dk, dv = (None, None) if dkv is None else split(dkv).unbind(0)
        o, do = layers.attention(q, k, v, dq, dk, dv)
        # (B, heads, L, d) -> (B, C, L): a view when the op's output is laid out like q, or heads = 1
        channels_first = lambda a: None if a is None else a.transpose(-1, -2).reshape(a.shape[0], c, length)
        dresidual = None if do is None else dx.reshape(dx.shape[0], c, length)  # added by the matmul
        out, dout = layers.channel_linear(channels_first(o), self.proj, channels_first(do), dresidual)
        as_map = lambda a: a.view(a.shape[0], c, hh, ww)
        return x + as_map(out), None if dout is None else as_map(dout)


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each followed by cross-attention where chosen."""

    def __init__(self, in_chs: list[int], out_ch: int, context_dim: int, head_dim: int, cross_attn: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, context_dim) for c in in_chs)
        self.attn = nn.ModuleList(
            AttnBlock(out_ch, head_dim, context_dim) if cross_attn else nn.Identity() for _ in in_chs
        )


class OutputLayer(nn.Module):
    """GN -> SiLU -> conv3x3, zero-initialised."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups_for(channels), channels)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(group_norm_silu(x, self.norm))

    def fused(self, x, dx=None):
        h, dh = layers.group_norm_act(x, self.norm, dx)
        return layers.conv2d(h, self.conv, dh)


class IMFNet(nn.Module):
    """U-Net with in-context conditioning.

    `forward(z, cond)` returns (u, v) and `forward(z, cond, dz, dcond)` returns (u, du, v), both through the fused
    path; v comes from the aux head (None for v_head="boundary" or with_v=False). `u`, `v`, `trunk`, `u_head` and
    `v_head` are the reference path (plain ops), `fused_u` and `fused_v` the fused primal for sampling and targets.
    """

    takes_tangents = True  # the objectives and the sampler use the fused path of models that have one

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            hint = " (a preset's model config is preset.model)" if hasattr(cfg, "model") else ""
            raise TypeError(f"IMFNet takes a ModelConfig{hint}, got {type(cfg).__name__}")
        # its own copy, checked again: a preset's config may have been changed since it was made (get_preset's
        # copies are the user's to modify), and changing it after this must not change the built model's
        cfg = copy.deepcopy(cfg)
        cfg.__post_init__()
        self.cfg = cfg
        d, hd = cfg.context_dim, cfg.head_dim
        chs = [cfg.width * m for m in cfg.channel_mult]
        self.cond = Conditioning(cfg)
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.width, 3, padding=1)

        # Encoder: per level, num_res_blocks ResBlocks; a strided conv between levels. Every output is a skip.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chs, ch, res = [cfg.width], cfg.width, cfg.image_size
        for i, out_ch in enumerate(chs):
            in_chs = [ch] + [out_ch] * (cfg.num_res_blocks - 1)
            self.down.append(Level(in_chs, out_ch, d, hd, res in cfg.cross_attn_resolutions))
            ch = out_ch
            skip_chs += [ch] * cfg.num_res_blocks
            if i < len(chs) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chs.append(ch)
                res //= 2

        self.mid1 = ResBlock(ch, ch, d)
        self.mid_self_attn = AttnBlock(ch, hd, None) if res in cfg.self_attn_resolutions else None
        self.mid_cross_attn = AttnBlock(ch, hd, d)
        self.mid2 = ResBlock(ch, ch, d)

        # Decoder: per level, num_res_blocks + 1 ResBlocks on [h, skip]; nearest-upsample + conv between levels.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self.up_skip_counts = []
        for i, out_ch in reversed(list(enumerate(chs))):
            in_chs = []
            for _ in range(cfg.num_res_blocks + 1):
                in_chs.append(ch + skip_chs.pop())
                ch = out_ch
            self.up.append(Level(in_chs, out_ch, d, hd, res in cfg.cross_attn_resolutions))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2
        self.out = OutputLayer(ch, cfg.image_channels)
        if cfg.v_head == "aux":  # a copy of the last decoder level and the output layer, own weights
            self.v_level = copy.deepcopy(self.up[-1])
            self.v_out = copy.deepcopy(self.out)
        if cfg.channels_last:  # the 4-D weights (convolutions'): every convolution's output is channels-last then
            self.to(memory_format=torch.channels_last)

    def _run_level(self, level: Level, h, skips, ctx, pooled):
        for res, attn in zip(level.res, level.attn, strict=True):
            h = res(torch.cat([h, skips.pop()], dim=1), pooled)
            h = attn(h, ctx) if isinstance(attn, AttnBlock) else h
        return h

    def trunk(self, z: torch.Tensor, cond: Cond):
        """Everything up to the last decoder level: returns (features, skips of the last level, ctx, pooled)."""
        ctx = self.cond(cond)
        pooled = ctx.mean(dim=1)
        h = self.conv_in(z)
        skips = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = res(h, pooled)
                h = attn(h, ctx) if isinstance(attn, AttnBlock) else h
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid1(h, pooled)
        if self.mid_self_attn is not None:
            h = self.mid_self_attn(h, None)
        h = self.mid2(self.mid_cross_attn(h, ctx), pooled)
        for i, level in enumerate(self.up[:-1]):
            h = self._run_level(level, h, skips, ctx, pooled)
            h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h, skips, ctx, pooled

    def u_head(self, features) -> torch.Tensor:
        h, skips, ctx, pooled = features
        return self.out(self._run_level(self.up[-1], h, list(skips), ctx, pooled)).contiguous()

    def v_head(self, features) -> torch.Tensor:
        """The aux v-head on the trunk's features (v_head="aux" only)."""
        h, skips, ctx, pooled = features
        return self.v_out(self._run_level(self.v_level, h, list(skips), ctx, pooled)).contiguous()

    def u(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The average velocity only (sampling): the v-head is not run."""
        return self.u_head(self.trunk(z, cond))

    def v(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The instantaneous velocity: the aux head, or u at h = 0 for v_head="boundary" (cond.h is used as given,
        callers pass h = 0)."""
        if self.cfg.v_head == "boundary":
            return self.u(z, cond)
        return self.v_head(self.trunk(z, cond))

    # --- the fused path (DESIGN 3.3) -------------------------------------------------------------------------

    def _banks(self, ctx, dctx, pooled, dpooled, heads: tuple[Level, ...], tangent_heads: int) -> dict:
        """{ResBlock: (scale, shift, dscale, dshift), cross-attention AttnBlock: (k, v, dk, dv)} for the trunk's
        blocks and those of `heads` (the decoder levels run on the trunk's features, the first `tangent_heads` of
        them with tangents): the FiLM layers, all reading the pooled context, from one matmul over their weights
        (`layers.film_bank`), and the cross-attention keys and values, all projections of the context, from another
        (`layers.kv_bank`): ~290 fewer kernels a latent-b training step than a call per block. Empty under FSDP2,
        whose units gather their parameters only around their own calls: the blocks then compute their own."""
        trunk_res = [res for level in self.down for res in level.res] + [self.mid1, self.mid2]
        trunk_res += [res for level in self.up[:-1] for res in level.res]
        cross = lambda levels: [attn for level in levels for attn in level.attn if isinstance(attn, AttnBlock)]
        trunk_attn = cross(self.down) + [self.mid_cross_attn] + cross(self.up[:-1])
        res_blocks = trunk_res + [res for level in heads for res in level.res]
        attn_blocks = trunk_attn + cross(heads)
        if _FSDPModule and any(isinstance(block, _FSDPModule) for block in res_blocks + attn_blocks):
            return {}
        banked = {}
        moving = len(trunk_res) + sum(len(level.res) for level in heads[:tangent_heads])
        films = layers.film_bank(pooled, [block.film for block in res_blocks], dpooled, moving)
        if films is not None:
            banked.update(zip(res_blocks, films, strict=True))
        moving = len(trunk_attn) + len(cross(heads[:tangent_heads]))
        to_kv = [block.to_kv for block in attn_blocks]
        kvs = layers.kv_bank(ctx, to_kv, [block.heads for block in attn_blocks], dctx, moving)
        if kvs is not None:
            banked.update(zip(attn_blocks, kvs, strict=True))
        return banked

    def fused_trunk(
        self,
        z: torch.Tensor,
        cond: Cond,
        dz: torch.Tensor | None = None,
        dcond: CondTangent | None = None,
        *,
        heads: tuple[Level, ...] = (),
        tangent_heads: int = 0,
    ) -> Features:
        """`trunk` with tangents: every layer returns (y, dy) in one pass; dz None means no tangents at all.
        `heads`: the decoder levels that will run on these features, the first `tangent_heads` with tangents,
        whose FiLM layers and cross-attention keys and values are computed here with the trunk's (`Features.banked`)."""
        ctx, dctx = self.cond.fused(cond, dcond if dz is not None else None)
        pooled, dpooled = ctx.mean(dim=1), None if dctx is None else dctx.mean(dim=1)
        banked = self._banks(ctx, dctx, pooled, dpooled, heads, tangent_heads)
        h, dh = layers.conv2d(z, self.conv_in, dz)
        skips = [(h, dh)]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h, dh = res.fused(h, pooled, dh, dpooled, banked.get(res))
                if isinstance(attn, AttnBlock):
                    h, dh = attn.fused(h, ctx, dh, dctx, banked.get(attn))
                skips.append((h, dh))
            if i < len(self.downsample):
                h, dh = layers.conv2d(h, self.downsample[i], dh)
                skips.append((h, dh))
        h, dh = self.mid1.fused(h, pooled, dh, dpooled, banked.get(self.mid1))
        if self.mid_self_attn is not None:
            h, dh = self.mid_self_attn.fused(h, None, dh, None)
        h, dh = self.mid_cross_attn.fused(h, ctx, dh, dctx, banked.get(self.mid_cross_attn))
        h, dh = self.mid2.fused(h, pooled, dh, dpooled, banked.get(self.mid2))
        upsample = lambda a: None if a is None else F.interpolate(a, scale_factor=2.0, mode="nearest")
        for i, level in enumerate(self.up[:-1]):
            h, dh = self._fused_level(level, h, dh, skips, ctx, dctx, pooled, dpooled, banked)
            h, dh = layers.conv2d(upsample(h), self.upsample[i], upsample(dh))
        return Features(h, dh, skips, ctx, dctx, pooled, dpooled, banked)

    def _fused_level(self, level: Level, h, dh, skips, ctx, dctx, pooled, dpooled, banked: dict):
        for res, attn in zip(level.res, level.attn, strict=True):
            skip, dskip = skips.pop()
            dh = None if dh is None else torch.cat([dh, dskip], dim=1)
            h, dh = res.fused(torch.cat([h, skip], dim=1), pooled, dh, dpooled, banked.get(res))
            if isinstance(attn, AttnBlock):
                h, dh = attn.fused(h, ctx, dh, dctx, banked.get(attn))
        return h, dh

    def _fused_head(self, level: Level, out: OutputLayer, f: Features, with_tangent: bool):
        """The last decoder level and the output layer on the trunk's features, with or without their tangents."""
        if with_tangent:
            h, dh = self._fused_level(level, f.h, f.dh, list(f.skips), f.ctx, f.dctx, f.pooled, f.dpooled, f.banked)
        else:
            skips = [(skip, None) for skip, _ in f.skips]
            h, dh = self._fused_level(level, f.h, None, skips, f.ctx, None, f.pooled, None, f.banked)
        y, dy = out.fused(h, dh)
        # contiguous outputs (a copy of a few channels where the maps are channels-last, ModelConfig.channels_last)
        return y.contiguous(), None if dy is None else dy.contiguous()

    def forward(
        self,
        z: torch.Tensor,
        cond: Cond,
        dz: torch.Tensor | None = None,
        dcond: CondTangent | None = None,
        *,
        with_v: bool = True,
    ):
        """(u, v), or (u, du, v) when a tangent is given (dz None with dcond given: dz = 0). The v-head runs on the
        same trunk pass, primal only (nothing needs its tangent).

        The tangent may cover only the first m rows: dz of shape (m, ...) and dcond's tensors of shape (m,), m <= B;
        du then has m rows and the other rows run primal-only (`imf.layers`)."""
        with_tangent = dz is not None or dcond is not None
        if with_tangent:
            if dz is None:
                rows = next((a.shape[0] for a in dcond if a is not None), z.shape[0])
                dz = z.new_zeros(rows, *z.shape[1:])
            dz = dz.detach().to(z.dtype)
        with_v = with_v and self.cfg.v_head == "aux"
        heads = (self.up[-1], self.v_level) if with_v else (self.up[-1],)
        features = self.fused_trunk(z, cond, dz, dcond, heads=heads, tangent_heads=int(with_tangent))
        u, du = self._fused_head(self.up[-1], self.out, features, with_tangent)
        v = None
        if with_v:
            v, _ = self._fused_head(self.v_level, self.v_out, features, False)
        return (u, du, v) if with_tangent else (u, v)

    def fused_u(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """`u` through the fused primal ops (sampling): the v-head is not run."""
        return self._fused_head(self.up[-1], self.out, self.fused_trunk(z, cond, heads=(self.up[-1],)), False)[0]

    def fused_v(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """`v` through the fused primal ops (the objectives' no-grad targets)."""
        if self.cfg.v_head == "boundary":
            return self.fused_u(z, cond)
        return self._fused_head(self.v_level, self.v_out, self.fused_trunk(z, cond, heads=(self.v_level,)), False)[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# bf16 copies of a model's parameters, by model: (the bf16 buffers, the parameters' ids). The value holds no
# reference to the model, so the entry goes with it.
_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the modules whose parameters the fused path only ever uses in bf16 under autocast (convolutions and matmuls cast
# them; imf.layers casts GroupNorm's to the activations' dtype); an embedding or a hand-written norm would compute
# in bf16 what it computed in fp32
BF16_CAST_MODULES = (nn.Conv2d, nn.Linear, nn.GroupNorm)


@contextlib.contextmanager
def bf16_parameters(model: nn.Module, enabled: bool = True):
    """Inside, under torch.no_grad(): each parameter of `model`'s BF16_CAST_MODULES is a bf16 copy, refreshed on
    entry by one multi-tensor copy into buffers kept for the model (the same buffers every step: a CUDA graph can
    hold them). For the fused path's no-grad target evaluations under bf16 autocast, which would otherwise cast
    each weight at each layer, one kernel per tensor (~350 of the ~3800 kernels of a latent-b step on the H100), to
    the same values. Does nothing with grad enabled, when not `enabled`, or for a model whose parameters are
    DTensors (FSDP2) or that DDP wraps (its forward manages the parameters itself)."""
    if not enabled or torch.is_grad_enabled() or isinstance(model, nn.parallel.DistributedDataParallel):
        yield
        return
    slots = [
        (module, name, param)
        for module in model.modules()
        if isinstance(module, BF16_CAST_MODULES)
        for name, param in module._parameters.items()
        if param is not None and param.is_floating_point()
    ]
    if not slots or type(slots[0][2]) not in (nn.Parameter, torch.Tensor):
        yield
        return
    params = [param for _, _, param in slots]
    ids = tuple(map(id, params))
    entry = _BF16_COPIES.get(model)
    if entry is None or entry[1] != ids:  # made once, again if the parameters were replaced
        entry = _BF16_COPIES[model] = ([torch.empty_like(p, dtype=torch.bfloat16) for p in params], ids)
    copies = entry[0]
    torch._foreach_copy_(copies, params)
    try:
        for (module, name, _), copy_ in zip(slots, copies, strict=True):
            module._parameters[name] = copy_
        yield
    finally:
        for module, name, param in slots:
            module._parameters[name] = param
