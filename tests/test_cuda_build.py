"""The CUDA extension on a machine without a GPU: it built, imports, registers every op, and its kernels pass
the static checks a GPU would otherwise reveal only as slowness.

- the extension `imf_kernels._C` exposes every binding, and the `cuda` backend package every launcher;
- ptxas (`-Xptxas -v`, sm_90, the build's flags from setup.py) reports 0 bytes of spills for every kernel, and
  the built .so's resource usage (`cuobjdump -res-usage`) has no stack or local memory;
- the SASS of every vectorised instantiation in the built .so holds 16-byte global loads (`LDG.E.128`).
Skipped only where torch has no CUDA (then setup.py builds without the extension, by design, and says so once:
the last test checks that message with nvcc hidden).
"""

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imf_kernels import dispatch, interface

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = sorted(CSRC.glob("*.cu"))

needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="torch has no CUDA: no extension is built")

BINDINGS = (
    "group_norm_act_fwd",
    "group_norm_act_bwd",
    "attention_fwd",
    "attention_bwd",
    "loss_fwd",
    "loss_bwd",
    "attention_fwd_smem_bytes",
    "attention_bwd_smem_bytes",
    "group_norm_bwd_smem_bytes",
)
LAUNCHERS = {
    "group_norm": ("gn_act_fwd", "gn_act_jvp_fwd", "gn_act_bwd"),
    "attention": ("attention_fwd", "attention_jvp_fwd", "attention_bwd"),
    "loss": ("imf_loss_fwd", "imf_loss_bwd", "meanflow_loss_fwd", "meanflow_loss_bwd"),
}
# kernel -> index of the vector-width template argument among its integer arguments (None: always 16-byte vectors)
KERNELS = {
    "group_norm_act_fwd_kernel": 0,
    "group_norm_act_bwd_kernel": 0,
    "group_norm_act_fwd_resident_kernel": None,
    "group_norm_act_bwd_resident_kernel": None,
    "attention_fwd_kernel": 1,
    "attention_bwd_kernel": 1,
    "attention_bwd_reduce_kernel": None,  # the backward's sums of grad_k, grad_v partials: float4 loads
    "loss_fwd_kernel": 0,
    "loss_bwd_kernel": 0,
}
# kernels of O(B C) data with scalar loads only: the GroupNorm backward's batch sums of grad_weight, grad_bias; the
# loss forward's batch totals (no element type: it reads the float32 per-sample values)
SCALAR_KERNELS = ("group_norm_param_grads_kernel", "loss_totals_kernel")
UNTYPED_KERNELS = ("loss_totals_kernel",)
# Itanium-mangled element types of the instantiations, and their 16-byte vector widths.
VECTOR_WIDTH = {"f": 4, "6__half": 8, "13__nv_bfloat16": 8}
DTYPES_PER_KERNEL = len(VECTOR_WIDTH)


def extension():
    return importlib.import_module("imf_kernels._C")


def parse_instantiation(mangled: str) -> tuple[str, str, list[int]] | None:
    """(kernel, element type ("" for an untyped kernel), integer template arguments) of one of our kernels, else
    None."""
    kernels = "|".join((*KERNELS, *SCALAR_KERNELS))
    match = re.search(rf"\d+({kernels})I(f|6__half|13__nv_bfloat16)((?:L[ib]\d+E)*)E", mangled)
    if match is None:
        untyped = re.search(rf"\d+({'|'.join(UNTYPED_KERNELS)})E", mangled)
        return None if untyped is None else (untyped.group(1), "", [])
    integers = [int(value) for kind, value in re.findall(r"L([ib])(\d+)E", match.group(3)) if kind == "i"]
    return match.group(1), match.group(2), integers


