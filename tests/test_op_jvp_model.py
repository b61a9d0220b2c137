"""The ops as drop-in layers: torch.func.jvp and torch.autograd.forward_ad through a small model built from
group_norm_act and attention give the tangents of the same model built from the reference ops (DESIGN 4.2).
"""

import copy
import functools
import types

import pytest
import torch
from torch import nn

import imf_kernels
from imf_kernels import dispatch, reference

BACKENDS = list(dispatch.BACKENDS)
BATCH, CHANNELS, HEIGHT, WIDTH, GROUPS = 2, 40, 5, 7, 8
CONTEXT_TOKENS, CONTEXT_DIM, HEADS, HEAD_DIM = 20, 24, 2, 32
FLOOR = reference.FLOOR[torch.float32]


class TinyAttentionBlock(nn.Module):
    """GN + FiLM + SiLU, self-attention over the 35 pixels, cross-attention to a 20-token context, residual."""

    def __init__(self) -> None:
        super().__init__()
        inner = HEADS * HEAD_DIM
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(CHANNELS))
        self.norm_bias = nn.Parameter(0.1 * torch.randn(CHANNELS))
        self.film = nn.Linear(CONTEXT_DIM, 2 * CHANNELS)
        self.qkv = nn.Linear(CHANNELS, 3 * inner)
        self.self_out = nn.Linear(inner, CHANNELS)
        self.q_cross = nn.Linear(CHANNELS, inner)
        self.kv_cross = nn.Linear(CONTEXT_DIM, 2 * inner)
        self.out = nn.Linear(inner, CHANNELS)

    @staticmethod
    def heads(tokens: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, L, parts * H * D) -> parts contiguous tensors (B, H, L, D)."""
        batch, length = tokens.shape[:2]
        split = tokens.view(batch, length, parts, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).contiguous()
        return split.unbind(0)

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ops: types.SimpleNamespace) -> torch.Tensor:
        scale, shift = (part.contiguous() for part in self.film(context.mean(1)).chunk(2, dim=-1))
        h = ops.group_norm_act(x, GROUPS, self.norm_weight, self.norm_bias, scale=scale, shift=shift)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.self_out(self.merge(ops.attention(*self.heads(self.qkv(tokens), 3))))
        (q,) = self.heads(self.q_cross(tokens), 1)
        o = ops.attention(q, *self.heads(self.kv_cross(context), 2))
        return x + self.out(self.merge(o)).transpose(1, 2).reshape(x.shape)


REFERENCE_OPS = types.SimpleNamespace(group_norm_act=reference.group_norm_act, attention=reference.attention)


def kernel_ops(backend: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        group_norm_act=functools.partial(imf_kernels.group_norm_act, backend=backend),
        attention=functools.partial(imf_kernels.attention, backend=backend),
    )


def skip_unless_runs(backend: str) -> None:
    """Skip with the backend's own words when it cannot take the model's GN and attention calls."""
    x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH)
    gn_args = dict(x=x, num_groups=GROUPS, weight=None, bias=None, scale=None, shift=None, eps=1e-5, act="silu")
    q = torch.randn(BATCH, HEADS, HEIGHT * WIDTH, HEAD_DIM)
    context = torch.randn(BATCH, HEADS, CONTEXT_TOKENS, HEAD_DIM)
    reasons = [
        *dispatch.not_supported_reasons(backend, "group_norm_act", gn_args),
        *dispatch.not_supported_reasons(backend, "attention", dict(q=q, k=q, v=q, scale=None)),
        *dispatch.not_supported_reasons(backend, "attention", dict(q=q, k=context, v=context, scale=None)),
    ]
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(dict.fromkeys(reasons)))


@pytest.fixture
def model_and_inputs():
    """A float32 model, its float64 copy, and fresh random (x, context) with tangents (dx, dcontext)."""
    model = TinyAttentionBlock()
    inputs = (torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH), torch.randn(BATCH, CONTEXT_TOKENS, CONTEXT_DIM))
    tangents = tuple(torch.randn_like(value) for value in inputs)
    return model, copy.deepcopy(model).double(), inputs, tangents


def as_double(values):
    return tuple(value.double() for value in values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jvp_through_the_model(backend, model_and_inputs):
    """Tangent along (dx, dcontext): GN sees dx, dscale, dshift; attention sees dq, dk, dv."""
    skip_unless_runs(backend)
    model, model64, inputs, tangents = model_and_inputs
    ops = kernel_ops(backend)
    y, dy = torch.func.jvp(lambda x, c: model(x, c, ops), inputs, tangents)
    y64, dy64 = torch.func.jvp(lambda x, c: model64(x, c, REFERENCE_OPS), as_double(inputs), as_double(tangents))
    y32, dy32 = torch.func.jvp(lambda x, c: model(x, c, REFERENCE_OPS), inputs, tangents)
    reference.check_parity("y", y, y64, y32, FLOOR)
    reference.check_parity("dy", dy, dy64, dy32, FLOOR)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jvp_over_the_parameters(backend, model_and_inputs):
    """Tangents on every parameter (GN weight and bias included), as torch.func users differentiate modules."""
    skip_unless_runs(backend)
    model, model64, inputs, _ = model_and_inputs
    params = {name: value.detach() for name, value in model.named_parameters()}
    param_tangents = {name: torch.randn_like(value) for name, value in params.items()}

    def run(module, ops, inputs):
        return lambda p: torch.func.functional_call(module, p, (*inputs, ops))

    double = {name: value.double() for name, value in params.items()}
    double_tangents = {name: value.double() for name, value in param_tangents.items()}
    y, dy = torch.func.jvp(run(model, kernel_ops(backend), inputs), (params,), (param_tangents,))
    y64, dy64 = torch.func.jvp(run(model64, REFERENCE_OPS, as_double(inputs)), (double,), (double_tangents,))
    y32, dy32 = torch.func.jvp(run(model, REFERENCE_OPS, inputs), (params,), (param_tangents,))
    reference.check_parity("y", y, y64, y32, FLOOR)
    reference.check_parity("dy", dy, dy64, dy32, FLOOR)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_through_the_model(backend, model_and_inputs):
    """torch.autograd.forward_ad dual tensors through the model, then a backward through the primal."""
    skip_unless_runs(backend)
    model, model64, inputs, tangents = model_and_inputs
    with torch.autograd.forward_ad.dual_level():
        duals = [
            torch.autograd.forward_ad.make_dual(value, tangent) for value, tangent in zip(inputs, tangents, strict=True)
        ]
        y, dy = torch.autograd.forward_ad.unpack_dual(model(*duals, kernel_ops(backend)))
    y64, dy64 = torch.func.jvp(lambda x, c: model64(x, c, REFERENCE_OPS), as_double(inputs), as_double(tangents))
    y32, dy32 = torch.func.jvp(lambda x, c: model(x, c, REFERENCE_OPS), inputs, tangents)
    reference.check_parity("y", y, y64, y32, FLOOR)
    reference.check_parity("dy", dy, dy64, dy32, FLOOR)

    # the primal computed under forward AD keeps its autograd graph: parameter gradients match the reference
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(model.parameters()), grad_y)
    y64 = model64(*as_double(inputs), REFERENCE_OPS)
    grads64 = torch.autograd.grad(y64, list(model64.parameters()), grad_y.double())
    y32 = model(*inputs, REFERENCE_OPS)
    grads32 = torch.autograd.grad(y32, list(model.parameters()), grad_y)
    for (name, _), grad, grad64, grad32 in zip(model.named_parameters(), grads, grads64, grads32, strict=True):
        reference.check_parity(f"grad_{name}", grad, grad64, grad32, FLOOR)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_through_the_model(backend, model_and_inputs):
    """torch.func.grad runs the Functions' backward inside a transform: input gradients match the reference."""
    skip_unless_runs(backend)
    model, model64, inputs, _ = model_and_inputs
    grad_y = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH)

    def grads(module, ops, inputs, grad_y):
        return torch.func.grad(lambda x, c: (module(x, c, ops) * grad_y).sum(), argnums=(0, 1))(*inputs)

    kernel = grads(model, kernel_ops(backend), inputs, grad_y)
    truth = grads(model64, REFERENCE_OPS, as_double(inputs), grad_y.double())
    baseline = grads(model, REFERENCE_OPS, inputs, grad_y)
    for name, grad, grad64, grad32 in zip(("x", "context"), kernel, truth, baseline, strict=True):
        reference.check_parity(f"grad_{name}", grad, grad64, grad32, FLOOR)
