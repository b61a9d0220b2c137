"""attention and attention_jvp on every backend against the float64 reference (DESIGN 4.3, 5).

Each case checks o, do and the gradients dq, dk, dv: the kernel's error against float64 must be at most 2x the
error of the reference computed in the kernel's dtype, plus a small floor. Memory the launchers allocate with
`empty` is NaN-filled (deterministic mode), so an unwritten element fails.
"""

import re

import pytest
import torch

import imf_kernels
from imf_kernels import dispatch, reference

BACKENDS = list(dispatch.BACKENDS)
# (B, H, Lq, Lk, D): Lq not a power of two, cross-attention contexts of 4 and 20 tokens, a 77-token context
# that needs the KV loop, self-attention, batch 1.
SHAPES = [(2, 2, 24, 4, 32), (1, 3, 37, 20, 64), (2, 1, 13, 77, 32), (1, 2, 50, 50, 64)]
# The interpreter is slow: triton gets a short and a long context only.
INTERPRETED_SHAPES = [(1, 2, 24, 20, 32), (1, 1, 13, 77, 64)]
# name -> (scale, tangents on k and v)
VARIANTS = {"default": (None, True), "scaled-dq-only": (0.3, False)}
FLOOR = reference.FLOOR


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
        for shape in INTERPRETED_SHAPES if backend == "triton" else SHAPES:
            for variant in VARIANTS:
                for dtype in (*dtypes, torch.bfloat16) if backend == "torch" else dtypes:
                    yield pytest.param(backend, shape, variant, dtype, id=f"{backend}-{shape}-{variant}-{dtype}")


def make_inputs(shape, dtype, device="cpu"):
    """Fresh random q, k, v and tangents dq, dk, dv."""
    batch, heads, len_q, len_k, head_dim = shape
    sizes = {"q": len_q, "k": len_k, "v": len_k}
    inputs = {name: torch.randn(batch, heads, length, head_dim, device=device) for name, length in sizes.items()}
    inputs.update({"d" + name: torch.randn_like(inputs[name]) for name in sizes})
    return {name: value.to(dtype) for name, value in inputs.items()}


def primal_and_grads(fn, inputs, scale, with_tangent, grad_o, **backend):
    """(o, do or None, {name: gradient}) for one implementation; inputs are copied, never modified."""
    inputs = {name: value.detach().clone() for name, value in inputs.items()}
    leaves = [inputs[name].requires_grad_() for name in ("q", "k", "v")]
    if with_tangent:
        o, do = fn(*leaves, inputs["dq"], inputs.get("dk"), inputs.get("dv"), scale=scale, **backend)
    else:
        o, do = fn(*leaves, scale=scale, **backend), None
    grads = torch.autograd.grad(o, leaves, grad_o.to(o.dtype))
    return o, do, dict(zip(("q", "k", "v"), grads, strict=True))


def gradient_term_scales(inputs64, scale, grad_o) -> dict[str, float]:
    """The magnitude of the terms grad_q and grad_k sum, in float64: each is k (or q) times grad_s = p (grad_p -
    delta), delta = rowsum(p grad_p), a difference that cancels to far below its terms (with one key, to 0). Their
    rounding is the floor's scale (`reference.check_parity`), not the small result's."""
    q, k, v = inputs64["q"], inputs64["k"], inputs64["v"]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    grad_p = grad_o.double() @ v.transpose(-1, -2)
    delta = (p * grad_p).sum(-1, keepdim=True)
    terms = abs(scale) * p * (grad_p.abs() + delta.abs())
    return {
        "q": (terms @ k.abs()).max().item(),
        "k": (terms.transpose(-1, -2) @ q.abs()).max().item(),
    }


