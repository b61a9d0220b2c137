"""group_norm_act and group_norm_act_jvp on every backend against the float64 reference (DESIGN 4.3, 5).

Each case checks y, dy and every gradient (dx, dweight, dbias, dscale, dshift): the kernel's error against
float64 must be at most 2x the error of the reference computed in the kernel's dtype, plus a small floor.
Memory the launchers allocate with `empty` is NaN-filled (deterministic mode), so an unwritten element fails.
"""

import re

import numpy as np
import pytest
import torch

import imf_kernels
from imf_kernels import dispatch, reference

BACKENDS = list(dispatch.BACKENDS)
# (B, C, H, W, num_groups): C not a multiple of 32, odd maps, batch 1; the last two are shapes whose NCHW and NHWC
# layouts are the same memory (1x1 maps, one channel), where ATen may pick either kernel.
SHAPES = [(2, 40, 8, 8, 8), (1, 40, 5, 7, 8), (3, 96, 3, 5, 32), (3, 64, 1, 1, 8), (2, 1, 6, 5, 1)]
# The interpreter is slow: triton gets the first shapes only.
INTERPRETED_SHAPES = SHAPES[:2]
# name -> (weight and bias, scale and shift, act)
VARIANTS = {
    "modulated": (True, True, "silu"),
    "affine": (True, False, "silu"),
    "plain-linear": (False, False, "none"),
}
FLOOR = reference.FLOOR
PARAMETER_NAMES = ("weight", "bias", "scale", "shift")


# NaN-fill every torch.empty while a test runs (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")


def skip_unless_runs(backend: str, op: str, args: dict) -> None:
    """Skip with the backend's own words when it is not usable here or does not take this call."""
    reasons = dispatch.not_supported_reasons(backend, op, args)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def cases(dtypes):
    """The backends x shapes x dtypes; bfloat16 on the torch backend too (the interpreter has no bf16 arithmetic,
    the cuda backend needs a GPU, whose own tests hold their bf16 cases)."""
    for backend in BACKENDS:
        shapes = INTERPRETED_SHAPES if backend == "triton" else SHAPES
        for shape in shapes:
            for variant in VARIANTS:
                for dtype in (*dtypes, torch.bfloat16) if backend == "torch" else dtypes:
                    yield pytest.param(backend, shape, variant, dtype, id=f"{backend}-{shape}-{variant}-{dtype}")


def make_inputs(shape, variant, dtype, device="cpu"):
    """Fresh random inputs: x, dx and the parameters present in this variant with their tangents."""
    batch, channels, height, width, num_groups = shape
    affine, modulated, act = VARIANTS[variant]

    def randn(*size, offset=0.0):
        return (torch.randn(*size, device=device) + offset).to(dtype)

    inputs = {
        "x": randn(batch, channels, height, width, offset=0.5),
        "dx": randn(batch, channels, height, width),
    }
    if affine:
        inputs["weight"] = randn(channels, offset=1.0)
        inputs["bias"] = randn(channels)
    if modulated:
        inputs["scale"] = 0.5 * randn(batch, channels)
        inputs["shift"] = randn(batch, channels)
        inputs["dscale"] = randn(batch, channels)
        inputs["dshift"] = randn(batch, channels)
    return inputs, num_groups, act


def call(fn, inputs, num_groups, act, with_tangent, **backend):
    params = {name: inputs.get(name) for name in ("weight", "bias")}
    modulation = {name: inputs.get(name) for name in ("scale", "shift")}
    if with_tangent:
        return fn(
            inputs["x"],
            inputs["dx"],
            num_groups,
            **params,
            **modulation,
            dscale=inputs.get("dscale"),
            dshift=inputs.get("dshift"),
            act=act,
            **backend,
        )
    return fn(inputs["x"], num_groups, **params, **modulation, act=act, **backend)


def primal_and_grads(fn, inputs, num_groups, act, with_tangent, grad_y, **backend):
    """(y, dy or None, {name: gradient}) for one implementation; inputs are copied, never modified."""
    inputs = {name: value.detach().clone() for name, value in inputs.items()}
    leaves = {name: inputs[name].requires_grad_() for name in ("x", *PARAMETER_NAMES) if name in inputs}
    out = call(fn, inputs, num_groups, act, with_tangent, **backend)
    y, dy = out if with_tangent else (out, None)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.to(y.dtype))
    return y, dy, dict(zip(leaves, grads, strict=True))


