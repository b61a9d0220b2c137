"""Triton attention launchers (imf_kernels/triton/attention.py) against a float64 reference.

o, lse and the tangent do come from the forward launchers, (dq, dk, dv) from the backward one; the reference
is softmax attention in float64, its tangent by `torch.func.jvp`, its gradient by autograd. Each check asserts
    max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + ATOL[dtype]
Tolerances per backend: under TRITON_INTERPRET=1 (CPU, CI) tl.dot is exact fp32, so the fp32 floor is tight;
on a GPU fp32 dots run as TF32 (10-bit mantissa) while PyTorch's fp32 matmul does not, so GPU fp32 gets the
TF32 floor below. Outputs the launcher allocates are NaN-poisoned first (torch.empty/empty_like patched).
"""

import pytest
import torch

from imf_kernels.triton import attention as attn

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Fixed floors added to 2x PyTorch's same-dtype error (max abs error; inputs and outputs are O(1)). float32 runs
# fp32-accurate tf32x3 dots on a GPU (the module's DOT_PRECISION; 1e-2 here assumed one TF32 pass): the public-op
# GPU tests of these kernels passed the H200 leases at 1e-5 (tests/test_attention.py before its relative floors).
ATOL = {torch.float32: 1e-5 if ON_GPU else 5e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = GPU_DTYPES if ON_GPU else CPU_DTYPES

# (B, H, Lq, Lk, D, path): "single" and "loop" are what the launchers pick by themselves (asserted);
# "loop16" forces the online-softmax KV loop with 16-key tiles and 32-row query tiles, so a 20- or 24-token
# context takes two KV iterations and the rescaling runs.
CASES = [
    (1, 2, 37, 20, 32, "single"),
    (2, 1, 65, 4, 64, "single"),
    (2, 2, 37, 77, 64, "loop"),
    (1, 1, 65, 77, 32, "loop"),
    (2, 1, 37, 20, 64, "loop16"),
    (1, 2, 65, 24, 32, "loop16"),
    (1, 1, 37, 20, 16, "single"),  # the smallest head dim (its own tiles' dot K = 16)
    (1, 1, 33, 77, 128, "loop"),  # the largest: its own tile table; the jvp loops at any context
]
FORCED_LOOP = attn.BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)


def case_id(case) -> str:
    B, H, Lq, Lk, D, path = case
    return f"B{B}H{H}-Lq{Lq}-Lk{Lk}-D{D}-{path}"


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every floating tensor made by torch.empty / torch.empty_like while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def reference_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def reference_jvp(q, k, v, dq, dk, dv, scale):
    """(o, do, lse) with zero tangents where dk / dv are None, in the inputs' dtype."""
    dk = torch.zeros_like(k) if dk is None else dk
    dv = torch.zeros_like(v) if dv is None else dv
    o, do = torch.func.jvp(lambda a, b, c: reference_attention(a, b, c, scale), (q, k, v), (dq, dk, dv))
    lse = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)
    return o, do, lse


def reference_grads(grad_o, q, k, v, scale):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    reference_attention(*leaves, scale).backward(grad_o)
    return [x.grad for x in leaves]


def random_inputs(case, dtype, generator):
    B, H, Lq, Lk, D, _ = case
    shapes = [(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)]
    primal = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    tangent = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    # Inputs are rounded to `dtype` once; the float64 reference sees exactly the rounded values.
    primal = [x.to(dtype).to(torch.float64) for x in primal]
    tangent = [x.to(dtype).to(torch.float64) for x in tangent]
    return primal, tangent


def to_device(tensors, dtype):
    return [None if x is None else x.to(device=DEVICE, dtype=dtype) for x in tensors]


def max_error(value, reference) -> float:
    return (value.detach().to("cpu", torch.float64) - reference).abs().max().item()


def assert_close(name, value, torch_value, reference, dtype):
    assert torch.isfinite(value).all(), f"{name}: non-finite values (poisoned output not written?)"
    kernel_error = max_error(value, reference)
    torch_error = max_error(torch_value, reference)
    bound = 2 * torch_error + ATOL[dtype]
    assert kernel_error <= bound, f"{name}: error {kernel_error:.3g} > 2 * {torch_error:.3g} + {ATOL[dtype]}"


