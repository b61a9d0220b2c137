"""What a call launches: the torch ops that would run a kernel on a GPU, and the Triton kernels (interpreter).

Fixed costs decide the small shapes of the benchmarks: every extra kernel (a cast, a zero fill, a sum) costs a few
microseconds on a GPU, as much as a small GroupNorm. The tests of tests/test_launches.py (Triton) and
tests/test_cuda_emulated.py (cuda, whose kernels the emulator records) list each public op's launches exactly.

    with recorded() as launches:
        op()
    launches  # ["triton:_gn_fwd_kernel", ...] and torch ops by name, e.g. "_to_copy", "sum", "zeros"
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import imf_kernels as K

# torch ops that launch no kernel on a GPU: allocations, views and metadata
NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "view",
    "_unsafe_view",
    "as_strided",
    "select",
    "slice",
    "t",
    "transpose",
    "expand",
    "detach",
    "alias",
    "unsqueeze",
    "squeeze",
    "_reshape_alias",
    "split",
    "split_with_sizes",
    "unbind",
    "permute",
    "lift_fresh",
    "set_",
}


def call_site() -> str:
    """Where a launch comes from: "file.py:line function" of the innermost frame in this repository's packages
    (imf, imf_kernels; a Triton kernel's launcher, not their shared launch helper), else "backward: <autograd
    node>" inside a backward pass, else the innermost frame outside torch (e.g. the caller's `loss.backward()`: its
    gradient seed), else "?"."""
    frame, outside = sys._getframe(1), None
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        where = f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        if ("/imf/" in path or "/imf_kernels/" in path) and not path.endswith("/triton/_launch.py"):
            return where  # (the Triton launchers' shared helper is not a site: its caller is)
        if outside is None and "/torch/" not in path and path != __file__.replace("\\", "/"):
            outside = where
        frame = frame.f_back
    node = torch._C._current_autograd_node()
    return f"backward: {node.name()}" if node is not None else outside or "?"


class _Recorder(TorchDispatchMode):
    def __init__(self, launches: list[str], sites: list[str] | None):
        super().__init__()
        self.launches, self.sites = launches, sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.launches.append(name)
            if self.sites is not None:
                self.sites.append(call_site())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded(sites: list[str] | None = None) -> Iterator[list[str]]:
    """The launches made inside the block, in order: "triton:<kernel>" for a Triton kernel (run by the
    interpreter, whose own torch calls are not counted) and the name of every torch op that runs a kernel.
    `sites`: a list to which each launch's `call_site` is appended, in the same order."""
    launches: list[str] = []
    patched = None
    try:
        from triton.runtime import interpreter

        patched = interpreter.InterpretedFunction
        original = patched.run

        def run(self, *args, **kwargs):
            launches.append(f"triton:{self.fn.__name__}")
            if sites is not None:
                sites.append(call_site())
            with _disable_current_modes():
                return original(self, *args, **kwargs)

        patched.run = run
    except ImportError:
        pass
    try:
        with _Recorder(launches, sites):
            yield launches
    finally:
        if patched is not None:
            patched.run = original


def op_calls(backend: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Callable[[], object]]:
    """Calls of every public op (forward, forward-with-tangent, backward) on CPU tensors, by name; the backward
    graphs are built here, so a call is the backward alone."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.detach().clone().requires_grad_() for tensor in tensors]

    calls: dict[str, Callable[[], object]] = {}
    # GroupNorm: 4 samples, 64 channels in 32 groups of 8 x 8
    x, dx, grad_y = randn(4, 64, 8, 8), randn(4, 64, 8, 8), randn(4, 64, 8, 8)
    weight, bias = 1 + randn(64, std=0.1), randn(64, std=0.1)
    scale, shift, dscale, dshift = (randn(4, 64, std=0.1) for _ in range(4))
    modulation = dict(scale=scale, shift=shift)
    calls["gn.fwd"] = lambda: K.group_norm_act(x, 32, weight, bias, **modulation, backend=backend)
    calls["gn.jvp"] = lambda: K.group_norm_act_jvp(
        x, dx, 32, weight, bias, **modulation, dscale=dscale, dshift=dshift, backend=backend
    )
    calls["gn.jvp-first-rows"] = lambda: K.group_norm_act_jvp(
        x, dx[:2], 32, weight, bias, **modulation, dscale=dscale[:2], dshift=dshift[:2], backend=backend
    )
    gn_leaves = leaves(x, weight, bias, scale, shift)
    y = K.group_norm_act(gn_leaves[0], 32, *gn_leaves[1:3], scale=gn_leaves[3], shift=gn_leaves[4], backend=backend)
    calls["gn.bwd"] = lambda: torch.autograd.grad(y, gn_leaves, grad_y, retain_graph=True)
    plain_leaf = leaves(x)
    y_plain = K.group_norm_act(plain_leaf[0], 32, backend=backend)
    calls["gn.bwd-no-params"] = lambda: torch.autograd.grad(y_plain, plain_leaf, grad_y, retain_graph=True)
    # a residual block's norm: x returned by the op (return_input), its gradient added inside the backward
    residual_leaves = leaves(x, weight, bias, scale, shift)
    y_res, x_out = K.group_norm_act(
        residual_leaves[0], 32, *residual_leaves[1:3], scale=residual_leaves[3], shift=residual_leaves[4],
        backend=backend, return_input=True,
    )  # fmt: skip
    grad_x_out = randn(4, 64, 8, 8)
    calls["gn.bwd-residual"] = lambda: torch.autograd.grad(
        [y_res, x_out], residual_leaves, [grad_y, grad_x_out], retain_graph=True
    )
    # attention: 2 x 4 heads, 64 query rows, 24 keys of 32
    q, dq, grad_o = randn(2, 4, 64, 32), randn(2, 4, 64, 32), randn(2, 4, 64, 32)
    k, v, dk, dv = (randn(2, 4, 24, 32) for _ in range(4))
    calls["attn.fwd"] = lambda: K.attention(q, k, v, backend=backend)
    calls["attn.jvp"] = lambda: K.attention_jvp(q, k, v, dq, dk, dv, backend=backend)
    attention_leaves = leaves(q, k, v)
    o = K.attention(*attention_leaves, backend=backend)
    calls["attn.bwd"] = lambda: torch.autograd.grad(o, attention_leaves, grad_o, retain_graph=True)
    # losses: 8 samples of 4 x 8 x 8, times as float32
    u, du, v_pred, v_target = (randn(8, 4, 8, 8) for _ in range(4))
    t = torch.rand(8, generator=generator)
    r = t * torch.rand(8, generator=generator)
    calls["imf_loss.fwd"] = lambda: K.imf_loss(u, du, v_pred, v_target, t, r, backend=backend)
    loss_leaves = leaves(u, v_pred)
    total = K.imf_loss(loss_leaves[0], du, loss_leaves[1], v_target, t, r, backend=backend)[0]
    grad_total = torch.ones((), dtype=total.dtype)
    calls["imf_loss.bwd"] = lambda: torch.autograd.grad(total, loss_leaves, grad_total, retain_graph=True)
    calls["mf_loss.fwd"] = lambda: K.meanflow_loss(u, du, v_target, t, r, backend=backend)
    mf_total = K.meanflow_loss(loss_leaves[0], du, v_target, t, r, backend=backend)[0]
    calls["mf_loss.bwd"] = lambda: torch.autograd.grad(mf_total, loss_leaves[:1], grad_total, retain_graph=True)
    return calls