def tangent_term_scale(q, k, v, dq=None, dk=None, dv=None, scale=None) -> float:
    """The magnitude of the terms do sums, in float64: do = p (ds - rowsum(p ds)) v + p dv, ds = scale (dq k^T +
    q dk^T), a difference that cancels (|do| ~4 of terms ~22 at Lq = Lk = 50, D = 64, scale 0.3). Any float32 p
    is off by a few ulps (the torch backend's and PyTorch's alike), which ds and v multiply: the floor's scale is
    the terms', not |do| (at |do|'s, the torch backend failed 1 seed in 300 at 1.4x the allowed error, its p by
    chance 2x further from float64 than PyTorch's in the worst row; with this scale that seed is at 0.45)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = next(t.shape[0] for t in (dq, dk, dv) if t is not None)
    q, k, v = q[:rows], k[:rows], v[:rows]
    p = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    ds = torch.zeros_like(p)
    if dq is not None:
        ds = ds + scale * dq @ k.transpose(-1, -2)
    if dk is not None:
        ds = ds + scale * q @ dk.transpose(-1, -2)
    delta = (p * ds).sum(-1, keepdim=True)
    terms = (p * (ds.abs() + delta.abs())) @ v.abs()
    if dv is not None:
        terms = terms + p @ dv.abs()
    return terms.max().item()


def check_against_reference(backend, shape, variant, dtype, with_tangent, device="cpu"):
    scale, key_tangents = VARIANTS[variant]
    inputs = make_inputs(shape, dtype, device)
    if not key_tangents:
        del inputs["dk"], inputs["dv"]
    op = "attention_jvp" if with_tangent else "attention"
    args = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "scale": scale}
    if with_tangent:
        args.update(dq=inputs["dq"], dk=inputs.get("dk"), dv=inputs.get("dv"))
    skip_unless_runs(backend, op, args)

    grad_o = torch.randn(inputs["q"].shape, device=device)
    kernel_fn = imf_kernels.attention_jvp if with_tangent else imf_kernels.attention
    reference_fn = reference.attention_jvp if with_tangent else reference.attention
    kernel = primal_and_grads(kernel_fn, inputs, scale, with_tangent, grad_o, backend=backend)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = primal_and_grads(reference_fn, inputs64, scale, with_tangent, grad_o)
    baseline = primal_and_grads(reference_fn, inputs, scale, with_tangent, grad_o)

    # fp32 runs full-precision dots on a GPU too (input_precision="ieee"), so one floor per dtype everywhere.
    floor = FLOOR[dtype]
    assert kernel[0].dtype == dtype
    reference.check_parity("o", kernel[0], truth[0], baseline[0], floor)
    if with_tangent:
        assert kernel[1].dtype == dtype and not kernel[1].requires_grad
        do_scale = tangent_term_scale(*(inputs64.get(n) for n in ("q", "k", "v", "dq", "dk", "dv")), scale)
        reference.check_parity("do", kernel[1], truth[1], baseline[1], floor, scale=do_scale)
    term_scales = gradient_term_scales(inputs64, scale, grad_o)
    for name, grad in kernel[2].items():
        assert grad.dtype == dtype, name
        reference.check_parity(
            f"grad_{name}", grad, truth[2][name], baseline[2][name], floor, scale=term_scales.get(name)
        )


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype"), cases((torch.float32, torch.float16)))
def test_attention_matches_reference(backend, shape, variant, dtype):
    check_against_reference(backend, shape, variant, dtype, with_tangent=False)


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype"), cases((torch.float32, torch.float16)))
def test_attention_jvp_matches_reference(backend, shape, variant, dtype):
    check_against_reference(backend, shape, variant, dtype, with_tangent=True)


STRIDED_SHAPE = (2, 2, 24, 20, 32)  # (B, H, Lq, Lk, D)


def strided_inputs(dtype=torch.float32, kv_layout="tokens"):
    """q, dq as transposed views of (B, H, D, Lq) tensors (a channels-first feature map's pixels) and k, v, dk, dv
    as views of token-major (B, Lk, 2, H, D) tensors (a linear's output; kv_layout="tokens", cross-attention) or
    of channels-first (B, 2, H, D, Lk) ones (kv_layout="channels", self-attention on the map), with the leaves
    they are views of."""
    batch, heads, len_q, len_k, head_dim = STRIDED_SHAPE
    kv_shape = (batch, len_k, 2, heads, head_dim) if kv_layout == "tokens" else (batch, 2, heads, head_dim, len_k)
    leaves = {
        "q": torch.randn(batch, heads, head_dim, len_q, dtype=dtype),
        "kv": torch.randn(kv_shape, dtype=dtype),
        "dq": torch.randn(batch, heads, head_dim, len_q, dtype=dtype),
        "dkv": torch.randn(kv_shape, dtype=dtype),
    }

    def views(leaves):
        if kv_layout == "tokens":
            k, v = leaves["kv"].permute(2, 0, 3, 1, 4).unbind(0)
            dk, dv = leaves["dkv"].permute(2, 0, 3, 1, 4).unbind(0)
        else:
            k, v = leaves["kv"].transpose(-1, -2).unbind(1)
            dk, dv = leaves["dkv"].transpose(-1, -2).unbind(1)
        return leaves["q"].transpose(-1, -2), k, v, leaves["dq"].transpose(-1, -2), dk, dv

    return leaves, views


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
@pytest.mark.parametrize("kv_layout", ["tokens", "channels"])
def test_strided_inputs_match_the_reference(backend, with_tangent, kv_layout):
    """q, k, v (and tangents) as transposed and permuted views, and grad_o a transposed view too (the gradient of
    a channels-first map's view): every backend takes them (those with STRIDED_INPUTS as they are, the others
    after a copy the op makes) and returns the reference's o, do and gradients."""
    leaves, views = strided_inputs(kv_layout=kv_layout)
    q, k, v, dq, dk, dv = views(leaves)
    assert not any(tensor.is_contiguous() for tensor in (q, k, v, dq, dk, dv))
    op = "attention_jvp" if with_tangent else "attention"
    skip_unless_runs(backend, op, dict(q=q, k=k, v=v, dq=dq, dk=dk, dv=dv, scale=None))
    grad_o = torch.randn(q.shape[:2] + q.shape[2:][::-1]).transpose(-1, -2)

    def run(fn, leaves, **backend_arg):
        leaves = {name: value.detach().clone().requires_grad_(name in ("q", "kv")) for name, value in leaves.items()}
        q, k, v, dq, dk, dv = views(leaves)
        o, do = fn(q, k, v, dq, dk, dv, **backend_arg) if with_tangent else (fn(q, k, v, **backend_arg), None)
        return o, do, torch.autograd.grad(o, (leaves["q"], leaves["kv"]), grad_o.to(o.dtype))

    kernel_fn = imf_kernels.attention_jvp if with_tangent else imf_kernels.attention
    reference_fn = reference.attention_jvp if with_tangent else reference.attention
    kernel = run(kernel_fn, leaves, backend=backend)
    truth = run(reference_fn, {name: value.double() for name, value in leaves.items()})
    baseline = run(reference_fn, leaves)
    floor = FLOOR[torch.float32]
    reference.check_parity("o", kernel[0], truth[0], baseline[0], floor)
    if with_tangent:
        do_scale = tangent_term_scale(*views({name: value.double() for name, value in leaves.items()}))
        reference.check_parity("do", kernel[1], truth[1], baseline[1], floor, scale=do_scale)
    q64, k64, v64 = views({name: value.double() for name, value in leaves.items()})[:3]
    term_scales = gradient_term_scales({"q": q64, "k": k64, "v": v64}, None, grad_o)
    term_scales["kv"] = max(term_scales.pop("k"), truth[2][1].abs().max().item())  # grad_k and grad_v in one
    for name, grad, grad64, grad32 in zip(("q", "kv"), kernel[2], truth[2], baseline[2], strict=True):
        reference.check_parity(f"grad_{name}", grad, grad64, grad32, floor, scale=term_scales[name])
    if backend in ("torch", "triton"):  # outputs laid out like q: back to (B, H * D, Lq) is a view, no copy
        for name, out in (("o", kernel[0]), ("do", kernel[1])):
            if out is not None:
                assert out.transpose(-1, -2).is_contiguous(), name


@pytest.mark.parametrize("limit", [0, 1 << 40], ids=["written-out", "flash"])
def test_torch_forward_on_each_cpu_path(monkeypatch, limit):
    """The torch backend's CPU forward runs ATen's flash kernel up to FLASH_CPU_MAX_WORK and the written-out
    softmax above it: each path on every shape, dtype and layout (its o laid out like q)."""
    from imf_kernels.torch_ops import attention as torch_attention

    monkeypatch.setattr(torch_attention, "FLASH_CPU_MAX_WORK", limit)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float16):
            for variant in VARIANTS:
                check_against_reference("torch", shape, variant, dtype, with_tangent=False)
    for kv_layout in ("tokens", "channels"):
        test_strided_inputs_match_the_reference("torch", with_tangent=False, kv_layout=kv_layout)


def test_torch_cpu_flash_kernel_gets_rows_with_a_contiguous_last_dim(monkeypatch):
    """ATen's CPU flash kernel read a transposed k or v (the channels-first self-attention block's) as if its last
    dim were contiguous in torch 2.11 and 2.13 (o off by ~2; torch 2.14 reads it right) and writes o as if q's were:
    the torch backend hands it q, k and v with a contiguous last dim only, on every layout of the strided test."""
    from imf_kernels.torch_ops import attention as torch_attention

    seen = []

    def flash(q, k, v, scale):
        seen.append(tuple(t.stride(-1) for t in (q, k, v)))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, scale=scale)

    monkeypatch.setattr(torch_attention, "_flash_cpu", flash)
    monkeypatch.setattr(torch_attention, "FLASH_CPU_MAX_WORK", 1 << 40)
    for kv_layout in ("tokens", "channels"):
        test_strided_inputs_match_the_reference("torch", with_tangent=False, kv_layout=kv_layout)
    assert len(seen) == 2 and all(strides == (1, 1, 1) for strides in seen), seen


