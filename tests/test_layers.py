"""Each tangent-aware layer of `imf.layers` on its own against `torch.func.jvp` of the plain layer, in float64:
the primal, the tangent (of every row, or of the first m rows only), with and without bias, and that the tangent
records no graph."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imf import layers

RTOL = 1e-10


def jvp_of(fn, x, dx):
    """torch.func.jvp of fn at x along dx: the oracle."""
    return torch.func.jvp(fn, (x,), (dx,))


def check(y, dy, x, dx_full, fn, rows):
    expected_y, expected_dy = jvp_of(fn, x, dx_full)
    torch.testing.assert_close(y, expected_y, rtol=RTOL, atol=RTOL)
    assert dy.shape[0] == rows
    torch.testing.assert_close(dy, expected_dy[:rows], rtol=RTOL, atol=RTOL)
    assert not dy.requires_grad and dy.grad_fn is None


def rows_case(batch, rows, shape, gen):
    """x (batch, ...) requiring grad, a tangent of the first `rows` rows, and that tangent padded with fresh
    random rows (their tangent outputs are not compared: any values give the same first rows)."""
    x = torch.randn(batch, *shape, dtype=torch.float64, generator=gen).requires_grad_()
    dx = torch.randn(rows, *shape, dtype=torch.float64, generator=gen)
    pad = torch.randn(batch - rows, *shape, dtype=torch.float64, generator=gen)
    return x, dx, torch.cat([dx, pad])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch, rows", [(3, 3), (5, 2), (1, 1)])
def test_linear_and_channel_linear(bias, batch, rows):
    gen = torch.Generator().manual_seed(batch * 10 + rows)
    torch.manual_seed(batch)
    layer = nn.Linear(19, 13, bias=bias).double()
    # linear over tokens (B, L, C_in)
    x, dx, dx_full = rows_case(batch, rows, (7, 19), gen)
    y, dy = layers.linear(x, layer, dx)
    check(y, dy, x, dx_full, layer, rows)
    # channel_linear over a channels-first map (B, C_in, L): the same map on the transposed tokens
    x, dx, dx_full = rows_case(batch, rows, (19, 7), gen)
    y, dy = layers.channel_linear(x, layer, dx)
    check(y, dy, x, dx_full, lambda a: layer(a.transpose(1, 2)).transpose(1, 2), rows)
    assert layers.channel_linear(x, layer)[1] is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch, rows", [(3, 3), (5, 2), (1, 1)])
def test_film_is_the_linear_layer_in_two_contiguous_halves(bias, batch, rows):
    """film: (scale, shift) = the halves of W x + b, (dscale, dshift) those of W dx, each a contiguous (B, C) tensor,
    and the gradients of x, W and b those of the linear layer."""
    gen = torch.Generator().manual_seed(batch * 10 + rows + 100)
    torch.manual_seed(batch)
    layer = nn.Linear(11, 2 * 13, bias=bias).double()
    x, dx, dx_full = rows_case(batch, rows, (11,), gen)
    scale, shift, dscale, dshift = layers.film(x, layer, dx)
    for part, tangent, half in ((scale, dscale, 0), (shift, dshift, 1)):
        assert part.is_contiguous() and tangent.is_contiguous() and part.shape == (batch, 13)
        check(part, tangent, x, dx_full, lambda a, half=half: layer(a).chunk(2, dim=1)[half], rows)
    assert layers.film(x, layer)[2:] == (None, None)
    g_scale, g_shift = torch.randn(2, batch, 13, dtype=torch.float64, generator=gen)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad((scale * g_scale).sum() + (shift * g_shift).sum(), params)
    want = torch.autograd.grad((layer(x) * torch.cat([g_scale, g_shift], dim=1)).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("bias", [True, False])
def test_films_graded_form_has_the_linear_layers_gradients_in_four_launches(bias):
    """With an autograd graph, film runs through `_FiLM`: gradcheck in float64 (x, W, b; one of the two halves
    unused too), the same values as without a graph, and a backward of 4 kernels (cat, two matmuls, the bias sum)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    gen = torch.Generator().manual_seed(31 + bias)
    layer = nn.Linear(7, 2 * 5, bias=bias).double()
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    params = (x, layer.weight, layer.bias) if bias else (x, layer.weight, None)
    assert torch.autograd.gradcheck(lambda *a: layers._FiLM.apply(*a), params)
    assert torch.autograd.gradcheck(lambda *a: layers._FiLM.apply(*a)[1], params)  # the scale unused
    scale, shift = layers.film(x, layer)[:2]
    assert scale.grad_fn is not None and "_FiLM" in type(scale.grad_fn).__name__
    with torch.no_grad():
        plain = layers.film(x, layer)[:2]
    for got, want in zip((scale, shift), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.is_contiguous()
    g_scale, g_shift = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    loss = (scale * g_scale).sum() + (shift * g_shift).sum()
    with recorded() as launched:
        torch.autograd.grad(loss, [p for p in params if p is not None])
    # the loss's own backward (ones_like, two muls), then FiLM's: autograd's of the batched form launched stack,
    # bmm, bmm, sum (the expanded input), [sum (the broadcast bias),] clone (the transposed weight view)
    assert launched[:3] == ["ones_like", "mul", "mul"]
    assert launched[3:] == ["cat", "mm", "mm", *(["sum"] if bias else [])]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d(bias, stride):
    gen = torch.Generator().manual_seed(stride)
    torch.manual_seed(stride)
    layer = nn.Conv2d(5, 7, 3, stride=stride, padding=1, bias=bias).double()
    x, dx, dx_full = rows_case(4, 3, (5, 9, 6), gen)
    y, dy = layers.conv2d(x, layer, dx)
    check(y, dy, x, dx_full, layer, 3)


def test_layer_norm_and_silu():
    gen = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(11).double()
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    x, dx, dx_full = rows_case(4, 2, (6, 11), gen)
    y, dy = layers.layer_norm(x, norm, dx)
    check(y, dy, x, dx_full, norm, 2)
    y, dy = layers.silu(x, dx)
    check(y, dy, x, dx_full, F.silu, 2)


def test_the_tangent_never_reaches_a_weight_gradient():
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(6, 5).double()
    x, dx, _ = rows_case(3, 3, (6, 4), gen)
    y, dy = layers.channel_linear(x, layer, dx)
    y.sum().backward()
    # d sum(W x + b) / dW = sum over samples and positions of x^T; / db = the count of (sample, position) pairs
    torch.testing.assert_close(layer.weight.grad, x.detach().sum((0, 2)).expand(5, -1), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(layer.bias.grad, torch.full((5,), 12.0, dtype=torch.float64))
    assert dy.grad_fn is None
