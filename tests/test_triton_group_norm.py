"""Launcher-level parity of the Triton GroupNorm + modulation + SiLU kernels (DESIGN 4.3) with a float64
reference: F.group_norm + modulation + SiLU, its tangent from torch.func.jvp, its gradients from autograd.

The kernel's error must be at most 2x the error of the same reference run by PyTorch in the kernel's dtype,
plus a small floor. Both layouts run: the single register tile and, with the tile limits lowered, the chunked
loop (Chan-merged statistics, two passes) that large groups take on a GPU.
"""

import contextlib
import zlib
from dataclasses import dataclass

import pytest
import torch

from imf_kernels import reference as R
from imf_kernels.triton import group_norm as triton_gn

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-5
# Error floor relative to the largest reference magnitude of each output: a few units in the last place of
# fp32; half a unit (the output's own rounding) of fp16 and bf16.
FLOOR = {torch.float32: 3e-7, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class Case:
    batch: int
    height: int
    width: int
    options: tuple[str, ...]  # which of weight, bias, scale, shift, dscale, dshift are given
    act: str
    channels: int = 40
    num_groups: int = 8


ALL_OPTIONS = ("weight", "bias", "scale", "shift", "dscale", "dshift")
CASES = [
    Case(3, 8, 8, ALL_OPTIONS, "silu"),
    Case(1, 5, 7, ALL_OPTIONS, "silu"),
    Case(3, 5, 7, (), "silu"),
    Case(1, 8, 8, ("weight", "bias"), "none"),
    Case(3, 5, 7, ("weight", "scale", "dscale"), "none"),
    Case(1, 5, 7, ("bias", "scale", "shift"), "silu"),
    # the backward's batch sums of grad_weight, grad_bias: 37 samples in one masked step of 64 (5 programs of 8
    # channels); with the "param-loop" layout, in steps of 16 (3 programs of 16 channels, the last one masked)
    Case(37, 2, 3, ("weight", "bias", "scale"), "silu"),
]


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


def use_layout(layout: str, monkeypatch) -> None:
    """The chunked layout at test sizes: tiles of at most 64 elements, chunks of 32 (4 H*W columns of 8).
    "split-single" / "split-chunked": the same with the channel column split in two unpadded tiles (5 channels
    per group: 4 + 1 rows), the candidate configuration bench/tune_gpu.py sweeps. "param-loop": the backward's
    batch sums in steps of 16 samples (the loop a batch above PARAM_MAX_ROWS takes), 16 channels a program."""
    if layout == "param-loop":
        monkeypatch.setattr(triton_gn, "PARAM_MAX_ROWS", 16)
        monkeypatch.setattr(triton_gn, "PARAM_BLOCK_C", 16)
    if layout.endswith("chunked"):
        monkeypatch.setattr(triton_gn, "_MAX_SINGLE_TILE", 64)
        monkeypatch.setattr(triton_gn, "_MAX_SPLIT_TILE", 0)  # chunks, not the launcher's split single tiles
        monkeypatch.setattr(triton_gn, "_CHUNK_TILE", 32)
    if layout == "split-picked":  # the launcher's own split pick: 5 x 64 fits a tile of 384 unpadded, not 8 x 64
        monkeypatch.setattr(triton_gn, "_MAX_SINGLE_TILE", 256)
        monkeypatch.setattr(triton_gn, "_MAX_SPLIT_TILE", 384)
        launcher_pick = triton_gn.pick_blocks

        def pick_checked(channels_per_group, hw, dtype):
            blocks = launcher_pick(channels_per_group, hw, dtype)
            assert blocks.single_tile and blocks.block_c2 > 0, blocks
            return blocks

        monkeypatch.setattr(triton_gn, "pick_blocks", pick_checked)
    if layout in ("split-single", "split-chunked"):
        pick = triton_gn.pick_blocks

        def pick_split(channels_per_group, hw, dtype):
            blocks = triton_gn.split_tile(pick(channels_per_group, hw, dtype), channels_per_group)
            assert blocks is not None and blocks.block_c2 > 0, "the split cases need C/G = 2^a + 2^b"
            return blocks

        monkeypatch.setattr(triton_gn, "pick_blocks", pick_split)
    if layout.startswith("groups"):  # "groups2": 2 (sample, group) slabs per program, one single tile
        pick, groups = triton_gn.pick_blocks, int(layout.removeprefix("groups"))

        def pick_groups(channels_per_group, hw, dtype):
            blocks = triton_gn.group_tile(pick(channels_per_group, hw, dtype), groups)
            assert blocks is not None, "the groups cases need a single tile"
            return blocks

        monkeypatch.setattr(triton_gn, "pick_blocks", pick_groups)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, offset=0.0):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
        return values.to(device=device, dtype=dtype)

    shape = (case.batch, case.channels, case.height, case.width)
    per_sample_channel = (case.batch, case.channels)
    tensors = {
        # A non-zero mean and a spread of scales per channel, so the statistics are not trivial.
        "x": randn(*shape, scale=2.0, offset=1.5) * randn(1, case.channels, 1, 1, scale=0.5, offset=1.0),
        "dx": randn(*shape),
        "grad_y": randn(*shape),
        "weight": randn(case.channels, scale=0.5, offset=1.0),
        "bias": randn(case.channels, scale=0.5),
        "scale": randn(*per_sample_channel, scale=0.3),
        "shift": randn(*per_sample_channel, scale=0.5),
        "dscale": randn(*per_sample_channel, scale=0.3),
        "dshift": randn(*per_sample_channel, scale=0.5),
    }
    for name in ALL_OPTIONS:
        if name not in case.options:
            tensors[name] = None
    return tensors


