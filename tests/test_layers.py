"""Each tangent-aware layer of `imf.layers` on its own against `torch.func.jvp` of the plain layer, in float64:
the primal, the tangent (of every row, or of the first m rows only), with and without bias, and that the tangent
records no graph."""

import math

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
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

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
    # a residual branch's tangent added by the matmul: dresidual + W dx, one kernel
    dresidual = torch.randn(rows, 13, 7, dtype=torch.float64, generator=gen)
    with recorded() as launched:
        dy_plus = layers.channel_linear(x.detach(), layer, dx, dresidual)[1]
    assert launched == ["baddbmm" if bias else "bmm", "baddbmm"]  # the primal's, then the tangent's
    torch.testing.assert_close(dy_plus, dresidual + dy, rtol=RTOL, atol=RTOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # dtypes that differ: added after, in the promoted dtype
        y16, dy16 = layers.channel_linear(x.detach().float(), layer.float(), dx.float(), dresidual.float())
    assert y16.dtype == torch.bfloat16 and dy16.dtype == torch.float32
    layer.double()


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


def film_layers(widths, features=11, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(features, 2 * width).double() for width in widths]


@pytest.mark.parametrize("batch, rows, tangent_layers", [(3, 3, 3), (5, 2, 2), (1, 1, 0), (4, 4, None)])
def test_film_bank_is_film_of_each_layer(batch, rows, tangent_layers):
    """film_bank: one matmul over several FiLM layers (widths 13, 5, 8: not multiples of anything) gives each
    layer's film: contiguous (B, C_i) scale and shift, tangents of dx's rows for the first `tangent_layers` only,
    and the gradients of x and of every weight and bias those of the layers called one by one."""
    gen = torch.Generator().manual_seed(batch * 10 + rows + 200)
    layer_list = film_layers((13, 5, 8), seed=batch)
    x, dx, _ = rows_case(batch, rows, (11,), gen)
    layers._film_bank_order.cache_clear()
    bank = layers.film_bank(x, layer_list, dx, tangent_layers)
    layers.film_bank(x, layer_list, dx[:1], tangent_layers)
    assert layers._film_bank_order.cache_info().currsize == 1  # one gather order per batch size, any tangent rows
    moving = len(layer_list) if tangent_layers is None else tangent_layers
    assert len(bank) == len(layer_list)
    upstream = []
    for i, (layer, got) in enumerate(zip(layer_list, bank, strict=True)):
        want = layers.film(x, layer, dx if i < moving else None)
        for part, expected in zip(got, want, strict=True):
            if expected is None:
                assert part is None
                continue
            assert part.is_contiguous() and part.shape == expected.shape
            torch.testing.assert_close(part, expected, rtol=RTOL, atol=RTOL)
        for part in got[2:]:
            assert part is None or (not part.requires_grad and part.grad_fn is None)
        upstream.append(torch.randn(2, batch, layer.out_features // 2, dtype=torch.float64, generator=gen))
    params = [x] + [p for layer in layer_list for p in layer.parameters()]
    got = torch.autograd.grad(
        sum((s * g[0]).sum() + (t * g[1]).sum() for (s, t, *_), g in zip(bank, upstream, strict=True)), params
    )
    films = [layers.film(x, layer) for layer in layer_list]
    want = torch.autograd.grad(
        sum((s * g[0]).sum() + (t * g[1]).sum() for (s, t, *_), g in zip(films, upstream, strict=True)), params
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)


def test_film_banks_graded_form_launches_nine_kernels():
    """film_bank with an autograd graph: gradcheck of `_FiLMBank` in float64 (one layer's outputs unused too), and
    4 kernels forward (the weights' and biases' concatenations, the matmul, the gather) and 5 backward (the
    gradients' concatenation, the inverse gather, two matmuls, the bias sum) for any number of layers, where a
    `film` per layer launches 1 and 4, and the shared input's gradients are summed over the layers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    gen = torch.Generator().manual_seed(41)
    layer_list = film_layers((3, 6, 2, 5), features=7, seed=41)
    x = torch.randn(4, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.cat([layer.weight for layer in layer_list]).detach().requires_grad_()
    bias = torch.cat([layer.bias for layer in layer_list]).detach().requires_grad_()
    order, inverse = layers._film_bank_order((3, 6, 2, 5), 4, x.device)
    assert sorted(order.tolist()) == list(range(4 * 32)) and torch.equal(
        order[inverse.long()].long(), torch.arange(4 * 32)
    )
    bank = lambda *a: layers._FiLMBank.apply(*a, order, inverse)
    assert torch.autograd.gradcheck(bank, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: bank(*a)[: 2 * 4 * 3 + 2 * 4 * 6], (x, weight, bias))
    with recorded() as launched:
        outputs = [part for film in layers.film_bank(x, layer_list) for part in film[:2]]
    assert launched == ["cat", "cat", "addmm", "index_select"]
    grads = [torch.randn(part.shape, dtype=torch.float64, generator=gen) for part in outputs]
    with recorded() as launched:
        torch.autograd.grad(outputs, [x] + [p for layer in layer_list for p in layer.parameters()], grads)
    assert launched == ["cat", "index_select", "mm", "mm", "sum"]


def test_film_bank_trains_after_its_first_call_ran_under_inference_mode():
    """The gather order is cached per batch size; one first built inside torch.inference_mode (e.g. sampling) is
    a plain tensor, which the graded pass can save for its backward."""
    layer_list = film_layers((3, 4), seed=5)
    x = torch.randn(7, 11, dtype=torch.float64)  # a batch size no other test uses: built here
    with torch.inference_mode():
        sampled = layers.film_bank(x, layer_list)
    graded = layers.film_bank(x.clone().requires_grad_(), layer_list)
    torch.autograd.grad(sum(part.sum() for film in graded for part in film[:2]), layer_list[0].weight)
    torch.testing.assert_close(graded[1][1], sampled[1][1], rtol=0, atol=0)


def test_film_bank_refuses_a_tangent_of_more_rows_than_x():
    layer_list = film_layers((3, 4))
    x = torch.randn(2, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="dx must have 1 to 2 rows"):
        layers.film_bank(x, layer_list, torch.randn(3, 11, dtype=torch.float64))


def test_film_bank_leaves_layers_it_cannot_concatenate_to_film():
    """None (the callers fall back to `film` per layer) for a layer without a bias, a parameter that is not a
    plain tensor (e.g. an FSDP2 shard) or no layers."""
    layer_list = film_layers((3, 4))
    x = torch.randn(2, 11, dtype=torch.float64)
    assert layers.film_bank(x, []) is None
    no_bias = [layer_list[0], nn.Linear(11, 8, bias=False).double()]
    assert layers.film_bank(x, no_bias) is None

    class Shard(torch.Tensor):
        pass

    layer_list[1].weight = nn.Parameter(layer_list[1].weight.detach().as_subclass(Shard))
    assert type(layer_list[1].weight) is not nn.Parameter
    assert layers.film_bank(x, layer_list) is None


def split_kv(kv, heads):
    """AttnBlock's own split of a (B, Lk, 2C) key/value projection: (k, v), each (B, heads, Lk, d)."""
    return kv.view(kv.shape[0], kv.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("batch, rows, tangent_layers", [(3, 3, 3), (4, 2, 2), (1, 1, 0)])
def test_kv_bank_is_each_layers_keys_and_values(batch, rows, tangent_layers):
    """kv_bank: one matmul over several cross-attention `to_kv` layers (1, 3 and 2 heads of 4) gives each layer's
    k and v as `linear` and AttnBlock's split give them, (B, heads, Lk, d) views; tangents of dctx's rows for the
    first `tangent_layers`; the gradients of the context and of every weight and bias those of the layers called
    one by one; and 4 kernels forward (two concatenations, the matmul; the tangent's one more), 4 backward (one
    concatenation of all the key and value gradients, two matmuls, the bias sum)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    gen = torch.Generator().manual_seed(batch * 10 + rows + 300)
    heads = [1, 3, 2]
    torch.manual_seed(batch)
    layer_list = [nn.Linear(6, 2 * 4 * count).double() for count in heads]
    ctx, dctx, _ = rows_case(batch, rows, (5, 6), gen)  # 5 context tokens of 6 features
    with recorded() as launched:
        bank = layers.kv_bank(ctx, layer_list, heads, dctx, tangent_layers)
    assert launched == ["cat", "cat", "addmm"] + (["mm"] if tangent_layers else [])
    upstream = []
    for i, (layer, count, got) in enumerate(zip(layer_list, heads, bank, strict=True)):
        kv, dkv = layers.linear(ctx, layer, dctx if i < tangent_layers else None)
        want = (*split_kv(kv, count), *((None, None) if dkv is None else split_kv(dkv, count)))
        for part, expected in zip(got, want, strict=True):
            if expected is None:
                assert part is None
                continue
            assert part.shape == expected.shape
            torch.testing.assert_close(part, expected, rtol=RTOL, atol=RTOL)
        for part in got[2:]:
            assert part is None or (not part.requires_grad and part.grad_fn is None)
        upstream += [torch.randn(got[0].shape, dtype=torch.float64, generator=gen) for _ in range(2)]
    params = [ctx] + [p for layer in layer_list for p in layer.parameters()]
    with recorded() as launched:
        got = torch.autograd.grad([part for kv in bank for part in kv[:2]], params, upstream)
    assert launched == ["cat", "mm", "mm", "sum"]
    own = [split_kv(layers.linear(ctx, layer)[0], count) for layer, count in zip(layer_list, heads, strict=True)]
    want = torch.autograd.grad([part for kv in own for part in kv], params, upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)


def test_kv_bank_leaves_layers_it_cannot_concatenate_to_their_own_calls():
    """None (each block projects its own) for head dims that differ, heads that do not divide a layer's outputs,
    a layer without a bias, or no layers."""
    torch.manual_seed(0)
    ctx = torch.randn(2, 3, 6, dtype=torch.float64)
    fours = [nn.Linear(6, 8).double(), nn.Linear(6, 16).double()]
    assert layers.kv_bank(ctx, fours, [1, 2]) is not None
    assert layers.kv_bank(ctx, fours, [1, 1]) is None  # head dims 4 and 8
    assert layers.kv_bank(ctx, [nn.Linear(6, 12).double()], [3]) is not None  # 3 heads of 2
    assert layers.kv_bank(ctx, [nn.Linear(6, 10).double()], [2]) is None  # 10 outputs in 2 x 2 parts
    assert layers.kv_bank(ctx, [fours[0], nn.Linear(6, 16, bias=False).double()], [1, 2]) is None
    assert layers.kv_bank(ctx, [], []) is None


def test_kv_bank_refuses_a_heads_list_of_another_length():
    ctx = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^kv_bank: heads must give one count per layer \(2\), got 1$"):
        layers.kv_bank(ctx, [nn.Linear(6, 8).double(), nn.Linear(6, 16).double()], [1])


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
    """The tangents against torch.func.jvp (float64, a tangent on the first rows), and their launches."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    gen = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(11).double()
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    x, dx, dx_full = rows_case(4, 2, (6, 11), gen)
    with recorded() as launched:
        y, dy = layers.layer_norm(x, norm, dx)
    check(y, dy, x, dx_full, norm, 2)
    # the tangent from aten's LayerNorm backward (the normalisation's Jacobian is symmetric), then the weight
    assert launched == ["native_layer_norm", "native_layer_norm", "native_layer_norm_backward", "mul"]
    with recorded() as launched:
        y, dy = layers.silu(x, dx)
    check(y, dy, x, dx_full, F.silu, 2)
    assert launched == ["silu", "silu_backward"]  # the tangent from silu's backward (a diagonal Jacobian)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinusoidal_embedding_and_its_tangent(dtype):
    """The embedding [cos(f x), sin(f x)] and its tangent of the first rows against torch.func.jvp (float64), the
    tangent from the embedding's own sines and cosines bit for bit the tangent computed afresh, the frequencies
    kept (built once, the formula's values, a plain tensor even if first made under inference mode), and the
    launches of a warm call: mul, cos, sin, cat for the embedding; mul, roll, mul for the tangent from it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    from imf.model import sinusoidal_embedding

    gen = torch.Generator().manual_seed(7)
    x = torch.rand(5, generator=gen, dtype=dtype) * 3
    dx = torch.randn(3, generator=gen, dtype=dtype)
    layers._frequencies.cache_clear()
    with torch.inference_mode():
        sinusoidal_embedding(x, dim=12)
    freqs = layers.sinusoidal_frequencies(6, 10000.0, dtype, x.device)
    assert not freqs.is_inference() and layers._frequencies.cache_info().currsize == 1
    torch.testing.assert_close(freqs, torch.exp(-math.log(10000.0) * torch.arange(6, dtype=dtype) / 6), rtol=0, atol=0)
    with recorded() as launched:
        emb = sinusoidal_embedding(x, dim=12)
    assert launched == ["mul", "cos", "sin", "cat"]
    layers.sinusoidal_embedding_tangent(x, dx, dim=12, emb=emb)  # builds the signed frequencies once
    with recorded() as launched:
        from_emb = layers.sinusoidal_embedding_tangent(x, dx, dim=12, emb=emb)
    assert launched == ["mul", "roll", "mul"]
    afresh = layers.sinusoidal_embedding_tangent(x, dx, dim=12)
    assert torch.equal(from_emb, afresh) and from_emb.shape == (3, 12)
    if dtype == torch.float64:
        full = torch.cat([dx, torch.randn(2, generator=gen, dtype=dtype)])
        want_emb, want_tangent = torch.func.jvp(lambda a: sinusoidal_embedding(a, dim=12), (x,), (full,))
        torch.testing.assert_close(emb, want_emb, rtol=RTOL, atol=RTOL)
        torch.testing.assert_close(afresh, want_tangent[:3], rtol=RTOL, atol=RTOL)


def test_the_sinusoidal_embedding_traces_whole_under_torch_compile():
    """The compiled reference baseline (bench/step.py) traces the embedding in one graph, to the same values; the
    traced code computes the frequencies itself rather than call the cache (which dynamo skips with a warning)."""
    import warnings

    from imf.model import sinusoidal_embedding

    x = torch.rand(4, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda a: sinusoidal_embedding(a, dim=8), backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = compiled(x)
    torch._dynamo.reset()
    torch.testing.assert_close(traced, sinusoidal_embedding(x, dim=8), rtol=0, atol=0)
    assert not [w for w in caught if "lru_cache" in str(w.message)]


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