def first_rows_cases():
    for case in cases((torch.float32, torch.float16)):
        backend, shape, variant, dtype = case.values
        batch = max(shape[0], 2)  # the interpreted shapes have batch 1: widen to 2
        for rows in sorted({1, batch - 1}):
            yield pytest.param(backend, (batch, *shape[1:]), variant, dtype, rows, id=f"{case.id}-B{batch}-rows{rows}")


@pytest.mark.parametrize(("backend", "shape", "variant", "dtype", "rows"), first_rows_cases())
def test_attention_jvp_with_a_tangent_on_the_first_rows(backend, shape, variant, dtype, rows):
    """dq (dk, dv) on the first m < B samples only: o and the gradients are those of the whole batch, do that of
    the first m samples, against the float64 reference of the whole batch (a backend with TANGENT_ROWS takes the
    call as it is, the others through the op's split)."""
    check_first_rows(backend, shape, variant, dtype, rows)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-backend", "strided-backend"])
def test_first_rows_through_the_op_split(monkeypatch, variant, strided):
    """The op's split for backends without TANGENT_ROWS (and, with strided=False, without STRIDED_INPUTS), on
    the torch backend with the flags off."""
    from imf_kernels.torch_ops import attention as torch_attention

    monkeypatch.setattr(torch_attention, "TANGENT_ROWS", False)
    monkeypatch.setattr(torch_attention, "STRIDED_INPUTS", strided)
    check_first_rows("torch", (3, *SHAPES[0][1:]), variant, torch.float32, 2)


