"""The cuda backend's kernels (csrc/) on this CPU, through the CUDA emulator (tests/cuda_emulator.py): the checks of
tests/test_cuda_ops.py (float64 references, 2x PyTorch's same-dtype error, NaN-poisoned outputs, odd shapes,
the scalar and the vector path), run on CPU tensors, so CI tests every kernel change without a GPU. The GPU runs
the same checks for real (`gpu` tests); what only a GPU shows (speed, memory ordering, compiler bugs) stays there.

Also the emulator's own contract: exact warp-operation results, and the misuses it refuses or exposes.
`make test` sets IMF_REQUIRE_CUDA_EMULATOR=1: there a missing toolchain fails instead of skipping.
"""

import os
import sys

import cuda_emulator
import launches
import pytest
import test_attention as attention_tests
import test_cuda_ops as cuda_tests
import test_fused as fused_tests
import test_group_norm as group_norm_tests
import test_loss as loss_tests
import torch

from imf_kernels import dispatch
from imf_kernels.cuda import _common
from imf_kernels.cuda import attention as cuda_attention
from imf_kernels.cuda import group_norm as cuda_group_norm

REASON = cuda_emulator.unavailable_reason()
if REASON is not None and os.environ.get("IMF_REQUIRE_CUDA_EMULATOR") == "1":
    raise RuntimeError(f"IMF_REQUIRE_CUDA_EMULATOR=1 but the CUDA emulator cannot be built: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CUDA emulator: {REASON}")

DTYPES, dtype_id = cuda_tests.DTYPES, cuda_tests.dtype_id


@pytest.fixture
def emulated(monkeypatch):
    """The cuda launchers on the emulated extension, the checks on CPU tensors, every output NaN-poisoned."""
    module = cuda_emulator.use(monkeypatch)
    monkeypatch.setattr(cuda_tests, "DEVICE", "cpu")
    monkeypatch.setattr(cuda_tests, "COMPARE_WITH_TRITON", False)
    monkeypatch.setattr(_common, "empty", cuda_tests.nan_empty)
    return module


# ---------------------------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize("variant", cuda_tests.GN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.GN_SHAPES, ids=cuda_tests.gn_id)
def test_group_norm(shape, dtype, variant, emulated):
    cuda_tests.check_gn_forward(shape, variant, dtype)
    cuda_tests.check_gn_jvp(shape, variant, dtype)
    cuda_tests.check_gn_backward(shape, variant, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.GN_RESIDUAL_SHAPES, ids=cuda_tests.gn_id)
