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