def check_first_rows(backend, shape, variant, dtype, rows):
    scale, key_tangents = VARIANTS[variant]
    inputs = make_inputs(shape, dtype)
    if not key_tangents:
        del inputs["dk"], inputs["dv"]
    partial = {name: value[:rows] if name[0] == "d" else value for name, value in inputs.items()}
    args = dict(q=partial["q"], k=partial["k"], v=partial["v"], scale=scale)
    skip_unless_runs(
        backend, "attention_jvp", {**args, "dq": partial["dq"], "dk": partial.get("dk"), "dv": partial.get("dv")}
    )

    grad_o = torch.randn(inputs["q"].shape)
    kernel = primal_and_grads(imf_kernels.attention_jvp, partial, scale, True, grad_o, backend=backend)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = primal_and_grads(reference.attention_jvp, inputs64, scale, True, grad_o)
    baseline = primal_and_grads(reference.attention_jvp, inputs, scale, True, grad_o)
    floor = FLOOR[dtype]
    reference.check_parity("o", kernel[0], truth[0], baseline[0], floor)
    assert kernel[1].shape == (rows, *shape[1:3], shape[4]) and not kernel[1].requires_grad
    do_scale = tangent_term_scale(
        *(inputs64.get(n) for n in ("q", "k", "v")),
        *(None if partial.get(n) is None else partial[n].double() for n in ("dq", "dk", "dv")),
        scale,
    )
    reference.check_parity("do", kernel[1], truth[1][:rows], baseline[1][:rows], floor, scale=do_scale)
    term_scales = gradient_term_scales(inputs64, scale, grad_o)
    for name, grad in kernel[2].items():
        reference.check_parity(
            f"grad_{name}", grad, truth[2][name], baseline[2][name], floor, scale=term_scales.get(name)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_of_the_primal_op_under_torch_func_jvp(backend):
    """torch.func.jvp through attention with a tangent on k only (dq and dv absent) vs the reference."""
    inputs = make_inputs(INTERPRETED_SHAPES[0], torch.float32)
    q, k, v, dk = inputs["q"], inputs["k"], inputs["v"], inputs["dk"]
    skip_unless_runs(backend, "attention", {"q": q, "k": k, "v": v, "scale": None})
    o, do = torch.func.jvp(lambda k: imf_kernels.attention(q, k, v, backend=backend), (k,), (dk,))
    o64, do64 = reference.attention_jvp(q.double(), k.double(), v.double(), torch.zeros_like(q.double()), dk.double())
    o32, do32 = reference.attention_jvp(q, k, v, torch.zeros_like(q), dk)
    reference.check_parity("o", o, o64, o32, FLOOR[torch.float32])
    reference.check_parity("do", do, do64, do32, FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_of_the_primal_op_under_forward_ad(backend):
    """torch.autograd.forward_ad through attention, tangents on q, k and v, vs the reference."""
    inputs = make_inputs(INTERPRETED_SHAPES[0], torch.float32)
    skip_unless_runs(backend, "attention", {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "scale": None})
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(inputs[name], inputs["d" + name]) for name in "qkv"]
        o, do = torch.autograd.forward_ad.unpack_dual(imf_kernels.attention(*duals, backend=backend))
    truth = reference.attention_jvp(*(inputs[name].double() for name in ("q", "k", "v", "dq", "dk", "dv")))
    baseline = reference.attention_jvp(*(inputs[name] for name in ("q", "k", "v", "dq", "dk", "dv")))
    reference.check_parity("o", o, truth[0], baseline[0], FLOOR[torch.float32])
    reference.check_parity("do", do, truth[1], baseline[1], FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_input_comes_out_nan_where_the_reference_has_it(monkeypatch, backend, where):
    """A NaN in one query row makes that row of o (and do) NaN, one in a key or value every row, as in the
    reference; everything else is unchanged. ATen's CPU flash kernel, which the torch backend calls for small
    calls, returned o = 0 for a query row holding a NaN (a silent zero); such a q now takes the written-out path."""
    from imf_kernels.torch_ops import attention as torch_attention

    monkeypatch.setattr(torch_attention, "FLASH_CPU_MAX_WORK", 1 << 40)  # every call a flash candidate
    inputs = make_inputs((1, 2, 24, 4, 32), torch.float32)  # 4 keys: the flash kernel's zeros (20 gave NaN)
    skip_unless_runs(backend, "attention", {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "scale": None})
    inputs[where][0, 1, 3, 5] = float("nan")
    q, k, v, dq, dk, dv = (inputs[name] for name in ("q", "k", "v", "dq", "dk", "dv"))
    truth = reference.attention_jvp(*(t.double() for t in (q, k, v, dq, dk, dv)))
    baseline = reference.attention_jvp(q, k, v, dq, dk, dv)
    got = {
        "attention": (imf_kernels.attention(q, k, v, backend=backend),),
        "attention_jvp": imf_kernels.attention_jvp(q, k, v, dq, dk, dv, backend=backend),
    }
    for op, outputs in got.items():
        for name, out, want, base in zip(("o", "do"), outputs, truth, baseline, strict=False):
            nan = want.isnan()
            assert nan.any() and torch.equal(out.isnan(), nan), (op, name, out.isnan().sum().item(), nan.sum().item())
            if not nan.all():
                keep = ~nan.flatten(0, 2).any(-1)  # the rows without a NaN
                out, want, base = (t.flatten(0, 2)[keep] for t in (out, want, base))
                reference.check_parity(f"{op} {name}", out, want, base, FLOOR[torch.float32])


def test_torch_backend_takes_any_context_length():
    """The CPU path materialises the scores, so a context past every kernel's limit (4096) still runs."""
    q, k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 5000, 16), torch.randn(1, 1, 5000, 16)
    o = imf_kernels.attention(q, k, v, backend="torch")
    reference.check_parity(
        "o", o, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v), 1e-5
    )


