"""cuda launchers (imf_kernels/cuda/ over csrc/) against float64 references written here, and against triton.

Every output and gradient is checked as
    max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + ATOL[dtype] * max(1, max|ref64|)
(the losses' outputs, whose weights and gradients are far below 1: + LOSS_FLOOR[dtype] * max|ref64|), where
torch_same_dtype is plain PyTorch (F.group_norm, matmul + softmax, the loss formulas) in the kernel's
dtype on the GPU. The CUDA kernels accumulate in fp32 without TF32, so their fp32 floor is tight. Where the
triton backend takes the same call, cuda and triton must agree within the sum of their allowed errors.
Every buffer a launcher allocates is NaN-poisoned first (imf_kernels.cuda._common.empty is swapped).
All tests need a GPU (marked `gpu`); tests/test_cuda_emulated.py runs the same check functions on this CPU through
the CUDA emulator (DEVICE "cpu", no triton comparison). `python tests/test_cuda_ops.py` runs one small case of every
kernel variant, which is what compute-sanitizer (memcheck, racecheck) runs over in the last test.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imf_kernels import api, dispatch
from imf_kernels.cuda import _common
from imf_kernels.cuda import attention as cuda_attention
from imf_kernels.cuda import group_norm as cuda_group_norm
from imf_kernels.cuda import loss as cuda_loss
from imf_kernels.reference import FLOOR as REFERENCE_FLOOR
from imf_kernels.reference import check_parity

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floors relative to max|ref64| (outputs range from O(1e-4) loss weights to O(1e4) loss sums), added to 2x
# PyTorch's same-dtype error.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The triton tests' floors on a GPU (tests/test_attention.py; fp32 dots there are full precision, "ieee").
TRITON_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The loss checks' floors, relative to each output's own largest magnitude (no max(1, .)): the shared table.
LOSS_FLOOR = REFERENCE_FLOOR
# The sanitizer run (`python tests/test_cuda_ops.py`) checks the cuda kernels alone.
COMPARE_WITH_TRITON = True


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every buffer the cuda launchers allocate, so an element a kernel skips shows up."""
    monkeypatch.setattr(_common, "empty", nan_empty)


def nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rounded(shape, dtype, generator, mean=0.0, std=1.0):
    """float64 values on the CPU that `dtype` represents exactly (the reference sees what the kernel sees)."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean
    return values.to(dtype).to(torch.float64)


def on_device(tensor, dtype):
    return None if tensor is None else tensor.to(device=DEVICE, dtype=dtype).contiguous()


def max_error(value, reference) -> float:
    return (value.detach().to("cpu", torch.float64) - reference).abs().max().item()


def allowed_error(torch_value, reference, dtype, floors) -> float:
    """2x PyTorch's error in the same dtype plus a floor relative to max(1, max |reference|), as
    `imf_kernels.reference.check_parity`: an exactly-zero reference (grad_q with one key: p = 1, dp = delta)
    still allows the rounding of the terms that cancel."""
    return 2 * max_error(torch_value, reference) + floors[dtype] * max(1.0, reference.abs().max().item())


def assert_close(name, value, torch_value, reference, dtype, relative=False):
    """`relative`: `imf_kernels.reference.check_parity`'s rule, the floor relative to max |reference| itself (no
    max(1, .)): the losses' outputs, whose weights (~1e-4) and gradients (~1e-5) a floor of 1 would let be 0."""
    assert value.shape == reference.shape, f"{name}: shape {tuple(value.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(value).all(), f"{name}: non-finite values (a poisoned output left unwritten?)"
    if relative:
        on_cpu = lambda t: t.detach().cpu()  # noqa: E731
        check_parity(f"{name} ({dtype_id(dtype)})", on_cpu(value), reference, on_cpu(torch_value), LOSS_FLOOR[dtype])
        return
    error = max_error(value, reference)
    bound = allowed_error(torch_value, reference, dtype, ATOL)
    assert error <= bound, f"{name}: error {error:.3g} > allowed {bound:.3g} ({dtype_id(dtype)})"


def assert_agrees_with_triton(name, value, triton_value, torch_value, reference, dtype):
    """|cuda - triton| within the sum of the two backends' allowed errors."""
    bound = allowed_error(torch_value, reference, dtype, ATOL) + allowed_error(
        torch_value, reference, dtype, TRITON_ATOL
    )
    difference = (value.double() - triton_value.double()).abs().max().item()
    assert difference <= bound, f"{name}: |cuda - triton| {difference:.3g} > {bound:.3g} ({dtype_id(dtype)})"


def triton_family(op: str, args: dict):
    """The triton launchers when that backend takes this call here, else None."""
    if not COMPARE_WITH_TRITON or dispatch.not_supported_reasons("triton", op, args):
        return None
    return dispatch.family_module("triton", op)


