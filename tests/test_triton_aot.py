"""Static GPU evidence without a GPU: every launch configuration the Triton launchers pick for the `latent-b`
and `cifar` layer shapes compiles for sm_90 (H100) on this machine, and its cubin fits the card: shared memory
<= 227 KiB per block, no local-memory spills, <= 255 registers (read with `cuobjdump -res-usage`).

Each family module in `imf_kernels/triton/` that has `aot_specs()` takes part; a spec is a dict {"name",
"fn", "signature", "constexprs", "num_warps", "num_stages"} and optionally "divisible_by_16" (argument names
the JIT would specialise as multiples of 16). The interpreter (TRITON_INTERPRET=1, set by conftest without a
GPU) replaces `triton.jit` functions and cannot compile, so the compilation runs in a subprocess with the
variable removed: `python tests/test_triton_aot.py` prints a spec count, then one JSON row per spec.

Every spec compiles twice: with the Triton installed here, and with the Triton of the GPU machines' image (3.6 with
their torch 2.11), whose compiler asserted on a GroupNorm backward that ours compiled (H200, 2026-11-26). That
second Triton is a folder installed with `pip install --target` (`make test` does it) and named by the variable
IMF_AOT_EXTRA_TRITON; without the variable that half is skipped, with it pointing at no Triton it fails.
"""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from triton_builds import BUILDS, compiling_env

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("group_norm", "loss", "attention")
H100_MAX_SHARED_BYTES = 227 * 1024
MAX_REGISTERS = 255
RESOURCE_PATTERN = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def family_specs() -> list[tuple[str, dict]]:
    """(family, spec) for every family module that exists and has aot_specs."""
    specs = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"imf_kernels.triton.{family}")
        except ModuleNotFoundError as error:
            if error.name != f"imf_kernels.triton.{family}":
                raise
            continue
        if hasattr(module, "aot_specs"):
            specs += [(family, spec) for spec in module.aot_specs()]
    return specs


def _ast_source(spec: dict):
    import triton

    fn = spec["fn"]
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.get("divisible_by_16", ())}
    return triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)


def compile_sm90(spec: dict):
    """The CompiledKernel of one spec for sm_90 (what a GPU's JIT would build; no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(
        _ast_source(spec),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
    )


def cuobjdump(kernel, flag: str) -> str:
    """`cuobjdump <flag>` (e.g. -res-usage, -sass) of a compiled kernel's cubin, with Triton's bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(tool), flag, cubin.name], capture_output=True, text=True, check=True).stdout


def compile_spec(index: int) -> dict:
    """Compile spec `index` of family_specs() for sm_90 and read its resource usage from the cubin."""
    family, spec = family_specs()[index]
    blocks = " ".join(f"{arg}={value}" for arg, value in spec["constexprs"].items() if arg.startswith("BLOCK"))
    row = {"family": family, "name": spec["name"], "config": f"{blocks} warps={spec['num_warps']}"}
    start = time.perf_counter()
    try:
        kernel = compile_sm90(spec)
    except Exception as error:  # every failure is reported as a row and fails the test
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
        return row
    usage = cuobjdump(kernel, "-res-usage")
    registers, stack, static_shared, local = map(int, RESOURCE_PATTERN.search(usage).groups())
    # Triton allocates its scratch as dynamic shared memory, which the cubin's SHARED does not count.
    row.update(
        registers=registers,
        stack=stack,
        local=local,
        shared=static_shared + kernel.metadata.shared,
        seconds=round(time.perf_counter() - start, 2),
    )
    return row


def main() -> None:
    import triton

    count = len(family_specs())
    print(json.dumps({"spec_count": count, "triton": triton.__version__}), flush=True)
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for row in pool.map(compile_spec, range(count)):
            print(json.dumps(row), flush=True)