# ------------------------------------------------------------------------------------------------ bad input


def qkv(len_q=5, len_k=4, head_dim=8, **overrides):
    tensors = {
        "q": torch.randn(2, 3, len_q, head_dim),
        "k": torch.randn(2, 3, len_k, head_dim),
        "v": torch.randn(2, 3, len_k, head_dim),
    }
    tensors.update(overrides)
    return tensors


BAD_CALLS = [
    ("q rank", lambda: imf_kernels.attention(**qkv(q=torch.randn(3, 5, 8))), "q must be 4-D (B, H, Lq, D)"),
    ("sparse k", lambda: imf_kernels.attention(**qkv(k=torch.randn(2, 3, 4, 8).to_sparse())), "k must be a dense"),
    ("k head dim", lambda: imf_kernels.attention(**qkv(k=torch.randn(2, 3, 4, 16))), "k must have shape"),
    ("v length", lambda: imf_kernels.attention(**qkv(v=torch.randn(2, 3, 6, 8))), "v must have shape"),
    (
        "dtype",
        lambda: imf_kernels.attention(**qkv(k=torch.randn(2, 3, 4, 8, dtype=torch.float16))),
        "k must have the dtype of q",
    ),
    ("empty context", lambda: imf_kernels.attention(**qkv(len_k=0)), "k must not be empty"),
    ("scale", lambda: imf_kernels.attention(**qkv(), scale=-1.0), "scale must be > 0"),
]