def misaligned(tensor):
    """The same values in a contiguous tensor whose data starts one element past a 16-byte boundary, which
    sends the launch down the scalar (non-vector) path."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    view = storage[1:].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 16 != 0
    return view


# ---------------------------------------------------------------------------------------------- GroupNorm

# (B, C, H, W, G): HW = 35 is the scalar path; 64, 16 the vector path; 36 vector in fp32 only (36 % 8 != 0);
# (2, 256, 32, 32, 32) is a model shape (8 channels x 32 x 32 = 8192 elements per group). The launch rule runs the
# resident kernels where a channel holds a power-of-two number of 16-byte chunks and a group at most 512 of them
# (csrc/group_norm.cu), a warp per group up to 128 chunks: 1, 2, 4 chunks per lane (B2C64G32, B19C40G4, B2C128G16),
# 8 groups per block and a last block with idle warps (B19C40G4: 76 groups); a block per larger group: 1 or 2 chunks
# per thread on 256 threads (B1C128G8 bf16/fp16, B1C512G1 2x2 fp32), channels a thread loops over in the backward
# (B1C512G1 2x2 fp32); one chunk per channel (B2C32 2x2 fp32); the looped kernels where a group is larger (B2C256,
# B1C16G1, B1C128G8 fp32) or the scalar path runs. A "resident" request (pick_kernel) takes groups up to 2048 chunks:
# 4 chunks per thread, 512 threads (test_group_norm_resident_kind_on_its_largest_groups). The backward's batch sums
# of grad_weight, grad_bias take 32 channels per block, 8 rows of samples: B19C40G4 has a partial block of channels
# and rows that loop unevenly.
GN_SHAPES = [
    (1, 40, 5, 7, 8),
    (2, 64, 8, 8, 32),
    (3, 96, 4, 4, 32),
    (2, 48, 6, 6, 4),
    (2, 256, 32, 32, 32),
    (1, 128, 16, 16, 8),
    (2, 32, 2, 2, 4),
    (1, 512, 2, 2, 1),
    (1, 16, 32, 32, 1),
    (2, 128, 8, 8, 16),
    (19, 40, 4, 4, 4),
]
# which of weight, bias, scale, shift are present, and the activation
GN_VARIANTS = {
    "full-silu": (("weight", "bias", "scale", "shift"), "silu"),
    "plain-none": ((), "none"),
    "film-silu": (("scale", "shift"), "silu"),
    "affine-none": (("weight", "bias"), "none"),
}
EPS = 1e-5


def explicit_group_norm(x, num_groups, eps):
    """Two-pass GroupNorm written out (the float64 truth)."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    var = ((groups - mean) ** 2).mean(-1, keepdim=True)
    return ((groups - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def torch_group_norm(x, num_groups, eps):
    """PyTorch's GroupNorm in the input's dtype (the baseline)."""
    return F.group_norm(x, num_groups, eps=eps)


def reference_gn(normalize, x, num_groups, weight, bias, scale, shift, act):
    h = normalize(x, num_groups, EPS)
    if weight is not None:
        h = h * weight[:, None, None]
    if bias is not None:
        h = h + bias[:, None, None]
    if scale is not None:
        h = h * (1 + scale[:, :, None, None])
    if shift is not None:
        h = h + shift[:, :, None, None]
    return h * torch.sigmoid(h) if act == "silu" else h


def gn_inputs(shape, variant, dtype, seed):
    """float64 CPU inputs: x (offset mean, so the centred statistics matter), parameters, tangents, grad_y."""
    batch, channels, height, width, num_groups = shape
    present, act = GN_VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)
    x = rounded((batch, channels, height, width), dtype, generator, mean=3.0, std=2.0)
    params = {
        "weight": rounded((channels,), dtype, generator, mean=1.0, std=0.5),
        "bias": rounded((channels,), dtype, generator, std=0.5),
        "scale": rounded((batch, channels), dtype, generator, std=0.5),
        "shift": rounded((batch, channels), dtype, generator, std=0.5),
    }
    params = {name: value if name in present else None for name, value in params.items()}
    dx = rounded(x.shape, dtype, generator)
    dscale = None if params["scale"] is None else rounded((batch, channels), dtype, generator, std=0.5)
    dshift = None if params["shift"] is None else rounded((batch, channels), dtype, generator, std=0.5)
    grad_y = rounded(x.shape, dtype, generator)
    return x, num_groups, params, act, dx, dscale, dshift, grad_y


def gn_id(shape) -> str:
    return "B{}C{}H{}W{}G{}".format(*shape)


def check_gn_forward(shape, variant, dtype):
    x, num_groups, params, act, *_ = gn_inputs(shape, variant, dtype, seed=1)
    x_d = on_device(x, dtype)
    params_d = {name: on_device(value, dtype) for name, value in params.items()}
    ordered = [params_d[name] for name in ("weight", "bias", "scale", "shift")]
    y, mean, rstd = cuda_group_norm.gn_act_fwd(x_d, num_groups, *ordered, EPS, act)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    ordered64 = [params[name] for name in ("weight", "bias", "scale", "shift")]
    y_ref = reference_gn(explicit_group_norm, x, num_groups, *ordered64, act)
    y_torch = reference_gn(torch_group_norm, x_d, num_groups, *ordered, act)
    assert_close("y", y, y_torch, y_ref, dtype)

    groups = x.reshape(x.shape[0], num_groups, -1)
    mean_ref = groups.mean(-1)
    rstd_ref = 1 / torch.sqrt(((groups - mean_ref[..., None]) ** 2).mean(-1) + EPS)
    groups32 = x_d.float().reshape(x.shape[0], num_groups, -1)
    var32, mean32 = torch.var_mean(groups32, dim=-1, unbiased=False)
    assert_close("mean", mean, mean32, mean_ref, torch.float32)
    assert_close("rstd", rstd, torch.rsqrt(var32 + EPS), rstd_ref, torch.float32)

    args = dict(x=x_d, num_groups=num_groups, **params_d, eps=EPS, act=act)
    triton = triton_family("group_norm_act", args)
    if triton is not None:
        y_triton, _, _ = triton.gn_act_fwd(x_d, num_groups, *ordered, EPS, act)
        assert_agrees_with_triton("y", y, y_triton, y_torch, y_ref, dtype)


def gn_jvp_reference(normalize, x, dx, num_groups, params, dscale, dshift, act):
    """(y, dy) by torch.func.jvp along (x, scale, shift)."""
    scale, shift = params["scale"], params["shift"]

    def fn(x_in, scale_in, shift_in):
        return reference_gn(normalize, x_in, num_groups, params["weight"], params["bias"], scale_in, shift_in, act)

    if scale is None:
        return torch.func.jvp(lambda a: fn(a, None, None), (x,), (dx,))
    return torch.func.jvp(fn, (x, scale, shift), (dx, dscale, dshift))


def check_gn_jvp(shape, variant, dtype, with_modulation_tangent=True):
    x, num_groups, params, act, dx, dscale, dshift, _ = gn_inputs(shape, variant, dtype, seed=2)
    if not with_modulation_tangent:
        dscale, dshift = None, None
    x_d, dx_d = on_device(x, dtype), on_device(dx, dtype)
    params_d = {name: on_device(value, dtype) for name, value in params.items()}
    dscale_d, dshift_d = on_device(dscale, dtype), on_device(dshift, dtype)
    ordered = [params_d[name] for name in ("weight", "bias", "scale", "shift")]
    y, dy, mean, rstd = cuda_group_norm.gn_act_jvp_fwd(x_d, dx_d, num_groups, *ordered, dscale_d, dshift_d, EPS, act)
    assert y.dtype == dy.dtype == dtype and mean.shape == rstd.shape == (x.shape[0], num_groups)
    zero = None if params["scale"] is None else torch.zeros_like(params["scale"])
    zero_d = None if zero is None else torch.zeros_like(params_d["scale"])
    y_ref, dy_ref = gn_jvp_reference(
        explicit_group_norm, x, dx, num_groups, params,
        zero if dscale is None else dscale, zero if dshift is None else dshift, act,
    )  # fmt: skip
    y_torch, dy_torch = gn_jvp_reference(
        torch_group_norm, x_d, dx_d, num_groups, params_d,
        zero_d if dscale_d is None else dscale_d, zero_d if dshift_d is None else dshift_d, act,
    )  # fmt: skip
    assert_close("y", y, y_torch, y_ref, dtype)
    assert_close("dy", dy, dy_torch, dy_ref, dtype)

    args = dict(x=x_d, dx=dx_d, num_groups=num_groups, **params_d, dscale=dscale_d, dshift=dshift_d)
    triton = triton_family("group_norm_act_jvp", {**args, "eps": EPS, "act": act})
    if triton is not None:
        _, dy_triton, _, _ = triton.gn_act_jvp_fwd(x_d, dx_d, num_groups, *ordered, dscale_d, dshift_d, EPS, act)
        assert_agrees_with_triton("dy", dy, dy_triton, dy_torch, dy_ref, dtype)


def gn_grads(normalize, x, num_groups, params, act, grad_y):
    """Gradients in x and every present parameter, by autograd (order: x, weight, bias, scale, shift)."""
    leaves = [x, *(params[name] for name in ("weight", "bias", "scale", "shift"))]
    leaves = [None if leaf is None else leaf.detach().clone().requires_grad_() for leaf in leaves]
    y = reference_gn(normalize, leaves[0], num_groups, *leaves[1:], act)
    present = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y))
    return [None if leaf is None else next(grads) for leaf in leaves]


