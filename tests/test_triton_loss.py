"""Launcher-level parity of the fused Triton iMF and MeanFlow losses (DESIGN 2.2, 2.3) with their formulas
in float64: per-sample losses and weights, the batch totals [mean_b(w L), mean_b L_u (, mean_b L_v)], and the
gradients (autograd of mean_b(stopgrad(w) L)).

The kernel's error must be at most 2x the error of the same formulas run by PyTorch in the kernel's dtype,
plus a small floor.
"""

import contextlib
import zlib

import pytest
import torch

from imf_kernels.triton import loss as triton_loss

HAS_CUDA = torch.cuda.is_available()
# Error floor relative to the largest reference magnitude of each output: a few units in the last place of
# fp32; half a unit (the output's own rounding) of fp16 and bf16 for the gradients, which have that dtype.
FLOOR = {torch.float32: 3e-7, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Odd per-sample sizes smaller than one block, batch 1, several chunks per sample (3072 = 3 x 1024), chunks of
# two blocks with a partial last one (17500 = 8 x 2048 + 1116), and a batch above the finish program's 256.
SHAPES = [(3, 3, 5, 7), (1, 4, 8, 8), (2, 3, 32, 32), (2, 5, 3500), (300, 5)]


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN-filled tensors: every output element must be written."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = lambda *args, **kwargs: poison(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poison(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def make_inputs(shape, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    batch = shape[0]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    t = torch.rand(batch, generator=generator, dtype=torch.float64)
    r = torch.rand(batch, generator=generator, dtype=torch.float64) * t
    r[0] = t[0]  # a flow-matching row: t = r
    if batch > 2:
        # Outside [0, 1]: MeanFlow clips t - r, iMF does not.
        t[1], r[1] = 0.2, 0.5
        t[2], r[2] = 1.9, 0.1
    return {
        "u": randn(*shape),
        "du": randn(*shape, scale=2.0),
        "v": randn(*shape),
        "v_target": randn(*shape),
        "t": t.to(device=device, dtype=torch.float32),
        "r": r.to(device=device, dtype=torch.float32),
        "grad_total": torch.tensor(0.75, device=device, dtype=torch.float32),
    }


def reference(inputs: dict, c: float, p: float, meanflow: bool) -> dict:
    """The loss formulas (interface.py) in the dtype of u; t, r promote to it."""
    u, du, v, v_target = (inputs[name].detach().clone().requires_grad_() for name in ("u", "du", "v", "v_target"))
    dtype = u.dtype
    gap = (inputs["t"] - inputs["r"]).to(dtype).view(-1, *[1] * (u.dim() - 1))
    if meanflow:
        gap = gap.clamp(0, 1)
    loss_u = ((u + gap * du - v_target) ** 2).flatten(1).sum(1)
    w_u = (loss_u.detach() + c) ** -p
    total = w_u * loss_u
    result = {"loss_u": loss_u, "w_u": w_u}
    if not meanflow:
        loss_v = ((v - v_target) ** 2).flatten(1).sum(1)
        w_v = (loss_v.detach() + c) ** -p
        total = total + w_v * loss_v
        result.update(loss_v=loss_v, w_v=w_v)
    # the totals: one output each, so that each has its own error floor (their magnitudes differ)
    result.update(total=total.mean(), mean_loss_u=loss_u.mean())
    if not meanflow:
        result["mean_loss_v"] = result["loss_v"].mean()
    total.mean().backward(inputs["grad_total"].to(dtype))
    result["grad_u"] = u.grad
    if not meanflow:
        result["grad_v"] = v.grad
    return {name: value.detach() for name, value in result.items()}


def assert_close_to_reference(name, kernel, exact, torch_same_dtype, dtype) -> None:
    """|kernel - exact| <= 2 |torch_same_dtype - exact| + floor * max|exact|, as max errors over the output."""
    assert kernel.shape == exact.shape, name
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (an element was never written?)"
    kernel_error = (kernel.double() - exact).abs().max().item()
    torch_error = (torch_same_dtype.double() - exact).abs().max().item()
    bound = 2 * torch_error + FLOOR[dtype] * exact.abs().max().item()
    assert kernel_error <= bound, f"{name}: kernel error {kernel_error:.3g} > bound {bound:.3g}"


def run_and_check(shape, dtype, device, c, p, meanflow, seed) -> None:
    inputs = make_inputs(shape, dtype, device, seed)
    exact = reference(
        {k: v.double() if k in ("u", "du", "v", "v_target") else v for k, v in inputs.items()}, c, p, meanflow
    )
    same_dtype = reference(inputs, c, p, meanflow)
    # Per-sample losses and weights are float32 by contract: PyTorch's float32 error on the same (rounded)
    # inputs is their baseline. The gradients have the inputs' dtype: PyTorch in that dtype is theirs.
    in_float32 = reference({k: v.float() for k, v in inputs.items()}, c, p, meanflow)
    u, du, v, v_target, t, r = (inputs[name] for name in ("u", "du", "v", "v_target", "t", "r"))
    with poisoned_allocations():
        if meanflow:
            loss_u, w_u, totals = triton_loss.meanflow_loss_fwd(u, du, v_target, t, r, c, p)
            grad_u = triton_loss.meanflow_loss_bwd(inputs["grad_total"], u, du, v_target, t, r, w_u)
            outputs = {"loss_u": loss_u, "w_u": w_u, "grad_u": grad_u}
        else:
            loss_u, loss_v, w_u, w_v, totals = triton_loss.imf_loss_fwd(u, du, v, v_target, t, r, c, p)
            grad_u, grad_v = triton_loss.imf_loss_bwd(inputs["grad_total"], u, du, v, v_target, t, r, w_u, w_v)
            outputs = {"loss_u": loss_u, "loss_v": loss_v, "w_u": w_u, "w_v": w_v, "grad_u": grad_u, "grad_v": grad_v}
    total_names = ("total", "mean_loss_u") if meanflow else ("total", "mean_loss_u", "mean_loss_v")
    assert totals.shape == (len(total_names),) and totals.dtype == torch.float32
    outputs.update(zip(total_names, totals, strict=True))
    assert outputs.keys() == exact.keys()
    for name, value in outputs.items():
        expected_dtype = dtype if name.startswith("grad") else torch.float32
        assert value.dtype == expected_dtype, f"{name}: dtype {value.dtype}, expected {expected_dtype}"
        expected_shape = shape if name.startswith("grad") else (() if value.dim() == 0 else shape[:1])
        assert value.shape == expected_shape, name
        baseline = same_dtype[name] if name.startswith("grad") else in_float32[name]
        assert_close_to_reference(name, value, exact[name], baseline, expected_dtype)


@pytest.mark.parametrize("meanflow", [False, True], ids=["imf", "meanflow"])
@pytest.mark.parametrize("c, p", [(0.01, 1.0), (0.5, 0.5)], ids=["c0.01_p1", "c0.5_p0.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_matches_reference(shape, dtype, c, p, meanflow):
    device = "cuda" if HAS_CUDA else "cpu"
    seed = zlib.crc32(repr((shape, dtype, c, p, meanflow)).encode())
    run_and_check(shape, dtype, device, c, p, meanflow, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("meanflow", [False, True], ids=["imf", "meanflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "shape", [(64, 4, 32, 32), (256, 3, 32, 32), (8, 16, 64, 64)], ids=lambda s: "x".join(map(str, s))
)  # (the last: chunks of 4 blocks, the pipelined loop)
def test_loss_matches_reference_at_model_shapes(shape, dtype, meanflow):
    run_and_check(shape, dtype, "cuda", 0.01, 1.0, meanflow, seed=2)


def test_forward_is_deterministic():
    """Partial sums per (sample, chunk) and one finish program in a fixed order, no atomics: bitwise repeatable."""
    inputs = make_inputs((300, 2, 700), torch.float32, "cuda" if HAS_CUDA else "cpu", seed=3)
    args = [inputs[name] for name in ("u", "du", "v", "v_target", "t", "r")]
    first, second = (triton_loss.imf_loss_fwd(*args, 0.01, 1.0) for _ in range(2))
    for name, value, again in zip(("loss_u", "loss_v", "w_u", "w_v", "totals"), first, second, strict=True):
        assert torch.equal(value, again), name


def test_block_picker_follows_gpu_rules():
    # Exact (BLOCK, num_warps): one 16-byte vector per thread, BLOCK capped at 1024.
    assert triton_loss.pick_block(105, torch.float32) == (128, 1)
    assert triton_loss.pick_block(4096, torch.float32) == (1024, 8)
    assert triton_loss.pick_block(3072, torch.float16) == (1024, 4)
    assert triton_loss.pick_block(3072, torch.bfloat16) == (1024, 4)
    assert triton_loss.pick_block(1, torch.float32) == (1, 1)


def test_forward_picker():
    # latent-b at the benchmark's batch: 256 samples x 4 chunks = 1024 programs, then one finish program over the
    # whole batch in one [256 samples, 4 partials] tile.
    assert triton_loss.pick_forward(256, 4 * 32 * 32, torch.bfloat16) == triton_loss.ForwardLaunch(
        chunk=1024, block=1024, num_warps=4, num_chunks=4, finish_block_b=256, finish_block_c=4, finish_num_warps=8
    )
    # A sample smaller than a block: one chunk; a batch above 256 loops in the finish program (a [256, 1] tile,
    # 2 fp32 per thread: 4 warps).
    assert triton_loss.pick_forward(300, 5, torch.float32) == triton_loss.ForwardLaunch(
        chunk=8, block=8, num_warps=1, num_chunks=1, finish_block_b=256, finish_block_c=1, finish_num_warps=4
    )
    # 3x256x256 pixels: chunks of 16 blocks, 12 per sample.
    # (a chunk of several blocks: its loop pipelined over 3 stages)
    assert triton_loss.pick_forward(2, 3 * 256 * 256, torch.float16) == triton_loss.ForwardLaunch(
        chunk=16384, block=1024, num_warps=4, num_chunks=12, finish_block_b=2, finish_block_c=16, finish_num_warps=1,
        stages=3,
    )  # fmt: skip
    for numel in range(1, 300_000, 997):
        launch = triton_loss.pick_forward(7, numel, torch.float32)
        assert launch.chunk % launch.block == 0 and launch.num_chunks <= 16, numel
        assert (launch.num_chunks - 1) * launch.chunk < numel <= launch.num_chunks * launch.chunk, numel
        assert launch.finish_block_c >= launch.num_chunks, numel
        assert launch.stages == (3 if launch.chunk > launch.block else 1), numel


@pytest.mark.parametrize("block, num_warps", [(96, 1), (128, 3), (0, 1)])
def test_gpu_rule_check_rejects_non_power_of_two(block, num_warps):
    with pytest.raises(AssertionError, match="must be a power of two"):
        triton_loss.check_gpu_rules(block, num_warps)


def test_not_supported_reasons():
    u = torch.randn(2, 3, 4, 4, device="cuda" if HAS_CUDA else "cpu")
    assert triton_loss.not_supported_reasons("imf_loss", {"u": u}) == []
    assert triton_loss.not_supported_reasons("meanflow_loss", {"u": u.half()}) == []
    expected = (
        "imf_loss: dtype torch.float64 not supported by triton (float32, float16, bfloat16)"
        if HAS_CUDA
        else "imf_loss: dtype torch.float64 not supported by the triton interpreter (float32, float16)"
    )
    assert triton_loss.not_supported_reasons("imf_loss", {"u": u.double()}) == [expected]