def test_group_norm_backward_adds_a_residual_gradient(shape, dtype, emulated):
    cuda_tests.test_group_norm_backward_adds_a_residual_gradient(shape, dtype, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_group_norm_edge_cases(dtype, emulated):
    """Zero modulation tangents with scale / shift present, and misaligned tensors (the scalar path)."""
    cuda_tests.check_gn_jvp(cuda_tests.GN_SHAPES[1], "full-silu", dtype, with_modulation_tangent=False)
    cuda_tests.check_gn_backward(cuda_tests.GN_SHAPES[1], "full-silu", dtype, make_misaligned=True)


# (B, C, H, W, G) -> the (items per thread, threads, groups per block) of the GroupNorm launch in fp32 and in bf16
# (fp16 alike): items 0 is the looped kernels (256 threads). The rule is csrc/group_norm.cu's group_norm_launch.
LOOPED, WARP = (0, 256, 1), lambda items: (items, 256, 8)
GN_LAUNCHES = {
    (1, 40, 5, 7, 8): (LOOPED, LOOPED),  # H*W = 35: the scalar path
    (2, 64, 8, 8, 32): (WARP(1), WARP(1)),
    (3, 96, 4, 4, 32): (WARP(1), WARP(1)),
    (2, 48, 6, 6, 4): (LOOPED, LOOPED),  # fp32: 9 chunks per channel; bf16: 36 % 8, the scalar path
    (2, 256, 32, 32, 32): (LOOPED, LOOPED),  # 2048 / 1024 chunks in a group: over the rule's 512 for resident
    (1, 128, 16, 16, 8): (LOOPED, (2, 256, 1)),  # fp32 1024 chunks, bf16 512
    (2, 32, 2, 2, 4): (WARP(1), LOOPED),
    (1, 512, 2, 2, 1): ((2, 256, 1), LOOPED),
    (1, 16, 32, 32, 1): (LOOPED, LOOPED),  # fp32: 4096 chunks in a group, bf16 2048
    (2, 128, 8, 8, 16): (WARP(4), WARP(2)),
    (19, 40, 4, 4, 4): (WARP(2), WARP(1)),
}
KIND_CODES = {"auto": 0, "looped": 1, "resident": 2, "warp": 3}


def gn_launches(shape, dtype, rule):
    """The (grid, 1, threads, dynamic shared memory) the forward and the backward launch under `rule`, and the
    backward's second launch where weight or bias is given (their sums over the batch: 8 channels by 32 rows of
    threads per block)."""
    batch, channels, height, width, groups = shape
    items, threads, per_block = rule
    hw, cpg = height * width, channels // groups
    grid = -(-batch * groups // per_block)
    if items:  # two floats per warp segment of a channel's chunks, per group of the block
        chunks_per_channel = hw * dtype.itemsize // 16
        smem = 2 * cpg * chunks_per_channel // min(chunks_per_channel, 32) * 4 * per_block
    else:  # two floats per channel
        smem = 2 * cpg * 4
    return [[grid, 1, threads, 0], [grid, 1, threads, smem], [-(-channels // 8), 1, 256, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.GN_SHAPES, ids=cuda_tests.gn_id)
def test_group_norm_launch_rule(shape, dtype, emulated):
    """The launch rule gives the table's kernels, and the launches are those (grid, threads, shared memory)."""
    batch, channels, height, width, groups = shape
    expected = GN_LAUNCHES[shape][dtype == torch.bfloat16]
    hw, cpg, element_size = height * width, channels // groups, dtype.itemsize
    vectorized = hw % (16 // element_size) == 0
    assert tuple(emulated.group_norm_launch(hw, cpg, element_size, vectorized)) == expected

    x, dx, grad_y = (torch.randn(batch, channels, height, width, dtype=dtype) for _ in range(3))
    emulated.emulator_launches()  # clears the record
    _, _, mean, rstd = cuda_group_norm.gn_act_jvp_fwd(x, dx, groups, None, None, None, None, None, None, 1e-5, "silu")
    cuda_group_norm.gn_act_bwd(grad_y, x, groups, None, None, None, None, mean, rstd, "silu")
    assert emulated.emulator_launches() == gn_launches(shape, dtype, expected)[:2]  # no weight, no bias


@pytest.mark.parametrize("kind", ["looped", "resident", "warp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.GN_SHAPES, ids=cuda_tests.gn_id)
def test_group_norm_kernel_kinds(shape, dtype, kind, emulated, monkeypatch):
    """pick_kernel = one kind (what bench/tune_gpu.py times against the rule's pick): in parity and launched as the
    rule says wherever the kind can take the group; a ValueError naming what it needs where it cannot."""
    batch, channels, height, width, groups = shape
    hw, cpg = height * width, channels // groups
    vectorized = hw % (16 // dtype.itemsize) == 0
    rule = tuple(emulated.group_norm_launch(hw, cpg, dtype.itemsize, vectorized, KIND_CODES[kind]))
    monkeypatch.setattr(cuda_group_norm, "pick_kernel", lambda *_: kind)
    if rule[0] < 0:
        x = torch.randn(batch, channels, height, width, dtype=dtype)
        limit = 2048 if kind == "resident" else 128
        with pytest.raises(ValueError, match=f"the {kind} kernels need the vector path .* at most {limit} per group"):
            cuda_group_norm.gn_act_fwd(x, groups, None, None, None, None, 1e-5, "silu")
        return
    emulated.emulator_launches()
    cuda_tests.check_gn_jvp(shape, "full-silu", dtype)
    cuda_tests.check_gn_backward(shape, "full-silu", dtype)
    forward, backward, parameter_sums = gn_launches(shape, dtype, rule)
    launches = emulated.emulator_launches()  # jvp, then the backward's forward and backward (with weight, bias)
    assert launches == [forward, forward, backward, parameter_sums]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_group_norm_parameter_sums_over_several_steps(dtype, emulated):
    """The backward's batch sums of grad_weight and grad_bias: each of a block's 32 rows of threads loads 8 samples
    a step, so 300 samples take two steps (the second masked), and 20 channels leave the third block of 8 columns
    half empty; in parity with the float64 reference."""
    emulated.emulator_launches()
    cuda_tests.check_gn_backward((300, 20, 2, 3, 4), "full-silu", dtype)
    assert emulated.emulator_launches()[-1] == [3, 1, 256, 0]


@pytest.mark.parametrize(
    "groups, kernel, message",
    [(3, 0, "num_groups=3 must divide C=8"), (1, 3, "the warp kernels need the vector path .* at most 128 per group")],
)
def test_checks_inside_the_extension_raise_value_errors(groups, kernel, message, emulated):
    """The extension's own checks (the launchers refuse a kind first; tests/test_cuda_ops.py runs the same calls on
    the real build in a child process)."""
    x = torch.randn(2, 8, 32, 32)
    y, mean, rstd = torch.empty_like(x), torch.empty(2, groups), torch.empty(2, groups)
    with pytest.raises(ValueError, match=message):
        emulated.group_norm_act_fwd(x, *[None] * 7, groups, 1e-5, True, y, None, mean, rstd, kernel)


def test_group_norm_kernel_kind_must_be_known(emulated, monkeypatch):
    monkeypatch.setattr(cuda_group_norm, "pick_kernel", lambda *_: "fastest")
    with pytest.raises(ValueError, match="pick_kernel returned 'fastest', accepted: 'auto', 'looped', 'resident'"):
        cuda_group_norm.gn_act_fwd(torch.randn(1, 8, 4, 4), 4, None, None, None, None, 1e-5, "silu")


def test_tune_gpu_sweeps_the_cuda_kernel_kinds(emulated):
    """bench/tune_gpu.py --families cuda_group_norm: a row per kind and pass, the launch rule's marked default (the
    emulator's times mean nothing; the rows and their bookkeeping do)."""
    sys.path.insert(0, str(cuda_emulator.REPO_ROOT / "bench"))
    try:
        import tune_gpu
    finally:
        sys.path.pop(0)
    sweep = tune_gpu.Sweep(torch.device("cpu"), budget_s=0.01, copy_gbps=1.0, deadline=None)
    tune_gpu.sweep_cuda_group_norm(sweep, torch.float32, batch=1, shapes=((64, 8),))
    kinds = ("auto", "looped", "resident", "warp")
    assert [(row["pass_"], row["config"], row["default"]) for row in sweep.rows] == [
        (pass_name, kind, kind == "auto") for pass_name in ("fwd", "jvp", "bwd") for kind in kinds
    ]
    assert all(row["ms"] is not None and row["note"] is None for row in sweep.rows)


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.ATTENTION_SHAPES, ids=cuda_tests.attention_id)
def test_attention(shape, dtype, emulated):
    cuda_tests.check_attention_forward(shape, dtype)
    cuda_tests.check_attention_jvp(shape, dtype)
    cuda_tests.check_attention_backward(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_edge_cases(dtype, emulated):
    """An explicit scale, zero key/value tangents, misaligned tensors."""
    cuda_tests.check_attention_forward(cuda_tests.ATTENTION_SHAPES[0], dtype, scale=0.3)
    for tangents in [(), ("dk",), ("dv",)]:
        cuda_tests.check_attention_jvp(cuda_tests.ATTENTION_SHAPES[0], dtype, tangents=tangents)
    cuda_tests.check_attention_forward(cuda_tests.ATTENTION_SHAPES[2], dtype, make_misaligned=True)
    cuda_tests.check_attention_backward(cuda_tests.ATTENTION_SHAPES[2], dtype, make_misaligned=True)


def test_attention_backward_splits_rows_over_blocks(emulated):
    """With the emulator's 4 multiprocessors the backward of most test shapes takes several row splits."""
    split = [s for s in cuda_tests.ATTENTION_SHAPES if cuda_attention.num_splits(s[0] * s[1], s[2], "cpu") > 1]
    assert len(split) >= 4


# ------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("options", cuda_tests.LOSS_OPTIONS, ids=lambda o: f"c{o[0]}-p{o[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", cuda_tests.LOSS_SHAPES, ids=cuda_tests.loss_id)
def test_losses(shape, dtype, options, emulated):
    cuda_tests.check_imf_loss(shape, dtype, *options)
    cuda_tests.check_meanflow_loss(shape, dtype, *options)


def test_bindings_check_their_inputs_in_the_emulated_build(emulated):
    """bindings.cpp's checks run in the emulated build too (there the kernels' device is the CPU)."""
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64)
    y, mean, rstd = torch.empty_like(x), torch.empty(1, 4), torch.empty(1, 4)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Double"):
        emulated.group_norm_act_fwd(x, None, None, None, None, None, None, None, 4, 1e-5, True, y, None, mean, rstd)
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError, match="num_groups=3 must divide C=8"):
        emulated.group_norm_act_fwd(x, None, None, None, None, None, None, None, 3, 1e-5, True, x, None, mean, rstd)
    with pytest.raises(ValueError, match="dx must be a CPU \\(the CUDA emulator\\) tensor, got device meta"):
        emulated.group_norm_act_fwd(
            x, x.to("meta"), None, None, None, None, None, None, 4, 1e-5, True, y.float(), x, mean, rstd
        )
    with pytest.raises(ValueError, match="num_groups=3 must divide C=8"):
        emulated.group_norm_act_fwd(x, None, None, None, None, None, None, None, 3, 1e-5, True, x, None, mean, rstd)


def test_bindings_messages_print_every_kind_of_value(emulated):
    """The checks' messages are built without std::ostream (bindings.cpp's message(): an ostream insertion crashed
    the real build on the GPU image): integers, shapes, dtypes and devices as c10 prints them."""
    x = torch.randn(2, 8, 3, 5)
    mean, rstd = torch.empty(2, 4), torch.empty(2, 4)
    fwd = emulated.group_norm_act_fwd
    with pytest.raises(ValueError) as caught:
        fwd(x, None, None, None, None, None, None, None, 4, 1e-5, True, torch.empty(2, 8, 15), None, mean, rstd)
    assert str(caught.value).startswith("group_norm_act: y must have shape [2, 8, 3, 5], got [2, 8, 15]")
    with pytest.raises(ValueError) as caught:
        fwd(x, None, None, None, None, None, None, None, 4, 1e-5, True, x.half(), None, mean, rstd)
    assert str(caught.value).startswith("group_norm_act: y must be Float, got Half")
    with pytest.raises(ValueError) as caught:
        fwd(x[0], None, None, None, None, None, None, None, 4, 1e-5, True, x, None, mean, rstd)
    assert str(caught.value).startswith("group_norm_act: x must be 4-D (B, C, H, W), got shape [8, 3, 5]")
    big = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError) as caught:
        fwd(big, None, None, None, None, None, None, None, -4, 1e-5, True, big, None, mean, rstd)
    assert str(caught.value).startswith("group_norm_act: num_groups=-4 must divide C=8")


# ----------------------------------------------------- the public ops and the model on backend="cuda"


@pytest.fixture
def emulated_backend(monkeypatch, poison_empty):
    """backend="cuda" takes CPU tensors and runs the emulated kernels (dispatch's cache emptied after)."""
    yield cuda_emulator.use_as_backend(monkeypatch)
    dispatch.clear_cache()


@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("variant", group_norm_tests.VARIANTS)
@pytest.mark.parametrize("shape", group_norm_tests.SHAPES, ids=str)
def test_group_norm_public_ops(shape, variant, dtype, with_tangent, emulated_backend):
    """tests/test_group_norm.py's check of the public op (values, tangent, every gradient by autograd)."""
    group_norm_tests.check_against_reference("cuda", shape, variant, dtype, with_tangent)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("variant", group_norm_tests.VARIANTS)
def test_group_norm_tangent_on_the_first_rows(variant, rows, emulated_backend):
    """TANGENT_ROWS: dx (dscale, dshift) of m < B rows, the jvp kernel on them and the primal one on the rest."""
    group_norm_tests.check_first_rows("cuda", group_norm_tests.SHAPES[2], variant, torch.float32, rows)


@pytest.mark.parametrize("rows", [None, 2, 1], ids=["primal", "jvp", "jvp-first-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_group_norm_return_input(dtype, rows, emulated_backend):
    """return_input=True: the residual branch's gradient added by the backward kernel (tests/test_group_norm.py)."""
    group_norm_tests.test_return_input_adds_the_residual_gradient_in_the_op("cuda", dtype, rows)


@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("variant", attention_tests.VARIANTS)
@pytest.mark.parametrize("shape", [s for s in attention_tests.SHAPES if s[3] <= cuda_attention.MAX_LK], ids=str)
def test_attention_public_ops(shape, variant, dtype, with_tangent, emulated_backend):
    attention_tests.check_against_reference("cuda", shape, variant, dtype, with_tangent)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("variant", attention_tests.VARIANTS)
def test_attention_tangent_on_the_first_rows(variant, rows, emulated_backend):
    attention_tests.check_first_rows("cuda", (3, *attention_tests.SHAPES[0][1:]), variant, torch.float32, rows)


# The public-op tests of tests/test_group_norm.py, test_attention.py and test_loss.py that build CPU tensors, on the
# emulated cuda backend: inside torch.func.jvp and forward AD, one value per group, a large mean, and the losses
# through their autograd Function (on a GPU only the GPU-shape tests reach it).


@pytest.mark.parametrize("mode", ["torch_func_jvp", "forward_ad"])
@pytest.mark.parametrize("tests", [group_norm_tests, attention_tests], ids=["group_norm", "attention"])
def test_primal_ops_under_forward_mode_ad(tests, mode, emulated_backend):
    getattr(tests, f"test_tangent_of_the_primal_op_under_{mode}")("cuda")


@pytest.mark.parametrize("tests", [group_norm_tests, attention_tests], ids=["group_norm", "attention"])
def test_tangent_inputs_get_no_gradient(tests, emulated_backend):
    tests.test_tangent_inputs_get_no_gradient("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", group_norm_tests.ONE_VALUE_SHAPES, ids=str)
def test_group_norm_one_value_per_group(shape, dtype, emulated_backend):
    group_norm_tests.test_one_value_per_group_on_each_backend("cuda", shape, dtype)
    if dtype == torch.float32:
        group_norm_tests.test_one_value_per_group_without_modulation("cuda", shape)


@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
def test_group_norm_large_mean_and_return_input_without_a_graph(with_tangent, emulated_backend):
    group_norm_tests.test_statistics_survive_a_large_mean("cuda", with_tangent)
    if not with_tangent:
        group_norm_tests.test_return_input_without_a_graph_returns_x_itself("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("op", ["imf_loss", "meanflow_loss"])
def test_losses_through_the_public_op(op, dtype, emulated_backend):
    """The losses' autograd Function on the cuda backend: loss, stats, every gradient and none on the constants."""
    for shape in loss_tests.SHAPES:
        for c, p in loss_tests.WEIGHTINGS:
            loss_tests.check_against_reference(op, "cuda", shape, c, p, dtype)
    for shape in loss_tests.TOTALS_SHAPES:
        loss_tests.test_loss_and_stats_are_the_float64_batch_means(op, "cuda", shape)


# kernels each public op launches on backend="cuda" (tests/launches.py: and no torch op that runs a kernel)
CUDA_LAUNCHES = {
    "gn.fwd": 1,
    "gn.jvp": 1,
    "gn.jvp-first-rows": 2,  # the jvp kernel on the tangent's rows, the primal one on the rest
    "gn.bwd": 2,  # grad_weight, grad_bias summed over the batch by a second kernel
    "gn.bwd-no-params": 1,
    "gn.bwd-residual": 2,  # the returned x's gradient added inside the kernel
    "attn.fwd": 1,
    "attn.jvp": 1,
    "attn.bwd": 2,  # grad_k, grad_v summed over the splits of query rows by a second kernel
    "imf_loss.fwd": 2,  # per-sample sums, then the batch totals
    "imf_loss.bwd": 1,
    "mf_loss.fwd": 2,
    "mf_loss.bwd": 1,
}


@pytest.mark.parametrize("name", CUDA_LAUNCHES)
def test_cuda_ops_launch_their_kernels_only(name, monkeypatch):
    """No zero fills, casts or torch reductions next to the kernels: bf16 parameters are read as they are, every
    gradient and total is written by a kernel (each extra launch costs a GPU a few microseconds)."""
    emulated = cuda_emulator.use_as_backend(monkeypatch)
    try:
        calls = launches.op_calls("cuda", torch.bfloat16)
        calls[name]()
        emulated.emulator_launches()  # clears the record
        with launches.recorded() as torch_launches:
            calls[name]()
        assert torch_launches == []
        assert len(emulated.emulator_launches()) == CUDA_LAUNCHES[name]
    finally:
        dispatch.clear_cache()


def test_the_fused_model_on_the_cuda_backend(emulated_backend):
    """tests/test_fused.py's float32 check on backend="cuda": u, du, v, the iMF loss and every parameter gradient
    of the fused path against the float64 reference path (every GroupNorm, attention and loss call on cuda)."""
    fused_tests.check_float32_backend("cuda", fused_tests.tiny_config(width=32, head_dim=32), 3)


# ------------------------------------------------------------------------------------- the emulator itself


def test_warp_operations_give_exact_results(emulated):
    """Per lane: the butterfly sum of the lane ids (496) + 1000 x shfl_down(lane id, 1) (lane 31 keeps its own)
    + 100000 x shfl(2 x lane id, from lane 0)."""
    out = emulated.emulator_warp_ops(64)
    expected = [496 + 1000 * (lane + 1 if lane < 31 else 31) for lane in range(32)] * 2
    assert out == expected


def test_a_missing_barrier_shows_up(emulated):
    """Each thread reads its neighbour's shared-memory slot: with __syncthreads() in between the values, without
    it the NaN the emulator fills shared memory with (the neighbour had not written yet in the turn order)."""
    assert emulated.emulator_neighbour(8, True) == [1, 2, 3, 4, 5, 6, 7, 0]
    without = emulated.emulator_neighbour(8, False)
    assert sum(value != value for value in without) == 7 and without[7] == 0  # NaN != NaN


def test_warps_drift_apart_between_barriers(emulated):
    """Each warp writes its lane-id sum (496 for threads 0-31, 1520 for 32-63) after a shuffle, then every thread
    reads the other warp's slot: with __syncthreads() in between the other sum; without it, warp 0 (released
    first) finds warp 1's slots not yet written (NaN)."""
    assert emulated.emulator_cross_warp(True) == [1520.0] * 32 + [496.0] * 32
    without = emulated.emulator_cross_warp(False)
    assert all(value != value for value in without[:32]) and without[32:] == [496.0] * 32


def test_misuses_are_errors(emulated):
    with pytest.raises(RuntimeError, match="deadlock: block \\(0, 0, 0\\) thread 1"):
        emulated.emulator_deadlock()
    with pytest.raises(RuntimeError, match="different warp operations"):
        emulated.emulator_divergent()
    with pytest.raises(RuntimeError, match="65536 bytes of dynamic shared memory, the kernel may use 49152"):
        emulated.emulator_shared_memory(64 * 1024, 0)
    assert emulated.emulator_shared_memory(64 * 1024, 64 * 1024) == [1.0] * 32  # after opting in
    with pytest.raises(RuntimeError, match="more than the 232448 an H100 allows"):
        emulated.emulator_shared_memory(64 * 1024, 300 * 1024)


def test_a_killed_builds_lock_is_removed_a_running_builds_is_kept(tmp_path):
    """torch's load() waits forever on a lock file a killed build left behind; build() removes one older than
    STALE_LOCK_SECONDS and leaves a younger one (a build running beside it) alone. Each torch version builds in its
    own folder (a module built against another torch does not import)."""
    lock = tmp_path / "lock"
    assert not cuda_emulator.remove_stale_lock(tmp_path)  # no lock
    lock.touch()
    now = lock.stat().st_mtime
    assert not cuda_emulator.remove_stale_lock(tmp_path, now=now + cuda_emulator.STALE_LOCK_SECONDS)
    assert lock.exists()
    with pytest.warns(UserWarning, match="left 16 minutes ago by a build that did not finish"):
        assert cuda_emulator.remove_stale_lock(tmp_path, now=now + cuda_emulator.STALE_LOCK_SECONDS + 60)
    assert not lock.exists()
    assert cuda_emulator.build_dir() == cuda_emulator.BUILD_DIR / f"torch-{torch.__version__}"