def check_gn_backward(shape, variant, dtype, make_misaligned=False, with_residual=False):
    """with_residual: a residual branch's gradient of x given to the backward (`grad_residual`), against the
    float64 sum and PyTorch's (autograd adds the two gradients in the dtype)."""
    x, num_groups, params, act, _, _, _, grad_y = gn_inputs(shape, variant, dtype, seed=3)
    x_d, grad_y_d = on_device(x, dtype), on_device(grad_y, dtype)
    residual = rounded(x.shape, dtype, torch.Generator().manual_seed(4)) if with_residual else None
    residual_d = on_device(residual, dtype)
    if make_misaligned:
        x_d, grad_y_d = misaligned(x_d), misaligned(grad_y_d)
        residual_d = None if residual_d is None else misaligned(residual_d)
    params_d = {name: on_device(value, dtype) for name, value in params.items()}
    ordered = [params_d[name] for name in ("weight", "bias", "scale", "shift")]
    _, mean, rstd = cuda_group_norm.gn_act_fwd(x_d, num_groups, *ordered, EPS, act)
    grads = cuda_group_norm.gn_act_bwd(grad_y_d, x_d, num_groups, *ordered, mean, rstd, act, residual_d)
    references = gn_grads(explicit_group_norm, x, num_groups, params, act, grad_y)
    torch_grads = gn_grads(torch_group_norm, x_d, num_groups, params_d, act, grad_y_d)
    if with_residual:
        references[0] = references[0] + residual
        torch_grads[0] = torch_grads[0] + residual_d
    names = ("grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift")
    for name, grad, torch_grad, reference in zip(names, grads, torch_grads, references, strict=True):
        if reference is None:
            assert grad is None, f"{name}: the input is None, the gradient must be None"
            continue
        assert grad.dtype == dtype, f"{name}: dtype {grad.dtype}"
        assert_close(name, grad, torch_grad, reference, dtype)

    args = dict(x=x_d, num_groups=num_groups, **params_d, eps=EPS, act=act)
    triton = triton_family("group_norm_act", args)
    if triton is not None and not make_misaligned:
        triton_grads = triton.gn_act_bwd(grad_y_d, x_d, num_groups, *ordered, mean, rstd, act, residual_d)
        assert_agrees_with_triton("grad_x", grads[0], triton_grads[0], torch_grads[0], references[0], dtype)