@pytest.mark.parametrize(("case", "bad_call", "message"), BAD_CALLS, ids=[case for case, _, _ in BAD_CALLS])
def test_bad_input_raises_a_clear_value_error(case, bad_call, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"attention: {message}")):
        bad_call()


def test_bad_tangent_raises_a_clear_value_error():
    tensors = qkv()
    with pytest.raises(ValueError, match=re.escape("attention_jvp: dk must have shape (m, H, Lk, D) like k")):
        imf_kernels.attention_jvp(**tensors, dq=torch.randn_like(tensors["q"]), dk=torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match=re.escape("attention_jvp: dq must have shape (B, H, Lq, D) like q, or")):
        imf_kernels.attention_jvp(**tensors, dq=torch.randn(3, 3, 5, 8))
    with pytest.raises(ValueError, match=re.escape("m rows like dq = (1, 3, 4, 8), got (2, 3, 4, 8)")):
        imf_kernels.attention_jvp(**tensors, dq=torch.randn(1, 3, 5, 8), dv=torch.randn(2, 3, 4, 8))


def test_a_context_longer_than_a_backend_takes_is_refused_in_words():
    """Lk = 5000 is past DESIGN's 4..4096: a backend named for it either refuses with its reasons in the
    ValueError or computes the right answer; auto (torch on CPU) always computes it."""
    tensors = qkv(len_k=5000, head_dim=32)
    truth = reference.attention(*(tensors[name].double() for name in "qkv"))
    baseline = reference.attention(*(tensors[name] for name in "qkv"))
    reference.check_parity("o", imf_kernels.attention(**tensors), truth, baseline, FLOOR[torch.float32])
    for backend in BACKENDS:
        reasons = dispatch.not_supported_reasons(backend, "attention", {**tensors, "scale": None})
        if reasons:
            with pytest.raises(ValueError, match=f"^attention: backend '{backend}' cannot take this call: "):
                imf_kernels.attention(**tensors, backend=backend)
            with pytest.raises(ValueError) as refusal:
                imf_kernels.attention(**tensors, backend=backend)
            assert all(reason in str(refusal.value) for reason in reasons)
        else:
            o = imf_kernels.attention(**tensors, backend=backend)
            reference.check_parity(f"o ({backend})", o, truth, baseline, FLOOR[torch.float32])


# ------------------------------------------------------------------------------------------------------ GPU

# latent-b: cross-attention to the 20/24 context tokens at 32x32, self-attention at 16x16.
GPU_SHAPES = [(8, 4, 1024, 24, 64), (8, 4, 1024, 20, 64), (8, 4, 256, 256, 64), (1, 3, 37, 77, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
def test_attention_on_gpu(backend, shape, dtype, with_tangent):
    check_against_reference(backend, shape, "default", dtype, with_tangent, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_inputs_get_no_gradient(backend):
    """The stop-gradient contract: dq, dk and dv that require grad get none through o, and do is not
    differentiable."""
    inputs = make_inputs(INTERPRETED_SHAPES[0], torch.float32)
    skip_unless_runs(backend, "attention_jvp", {**inputs, "scale": None})
    leaves = {name: value.clone().requires_grad_() for name, value in inputs.items()}
    o, do = imf_kernels.attention_jvp(*(leaves[name] for name in ("q", "k", "v", "dq", "dk", "dv")), backend=backend)
    assert o.requires_grad and not do.requires_grad
    tangents = [leaves[name] for name in ("dq", "dk", "dv")]
    assert torch.autograd.grad(o.sum(), tangents, allow_unused=True) == (None, None, None)