def reference(case: Case, inputs: dict) -> dict:
    """y, dy, mean, rstd and the gradients of sum(y * grad_y), computed by PyTorch in the inputs' dtype."""
    x = inputs["x"]

    def forward(x, weight=None, bias=None, scale=None, shift=None):
        return R.group_norm_act(x, case.num_groups, weight, bias, scale=scale, shift=shift, eps=EPS, act=case.act)

    # Tangent along (x, scale, shift); a missing dscale/dshift is a zero tangent. weight and bias are fixed.
    moving = [name for name in ("x", "scale", "shift") if inputs[name] is not None]
    tangent_of = {"x": inputs["dx"], "scale": inputs["dscale"], "shift": inputs["dshift"]}
    y, dy = torch.func.jvp(
        lambda *tensors: forward(
            weight=inputs["weight"], bias=inputs["bias"], **dict(zip(moving, tensors, strict=True))
        ),
        tuple(inputs[name] for name in moving),
        tuple(tangent_of[name] if tangent_of[name] is not None else torch.zeros_like(inputs[name]) for name in moving),
    )
    leaves = {
        name: inputs[name].detach().clone().requires_grad_()
        for name in ("x", "weight", "bias", "scale", "shift")
        if inputs[name] is not None
    }
    forward(**leaves).backward(inputs["grad_y"])
    _, mean, rstd = torch.ops.aten.native_group_norm(
        x, None, None, case.batch, case.channels, case.height * case.width, case.num_groups, EPS
    )
    result = {"y": y, "dy": dy, "mean": mean, "rstd": rstd}
    result.update({f"grad_{name}": leaf.grad for name, leaf in leaves.items()})
    return result


def assert_close_to_reference(name: str, kernel, exact, torch_same_dtype, dtype) -> None:
    """|kernel - exact| <= 2 |torch_same_dtype - exact| + floor * max|exact|, as max errors over the output."""
    assert kernel.shape == exact.shape, name
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (an element was never written?)"
    kernel_error = (kernel.double() - exact).abs().max().item()
    torch_error = (torch_same_dtype.double() - exact).abs().max().item()
    bound = 2 * torch_error + FLOOR[dtype] * exact.abs().max().item()
    assert kernel_error <= bound, f"{name}: kernel error {kernel_error:.3g} > bound {bound:.3g}"