@pytest.mark.parametrize("variant", GN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=gn_id)
def test_group_norm_forward(shape, dtype, variant, poisoned):
    check_gn_forward(shape, variant, dtype)


@pytest.mark.parametrize("variant", GN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=gn_id)
def test_group_norm_jvp(shape, dtype, variant, poisoned):
    check_gn_jvp(shape, variant, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_group_norm_jvp_without_modulation_tangents(dtype, poisoned):
    """dscale / dshift None are zero tangents while scale / shift are present."""
    check_gn_jvp(GN_SHAPES[1], "full-silu", dtype, with_modulation_tangent=False)


@pytest.mark.parametrize("variant", GN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=gn_id)
def test_group_norm_backward(shape, dtype, variant, poisoned):
    check_gn_backward(shape, variant, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_group_norm_scalar_path_on_misaligned_tensors(dtype, poisoned):
    check_gn_backward(GN_SHAPES[1], "full-silu", dtype, make_misaligned=True)


# the scalar path (H W = 35), resident groups of one block and several, a looped group (fp32), batch 19
GN_RESIDUAL_SHAPES = [GN_SHAPES[0], GN_SHAPES[1], GN_SHAPES[4], GN_SHAPES[8], GN_SHAPES[10]]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GN_RESIDUAL_SHAPES, ids=gn_id)
def test_group_norm_backward_adds_a_residual_gradient(shape, dtype, poisoned):
    """grad_residual (a residual branch's gradient of x) is added into grad_x by the kernel."""
    check_gn_backward(shape, "full-silu", dtype, with_residual=True)
    if shape == GN_SHAPES[1]:
        check_gn_backward(shape, "plain-none", dtype, make_misaligned=True, with_residual=True)


# ---------------------------------------------------------------------------------------------- attention

# (B, H, Lq, Lk, D): the model's 20/24-token contexts, the limits Lk = 1..64 (Lk > 32 fills a second key
# slot per lane), Lq = 1, odd lengths, and a model-size Lq whose backward splits the rows over many blocks.
ATTENTION_SHAPES = [
    (1, 2, 37, 20, 32),
    (2, 1, 65, 4, 64),
    (2, 2, 100, 24, 128),
    (1, 1, 1, 64, 64),
    (3, 2, 129, 33, 32),
    (1, 3, 7, 1, 128),
    (1, 4, 1024, 20, 64),
]


def attention_id(shape) -> str:
    return "B{}H{}-Lq{}-Lk{}-D{}".format(*shape)


def reference_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def reference_lse(q, k, scale):
    return torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)


def attention_inputs(shape, dtype, seed):
    batch, heads, lq, lk, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    q_shape, kv_shape = (batch, heads, lq, head_dim), (batch, heads, lk, head_dim)
    primal = [rounded(s, dtype, generator) for s in (q_shape, kv_shape, kv_shape)]
    tangent = [rounded(s, dtype, generator) for s in (q_shape, kv_shape, kv_shape)]
    return primal, tangent, rounded(q_shape, dtype, generator)