@pytest.fixture(scope="module", params=BUILDS)
def compiled_rows(request) -> list[dict]:
    """Every spec's row, compiled with the installed Triton or the GPU image's (IMF_AOT_EXTRA_TRITON)."""
    env, expected_version = compiling_env(request.param)
    result = subprocess.run(
        [sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    header, *rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == header["spec_count"]
    if expected_version is not None:
        assert header["triton"] == expected_version  # the compiler under test is the one asked for
    return rows


def test_every_spec_compiles_for_sm90_and_fits_h100(compiled_rows):
    assert {"group_norm", "loss"} <= {row["family"] for row in compiled_rows}

    print(f"\n{'kernel':40s} {'config':40s} {'regs':>4s} {'smem':>6s} {'local':>5s} {'stack':>5s} {'s':>5s}")
    for row in compiled_rows:
        if "error" in row:
            print(f"{row['name']:40s} {row['config']:40s} FAILED {row['error'][:200]}")
            continue
        print(
            f"{row['name']:40s} {row['config']:40s} {row['registers']:4d} {row['shared']:6d} "
            f"{row['local']:5d} {row['stack']:5d} {row['seconds']:5.1f}"
        )
    failed = [f"{row['name']}: {row['error']}" for row in compiled_rows if "error" in row]
    assert not failed, "\n".join(failed)
    too_much_shared = [row["name"] for row in compiled_rows if row["shared"] > H100_MAX_SHARED_BYTES]
    assert not too_much_shared, f"shared memory above 227 KiB: {too_much_shared}"
    spilling = [row["name"] for row in compiled_rows if row["local"] or row["stack"]]
    assert not spilling, f"local-memory spills (LOCAL or STACK > 0): {spilling}"
    too_many_registers = [row["name"] for row in compiled_rows if row["registers"] > MAX_REGISTERS]
    assert not too_many_registers, f"more than {MAX_REGISTERS} registers: {too_many_registers}"


def test_specs_cover_every_config_picked_for_the_presets():
    """Each (pass, blocks, num_warps) the launchers pick for the preset shapes, in every dtype, has a spec
    (fp16 picks the blocks of bf16, so its bf16 spec covers it); for the loss, each kernel of both launches of the
    forward and the backward, for both losses."""
    import torch

    from imf_kernels.triton import group_norm, loss

    gn_specs = group_norm.aot_specs()
    gn_compiled = {
        (spec["name"].split("_")[1], c["BLOCK_C"], c["BLOCK_HW"], spec["num_warps"], c["STAGES"])
        for spec in gn_specs
        if spec["fn"] is not group_norm._param_sums_kernel
        for c in [spec["constexprs"]]
    }
    # the backward's second launch, the batch sums of grad_weight and grad_bias: the tile each preset batch picks,
    # the largest (the bench's batch of 256) and the loop over larger batches, in each dtype
    param_sums = {
        (constexprs["BLOCK_B"], constexprs["BLOCK_C"], spec["num_warps"], constexprs["ONE_STEP"])
        for spec in gn_specs
        for constexprs in [spec["constexprs"]]
        if spec["fn"] is group_norm._param_sums_kernel
    }
    batches = {shape[0] for shape in group_norm.AOT_SHAPES} | {256, 512}
    picked = {dataclasses.astuple(group_norm.pick_param_blocks(batch)) for batch in batches}
    assert param_sums == picked, (param_sums, picked)
    assert picked == {(8, 8, 1, True), (64, 8, 4, True), (256, 8, 16, True), (256, 8, 16, False)}, picked
    loss_compiled = {
        (spec["fn"].__name__, tuple(sorted(spec["constexprs"].items())), spec["num_warps"]) for spec in loss.aot_specs()
    }
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for _, channels, height, width, num_groups in group_norm.AOT_SHAPES:
            for pass_name in ("fwd", "jvp", "bwd"):
                blocks = group_norm.pick_blocks(channels // num_groups, height * width, dtype)
                assert (pass_name, blocks.block_c, blocks.block_hw, blocks.num_warps, blocks.stages) in gn_compiled
        for batch, *sample in loss.AOT_SHAPES:
            numel_per_sample = sample[0] * sample[1] * sample[2]
            forward = loss.pick_forward(batch, numel_per_sample, dtype)
            block, num_warps = loss.pick_block(numel_per_sample, dtype)
            for with_v, clip_gap in ((True, False), (False, True)):
                flags = {"WITH_V": with_v, "CLIP_GAP": clip_gap}
                launches = (
                    (
                        "_loss_partial_kernel",
                        {"CHUNK": forward.chunk, "BLOCK": forward.block, **flags, "STAGES": forward.stages},
                        forward.num_warps,
                    ),
                    (
                        "_loss_finish_kernel",
                        {"BLOCK_B": forward.finish_block_b, "BLOCK_C": forward.finish_block_c, "WITH_V": with_v},
                        forward.finish_num_warps,
                    ),
                    ("_loss_bwd_kernel", {"BLOCK": block, **flags}, num_warps),
                )
                for kernel, constexprs, warps in launches:
                    assert (kernel, tuple(sorted(constexprs.items())), warps) in loss_compiled, (kernel, constexprs)


if __name__ == "__main__":
    main()