def run_and_check(case: Case, dtype: torch.dtype, device: str, seed: int, channels_last: bool = False) -> None:
    """channels_last: the maps (x, dx, grad_y, the residual gradient) in `torch.channels_last`, and every map the
    kernels write (y, dy, grad_x) must come out so too."""
    inputs = make_inputs(case, dtype, device, seed)
    if channels_last:
        for name in ("x", "dx", "grad_y"):
            inputs[name] = inputs[name].contiguous(memory_format=torch.channels_last)
    exact = reference(case, {k: v.double() if v is not None else None for k, v in inputs.items()})
    same_dtype = reference(case, inputs)
    # mean and rstd are float32 by contract: PyTorch's float32 error on the same (rounded) inputs is their
    # baseline. Every other output has the inputs' dtype: PyTorch in that dtype is its baseline.
    in_float32 = reference(case, {k: v.float() if v is not None else None for k, v in inputs.items()})
    params = [inputs[name] for name in ("weight", "bias", "scale", "shift")]
    with poisoned_allocations():
        y, mean, rstd = triton_gn.gn_act_fwd(inputs["x"], case.num_groups, *params, EPS, case.act)
        y_jvp, dy, mean_jvp, rstd_jvp = triton_gn.gn_act_jvp_fwd(
            inputs["x"],
            inputs["dx"],
            case.num_groups,
            *params,
            inputs["dscale"],
            inputs["dshift"],
            EPS,
            case.act,
        )
        grads = triton_gn.gn_act_bwd(inputs["grad_y"], inputs["x"], case.num_groups, *params, mean, rstd, case.act)
        # a residual branch's gradient of x, added into grad_x by the kernel
        residual = torch.randn_like(inputs["x"])  # (x's layout)
        grad_x_residual = triton_gn.gn_act_bwd(
            inputs["grad_y"], inputs["x"], case.num_groups, *params, mean, rstd, case.act, residual
        )[0]
    assert grad_x_residual.dtype == dtype
    exact_sum = exact["grad_x"] + residual.double()
    same_dtype_sum = same_dtype["grad_x"] + residual  # as autograd adds x's two gradients, in the dtype
    assert_close_to_reference("grad_x + residual", grad_x_residual, exact_sum, same_dtype_sum, dtype)

    assert y.dtype == dy.dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for name, value in (("y", y), ("dy", dy), ("y_jvp", y_jvp), ("grad_x", grads[0]), ("+residual", grad_x_residual)):
        assert value.is_contiguous(memory_format=layout), f"{name}: strides {value.stride()}, not x's layout"
    assert mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (case.batch, case.num_groups)
    outputs = {"y": y, "dy": dy, "mean": mean, "rstd": rstd}
    # The primal forward and the forward-with-tangent compute y and the statistics the same way.
    assert torch.equal(y_jvp, y) and torch.equal(mean_jvp, mean) and torch.equal(rstd_jvp, rstd)
    for name, grad in zip(("x", "weight", "bias", "scale", "shift"), grads, strict=True):
        if inputs[name] is None:
            assert grad is None, f"grad_{name} must be None when {name} is None"
        else:
            assert grad.dtype == inputs[name].dtype
            outputs[f"grad_{name}"] = grad
    assert outputs.keys() == exact.keys()
    for name, value in outputs.items():
        if name in ("mean", "rstd"):
            assert_close_to_reference(name, value, exact[name], in_float32[name], torch.float32)
        else:
            assert_close_to_reference(name, value, exact[name], same_dtype[name], dtype)


# Every case in fp32 with the single tile; fp16 and the chunked layout on a subset (the interpreter is slow).
PARITY_RUNS = [
    *[(case, torch.float32, "single") for case in CASES],
    *[(CASES[i], torch.float16, "single") for i in (0, 2, 3, 6)],
    *[(CASES[i], torch.float32, "chunked") for i in (0, 4)],
    *[(CASES[i], torch.float16, "chunked") for i in (1, 5)],
    *[(CASES[i], torch.float32, "split-single") for i in (0, 3, 4)],
    *[(CASES[i], torch.float16, "split-single") for i in (1,)],
    *[(CASES[i], torch.float16, "split-picked") for i in (0, 5)],
    *[(CASES[i], torch.float32, "split-chunked") for i in (0, 5)],
    *[(CASES[i], torch.float16, "split-chunked") for i in (4,)],
    *[(CASES[i], torch.float32, "groups2") for i in (0, 2, 3)],
    *[(CASES[i], torch.float16, "groups4") for i in (1, 4)],
    *[(CASES[i], torch.float32, "groups8") for i in (5,)],
    *[(CASES[i], dtype, "param-loop") for i in (6,) for dtype in (torch.float32, torch.float16)],
]


