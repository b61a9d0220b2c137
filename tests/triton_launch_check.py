"""Checks of `imf_kernels.triton._launch` against Triton's own launch path, without a GPU (run by
tests/test_triton_launch.py in a process of its own: Triton compiles here, so TRITON_INTERPRET must be off).

A stand-in CUDA driver makes Triton compile each kernel for sm_90 (ptxas runs, nothing is loaded) and hands every
launch to a recorder in place of the C launcher, so the arguments the cached path passes can be compared with those
`JITFunction.run` passes for the same call. Prints "ok <check>" per check; an AssertionError says what differed.
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.compiler import compiler  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

STREAM = 1234  # the stand-in's current stream, as the launch must pass it
LAUNCHES: list[tuple] = []  # what reached the "C launcher": (grid_x, grid_y, grid_z, stream, function, ..., args)
RECORD = True  # False: launches are dropped (bench/launch_overhead.py --stand-in-driver times them)


def _record_launch(*args) -> None:
    """The C launcher's part: call the enter hook with the launch metadata (Triton's launchers skip a None hook),
    launch (here: record), call the exit hook."""
    metadata, enter, exit_ = args[6:9]
    if enter is not None:
        enter(metadata)
    if RECORD:
        LAUNCHES.append(args)
    if exit_ is not None:
        exit_(metadata)


class StandInDriver(CudaDriver):
    """The current device 0, an sm_90 target, stream STREAM; launches recorded instead of run."""

    def __init__(self) -> None:
        self.launcher_cls = lambda src, metadata: _record_launch
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: STREAM
        self.get_device_capability = lambda device=0: (9, 0)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


LOADED: list[str] = []  # the name of each compiled kernel as it is loaded (once per compiled variant)


def _init_handles(self) -> None:  # CompiledKernel's: the module "loaded" without a driver
    if self.module is not None:
        return
    LOADED.append(self.name)
    self.module, self.function, self.n_regs, self.n_spills, self.n_max_threads = "module", f"fn:{self.name}", 0, 0, 1024
    self._run = driver.active.launcher_cls(self.src, self.metadata)


driver.set_active(StandInDriver())
compiler.CompiledKernel._init_handles = _init_handles
compiler.max_shared_mem = lambda device: 232448

from imf_kernels.triton import _launch  # noqa: E402
from imf_kernels.triton import attention as attention_family  # noqa: E402
from imf_kernels.triton import group_norm as gn_family  # noqa: E402
from imf_kernels.triton import loss as loss_family  # noqa: E402


def _normal(value):
    """A launch argument in a comparable form: tensors by dtype, shape, strides and address alignment (each call
    allocates its outputs afresh), the rest as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16 == 0)
    return value


def _launches_of(fn) -> list[tuple]:
    start = len(LAUNCHES)
    fn()
    return [tuple(_normal(v) for v in (*launch[:6], *launch[9:])) + (launch[6] is None,) for launch in LAUNCHES[start:]]


def _cases():
    gen = torch.Generator().manual_seed(0)
    bf16 = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    x, dx = bf16(3, 96, 5, 7), bf16(3, 96, 5, 7)  # 3 channels per group of 32, 35 positions
    weight, bias, scale, shift, dscale, dshift = bf16(96), bf16(96), bf16(3, 96), bf16(3, 96), bf16(2, 96), bf16(2, 96)
    mean, rstd = torch.randn(3, 32, generator=gen), torch.rand(3, 32, generator=gen) + 0.5
    q, k, v, dq = bf16(2, 3, 40, 64), bf16(2, 3, 24, 64), bf16(2, 3, 24, 64), bf16(2, 3, 40, 64)
    o, lse = bf16(2, 3, 40, 64), torch.randn(2, 3, 40, generator=gen)
    u, du, vp, vt = (bf16(5, 4, 6, 6) for _ in range(4))
    t, r = torch.rand(5, generator=gen), 0.5 * torch.rand(5, generator=gen)
    w = torch.rand(5, generator=gen)
    grad_total = torch.tensor(0.7)
    return {
        "gn forward": lambda: gn_family.gn_act_fwd(x, 32, weight, bias, scale, shift, 1e-5, "silu"),
        "gn forward-with-tangent on 2 of 3 rows": lambda: gn_family.gn_act_jvp_fwd(
            x, dx[:2], 32, weight, bias, scale, shift, dscale, dshift, 1e-5, "silu"
        ),
        "gn backward": lambda: gn_family.gn_act_bwd(dx, x, 32, weight, bias, scale, shift, mean, rstd, "silu"),
        "attention forward": lambda: attention_family.attention_fwd(q, k, v, 0.125),
        "attention forward-with-tangent, strided q": lambda: attention_family.attention_jvp_fwd(
            q.transpose(2, 3).contiguous().transpose(2, 3), k, v, dq, None, v, 0.125
        ),
        "attention backward": lambda: attention_family.attention_bwd(o, q, k, v, o, lse, 0.125),
        "imf loss forward": lambda: loss_family.imf_loss_fwd(u, du, vp, vt, t, r, 0.01, 1.0),
        "imf loss backward": lambda: loss_family.imf_loss_bwd(grad_total, u, du, vp, vt, t, r, w, w),
        "meanflow loss forward": lambda: loss_family.meanflow_loss_fwd(u, du, vt, t, r, 0.01, 1.0),
    }