def check_attention_forward(shape, dtype, scale=None, make_misaligned=False):
    (q, k, v), _, _ = attention_inputs(shape, dtype, seed=4)
    scale = shape[4] ** -0.5 if scale is None else scale
    q_d, k_d, v_d = (on_device(x, dtype) for x in (q, k, v))
    if make_misaligned:
        q_d, k_d, v_d = (misaligned(x) for x in (q_d, k_d, v_d))
    o, lse = cuda_attention.attention_fwd(q_d, k_d, v_d, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32
    o_ref, o_torch = reference_attention(q, k, v, scale), reference_attention(q_d, k_d, v_d, scale)
    assert_close("o", o, o_torch, o_ref, dtype)
    lse_torch = reference_lse(q_d.float(), k_d.float(), scale)
    assert_close("lse", lse, lse_torch, reference_lse(q, k, scale), torch.float32)

    triton = triton_family("attention", dict(q=q_d, k=k_d, v=v_d, scale=scale))
    if triton is not None:
        o_triton, _ = triton.attention_fwd(q_d, k_d, v_d, scale)
        assert_agrees_with_triton("o", o, o_triton, o_torch, o_ref, dtype)


def attention_jvp_reference(q, k, v, dq, dk, dv, scale):
    dk = torch.zeros_like(k) if dk is None else dk
    dv = torch.zeros_like(v) if dv is None else dv
    return torch.func.jvp(lambda a, b, c: reference_attention(a, b, c, scale), (q, k, v), (dq, dk, dv))


def check_attention_jvp(shape, dtype, tangents=("dk", "dv")):
    (q, k, v), (dq, dk, dv), _ = attention_inputs(shape, dtype, seed=5)
    dk = dk if "dk" in tangents else None
    dv = dv if "dv" in tangents else None
    scale = shape[4] ** -0.5
    inputs_d = [on_device(x, dtype) for x in (q, k, v, dq, dk, dv)]
    o, do, lse = cuda_attention.attention_jvp_fwd(*inputs_d, scale)
    assert o.dtype == do.dtype == dtype and lse.dtype == torch.float32
    o_ref, do_ref = attention_jvp_reference(q, k, v, dq, dk, dv, scale)
    o_torch, do_torch = attention_jvp_reference(*inputs_d, scale)
    assert_close("o", o, o_torch, o_ref, dtype)
    assert_close("do", do, do_torch, do_ref, dtype)
    q_d, k_d = inputs_d[0], inputs_d[1]
    assert_close("lse", lse, reference_lse(q_d.float(), k_d.float(), scale), reference_lse(q, k, scale), torch.float32)

    names = ("q", "k", "v", "dq", "dk", "dv")
    triton = triton_family("attention_jvp", {**dict(zip(names, inputs_d, strict=True)), "scale": scale})
    if triton is not None:
        _, do_triton, _ = triton.attention_jvp_fwd(*inputs_d, scale)
        assert_agrees_with_triton("do", do, do_triton, do_torch, do_ref, dtype)


def attention_grads(q, k, v, grad_o, scale):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(reference_attention(*leaves, scale), leaves, grad_o)


def check_attention_backward(shape, dtype, make_misaligned=False):
    (q, k, v), _, grad_o = attention_inputs(shape, dtype, seed=6)
    scale = shape[4] ** -0.5
    q_d, k_d, v_d, grad_o_d = (on_device(x, dtype) for x in (q, k, v, grad_o))
    if make_misaligned:
        q_d, k_d, v_d, grad_o_d = (misaligned(x) for x in (q_d, k_d, v_d, grad_o_d))
    o, lse = cuda_attention.attention_fwd(q_d, k_d, v_d, scale)
    grads = cuda_attention.attention_bwd(grad_o_d, q_d, k_d, v_d, o, lse, scale)
    references = attention_grads(q, k, v, grad_o, scale)
    torch_grads = attention_grads(q_d, k_d, v_d, grad_o_d, scale)
    for name, grad, torch_grad, reference in zip(
        ("grad_q", "grad_k", "grad_v"), grads, torch_grads, references, strict=True
    ):
        assert grad.dtype == dtype, f"{name}: dtype {grad.dtype}"
        assert_close(name, grad, torch_grad, reference, dtype)

    triton = triton_family("attention", dict(q=q_d, k=k_d, v=v_d, scale=scale))
    if triton is not None and not make_misaligned:
        triton_grads = triton.attention_bwd(grad_o_d, q_d, k_d, v_d, o, lse, scale)
        for name, grad, triton_grad, torch_grad, reference in zip(
            ("grad_q", "grad_k", "grad_v"), grads, triton_grads, torch_grads, references, strict=True
        ):
            assert_agrees_with_triton(name, grad, triton_grad, torch_grad, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=attention_id)
def test_attention_forward(shape, dtype, poisoned):
    check_attention_forward(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_forward_with_explicit_scale(dtype, poisoned):
    check_attention_forward(ATTENTION_SHAPES[0], dtype, scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=attention_id)
def test_attention_jvp(shape, dtype, poisoned):
    check_attention_jvp(shape, dtype)


@pytest.mark.parametrize("tangents", [(), ("dk",), ("dv",)], ids=["dq-only", "dq-dk", "dq-dv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_jvp_with_zero_tangents(dtype, tangents, poisoned):
    check_attention_jvp(ATTENTION_SHAPES[4], dtype, tangents)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=attention_id)
def test_attention_backward(shape, dtype, poisoned):
    check_attention_backward(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_scalar_path_on_misaligned_tensors(dtype, poisoned):
    check_attention_forward(ATTENTION_SHAPES[2], dtype, make_misaligned=True)
    check_attention_backward(ATTENTION_SHAPES[2], dtype, make_misaligned=True)


def test_attention_backward_splits_rows_over_blocks():
    """The model-size case really exercises the split partial sums (more than one block per head)."""
    batch, heads, lq = ATTENTION_SHAPES[-1][:3]
    assert cuda_attention.num_splits(batch * heads, lq, torch.device(DEVICE)) > 1


# ------------------------------------------------------------------------------------------------- losses

# (B, ...): 105 elements per sample is the scalar path, the others the vector path.
# (300, ...): the totals' block of 256 threads loops over the batch, unevenly
LOSS_SHAPES = [(1, 3, 5, 7), (4, 4, 8, 8), (3, 2, 16, 16), (2, 4, 32, 32), (300, 1, 3, 5)]
LOSS_OPTIONS = [(0.01, 1.0), (0.1, 0.5)]  # (c, p)
GRAD_TOTAL = 0.75


def loss_id(shape) -> str:
    return "x".join(map(str, shape))


def loss_inputs(shape, dtype, seed):
    """u, du, v, v_target rounded to dtype; t, r independent in [0, 1), so t - r takes both signs (the MF
    clip at 0 and the iMF coefficient's sign both run)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [rounded(shape, dtype, generator) for _ in range(4)]
    t = torch.rand(shape[0], generator=generator, dtype=torch.float64).float().double()
    r = torch.rand(shape[0], generator=generator, dtype=torch.float64).float().double()
    return (*tensors, t, r)


def per_sample(values, like):
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def same_dtype_times(t, r, dtype):
    """The PyTorch baseline's times in the inputs' dtype: t - r taken in float32 (the ops take t and r in
    float32) and rounded once, as (h, 0); rounding t and r each would make the baseline's error, and with it the
    allowed one, that of a difference of two rounded numbers."""
    return (t - r).to(dtype), torch.zeros_like(t, dtype=dtype)


def reference_imf_loss(u, du, v, v_target, t, r, c, p):
    """(total, loss_u, loss_v, w_u, w_v) of DESIGN 2.2 in the inputs' dtype."""
    loss_u = ((u + per_sample(t - r, u) * du - v_target) ** 2).flatten(1).sum(1)
    loss_v = ((v - v_target) ** 2).flatten(1).sum(1)
    w_u, w_v = (loss_u.detach() + c) ** -p, (loss_v.detach() + c) ** -p
    return (w_u * loss_u + w_v * loss_v).mean(), loss_u, loss_v, w_u, w_v


def reference_meanflow_loss(u, du, v_target, t, r, c, p):
    """(total, loss, w) of DESIGN 2.3 in the inputs' dtype."""
    u_target = v_target - per_sample((t - r).clamp(0, 1), u) * du
    loss = ((u - u_target) ** 2).flatten(1).sum(1)
    w = (loss.detach() + c) ** -p
    return (w * loss).mean(), loss, w


def check_imf_loss(shape, dtype, c, p):
    u, du, v, v_target, t, r = loss_inputs(shape, dtype, seed=7)
    u_d, du_d, v_d, vt_d = (on_device(x, dtype) for x in (u, du, v, v_target))
    t_d, r_d = on_device(t, torch.float32), on_device(r, torch.float32)
    *outputs, totals = cuda_loss.imf_loss_fwd(u_d, du_d, v_d, vt_d, t_d, r_d, c, p)
    total_reference, *loss_references = reference_imf_loss(u, du, v, v_target, t, r, c, p)
    h_d, zero = same_dtype_times(t_d, r_d, dtype)
    total_torch, *torch_values = reference_imf_loss(u_d, du_d, v_d, vt_d, h_d, zero, c, p)
    for name, value, torch_value, reference in zip(
        ("loss_u", "loss_v", "w_u", "w_v"), outputs, torch_values, loss_references, strict=True
    ):
        assert value.dtype == torch.float32 and value.shape == (shape[0],)
        assert_close(name, value, torch_value, reference, dtype, relative=True)
    # [mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v]: each its own check (their magnitudes differ by 1e4)
    assert totals.dtype == torch.float32 and totals.shape == (3,)
    torch_totals = (total_torch, torch_values[0].mean(), torch_values[1].mean())
    reference_totals = (total_reference, loss_references[0].mean(), loss_references[1].mean())
    for index, name in enumerate(("total", "mean loss_u", "mean loss_v")):
        assert_close(name, totals[index], torch_totals[index], reference_totals[index], dtype, relative=True)

    w_u, w_v = outputs[2], outputs[3]
    grad_total = torch.tensor(GRAD_TOTAL, device=DEVICE)
    grads = cuda_loss.imf_loss_bwd(grad_total, u_d, du_d, v_d, vt_d, t_d, r_d, w_u, w_v)

    def grads_of(u_in, du_in, v_in, vt_in, t_in, r_in):
        leaves = [u_in.detach().clone().requires_grad_(), v_in.detach().clone().requires_grad_()]
        total = reference_imf_loss(leaves[0], du_in, leaves[1], vt_in, t_in, r_in, c, p)[0]
        return torch.autograd.grad(total, leaves, torch.tensor(GRAD_TOTAL, dtype=total.dtype, device=total.device))

    grad_references = grads_of(u, du, v, v_target, t, r)
    torch_grads = grads_of(u_d, du_d, v_d, vt_d, h_d, zero)
    for name, grad, torch_grad, reference in zip(
        ("grad_u", "grad_v"), grads, torch_grads, grad_references, strict=True
    ):
        assert grad.dtype == dtype
        assert_close(name, grad, torch_grad, reference, dtype, relative=True)

    triton = triton_family("imf_loss", dict(u=u_d, du=du_d, v=v_d, v_target=vt_d, t=t_d, r=r_d, c=c, p=p))
    if triton is not None:
        triton_outputs = triton.imf_loss_fwd(u_d, du_d, v_d, vt_d, t_d, r_d, c, p)
        for name, value, triton_value, torch_value, reference in zip(
            ("loss_u", "loss_v"), outputs[:2], triton_outputs[:2], torch_values[:2], loss_references[:2], strict=True
        ):
            assert_agrees_with_triton(name, value, triton_value, torch_value, reference, dtype)


def check_meanflow_loss(shape, dtype, c, p):
    u, du, _, v_target, t, r = loss_inputs(shape, dtype, seed=8)
    u_d, du_d, vt_d = (on_device(x, dtype) for x in (u, du, v_target))
    t_d, r_d = on_device(t, torch.float32), on_device(r, torch.float32)
    loss, w, totals = cuda_loss.meanflow_loss_fwd(u_d, du_d, vt_d, t_d, r_d, c, p)
    total_ref, loss_ref, w_ref = reference_meanflow_loss(u, du, v_target, t, r, c, p)
    h_d, zero = same_dtype_times(t_d, r_d, dtype)
    total_torch, loss_torch, w_torch = reference_meanflow_loss(u_d, du_d, vt_d, h_d, zero, c, p)
    assert loss.dtype == w.dtype == totals.dtype == torch.float32 and totals.shape == (2,)
    assert_close("loss", loss, loss_torch, loss_ref, dtype, relative=True)
    assert_close("w", w, w_torch, w_ref, dtype, relative=True)
    # [mean_b(w L), mean_b L]: each its own check
    assert_close("total", totals[0], total_torch, total_ref, dtype, relative=True)
    assert_close("mean loss", totals[1], loss_torch.mean(), loss_ref.mean(), dtype, relative=True)

    grad_u = cuda_loss.meanflow_loss_bwd(torch.tensor(GRAD_TOTAL, device=DEVICE), u_d, du_d, vt_d, t_d, r_d, w)

    def grad_of(u_in, du_in, vt_in, t_in, r_in):
        leaf = u_in.detach().clone().requires_grad_()
        total = reference_meanflow_loss(leaf, du_in, vt_in, t_in, r_in, c, p)[0]
        return torch.autograd.grad(total, leaf, torch.tensor(GRAD_TOTAL, dtype=total.dtype, device=total.device))[0]

    reference = grad_of(u, du, v_target, t, r)
    torch_grad = grad_of(u_d, du_d, vt_d, h_d, zero)
    assert grad_u.dtype == dtype
    assert_close("grad_u", grad_u, torch_grad, reference, dtype, relative=True)


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: f"c{o[0]}-p{o[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=loss_id)
def test_imf_loss(shape, dtype, options, poisoned):
    check_imf_loss(shape, dtype, *options)


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: f"c{o[0]}-p{o[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=loss_id)
def test_meanflow_loss(shape, dtype, options, poisoned):
    check_meanflow_loss(shape, dtype, *options)


# ------------------------------------------------------------------- through the public ops, streams, graphs


def test_public_ops_run_on_the_cuda_backend():
    """api with backend="cuda": values and gradients through the shared autograd Functions (fp32)."""
    generator = torch.Generator().manual_seed(9)
    inputs = [rounded((2, 64, 8, 8), torch.float32, generator, mean=1.0)]
    inputs += [rounded((64,), torch.float32, generator), rounded((64,), torch.float32, generator)]
    names = ("x.grad", "weight.grad", "bias.grad")
    leaves64 = [t.clone().requires_grad_() for t in inputs]
    y_ref = reference_gn(explicit_group_norm, leaves64[0], 32, *leaves64[1:], None, None, "silu")
    leaves_torch = [on_device(t, torch.float32).requires_grad_() for t in inputs]
    y_torch = reference_gn(torch_group_norm, leaves_torch[0], 32, *leaves_torch[1:], None, None, "silu")
    leaves = [on_device(t, torch.float32).requires_grad_() for t in inputs]
    y = api.group_norm_act(leaves[0], 32, leaves[1], leaves[2], backend="cuda")
    for output in (y, y_torch, y_ref):
        (output**2).sum().backward()
    assert_close("y", y, y_torch, y_ref.detach(), torch.float32)
    for name, leaf, leaf_torch, leaf64 in zip(names, leaves, leaves_torch, leaves64, strict=True):
        assert_close(name, leaf.grad, leaf_torch.grad, leaf64.grad, torch.float32)

    (q, k, v), (dq, _, _), _ = attention_inputs((1, 2, 37, 20, 32), torch.float32, seed=10)
    inputs_d = [on_device(t, torch.float32) for t in (q, k, v, dq)]
    o, do = api.attention_jvp(*inputs_d, backend="cuda")
    o_ref, do_ref = attention_jvp_reference(q, k, v, dq, None, None, 32**-0.5)
    o_torch, do_torch = attention_jvp_reference(*inputs_d, None, None, 32**-0.5)
    assert_close("o", o, o_torch, o_ref, torch.float32)
    assert_close("do", do, do_torch, do_ref, torch.float32)


def test_launches_follow_the_current_stream_and_capture_in_a_cuda_graph():
    """Every launcher captured in a CUDA graph (capture fails on a launch to another stream or a host
    synchronisation) replays to exactly the eager results (the kernels are deterministic)."""
    generator = torch.Generator().manual_seed(11)
    x, dx, grad_y = (on_device(rounded((2, 64, 8, 8), torch.float16, generator), torch.float16) for _ in range(3))
    scale = on_device(rounded((2, 64), torch.float16, generator), torch.float16)
    (q, k, v), (dq, dk, dv), grad_o = attention_inputs((2, 2, 300, 20, 64), torch.bfloat16, seed=12)
    q, k, v, dq, dk, dv, grad_o = (on_device(t, torch.bfloat16) for t in (q, k, v, dq, dk, dv, grad_o))
    u, du, vv, v_target, t, r = loss_inputs((3, 4, 8, 8), torch.float32, seed=13)
    u, du, vv, v_target = (on_device(tensor, torch.float32) for tensor in (u, du, vv, v_target))
    t, r = on_device(t, torch.float32), on_device(r, torch.float32)
    grad_total = torch.tensor(GRAD_TOTAL, device=DEVICE)

    def run_all():
        y, dy, mean, rstd = cuda_group_norm.gn_act_jvp_fwd(x, dx, 32, None, None, scale, None, None, None, EPS, "silu")
        gn_grads_ = cuda_group_norm.gn_act_bwd(grad_y, x, 32, None, None, scale, None, mean, rstd, "silu")
        o, do, lse = cuda_attention.attention_jvp_fwd(q, k, v, dq, dk, dv, 0.125)
        attention_grads_ = cuda_attention.attention_bwd(grad_o, q, k, v, o, lse, 0.125)
        loss_u, loss_v, w_u, w_v, _ = cuda_loss.imf_loss_fwd(u, du, vv, v_target, t, r, 0.01, 1.0)
        loss_grads = cuda_loss.imf_loss_bwd(grad_total, u, du, vv, v_target, t, r, w_u, w_v)
        outputs = [y, dy, mean, rstd, gn_grads_[0], gn_grads_[3], o, do, lse, *attention_grads_]
        return [*outputs, loss_u, loss_v, w_u, w_v, *loss_grads]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_all()
    graph.replay()
    torch.cuda.synchronize()
    for index, (expected, replayed) in enumerate(zip(eager, captured, strict=True)):
        assert torch.equal(expected, replayed), f"output {index} differs between eager and graph replay"


EXTENSION_ERRORS = """
import torch
from imf_kernels.cuda import _common
C = _common.extension()
x = torch.randn(2, 8, 32, 32, device="cuda")
y = torch.empty_like(x)
args = (x, None, None, None, None, None, None, None)
for groups, kernel in ((3, 0), (1, 3)):  # C=8 not divisible by 3; a warp refused (2048 16-byte chunks per group)
    mean, rstd = (torch.empty(2, groups, device="cuda") for _ in range(2))
    try:
        C.group_norm_act_fwd(*args, groups, 1e-5, True, y, None, mean, rstd, kernel)
    except ValueError as error:
        print("ValueError:", error)
"""


def test_checks_inside_the_extension_raise_value_errors():
    """A check in csrc/bindings.cpp reaches Python as a ValueError on the real build, not a crash (run in a child
    process, so a crash is a failure with its exit status): bench/tune_gpu.py died of a segmentation fault on an
    H100 (2026-11-27) in the forward of a GroupNorm kernel kind the extension refuses."""
    child = subprocess.run([sys.executable, "-c", EXTENSION_ERRORS], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stdout}{child.stderr}"
    lines = child.stdout.splitlines()
    assert len(lines) == 2, child.stdout + child.stderr
    assert "num_groups=3 must divide C=8" in lines[0]
    assert "the warp kernels need the vector path" in lines[1] and "at most 128 per group" in lines[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 256, 32, 32, 32), (1, 16, 32, 32, 1)], ids=gn_id)
def test_group_norm_resident_kind_on_its_largest_groups(shape, dtype, poisoned, monkeypatch):
    """The block-per-group resident kernels with 4 chunks per thread and 512 threads, which the launch rule leaves
    to the looped ones since 2026-11-27 (an H200 timed those faster on groups over 512 chunks): a "resident" request
    still runs them (bench/tune_gpu.py times them), in parity; fp32 B1C16G1 (4096 chunks) is refused by name."""
    monkeypatch.setattr(cuda_group_norm, "pick_kernel", lambda *_: "resident")
    if dtype == torch.float32 and shape[1] == 16:
        x = torch.randn(shape[:4], device=DEVICE)
        with pytest.raises(ValueError, match="the resident kernels need the vector path .* at most 2048 per group"):
            cuda_group_norm.gn_act_fwd(x, shape[4], None, None, None, None, 1e-5, "silu")
        return
    check_gn_jvp(shape, "full-silu", dtype)
    check_gn_backward(shape, "full-silu", dtype)


# ------------------------------------------------------------------------------------------ compute-sanitizer


def run_small_cases() -> None:
    """One small case of every kernel variant (dtype x vector/scalar path x primal/tangent/backward)."""
    for dtype in DTYPES:
        # looped kernels on the scalar path, resident ones a warp per group, a block per group (bf16 / fp16; fp32:
        # looped, 1024 chunks)
        for shape in (GN_SHAPES[0], GN_SHAPES[1], (1, 128, 16, 16, 8)):
            check_gn_forward(shape, "full-silu", dtype)
            check_gn_jvp(shape, "full-silu", dtype)
            check_gn_backward(shape, "full-silu", dtype)
        for shape in ((1, 2, 37, 20, 32), (1, 1, 9, 33, 64), (1, 1, 5, 64, 128)):
            check_attention_forward(shape, dtype)
            check_attention_jvp(shape, dtype)
            check_attention_backward(shape, dtype)
        check_attention_forward((1, 1, 9, 33, 64), dtype, make_misaligned=True)
        check_attention_backward((1, 1, 9, 33, 64), dtype, make_misaligned=True)
        for shape in (LOSS_SHAPES[0], LOSS_SHAPES[1]):
            check_imf_loss(shape, dtype, 0.01, 1.0)
            check_meanflow_loss(shape, dtype, 0.01, 1.0)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(tool):
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).is_file():
        pytest.skip("compute-sanitizer not found (CUDA toolkit)")
    command = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, __file__]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"compute-sanitizer {tool}:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


if __name__ == "__main__":
    COMPARE_WITH_TRITON = False
    _common.empty = nan_empty  # poison here too: the sanitizer run checks the same writes
    run_small_cases()
    print("all small cases passed")