def check_path(case, dtype, kind):
    """The launcher picks the path the case names; returns the config to force, or None for the launcher's."""
    _, _, Lq, Lk, D, path = case
    if path == "loop16":
        return FORCED_LOOP
    if kind in ("fwd", "jvp"):
        assert attn.pick_config(kind, Lq, Lk, D, dtype).single_tile == (path == "single")
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype, poisoned):
    generator = torch.Generator().manual_seed(1)
    (q, k, v), _ = random_inputs(case, dtype, generator)
    scale = case[4] ** -0.5
    cfg = check_path(case, dtype, "fwd")
    qd, kd, vd = to_device((q, k, v), dtype)
    if cfg is None:
        o, lse = attn.attention_fwd(qd, kd, vd, scale)
    else:
        o, _, lse = attn._launch_fwd(qd, kd, vd, None, None, None, scale, cfg)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    o_ref = reference_attention(q, k, v, scale)
    lse_ref = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)
    qt, kt, vt = to_device((q, k, v), dtype)
    assert_close("o", o, reference_attention(qt, kt, vt, scale), o_ref, dtype)
    lse_torch = torch.logsumexp(scale * qt @ kt.transpose(-1, -2), dim=-1)
    assert_close("lse", lse, lse_torch, lse_ref, dtype)