# channels-last maps (the kernels address a channel's positions C elements apart, a position's channels 1 apart):
# every tile kind once
CHANNELS_LAST_RUNS = [
    (CASES[0], torch.float32, "single"),
    (CASES[1], torch.float16, "single"),
    (CASES[4], torch.float32, "chunked"),
    (CASES[5], torch.float16, "chunked"),
    (CASES[3], torch.float32, "split-single"),
    (CASES[0], torch.float16, "split-picked"),
    (CASES[5], torch.float32, "split-chunked"),
    (CASES[2], torch.float32, "groups2"),
    (CASES[4], torch.float16, "groups4"),
    (CASES[6], torch.float32, "param-loop"),
]


def run_id(run) -> str:
    case, dtype, layout = run
    options = "-".join(case.options) or "plain"
    return f"B{case.batch}_{case.height}x{case.width}_{options}_{case.act}_{str(dtype)[6:]}_{layout}"


@pytest.mark.parametrize("run", PARITY_RUNS, ids=run_id)
def test_group_norm_act_matches_reference(run, monkeypatch):
    case, dtype, layout = run
    use_layout(layout, monkeypatch)
    device = "cuda" if HAS_CUDA else "cpu"
    run_and_check(case, dtype, device, seed=zlib.crc32(run_id(run).encode()))


@pytest.mark.parametrize("run", CHANNELS_LAST_RUNS, ids=run_id)
def test_group_norm_act_matches_reference_on_channels_last_maps(run, monkeypatch):
    case, dtype, layout = run
    use_layout(layout, monkeypatch)
    device = "cuda" if HAS_CUDA else "cpu"
    run_and_check(case, dtype, device, seed=zlib.crc32(("cl" + run_id(run)).encode()), channels_last=True)


# a tangent on the first samples only (the training step's forward; PARTIAL_TANGENT): every tile kind, both layouts
FIRST_ROWS_RUNS = [
    (CASES[0], torch.float16 if layout == "split-picked" else torch.float32, layout, rows, channels_last)
    for layout in ("single", "chunked", "split-single", "split-picked", "split-chunked", "groups2", "groups4")
    for rows, channels_last in ((1, False), (2, True))
] + [(CASES[4], torch.float16, "chunked", 2, False), (CASES[2], torch.float16, "single", 1, True)]