def parameter_term_scales(inputs64, num_groups, act, grad_y) -> dict[str, float]:
    """The magnitude of the terms each parameter gradient sums (float64): grad_weight and grad_bias sum over the
    batch and the positions, grad_scale and grad_shift over the positions, terms of either sign that can cancel
    to far below them (with one channel the output is a single such sum). Their rounding is the floor's scale
    (`reference.check_parity`), not the small result's: max over the outputs of the sum of |terms|."""
    x = inputs64["x"]
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
    h = ((groups - mean) * (var + 1e-5).rsqrt()).reshape(x.shape)
    per_element = {}
    for name in PARAMETER_NAMES:
        if name in inputs64:
            value = inputs64[name].detach()
            value = value[:, None, None] if value.dim() == 1 else value[:, :, None, None]
            per_element[name] = value.expand_as(x).clone().requires_grad_()
    if "weight" in per_element:
        h = h * per_element["weight"]
    if "bias" in per_element:
        h = h + per_element["bias"]
    if "scale" in per_element:
        h = h * (1 + per_element["scale"])
    if "shift" in per_element:
        h = h + per_element["shift"]
    if not per_element:
        return {}
    y = torch.nn.functional.silu(h) if act == "silu" else h
    terms = torch.autograd.grad(y, list(per_element.values()), grad_y.to(y.device, torch.float64))
    summed = {"weight": (0, 2, 3), "bias": (0, 2, 3), "scale": (2, 3), "shift": (2, 3)}
    return {name: term.abs().sum(summed[name]).max().item() for name, term in zip(per_element, terms, strict=True)}


def check_gradients(grads, truth, baseline, floor, term_scales, prefix="grad_"):
    """check_parity of each gradient, the parameters' floors scaled by their terms (`parameter_term_scales`)."""
    for name, grad in grads.items():
        reference.check_parity(f"{prefix}{name}", grad, truth[name], baseline[name], floor, term_scales.get(name))


def check_against_reference(backend, shape, variant, dtype, with_tangent, device="cpu"):
    inputs, num_groups, act = make_inputs(shape, variant, dtype, device)
    op = "group_norm_act_jvp" if with_tangent else "group_norm_act"
    args = {name: inputs.get(name) for name in ("x", "weight", "bias", "scale", "shift")}
    args.update(num_groups=num_groups, eps=1e-5, act=act)
    if with_tangent:
        args.update(dx=inputs["dx"], dscale=inputs.get("dscale"), dshift=inputs.get("dshift"))
    skip_unless_runs(backend, op, args)

    grad_y = torch.randn(inputs["x"].shape, device=device)
    kernel_fn = imf_kernels.group_norm_act_jvp if with_tangent else imf_kernels.group_norm_act
    reference_fn = reference.group_norm_act_jvp if with_tangent else reference.group_norm_act
    kernel = primal_and_grads(kernel_fn, inputs, num_groups, act, with_tangent, grad_y, backend=backend)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = primal_and_grads(reference_fn, inputs64, num_groups, act, with_tangent, grad_y)
    baseline = primal_and_grads(reference_fn, inputs, num_groups, act, with_tangent, grad_y)

    floor = FLOOR[dtype]
    reference.check_parity("y", kernel[0], truth[0], baseline[0], floor)
    assert kernel[0].dtype == dtype
    if with_tangent:
        assert kernel[1].dtype == dtype and not kernel[1].requires_grad
        reference.check_parity("dy", kernel[1], truth[1], baseline[1], floor)
    for name, grad in kernel[2].items():
        assert grad.dtype == dtype, name
    check_gradients(kernel[2], truth[2], baseline[2], floor, parameter_term_scales(inputs64, num_groups, act, grad_y))


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype"), cases((torch.float32, torch.float16)))
def test_group_norm_act_matches_reference(backend, shape, variant, dtype):
    check_against_reference(backend, shape, variant, dtype, with_tangent=False)


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype"), cases((torch.float32, torch.float16)))
def test_group_norm_act_jvp_matches_reference(backend, shape, variant, dtype):
    check_against_reference(backend, shape, variant, dtype, with_tangent=True)


def first_rows_cases():
    for case in cases((torch.float32, torch.float16)):
        backend, shape, variant, dtype = case.values
        if shape[0] > 1:
            for rows in sorted({1, shape[0] - 1}):
                yield pytest.param(*case.values, rows, id=f"{case.id}-rows{rows}")


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype", "rows"), first_rows_cases())
def test_group_norm_act_jvp_with_a_tangent_on_the_first_rows(backend, shape, variant, dtype, rows):
    """dx (dscale, dshift) on the first m < B samples only: y and every gradient are those of the whole batch, dy
    that of the first m samples, against the float64 reference of the whole batch (a backend with TANGENT_ROWS
    takes the call as it is, the others through the op's split)."""
    check_first_rows(backend, shape, variant, dtype, rows)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_rows_through_the_op_split(monkeypatch, variant):
    """The op's split for backends without TANGENT_ROWS, on the torch backend with the flag off."""
    from imf_kernels.torch_ops import group_norm as torch_group_norm

    monkeypatch.setattr(torch_group_norm, "TANGENT_ROWS", False)
    check_first_rows("torch", SHAPES[2], variant, torch.float32, 2)