def run_jvp_case(case, dtype, tangents):
    generator = torch.Generator().manual_seed(2)
    (q, k, v), (dq, dk, dv) = random_inputs(case, dtype, generator)
    dk = dk if "dk" in tangents else None
    dv = dv if "dv" in tangents else None
    scale = case[4] ** -0.5
    cfg = check_path(case, dtype, "jvp")
    inputs = to_device((q, k, v, dq, dk, dv), dtype)
    if cfg is None:
        o, do, lse = attn.attention_jvp_fwd(*inputs, scale)
    else:
        o, do, lse = attn._launch_fwd(*inputs, scale, cfg)
    assert o.dtype == dtype and do.dtype == dtype and lse.dtype == torch.float32
    o_ref, do_ref, lse_ref = reference_jvp(q, k, v, dq, dk, dv, scale)
    o_torch, do_torch, lse_torch = reference_jvp(*inputs, scale)
    assert_close("o", o, o_torch, o_ref, dtype)
    assert_close("do", do, do_torch, do_ref, dtype)
    assert_close("lse", lse, lse_torch, lse_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jvp_forward_matches_reference(case, dtype, poisoned):
    run_jvp_case(case, dtype, tangents=("dk", "dv"))


@pytest.mark.parametrize("tangents", [(), ("dk",), ("dv",)], ids=["dq-only", "dq-dk", "dq-dv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=case_id)
def test_jvp_forward_with_zero_tangents(case, dtype, tangents, poisoned):
    """dk / dv None mean zero tangents (constexpr flags, nothing allocated)."""
    run_jvp_case(case, dtype, tangents)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(case, dtype, poisoned):
    generator = torch.Generator().manual_seed(3)
    (q, k, v), (grad_o, _, _) = random_inputs(case, dtype, generator)
    scale = case[4] ** -0.5
    cfg = check_path(case, dtype, "bwd")
    qd, kd, vd, grad_od = to_device((q, k, v, grad_o), dtype)
    o, lse = attn.attention_fwd(qd, kd, vd, scale)
    if cfg is None:
        grads = attn.attention_bwd(grad_od, qd, kd, vd, o, lse, scale)
    else:
        grads = attn._launch_bwd(grad_od, qd, kd, vd, o, lse, scale, cfg, cfg)
    references = reference_grads(grad_o, q, k, v, scale)
    torch_grads = reference_grads(grad_od, qd, kd, vd, scale)
    for name, grad, torch_grad, reference in zip(("dq", "dk", "dv"), grads, torch_grads, references, strict=True):
        assert grad.dtype == dtype and grad.shape == reference.shape
        assert_close(name, grad, torch_grad, reference, dtype)


# ---- block configurations: the GPU's rules, asserted on every machine ----


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", attn.HEAD_DIMS)
def test_picked_configs_obey_gpu_rules(D, dtype):
    for kind in ("fwd", "jvp", "bwd_dkdv", "bwd_dq"):
        for Lq in (1, 37, 64, 1024):
            for Lk in (1, 4, 20, 24, 64, 65, 77, 256, 4096):
                cfg = attn.pick_config(kind, Lq, Lk, D, dtype)
                attn.check_config(cfg, D, Lk)
                for block in (cfg.block_m, cfg.block_n):
                    assert block >= 16 and block & (block - 1) == 0, (kind, Lq, Lk, D, cfg)
                # single tile exactly when the padded context fits the table's single-tile limit (fp32 pads to
                # 32, so fp32 D=128 jvp, limit 16, always loops: its single tile spills)
                fp32 = dtype == torch.float32
                limit = (attn._TILES.get((kind, D, fp32)) or attn._TILES[(kind[:3], D, fp32)])[3]
                padded = attn.padded_length(Lk, dtype)
                assert cfg.single_tile == (kind in ("fwd", "jvp") and padded <= limit), (kind, Lk, cfg)
                assert not cfg.single_tile or Lk <= cfg.block_n
                assert cfg == attn.pick_config(kind, Lq, Lk, D, dtype)  # deterministic


def test_preset_shapes_take_the_expected_paths():
    bf16, fp32 = torch.bfloat16, torch.float32
    # latent-b cross-attention: 20/24 context tokens padded to one 32-key tile, no KV loop.
    assert attn.pick_config("jvp", 1024, 20, 64, bf16) == attn.BlockConfig(64, 32, 4, 1, single_tile=True)
    assert attn.pick_config("fwd", 256, 24, 64, fp32) == attn.BlockConfig(64, 32, 8, 1, single_tile=True)
    # self-attention at 16x16 loops over KV tiles.
    assert attn.pick_config("jvp", 256, 256, 64, bf16) == attn.BlockConfig(64, 32, 4, 2)
    assert attn.pick_config("jvp", 64, 64, 64, bf16) == attn.BlockConfig(64, 32, 4, 2)
    # fp32 runs tf32x3 dots (split operands): the narrowest tiles.
    assert attn.pick_config("jvp", 256, 256, 64, fp32) == attn.BlockConfig(16, 16, 4, 2)
    assert attn.pick_config("bwd_dkdv", 1024, 24, 64, bf16) == attn.BlockConfig(64, 32, 4, 2)


@pytest.mark.parametrize(
    "cfg, D, Lk, message",
    [
        (attn.BlockConfig(64, 8, 4, 2), 64, 77, "BLOCK_N=8 < 16: every tl.dot dimension must be >= 16"),
        (attn.BlockConfig(8, 32, 4, 2), 64, 77, "BLOCK_M=8 < 16"),
        (attn.BlockConfig(48, 32, 4, 2), 64, 77, "BLOCK_M=48 is not a power of two"),
        (attn.BlockConfig(64, 32, 4, 2), 8, 77, "head dim D=8 < 16"),
        (
            attn.BlockConfig(64, 32, 4, 1, single_tile=True),
            64,
            40,
            "single-tile path needs Lk=40 <= BLOCK_N=32",
        ),
    ],
)
def test_check_config_rejects_what_a_gpu_rejects(cfg, D, Lk, message):
    with pytest.raises(ValueError, match=message):
        attn.check_config(cfg, D, Lk)


def test_launchers_assert_gpu_rules_before_launching():
    q = torch.randn(1, 1, 20, 32, device=DEVICE)
    k = torch.randn(1, 1, 12, 32, device=DEVICE)
    tiny = attn.BlockConfig(16, 8, 4, 2)
    with pytest.raises(ValueError, match="BLOCK_N=8 < 16"):
        attn._launch_fwd(q, k, k, q, None, None, 0.1, tiny)
    lse = torch.zeros(1, 1, 20, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_N=8 < 16"):
        attn._launch_bwd(q, q, k, k, q, lse, 0.1, tiny, attn.BlockConfig(16, 16, 4, 2))
    with pytest.raises(ValueError, match="head dim D=8"):
        attn.pick_config("fwd", 20, 12, 8, torch.float32)


def test_not_supported_reasons():
    def args(Lk=20, D=64, dtype=torch.float32):
        q = torch.randn(1, 2, 5, D, device=DEVICE).to(dtype)
        k = torch.randn(1, 2, Lk, D, device=DEVICE).to(dtype)
        return {"q": q, "k": k, "v": k, "dq": q, "dk": None, "dv": None, "scale": None}

    assert attn.not_supported_reasons("attention", args()) == []
    assert attn.not_supported_reasons("attention_jvp", args(Lk=4096, D=16)) == []
    assert attn.not_supported_reasons("attention", args(D=48)) == [
        "attention: head dim D=48 not in (16, 32, 64, 128) supported by triton"
    ]
    assert attn.not_supported_reasons("attention_jvp", args(Lk=5000)) == [
        "attention_jvp: Lk=5000 > 4096 supported by triton"
    ]
    assert attn.not_supported_reasons("attention", args(Lk=0)) == [
        "attention: empty sequence (Lq=5, Lk=0) not supported by triton"
    ]
    many_heads = {"q": torch.empty(70000, 1, 1, 16, device=DEVICE), "k": torch.empty(70000, 1, 3, 16, device=DEVICE)}
    assert attn.not_supported_reasons("attention", many_heads) == [
        "attention: B * H = 70000 > 65535 supported by triton"
    ]
    assert attn.not_supported_reasons("group_norm_act", args()) == ["group_norm_act: not an attention op"]
    bf16_reasons = attn.not_supported_reasons("attention", args(dtype=torch.bfloat16))
    if ON_GPU:
        assert bf16_reasons == []
    else:
        assert len(bf16_reasons) == 1 and "torch.bfloat16 not supported by the Triton interpreter" in bf16_reasons[0]


def test_aot_specs_cover_every_launch_for_the_presets():
    specs = attn.aot_specs()
    for spec in specs:
        assert set(spec) == {
            "name",
            "fn",
            "signature",
            "constexprs",
            "num_warps",
            "num_stages",
            "divisible_by_16",
        }
        assert list(spec["signature"]) == spec["fn"].arg_names
        assert all(spec["signature"][arg] == "constexpr" for arg in spec["constexprs"])
        assert set(spec["divisible_by_16"]) <= {a for a, t in spec["signature"].items() if t[0] in "*i"}
    # Every config the launchers pick for a preset shape has its spec (bf16 and fp32; fp16 tiles = bf16).
    keys = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "SINGLE_TILE", "TANGENT", "HAS_DK", "HAS_DV", "DOT_PRECISION")
    picked = {
        (s["name"], s["signature"].get("Q", s["signature"].get("O")))
        + tuple(s["constexprs"][key] for key in keys if key in s["constexprs"])
        for s in specs
    }
    for Lq, Lk, D in attn.AOT_SHAPES:
        for dtype, ptr in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            cfg = attn.pick_config("jvp", Lq, Lk, D, dtype)
            assert (
                "attn_jvp",
                ptr,
                D,
                cfg.block_m,
                cfg.block_n,
                cfg.single_tile,
                True,
                False,
                True,
                attn.dot_precision(dtype, "highest"),
            ) in picked
            cfg = attn.pick_config("bwd_dq", Lq, Lk, D, dtype)
            for precision in attn.FP32_DOT_PRECISIONS if dtype == torch.float32 else ("tf32",):
                assert ("attn_bwd_dq", ptr, D, cfg.block_m, cfg.block_n, precision) in picked
    names = {s["name"] for s in specs}
    assert names == {"attn_fwd", "attn_jvp", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"}
    # the model's layouts, specialised as the JIT does (a stride of 1 is a constexpr): q channels-first (unit stride
    # along the pixels); k and v channels-first for self-attention (unit stride along the keys) and contiguous for
    # the context's tokens (unit stride along d)
    units = set()
    for spec in (s for s in specs if s["name"] in ("attn_fwd", "attn_jvp")):
        assert spec["constexprs"]["stride_qm"] == 1 and spec["signature"]["stride_qd"] == "i32"
        unit = [arg for arg, value in spec["constexprs"].items() if arg.startswith("stride_k") and value == 1]
        units.add(tuple(unit))
    assert units == {("stride_kn",), ("stride_kd",)}
    assert {s["constexprs"].get("SINGLE_TILE") for s in specs if s["name"] == "attn_jvp"} == {True, False}


def test_fp32_pads_short_sequences_to_32():
    """fp32 (tf32x3 dots) never takes a 16-wide tile for a short sequence: triton 3.6's backward over one
    16-key tile made an illegal memory access on an H200; bf16 keeps 16."""
    for kind in ("fwd", "jvp", "bwd_dkdv", "bwd_dq"):
        assert attn.pick_config(kind, 65, 4, 64, torch.float32).block_n == 32
        assert attn.pick_config(kind, 65, 4, 64, torch.bfloat16).block_n == 16
    assert attn.pick_config("fwd", 1, 64, 64, torch.float32).block_m == 32


def test_fp32_dots_follow_torch_float32_matmul_precision():
    """fp32-accurate tf32x3 under PyTorch's default "highest"; one TF32 pass once the user allows TF32."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert attn.dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert attn.dot_precision(torch.float32) == "tf32"
        assert attn.dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