@pytest.mark.parametrize(
    "run", FIRST_ROWS_RUNS, ids=lambda run: f"{run_id(run[:3])}-rows{run[3]}{'-cl' if run[4] else ''}"
)
def test_a_tangent_on_the_first_samples_gives_the_whole_batchs_numbers(run, monkeypatch):
    """dx, dscale, dshift on the first m of B samples: on single tiles one launch (PARTIAL_TANGENT), on chunked
    ones two (the jvp kernel on the m samples, the primal one on the rest); y, mean and rstd bit for bit those of
    the call with a tangent on every sample, dy (m samples, x's layout) bit for bit that call's first m samples,
    every element written (poisoned allocations)."""
    case, dtype, layout, rows, channels_last = run
    use_layout(layout, monkeypatch)
    device = "cuda" if HAS_CUDA else "cpu"
    check_first_samples(case, dtype, device, rows, channels_last, zlib.crc32(f"rows{run}".encode()), monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 256, 32, 32, 32), (6, 768, 16, 16, 32), (6, 512, 8, 8, 32), (5, 768, 8, 8, 32)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_tangent_on_the_first_samples_at_model_shapes(shape, dtype, channels_last, monkeypatch):
    """The same at latent-b's layer shapes, compiled for the GPU (single tiles in one launch, chunked in two)."""
    batch, channels, height, width, num_groups = shape
    case = Case(batch, height, width, ALL_OPTIONS, "silu", channels, num_groups)
    check_first_samples(case, dtype, "cuda", batch // 2, channels_last, 4, monkeypatch)


def check_first_samples(case: Case, dtype, device: str, rows: int, channels_last: bool, seed: int, monkeypatch) -> None:
    inputs = make_inputs(case, dtype, device, seed)
    launched = []  # the launcher's kernel launches (interpreted or compiled)
    launch = triton_gn.launch_kernel

    def recorded_launch(kernel, *args, **kwargs):
        launched.append(kernel)
        launch(kernel, *args, **kwargs)

    monkeypatch.setattr(triton_gn, "launch_kernel", recorded_launch)
    if channels_last:
        for name in ("x", "dx"):
            inputs[name] = inputs[name].contiguous(memory_format=torch.channels_last)
    params = [inputs[name] for name in ("weight", "bias", "scale", "shift")]
    tangents = [inputs[name] for name in ("dx", "dscale", "dshift")]
    with poisoned_allocations():
        whole = triton_gn.gn_act_jvp_fwd(
            inputs["x"], tangents[0], case.num_groups, *params, *tangents[1:], EPS, case.act
        )
        first = [None if t is None else t[:rows] for t in tangents]
        launched.clear()
        partial = triton_gn.gn_act_jvp_fwd(inputs["x"], first[0], case.num_groups, *params, *first[1:], EPS, case.act)
    blocks = triton_gn.pick_blocks(case.channels // case.num_groups, case.height * case.width, dtype)
    assert launched == [triton_gn._gn_fwd_kernel] * (1 if blocks.single_tile else 2)
    y, dy, mean, rstd = partial
    assert dy.shape == (rows, *inputs["x"].shape[1:])
    layout_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout_format) and dy.is_contiguous(memory_format=layout_format)
    assert torch.isfinite(dy).all()
    assert torch.equal(y, whole[0]) and torch.equal(mean, whole[2]) and torch.equal(rstd, whole[3])
    assert torch.equal(dy, whole[1][:rows])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(8, 256, 32, 32, 32), (8, 512, 32, 32, 32), (4, 768, 16, 16, 32), (4, 1536, 8, 8, 32), (2, 384, 16, 16, 32)],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_act_matches_reference_at_model_shapes(shape, dtype, channels_last):
    batch, channels, height, width, num_groups = shape
    case = Case(batch, height, width, ALL_OPTIONS, "silu", channels, num_groups)
    run_and_check(case, dtype, "cuda", seed=1, channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        (4, 768, 8, 8, 32),
        (2, 768, 16, 16, 32),
        (4, 1536, 8, 8, 32),
        (2, 384, 16, 16, 32),
        (2, 768, 32, 32, 32),
        (2, 1280, 16, 16, 32),
    ],
)
def test_split_tiles_match_reference_at_model_shapes(shape, dtype, monkeypatch):
    """The split-column candidates of bench/tune_gpu.py (24 = 16 + 8 channels per group: latent-b's padded groups,
    single tile and chunked; 48 = 32 + 16, 12 = 8 + 4, 40), compiled for the GPU."""
    use_layout("split-single", monkeypatch)
    batch, channels, height, width, num_groups = shape
    case = Case(batch, height, width, ALL_OPTIONS, "silu", channels, num_groups)
    run_and_check(case, dtype, "cuda", seed=2)