def find_tool(name: str) -> str | None:
    """A CUDA binary tool from CUDA_HOME, PATH, or the copy triton ships in backends/nvidia/bin."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [Path(CUDA_HOME) / "bin" / name] if CUDA_HOME else []
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(path) for path in candidates if path.is_file()), None)


@needs_cuda_torch
def test_extension_imports_and_registers_every_op():
    module = extension()
    missing = [name for name in BINDINGS if not hasattr(module, name)]
    assert missing == [], f"imf_kernels._C lacks {missing}"
    assert dispatch.BACKENDS["cuda"] == "imf_kernels.cuda"
    for op, family in dispatch.OP_FAMILIES.items():
        launchers = dispatch.family_module("cuda", op)
        assert launchers.__name__ == f"imf_kernels.cuda.{family}"
        for name in (*LAUNCHERS[family], "not_supported_reasons"):
            assert callable(getattr(launchers, name, None)), f"imf_kernels.cuda.{family} lacks {name}"
            assert name == "not_supported_reasons" or name in interface.__doc__
    expected = None if torch.cuda.is_available() else "no CUDA device is visible"
    assert importlib.import_module("imf_kernels.cuda").unavailable_reason() == expected


@needs_cuda_torch
def test_reasons_name_what_cuda_cannot_take():
    backend = importlib.import_module("imf_kernels.cuda")
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    gn_args = dict(x=x, num_groups=8, weight=None, bias=None, scale=None, shift=None, eps=1e-5, act="gelu")
    assert backend.not_supported_reasons("group_norm_act", gn_args) == [
        "group_norm_act: cuda takes CUDA tensors only, got cpu",
        "group_norm_act: x has dtype float64, cuda supports float32, float16, bfloat16",
        "group_norm_act: act='gelu' not supported by cuda (silu, none)",
    ]
    q, k = torch.randn(1, 2, 10, 48), torch.randn(1, 2, 65, 48)
    reasons = backend.not_supported_reasons("attention", dict(q=q, k=k, v=k, scale=None))
    assert reasons == [
        "attention: cuda takes CUDA tensors only, got cpu",
        "attention: head dim D=48 not supported by cuda (32, 64, 128)",
        "attention: Lk=65 not supported by cuda (1 to 64 context tokens, in shared memory)",
    ]
    u = torch.randn(2, 3)
    loss_args = dict(u=u, du=u, v_target=u, t=torch.rand(2), r=torch.rand(2), c=0.01, p=1.0)
    assert backend.not_supported_reasons("meanflow_loss", loss_args) == [
        "meanflow_loss: cuda takes CUDA tensors only, got cpu"
    ]


@needs_cuda_torch
def test_shared_memory_fits_a100_and_h100():
    """Every supported (Lk, D) fits the opt-in shared memory of sm_80 (163 KiB) and sm_90 (227 KiB)."""
    module = extension()
    # K, V (and dK, dV) rows padded to D + 4 floats (Lk rounded up to 4), plus per warp (8) its row tile (4 rows,
    # 2 at D = 128) of q rows and 64 probabilities (and dq rows and 64 p * ds for the tangent).
    assert module.attention_fwd_smem_bytes(64, 128, True, True, True) == 4 * (4 * 64 * 132 + 8 * 2 * (2 * 128 + 128))
    assert module.attention_fwd_smem_bytes(20, 64, False, False, False) == 4 * (2 * 20 * 68 + 8 * 4 * (64 + 64))
    assert module.attention_fwd_smem_bytes(33, 32, True, False, True) == 4 * (3 * 36 * 36 + 8 * 4 * (2 * 32 + 128))
    # backward: K, V and a tile of 16 q and grad_o rows padded to D + 4, 16 x 64 probabilities and dS
    assert module.attention_bwd_smem_bytes(64, 128) == 4 * (2 * 64 * 132 + 2 * 16 * 132 + 2 * 16 * 64)
    assert module.group_norm_bwd_smem_bytes(8) == 64
    a100_optin = 163 * 1024
    for head_dim in (32, 64, 128):
        worst = max(
            module.attention_fwd_smem_bytes(64, head_dim, True, True, True),
            module.attention_bwd_smem_bytes(64, head_dim),
        )
        assert worst <= a100_optin, (head_dim, worst)


def nvcc_flags_of_setup() -> list[str]:
    """NVCC_FLAGS as setup.py defines them (read, not imported: importing setup.py runs setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS")


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory) -> dict[str, str]:
    """ptxas -v output per .cu file, compiled for sm_90 with the build's flags (the files run in parallel)."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    from torch.utils.cpp_extension import include_paths

    out_dir = tmp_path_factory.mktemp("ptxas")
    # torch's own nvcc flags for extensions (cpp_extension COMMON_NVCC_FLAGS and its C++ standard)
    torch_flags = [
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        "-std=c++20",
    ]
    includes = [f"-I{path}" for path in include_paths()]
    processes = {}
    for source in KERNEL_FILES:
        command = [nvcc, "-cubin", "-arch=sm_90", "-Xptxas", "-v", *torch_flags, *nvcc_flags_of_setup()]
        command += [*includes, "-o", str(out_dir / f"{source.stem}.cubin"), str(source)]
        processes[source.name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reports = {}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"nvcc failed on {name}:\n{output[-4000:]}"
        reports[name] = output
    return reports


@needs_cuda_torch
def test_ptxas_reports_no_spills(ptxas_reports):
    for name, report in ptxas_reports.items():
        # "Function properties for <mangled>" is followed by "<n> bytes stack frame, <s> bytes spill stores, ..."
        entries = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                             r"(\d+) bytes spill loads", report)  # fmt: skip
        kernels = [entry for entry in entries if parse_instantiation(entry[0]) is not None]
        assert kernels, f"{name}: no kernel found in the ptxas report"
        spilling = [(entry[0], entry[2], entry[3]) for entry in kernels if entry[2] != "0" or entry[3] != "0"]
        assert spilling == [], f"{name}: kernels spill (name, store bytes, load bytes): {spilling}"


@pytest.fixture(scope="module")
def built_library() -> str:
    return extension().__file__


def run_cuobjdump(flag: str, library: str) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's backends/nvidia/bin)")
    result = subprocess.run([tool, flag, library], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


@needs_cuda_torch
def test_built_kernels_use_no_local_memory(built_library):
    report = run_cuobjdump("-res-usage", built_library)
    usage = re.findall(r"Function (\S+):\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    ours = [entry for entry in usage if parse_instantiation(entry[0]) is not None]
    # every kernel x element type x template variant: GN looped 2 x 2 + 2, GN resident 3 items x (2 + 1) x (block,
    # warp), GN batch sums 1, attention 3 head dims x (4 + 2) + its split sums 1, loss 2 + 2 (the loss totals
    # kernel has no element type: 1)
    assert len(ours) == DTYPES_PER_KERNEL * (6 + 18 + 1 + 3 * 6 + 1 + 4) + 1, [entry[0] for entry in ours]
    heavy = [(name, stack, local) for name, _, stack, local in ours if stack != "0" or local != "0"]
    assert heavy == [], f"kernels with stack or local memory: {heavy}"


@needs_cuda_torch
def test_vectorised_kernels_issue_16_byte_loads(built_library):
    sass = run_cuobjdump("-sass", built_library)
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    checked = {kernel: 0 for kernel in KERNELS}
    for function in functions:
        name, _, body = function.partition("\n")
        parsed = parse_instantiation(name.strip())
        if parsed is None:
            continue
        kernel, element_type, integers = parsed
        if kernel in SCALAR_KERNELS:
            continue
        if KERNELS[kernel] is not None and integers[KERNELS[kernel]] != VECTOR_WIDTH[element_type]:
            continue  # the scalar fallback for unaligned or odd sizes
        assert "LDG.E.128" in body, f"{kernel} ({element_type}, {integers}) has no 16-byte global load"
        checked[kernel] += 1
    assert all(count >= DTYPES_PER_KERNEL for count in checked.values()), checked


def test_cuda_launchers_do_not_synchronise():
    """The hot path never asks the host to wait: no .item(), .cpu(), .tolist() or synchronize() in the
    launchers (device properties are cached by torch)."""
    for family in LAUNCHERS:
        source = (ROOT / "imf_kernels" / "cuda" / f"{family}.py").read_text()
        for forbidden in (".item(", ".cpu(", ".tolist(", "synchronize(", ".numpy("):
            assert forbidden not in source, f"imf_kernels/cuda/{family}.py calls {forbidden}"


def test_setup_says_once_that_it_builds_without_cuda(tmp_path):
    """With no nvcc (CUDA_HOME pointing nowhere) setup.py still runs, and says why there is no extension."""
    environment = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda")}
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--help"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [line for line in result.stderr.splitlines() if line.startswith("imf-kernels:")]
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    else:
        reason = "nvcc not found (set CUDA_HOME)"
    assert messages == [f"imf-kernels: building without the CUDA extension imf_kernels._C: {reason}"]