def check_cached_launches_pass_what_triton_passes() -> None:
    """Per launcher call: Triton's path (cache off), then the cached path twice (the first call fills the cache
    through Triton, the second launches directly): the same launches with the same arguments, in the same order
    (the direct launch passes no launch metadata: no hook reads it)."""
    for name, call in _cases().items():
        _launch.ENABLED = False
        triton_launches = _launches_of(call)
        _launch.ENABLED = True
        first, cached = _launches_of(call), _launches_of(call)
        assert triton_launches, f"{name}: nothing launched"
        strip = lambda launches: [launch[:-1] for launch in launches]  # noqa: E731
        # (the first call fills the cache through Triton where an earlier case has not filled it already)
        assert strip(first) == strip(triton_launches), f"{name}: the cache-filling call launches otherwise"
        assert strip(cached) == strip(triton_launches), (
            f"{name}: the cached launch passes other arguments than Triton's:\n{cached}\n{triton_launches}"
        )
        assert all(launch[3] == STREAM for launch in cached), f"{name}: not on the current stream"
        assert all(launch[-1] for launch in cached), f"{name}: the direct launch made launch metadata"
        assert not any(launch[-1] for launch in triton_launches), f"{name}: Triton's launch made no metadata"


def check_the_key_is_as_fine_as_tritons_specialisation() -> None:
    """For arguments that Triton specialises differently (ints 1, 16, 17, 2^31, 2^40; tensors of two dtypes at
    aligned and unaligned addresses; floats; None; bools), the keys differ too; and equal keys mean equal
    specialisations over every pair of those values."""
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    base = torch.zeros(64, dtype=torch.bfloat16)
    values = [0, 1, 2, 15, 16, 17, 32, 2**31 - 16, 2**31, 2**40, 2**63, -1, -16, 1.0, 1e-5, None, True, False]
    values += [base, base[1:], base[8:], base.float(), base.float()[4:], base.half()]
    for a in values:
        for b in values:
            same_key = _launch.launch_key(0, (a,), {}) == _launch.launch_key(0, (b,), {})
            spec_a = native_specialize_impl(backend, a, False, True, True)
            spec_b = native_specialize_impl(backend, b, False, True, True)
            if same_key:
                assert spec_a == spec_b, f"one key for {a!r} and {b!r}, which Triton specialises as {spec_a}, {spec_b}"
    assert _launch.launch_key(0, (base,), {}) != _launch.launch_key(1, (base,), {}), "the device is not in the key"
    assert _launch.launch_key(0, (), {"A": 1, "B": 2}) != _launch.launch_key(0, (), {"A": 2, "B": 1})


def check_hooks_and_unfilled_parameters_take_tritons_path() -> None:
    """A registered launch hook sees every launch with its metadata; a launch leaving a parameter to its default is
    never cached (Triton fills the default); a runtime argument by keyword is refused (the key would hold it)."""
    import triton
    import triton.language as tl
    from triton import knobs

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr = 32):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    src, dst = torch.randn(40), torch.empty(40)
    for _ in range(3):
        _launch.launch_kernel(_copy, (2,), src, dst, 40)
    assert list(_copy._imf_compiled.values()) == [_launch._NOT_CACHED], "a defaulted parameter was cached"
    try:
        _launch.launch_kernel(_copy, (2,), src, dst, n=40, BLOCK=32)
    except TypeError as error:
        assert "gets runtime arguments by keyword (n)" in str(error), error
    else:
        raise AssertionError("a runtime argument by keyword was taken")
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        start = len(LAUNCHES)
        for _ in range(2):
            gn_family.gn_act_fwd(*_gn_args())
        assert len(seen) == 2 and all(metadata is not None for metadata in seen), seen
        assert all(launch[6] is not None for launch in LAUNCHES[start:]), "a hooked launch had no metadata"
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def check_tangent_row_counts_share_one_compiled_kernel() -> None:
    """The GroupNorm forward with a tangent on the first rows (the iMF step's, whose count changes every step):
    counts Triton would specialise (1, multiples of 16) compile no variant of their own (do_not_specialize)."""
    gen = torch.Generator().manual_seed(1)
    x, dx = (torch.randn(40, 64, 3, 3, generator=gen).to(torch.bfloat16) for _ in range(2))
    scale, dscale = (torch.randn(40, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    loaded = len(LOADED)
    for rows in (17, 16, 1, 32, 5):
        gn_family.gn_act_jvp_fwd(x, dx[:rows], 32, None, None, scale, None, dscale[:rows], None, 1e-5, "silu")
    assert LOADED[loaded:] == ["_gn_fwd_kernel"], LOADED[loaded:]


def _gn_args():
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    return x, 32, None, None, None, None, 1e-5, "none"


CHECKS = [
    check_cached_launches_pass_what_triton_passes,
    check_the_key_is_as_fine_as_tritons_specialisation,
    check_hooks_and_unfilled_parameters_take_tritons_path,
    check_tangent_row_counts_share_one_compiled_kernel,
]

if __name__ == "__main__":
    for check in CHECKS:
        started = time.perf_counter()
        check()
        print(f"ok {check.__name__} ({time.perf_counter() - started:.0f} s)")
    sys.exit(0)