def test_block_picker_follows_gpu_rules():
    # Exact configurations for the test and model shapes: (C/G, H*W) -> padded channels, columns, warps.
    # (the rules measured on an H200 by bench/tune_gpu.py: single tiles up to 4096 elements; chunks of 2048
    # (<= 16 channels) or 4096 elements)
    assert triton_gn.pick_blocks(5, 35, torch.float32) == triton_gn.GNBlocks(8, 64, True, 2)
    assert triton_gn.pick_blocks(8, 1024, torch.float32) == triton_gn.GNBlocks(8, 256, False, 8)
    # (chunked tiles of up to 16 rows in half precision pipeline their loops over 3 stages; wider ones and fp32
    # run plain loops: an H200 timed both, chunk_stages)
    assert triton_gn.pick_blocks(8, 1024, torch.bfloat16) == triton_gn.GNBlocks(8, 256, False, 4, stages=3)
    assert triton_gn.pick_blocks(16, 1024, torch.bfloat16) == triton_gn.GNBlocks(16, 128, False, 4, stages=3)
    assert triton_gn.pick_blocks(16, 1024, torch.float32) == triton_gn.GNBlocks(16, 128, False, 8)
    assert triton_gn.pick_blocks(24, 1024, torch.bfloat16) == triton_gn.GNBlocks(32, 128, False, 16)
    # (a half-precision group that fits one tile only unpadded: one split tile, 24 elements per thread; fp32 chunks)
    assert triton_gn.pick_blocks(24, 256, torch.bfloat16) == triton_gn.GNBlocks(16, 256, True, 8, block_c2=8)
    assert triton_gn.pick_blocks(24, 256, torch.float32) == triton_gn.GNBlocks(32, 128, False, 16)
    assert triton_gn.pick_blocks(12, 512, torch.float16) == triton_gn.GNBlocks(8, 512, True, 8, block_c2=4)
    assert triton_gn.pick_blocks(12, 1024, torch.float16) == triton_gn.GNBlocks(16, 128, False, 4, stages=3)
    assert triton_gn.pick_blocks(16, 256, torch.bfloat16) == triton_gn.GNBlocks(16, 256, True, 4)
    assert triton_gn.pick_blocks(48, 64, torch.float16) == triton_gn.GNBlocks(64, 64, True, 4)
    for channels_per_group in (1, 3, 5, 24, 40, 48, 1024):
        for hw in (1, 35, 64, 1024, 4096):
            blocks = triton_gn.pick_blocks(channels_per_group, hw, torch.float16)
            assert blocks.block_c + blocks.block_c2 >= channels_per_group
            limit = triton_gn._MAX_SPLIT_TILE if blocks.block_c2 else triton_gn._MAX_SINGLE_TILE
            assert (blocks.block_c + blocks.block_c2) * blocks.block_hw <= limit
            assert not blocks.block_c2 or blocks.single_tile  # the launcher's split tiles are single tiles
            assert blocks.stages == (1 if blocks.single_tile or blocks.block_c > 16 else 3)
    # a split chunked tile (four tiles a chunk) pipelines over at most 2 stages (12 = 8 + 4 rows; 16 padded)
    assert triton_gn.split_tile(triton_gn.pick_blocks(12, 1024, torch.bfloat16), 12).stages == 2
    assert triton_gn.split_tile(triton_gn.pick_blocks(24, 1024, torch.bfloat16), 24).stages == 1
    assert triton_gn.split_tile(triton_gn.pick_blocks(24, 1024, torch.float32), 24).stages == 1