def check_first_rows(backend, shape, variant, dtype, rows):
    inputs, num_groups, act = make_inputs(shape, variant, dtype)
    partial = {name: value[:rows] if name[0] == "d" else value for name, value in inputs.items()}
    args = {name: partial.get(name) for name in ("x", "dx", "weight", "bias", "scale", "shift", "dscale", "dshift")}
    skip_unless_runs(backend, "group_norm_act_jvp", {**args, "num_groups": num_groups, "eps": 1e-5, "act": act})

    grad_y = torch.randn(inputs["x"].shape)
    kernel = primal_and_grads(imf_kernels.group_norm_act_jvp, partial, num_groups, act, True, grad_y, backend=backend)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = primal_and_grads(reference.group_norm_act_jvp, inputs64, num_groups, act, True, grad_y)
    baseline = primal_and_grads(reference.group_norm_act_jvp, inputs, num_groups, act, True, grad_y)

    floor = FLOOR[dtype]
    reference.check_parity("y", kernel[0], truth[0], baseline[0], floor)
    assert kernel[1].shape == (rows, *shape[1:4]) and kernel[1].dtype == dtype and not kernel[1].requires_grad
    reference.check_parity("dy", kernel[1], truth[1][:rows], baseline[1][:rows], floor)
    check_gradients(kernel[2], truth[2], baseline[2], floor, parameter_term_scales(inputs64, num_groups, act, grad_y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_of_the_primal_op_under_torch_func_jvp(backend):
    """torch.func.jvp through group_norm_act, tangents on every input and parameter, vs the reference."""
    inputs, num_groups, act = make_inputs(SHAPES[1], "modulated", torch.float32)
    args = {name: inputs[name] for name in ("x", "weight", "bias", "scale", "shift")}
    skip_unless_runs(backend, "group_norm_act", {**args, "num_groups": num_groups, "eps": 1e-5, "act": act})
    tangents = (inputs["dx"], torch.randn(40), torch.randn(40), inputs["dscale"], inputs["dshift"])

    def kernel(x, weight, bias, scale, shift):
        return imf_kernels.group_norm_act(x, num_groups, weight, bias, scale=scale, shift=shift, backend=backend)

    def oracle(x, weight, bias, scale, shift):
        return reference.group_norm_act(x, num_groups, weight, bias, scale=scale, shift=shift)

    y, dy = torch.func.jvp(kernel, tuple(args.values()), tangents)
    y64, dy64 = torch.func.jvp(oracle, tuple(a.double() for a in args.values()), tuple(t.double() for t in tangents))
    y32, dy32 = torch.func.jvp(oracle, tuple(args.values()), tangents)
    reference.check_parity("y", y, y64, y32, FLOOR[torch.float32])
    reference.check_parity("dy", dy, dy64, dy32, FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_of_the_primal_op_under_forward_ad(backend):
    """torch.autograd.forward_ad through group_norm_act (tangent on x only) equals the fused jvp op."""
    inputs, num_groups, act = make_inputs(SHAPES[0], "affine", torch.float32)
    args = {
        "x": inputs["x"],
        "weight": inputs["weight"],
        "bias": inputs["bias"],
        "scale": None,
        "shift": None,
    }
    skip_unless_runs(backend, "group_norm_act", {**args, "num_groups": num_groups, "eps": 1e-5, "act": act})
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(inputs["x"], inputs["dx"])
        out = imf_kernels.group_norm_act(dual, num_groups, inputs["weight"], inputs["bias"], backend=backend)
        y, dy = torch.autograd.forward_ad.unpack_dual(out)
    y64, dy64 = reference.group_norm_act_jvp(
        inputs["x"].double(),
        inputs["dx"].double(),
        num_groups,
        inputs["weight"].double(),
        inputs["bias"].double(),
    )
    y32, dy32 = reference.group_norm_act_jvp(inputs["x"], inputs["dx"], num_groups, inputs["weight"], inputs["bias"])
    reference.check_parity("y", y, y64, y32, FLOOR[torch.float32])
    reference.check_parity("dy", dy, dy64, dy32, FLOOR[torch.float32])


def residual_block_grads(fn, inputs, num_groups, act, rows, grad_y, grad_residual, return_input, **backend):
    """Gradients of sum(y grad_y) + sum(x' grad_residual) in x and the parameters, x' being the x the op returned
    (return_input=True) or x itself (autograd adds its two gradients); with a tangent on the first `rows` rows."""
    inputs = {name: value.detach().clone() for name, value in inputs.items()}
    leaves = {name: inputs[name].requires_grad_() for name in ("x", *PARAMETER_NAMES) if name in inputs}
    params = {name: inputs.get(name) for name in PARAMETER_NAMES}
    tangents = {} if rows is None else {"dscale": inputs.get("dscale"), "dshift": inputs.get("dshift")}
    tangents = {name: None if t is None else t[:rows] for name, t in tangents.items()}
    extra = {"return_input": True} if return_input else {}
    x = leaves["x"]
    if rows is None:
        out = fn(x, num_groups, **params, act=act, **extra, **backend)
    else:
        out = fn(x, inputs["dx"][:rows], num_groups, **params, **tangents, act=act, **extra, **backend)
    out = out if isinstance(out, tuple) else (out,)
    x_out = out[-1] if return_input else x
    loss = (out[0] * grad_y.to(out[0].dtype)).sum() + (x_out * grad_residual.to(x.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return x_out, dict(zip(leaves, grads, strict=True))


RESIDUAL_CASES = [
    pytest.param(backend, dtype, rows, id=f"{backend}-{str(dtype)[6:]}-{'primal' if rows is None else rows}")
    for backend in BACKENDS
    for dtype in (torch.float32, torch.float16)
    for rows in (None, 2, 1)
]


@pytest.mark.parametrize(("backend", "dtype", "rows"), RESIDUAL_CASES)
def test_return_input_adds_the_residual_gradient_in_the_op(backend, dtype, rows):
    """A residual block's norm: x returned by the op (return_input=True) and added by the block; its gradient
    reaches the op's backward, which adds it into grad_x. Every gradient against float64 (PyTorch's same-dtype
    error the yardstick), and in fp32 bit for bit what autograd gives when it adds x's two gradients itself."""
    shape = SHAPES[0]
    inputs, num_groups, act = make_inputs(shape, "modulated", dtype)
    op = "group_norm_act" if rows is None else "group_norm_act_jvp"
    args = {name: inputs.get(name) for name in ("x", "weight", "bias", "scale", "shift")}
    args.update(num_groups=num_groups, eps=1e-5, act=act)
    if rows is not None:
        args.update(dx=inputs["dx"][:rows], dscale=inputs["dscale"][:rows], dshift=inputs["dshift"][:rows])
    skip_unless_runs(backend, op, args)
    fn = imf_kernels.group_norm_act if rows is None else imf_kernels.group_norm_act_jvp
    oracle = reference.group_norm_act if rows is None else reference.group_norm_act_jvp
    grad_y, grad_residual = torch.randn(shape[:4]), torch.randn(shape[:4])
    run = (inputs, num_groups, act, rows, grad_y, grad_residual)

    x_out, fused = residual_block_grads(fn, *run, return_input=True, backend=backend)
    assert torch.equal(x_out, inputs["x"]) and x_out.requires_grad
    assert "WithInput" in type(x_out.grad_fn).__name__  # the op's node, not x's
    _, summed = residual_block_grads(fn, *run, return_input=False, backend=backend)
    # the references' tangents cover the whole batch (the gradients do not depend on them)
    whole = (inputs, num_groups, act, None if rows is None else shape[0], grad_y, grad_residual)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    _, truth = residual_block_grads(oracle, inputs64, *whole[1:], return_input=False)
    _, baseline = residual_block_grads(oracle, *whole, return_input=False)
    check_gradients(fused, truth, baseline, FLOOR[dtype], parameter_term_scales(inputs64, num_groups, act, grad_y))
    for name, grad in fused.items():
        assert grad.dtype == dtype, name
        if dtype == torch.float32:
            assert torch.equal(grad, summed[name]), name


def channels_last_run(backend, dtype, rows, channels_last, dx_channels_last, device):
    """(y, dy, x_out, {name: gradient}) of a residual block's norm on one batch: the maps channels-last or not."""
    torch.manual_seed(3)  # the same values in both layouts
    inputs, num_groups, act = make_inputs((3, 40, 6, 5, 8), "modulated", dtype, device)
    grad_y, grad_residual = torch.randn_like(inputs["x"]), torch.randn_like(inputs["x"])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    dx_layout = torch.channels_last if dx_channels_last else torch.contiguous_format
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("x", *PARAMETER_NAMES)}
    x = leaves["x"].contiguous(memory_format=layout)
    params = {name: leaves[name] for name in PARAMETER_NAMES}
    if rows is None:
        (y, x_out), dy = imf_kernels.group_norm_act(x, num_groups, **params, act=act, return_input=True,
                                                    backend=backend), None  # fmt: skip
    else:
        dx = inputs["dx"][:rows].contiguous(memory_format=dx_layout)
        tangents = {"dscale": inputs["dscale"][:rows], "dshift": inputs["dshift"][:rows]}
        y, dy, x_out = imf_kernels.group_norm_act_jvp(
            x, dx, num_groups, **params, **tangents, act=act, return_input=True, backend=backend
        )
    loss = (y * grad_y.contiguous(memory_format=layout)).sum() + (x_out * grad_residual).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    return y, dy, x_out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("rows", "dx_channels_last"), [(None, False), (3, True), (2, True), (2, False)])
def test_channels_last_maps_give_the_contiguous_numbers_laid_out_as_x(backend, dtype, rows, dx_channels_last):
    """x channels-last (a conv's output in `torch.channels_last`): y, dy and x's gradient come out laid out as x,
    with the numbers of the same call on contiguous maps (bit for bit on the CPU: the triton kernels address the
    layouts alike and reduce in the same order, the other backends compute on contiguous copies), a tangent of the
    first rows and a dx in the other layout too."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = dict(x=torch.randn(3, 40, 6, 5, device=device, dtype=dtype), num_groups=8, eps=1e-5, act="silu")
    skip_unless_runs(backend, "group_norm_act", args)
    y, dy, x_out, grads = channels_last_run(backend, dtype, rows, True, dx_channels_last, device)
    y0, dy0, x_out0, grads0 = channels_last_run(backend, dtype, rows, False, False, device)
    for name, value in (("y", y), ("dy", dy), ("x_out", x_out), ("grad_x", grads["x"])):
        if value is not None and name != "grad_x":
            assert value.is_contiguous(memory_format=torch.channels_last), (name, value.stride())
    pairs = [("y", y, y0), ("dy", dy, dy0), ("x_out", x_out, x_out0)] + [
        (f"grad_{name}", grads[name], grads0[name]) for name in grads
    ]
    for name, value, contiguous in pairs:
        if value is None:
            assert contiguous is None, name
        elif device == "cpu":
            assert torch.equal(value, contiguous), name
        else:  # (another reduction order on a GPU)
            torch.testing.assert_close(value, contiguous, rtol=FLOOR[dtype], atol=FLOOR[dtype], msg=name)


def test_return_input_through_the_op_split(monkeypatch):
    """A tangent on the first rows on a backend without TANGENT_ROWS (the op splits the batch): x comes back as it
    is and autograd adds its two gradients, the same numbers."""
    from imf_kernels.torch_ops import group_norm as torch_group_norm

    inputs, num_groups, act = make_inputs(SHAPES[2], "modulated", torch.float32)
    grad_y, grad_residual = torch.randn(SHAPES[2][:4]), torch.randn(SHAPES[2][:4])
    run = (inputs, num_groups, act, 2, grad_y, grad_residual)
    fn = imf_kernels.group_norm_act_jvp
    _, fused = residual_block_grads(fn, *run, return_input=True, backend="torch")
    monkeypatch.setattr(torch_group_norm, "TANGENT_ROWS", False)
    x_out, split = residual_block_grads(fn, *run, return_input=True, backend="torch")
    assert x_out.grad_fn is None  # x itself (a leaf)
    for name, grad in split.items():
        torch.testing.assert_close(grad, fused[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_input_without_a_graph_returns_x_itself(backend):
    """No graph to record (no grad, torch.func.jvp, forward AD): x comes back as it is, and y as without it."""
    inputs, num_groups, act = make_inputs(SHAPES[0], "affine", torch.float32)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    skip_unless_runs(backend, "group_norm_act", {"x": x, "num_groups": num_groups, "weight": weight, "bias": bias,
                                                  "scale": None, "shift": None, "eps": 1e-5, "act": act})  # fmt: skip
    y = imf_kernels.group_norm_act(x, num_groups, weight, bias, backend=backend)
    with torch.no_grad():
        y_out, x_out = imf_kernels.group_norm_act(x, num_groups, weight, bias, backend=backend, return_input=True)
    assert x_out is x and torch.equal(y_out, y)

    def through(x):
        y, x_out = imf_kernels.group_norm_act(x, num_groups, weight, bias, backend=backend, return_input=True)
        assert x_out is x
        return y + x_out

    out, tangent = torch.func.jvp(through, (x,), (inputs["dx"],))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, inputs["dx"])
        forward_out, forward_tangent = torch.autograd.forward_ad.unpack_dual(through(dual))
    expected = reference.group_norm_act_jvp(x, inputs["dx"], num_groups, weight, bias)
    exact = reference.group_norm_act_jvp(
        *(value.double() for value in (x, inputs["dx"])), num_groups, weight.double(), bias.double()
    )
    for name, value, want, base in (
        ("y + x", out, exact[0] + x.double(), expected[0] + x),
        ("dy + dx", tangent, exact[1] + inputs["dx"].double(), expected[1] + inputs["dx"]),
    ):
        reference.check_parity(name, value, want, base, FLOOR[torch.float32])
    assert torch.equal(forward_out, out) and torch.equal(forward_tangent, tangent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
def test_statistics_survive_a_large_mean(backend, with_tangent):
    """x = 1000 + N(0, 1) in float32 (a one-pass variance loses every digit there): y, and dy of the tangent pass,
    within 2x PyTorch's float32 error of the float64 answer plus the floor, on every backend."""
    x, dx = 1000 + torch.randn(2, 40, 5, 7), torch.randn(2, 40, 5, 7)
    op = "group_norm_act_jvp" if with_tangent else "group_norm_act"
    args = {"x": x, "num_groups": 8, "eps": 1e-5, "act": "none", **({"dx": dx} if with_tangent else {})}
    skip_unless_runs(backend, op, args)
    if with_tangent:
        kernel = imf_kernels.group_norm_act_jvp(x, dx, 8, act="none", backend=backend)
        truth = reference.group_norm_act_jvp(x.double(), dx.double(), 8, act="none")
        baseline = reference.group_norm_act_jvp(x, dx, 8, act="none")
    else:
        kernel = (imf_kernels.group_norm_act(x, 8, act="none", backend=backend),)
        truth = (reference.group_norm_act(x.double(), 8, act="none"),)
        baseline = (reference.group_norm_act(x, 8, act="none"),)
    for name, value, want, base in zip(("y", "dy"), kernel, truth, baseline, strict=False):
        reference.check_parity(name, value, want, base, FLOOR[torch.float32])


@pytest.mark.parametrize("variant", ["modulated", "affine"])
@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_torch_backend_gradients_survive_a_large_mean(offset, variant):
    """x = offset + N(0, 1): every gradient within 2x of PyTorch's float32 error plus the floor. Modulated, sums
    of g x taken before subtracting mean sum g lose |mean| / std digits (ATen's backward on x itself gave
    grad_scale 2.7x PyTorch's float32 error at offset 10, inside the floor here), so that backward centres x;
    without modulation it runs ATen's backward on x as PyTorch does, and SiLU's input is recomputed as x a + c."""
    inputs, num_groups, act = make_inputs((4, 40, 5, 7, 8), variant, torch.float32)
    inputs["x"] = inputs["x"] - 0.5 + offset
    grad_y = torch.randn(inputs["x"].shape)
    kernel = primal_and_grads(imf_kernels.group_norm_act, inputs, num_groups, act, False, grad_y, backend="torch")
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = primal_and_grads(reference.group_norm_act, inputs64, num_groups, act, False, grad_y)
    baseline = primal_and_grads(reference.group_norm_act, inputs, num_groups, act, False, grad_y)
    scales = parameter_term_scales(inputs64, num_groups, act, grad_y)
    check_gradients(kernel[2], truth[2], baseline[2], FLOOR[torch.float32], scales)


# -------------------------------------------------------------------------------------- one value per group

# Batch 1 with one value in each group: its variance is 0, so GN gives 0 and h = beta (F.group_norm refuses
# this shape in training mode; the reference and the ops must not).
ONE_VALUE_SHAPES = [(1, 4, 1, 1, 4), (1, 40, 1, 1, 40)]


def one_value_per_group_formula(inputs, grad_y):
    """(y, dy, gradients) of the definition when each group holds one value, in the dtype of the inputs.

    xh = 0 and dxh = 0, so h = bias (1 + scale) + shift, dh = bias dscale + dshift, y = silu(h),
    dy = silu'(h) dh with silu'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))); for the cotangent grad_y,
    g_h = silu'(h) grad_y: grad_x = grad_weight = 0, grad_bias = sum_b (1 + scale) g_h,
    grad_scale = bias g_h, grad_shift = g_h.
    """
    bias, scale, shift = inputs["bias"], inputs["scale"], inputs["shift"]
    h = bias * (1 + scale) + shift
    sig = torch.sigmoid(h)
    silu_slope = sig * (1 + h * (1 - sig))
    dh = bias * inputs["dscale"] + inputs["dshift"]
    g_h = silu_slope * grad_y.to(h.dtype).flatten(1)
    grads = {
        "x": torch.zeros_like(inputs["x"]),
        "weight": torch.zeros_like(inputs["weight"]),
        "bias": ((1 + scale) * g_h).sum(0),
        "scale": bias * g_h,
        "shift": g_h,
    }
    shape = inputs["x"].shape
    return (h * sig).view(shape), (silu_slope * dh).view(shape), grads


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
def test_reference_with_one_value_per_group(shape):
    """The float64 reference equals the formula: y = act(beta), its tangent and every gradient."""
    inputs, num_groups, act = make_inputs(shape, "modulated", torch.float64)
    grad_y = torch.randn(inputs["x"].shape, dtype=torch.float64)
    y, dy, grads = one_value_per_group_formula(inputs, grad_y)
    params = {name: inputs[name] for name in PARAMETER_NAMES}
    tangents = {name: inputs[name] for name in ("dscale", "dshift")}
    ref_y, ref_dy = reference.group_norm_act_jvp(inputs["x"], inputs["dx"], num_groups, **params, **tangents)
    _, _, ref_grads = primal_and_grads(reference.group_norm_act, inputs, num_groups, act, False, grad_y)
    # ATen folds the normalisation into x * a + b, whose rounding rstd = eps^-1/2 ~ 316 amplifies: not exact.
    assert reference.max_error(ref_y, y) < 1e-12
    assert reference.max_error(ref_dy, dy) < 1e-12
    for name, grad in ref_grads.items():
        assert reference.max_error(grad, grads[name]) < 1e-12, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_value_per_group_on_each_backend(backend, shape, dtype):
    """y, dy and the gradients against the float64 formula. The error baseline of y and dy is the formula in
    the kernel's dtype (the float16 reference's tangent is NaN here: rstd^3 overflows); that of the gradients
    is the reference's backward in the kernel's dtype, as everywhere in this file."""
    inputs, num_groups, act = make_inputs(shape, "modulated", dtype)
    args = {name: inputs[name] for name in ("x", "dx", *PARAMETER_NAMES, "dscale", "dshift")}
    skip_unless_runs(backend, "group_norm_act_jvp", {**args, "num_groups": num_groups, "eps": 1e-5, "act": act})
    grad_y = torch.randn(inputs["x"].shape)
    truth = one_value_per_group_formula({name: value.double() for name, value in inputs.items()}, grad_y)
    baseline = one_value_per_group_formula(inputs, grad_y)
    floor = FLOOR[dtype]

    y, dy = call(imf_kernels.group_norm_act_jvp, inputs, num_groups, act, True, backend=backend)
    reference.check_parity("y", y, truth[0], baseline[0], floor)
    reference.check_parity("dy", dy, truth[1], baseline[1], floor)
    y, _, grads = primal_and_grads(imf_kernels.group_norm_act, inputs, num_groups, act, False, grad_y, backend=backend)
    _, _, reference_grads = primal_and_grads(reference.group_norm_act, inputs, num_groups, act, False, grad_y)
    reference.check_parity("y of group_norm_act", y, truth[0], baseline[0], floor)
    scales = parameter_term_scales({name: value.double() for name, value in inputs.items()}, num_groups, act, grad_y)
    check_gradients(grads, truth[2], reference_grads, floor, scales)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
def test_one_value_per_group_without_modulation(backend, shape):
    """Weight and bias only (the per-channel backward): y = silu(bias), grad_x = grad_weight = 0, grad_bias = the
    batch sum of g_h, against the formula at scale = shift = 0 in float64."""
    inputs, num_groups, act = make_inputs(shape, "affine", torch.float32)
    del inputs["dx"]
    skip_unless_runs(backend, "group_norm_act", {**inputs, "scale": None, "shift": None, "num_groups": num_groups,
                                                 "eps": 1e-5, "act": act})  # fmt: skip
    grad_y = torch.randn(inputs["x"].shape)
    zeros = {name: torch.zeros(shape[0], shape[1]) for name in ("scale", "shift", "dscale", "dshift")}
    truth = one_value_per_group_formula({name: value.double() for name, value in {**inputs, **zeros}.items()}, grad_y)
    baseline = one_value_per_group_formula({**inputs, **zeros}, grad_y)
    _, _, reference_grads = primal_and_grads(reference.group_norm_act, inputs, num_groups, act, False, grad_y)
    y, _, grads = primal_and_grads(imf_kernels.group_norm_act, inputs, num_groups, act, False, grad_y, backend=backend)
    reference.check_parity("y", y, truth[0], baseline[0], FLOOR[torch.float32])
    assert set(grads) == {"x", "weight", "bias"}
    scales = parameter_term_scales({name: value.double() for name, value in inputs.items()}, num_groups, act, grad_y)
    check_gradients(grads, truth[2], reference_grads, FLOOR[torch.float32], scales)


# ------------------------------------------------------------------------------------ partial modulation

# The torch backend picks its layout (per channel, or per sample and channel) from which of weight, bias, scale,
# shift, dscale, dshift are present: each subset below against the float64 reference, y, dy and every gradient.
PARTIAL_MODULATION = [
    ("weight", "bias", "scale", "dscale"),
    ("weight", "bias", "shift", "dshift"),
    ("weight", "bias", "scale", "shift", "dshift"),
    ("weight", "bias", "scale", "shift"),
    ("scale", "shift", "dscale", "dshift"),
    ("bias", "scale", "dscale"),
    ("weight", "shift"),
]


@pytest.mark.parametrize("present", PARTIAL_MODULATION, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_torch_backend_with_partial_modulation(present, dtype):
    inputs, num_groups, act = make_inputs(SHAPES[0], "modulated", dtype)
    inputs = {name: value for name, value in inputs.items() if name in ("x", "dx", *present)}
    grad_y = torch.randn(inputs["x"].shape)
    for with_tangent in (False, True):
        kernel_fn = imf_kernels.group_norm_act_jvp if with_tangent else imf_kernels.group_norm_act
        reference_fn = reference.group_norm_act_jvp if with_tangent else reference.group_norm_act
        kernel = primal_and_grads(kernel_fn, inputs, num_groups, act, with_tangent, grad_y, backend="torch")
        inputs64 = {name: value.double() for name, value in inputs.items()}
        truth = primal_and_grads(reference_fn, inputs64, num_groups, act, with_tangent, grad_y)
        baseline = primal_and_grads(reference_fn, inputs, num_groups, act, with_tangent, grad_y)
        reference.check_parity("y", kernel[0], truth[0], baseline[0], FLOOR[dtype])
        if with_tangent:
            reference.check_parity("dy", kernel[1], truth[1], baseline[1], FLOOR[dtype])
        scales = parameter_term_scales(inputs64, num_groups, act, grad_y)
        check_gradients(kernel[2], truth[2], baseline[2], FLOOR[dtype], scales)


# ------------------------------------------------------------------------------------------------ bad input

BAD_CALLS = [
    (
        "return_input",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, return_input="yes"),
        "return_input must be True or False, got 'yes'",
    ),
    ("x rank", lambda: imf_kernels.group_norm_act(torch.randn(3, 5), 1), "x must be 4-D (B, C, H, W)"),
    (
        "sparse x",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2).to_sparse(), 2),
        "x must be a dense (strided) tensor, got layout torch.sparse_coo (call .to_dense())",
    ),
    (
        "groups",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 40, 2, 2), 7),
        "num_groups=7 must divide the 40",
    ),
    (
        "dtype",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, torch.randn(8, dtype=torch.float16)),
        "weight must have the dtype of x",
    ),
    (
        "weight shape",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, torch.randn(4)),
        "weight must have shape (C,)",
    ),
    (
        "scale shape",
        lambda: imf_kernels.group_norm_act(torch.randn(2, 8, 2, 2), 2, scale=torch.randn(1, 8)),
        "scale must have shape (B, C)",
    ),
    (
        "contiguity",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 3).transpose(2, 3), 2),
        "x must be contiguous or channels-last (call .contiguous())",
    ),
    (
        "dx strides",
        lambda: imf_kernels.group_norm_act_jvp(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2).transpose(2, 3), 2),
        "dx must be contiguous or channels-last",
    ),
    (
        "integer x",
        lambda: imf_kernels.group_norm_act(torch.ones(1, 8, 2, 2, dtype=torch.int64), 2),
        "x must have dtype float16, bfloat16, float32, float64",
    ),
    ("act", lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, act="gelu"), "act must be one of"),
    (
        "weight length before layout",
        lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, weight=torch.randn(6, 2)[:, 0]),
        "weight must have shape (C,) = (8,), got (6,)",
    ),
    ("eps", lambda: imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, eps=0.0), "eps must be > 0"),
    (
        "dx shape",
        lambda: imf_kernels.group_norm_act_jvp(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 3), 2),
        "dx must have shape",
    ),
    (
        "dx rows",
        lambda: imf_kernels.group_norm_act_jvp(torch.randn(2, 8, 2, 2), torch.randn(3, 8, 2, 2), 2),
        "dx must have shape (B, C, H, W) like x, or its first m rows (m, C, H, W) = (2, 8, 2, 2), got (3, 8, 2, 2)",
    ),
    (
        "dscale rows",
        lambda: imf_kernels.group_norm_act_jvp(
            torch.randn(2, 8, 2, 2),
            torch.randn(1, 8, 2, 2),
            2,
            scale=torch.randn(2, 8),
            shift=torch.randn(2, 8),
            dscale=torch.randn(2, 8),
        ),
        "dscale must have shape (m, C), m rows like dx = (1, 8), got (2, 8)",
    ),
    (
        "dscale without scale",
        lambda: imf_kernels.group_norm_act_jvp(
            torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2), 2, dscale=torch.randn(1, 8)
        ),
        "dscale needs scale",
    ),
]