def test_param_sums_picker_follows_gpu_rules(monkeypatch):
    # the backward's batch sums: the whole batch as one tile up to 256 samples, one 16-byte vector of each
    # partial per thread (8 channels x 256 samples: 16 warps); above 256 samples, a loop of 256-sample steps
    pick = triton_gn.pick_param_blocks
    assert pick(1) == triton_gn.ParamBlocks(1, 8, 1, True)
    assert pick(64) == triton_gn.ParamBlocks(64, 8, 4, True)
    assert pick(256) == triton_gn.ParamBlocks(256, 8, 16, True)
    assert pick(257) == triton_gn.ParamBlocks(256, 8, 16, False)
    for batch in (1, 2, 3, 37, 100, 255, 256, 1000):
        blocks = pick(batch)
        for value in (blocks.block_b, blocks.block_c, blocks.num_warps):
            assert value & (value - 1) == 0  # powers of two, as a GPU compiler needs
        assert blocks.one_step == (batch <= blocks.block_b)
        assert blocks.num_warps <= 16
    monkeypatch.setattr(triton_gn, "PARAM_MAX_ROWS", 16)  # the "param-loop" layout of the parity runs
    monkeypatch.setattr(triton_gn, "PARAM_BLOCK_C", 16)
    assert pick(37) == triton_gn.ParamBlocks(16, 16, 2, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("shape", [(4, 256, 8, 8, 32), (4, 512, 8, 8, 32), (2, 256, 16, 16, 32), (2, 768, 8, 8, 32)])
def test_group_tiles_match_reference_at_model_shapes(shape, groups, dtype, monkeypatch):
    """Several (sample, group) slabs per program, the small-group candidates of bench/tune_gpu.py."""
    use_layout(f"groups{groups}", monkeypatch)
    batch, channels, height, width, num_groups = shape
    case = Case(batch, height, width, ALL_OPTIONS, "silu", channels, num_groups)
    run_and_check(case, dtype, "cuda", seed=3)


def test_group_tiles_take_single_tiles_only(monkeypatch):
    single = triton_gn.pick_blocks(16, 64, torch.bfloat16)
    assert triton_gn.group_tile(single, 4) == triton_gn.GNBlocks(16, 64, True, 8, groups=4)
    assert triton_gn.group_tile(single, 4, num_warps=4).num_warps == 4
    assert triton_gn.group_tile(triton_gn.pick_blocks(8, 1024, torch.bfloat16), 2) is None  # chunked
    assert triton_gn.group_tile(triton_gn.split_tile(single, 24), 2) is None  # split
    assert triton_gn.split_tile(triton_gn.group_tile(single, 2), 24) is None  # the two do not combine
    with pytest.raises(AssertionError, match="needs a single tile without a split"):
        triton_gn.check_gpu_rules(triton_gn.GNBlocks(8, 256, False, 4, groups=2))
    # a launch over 6 groups cannot take them 4 per program
    blocks = triton_gn.group_tile(triton_gn.pick_blocks(4, 16, torch.float32), 4)
    monkeypatch.setattr(triton_gn, "pick_blocks", lambda *_: blocks)
    x = torch.randn(1, 24, 4, 4)
    with pytest.raises(AssertionError, match="groups=4 per program must divide 6 groups"):
        triton_gn._launch(x, None, 6, None, None, None, None, None, None, 1e-5, "silu", *_outputs(x, 6))


def _outputs(x, num_groups):
    return torch.empty_like(x), torch.empty(x.shape[0], num_groups), torch.empty(x.shape[0], num_groups)


def test_split_tiles_cover_the_group_without_padding():
    assert triton_gn.split_channels(24) == (16, 8)
    assert triton_gn.split_channels(40) == (32, 8)
    assert triton_gn.split_channels(48) == (32, 16)
    assert triton_gn.split_channels(5) == (4, 1)
    assert triton_gn.split_channels(3) == (2, 1)
    for not_two_powers in (1, 2, 7, 16, 56, 1024):
        assert triton_gn.split_channels(not_two_powers) is None
    blocks = triton_gn.pick_blocks(48, 64, torch.bfloat16)
    assert triton_gn.split_tile(blocks, 48) == triton_gn.GNBlocks(32, 64, True, 4, block_c2=16)
    assert triton_gn.split_tile(blocks, 64) is None


@pytest.mark.parametrize(
    "bad",
    [
        triton_gn.GNBlocks(5, 64, True, 2),
        triton_gn.GNBlocks(8, 48, False, 2),
        triton_gn.GNBlocks(8, 64, True, 3),
        triton_gn.GNBlocks(8, 64, True, 2, block_c2=3),
    ],
)
def test_gpu_rule_check_rejects_non_power_of_two(bad):
    with pytest.raises(AssertionError, match="must be a power of two"):
        triton_gn.check_gpu_rules(bad)


def test_not_supported_reasons():
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(2, 40, 5, 7, device=device)
    args = {"x": x, "num_groups": 8, "act": "silu"}
    assert triton_gn.not_supported_reasons("group_norm_act", args) == []
    assert triton_gn.not_supported_reasons("group_norm_act", {**args, "x": x.half()}) == []
    assert triton_gn.not_supported_reasons("group_norm_act_jvp", {**args, "act": "gelu"}) == [
        "group_norm_act_jvp: act='gelu' not supported by triton (silu, none)"
    ]
    wide = torch.randn(1, 2048, 1, 1, device=device)
    assert triton_gn.not_supported_reasons("group_norm_act", {**args, "x": wide, "num_groups": 1}) == [
        "group_norm_act: C/num_groups=2048 > 1024 supported by triton"
    ]
    if not HAS_CUDA:
        assert triton_gn.not_supported_reasons("group_norm_act", {**args, "x": x.bfloat16()}) == [
            "group_norm_act: dtype torch.bfloat16 not supported by the triton interpreter (float32, float16)"
        ]