@pytest.mark.parametrize(("case", "bad_call", "message"), BAD_CALLS, ids=[case for case, _, _ in BAD_CALLS])
def test_bad_input_raises_a_clear_value_error(case, bad_call, message):
    op = "group_norm_act_jvp" if case.startswith(("dx", "dscale")) else "group_norm_act"
    with pytest.raises(ValueError, match="^" + re.escape(f"{op}: {message}")):
        bad_call()


def test_a_numpy_group_count_is_an_int():
    x = torch.randn(2, 8, 3, 3)
    got = imf_kernels.group_norm_act(x, np.int64(4), backend="torch")
    assert torch.equal(got, imf_kernels.group_norm_act(x, 4, backend="torch"))


# ------------------------------------------------------------------------------------------------------ GPU

# latent-b shapes: ResBlock GN at 32x32 and 16x16, 32 groups
GPU_SHAPES = [(8, 256, 32, 32, 32), (8, 192, 16, 16, 32), (1, 40, 5, 7, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
def test_group_norm_act_on_gpu(backend, shape, dtype, with_tangent):
    check_against_reference(backend, shape, "modulated", dtype, with_tangent, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_inputs_get_no_gradient(backend):
    """The stop-gradient contract: dx, dscale and dshift that require grad get none through y, and dy is not
    differentiable (the tangent half never reaches a weight gradient)."""
    inputs, num_groups, act = make_inputs(SHAPES[0], "modulated", torch.float32)
    args = {name: inputs[name] for name in ("x", "dx", *PARAMETER_NAMES, "dscale", "dshift")}
    skip_unless_runs(backend, "group_norm_act_jvp", {**args, "num_groups": num_groups, "eps": 1e-5, "act": act})
    leaves = {name: value.clone().requires_grad_() for name, value in args.items()}
    y, dy = call(imf_kernels.group_norm_act_jvp, leaves, num_groups, act, True, backend=backend)
    assert y.requires_grad and not dy.requires_grad
    tangents = [leaves[name] for name in ("dx", "dscale", "dshift")]
    assert torch.autograd.grad(y.sum(), tangents, allow_unused=True) == (None, None, None)
