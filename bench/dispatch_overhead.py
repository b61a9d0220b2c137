"""Per-call Python overhead of the public ops: input checks, backend selection and the autograd Function.

    PYTHONPATH=. python bench/dispatch_overhead.py             # 20 x 500 calls per row, CPU, one thread
    PYTHONPATH=. python bench/dispatch_overhead.py --calls 200 --reps 5

Each public op runs on tiny CPU float32 tensors (so its torch-backend launcher costs little), in two modes:
`no_grad` (inside torch.no_grad, as sampling runs) and `grad` (x / q / u and the parameters require grad, as
training runs; the graph is dropped after each call). Columns, in microseconds of the thread's CPU time per
call (the machine is shared: wall-clock medians swing with the other processes' load), each the median over
`reps` runs of `calls` calls, the variants' runs interleaved:
  public     the public op with backend=None (auto), what a model calls
  named      the public op with backend="torch"
  apply      the op's autograd Function called directly: Function.apply(torch family module, ...) (the public
             op records a graph through the Function's old-style twin, `_plain`, without apply's binding)
  forward    the Function's forward alone: the torch launcher (plus the loss total for the losses)
  overhead   public - forward: everything Python adds around the launcher (for the losses this includes the
             two batch means of the returned stats, which are tensor ops)
  select     `dispatch.select` alone (auto), the backend-resolution part
On a GPU the same host time is spent per call; at batch 1 it is longer than the kernels.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import imf_kernels
from imf_kernels import api, dispatch
from imf_kernels.torch_ops import attention as torch_attention
from imf_kernels.torch_ops import group_norm as torch_group_norm
from imf_kernels.torch_ops import loss as torch_loss


def per_call_us(variants: dict[str, Callable[[], Any]], calls: int, reps: int) -> dict[str, float]:
    """Per variant: the median over `reps` runs of the thread CPU time of `calls` calls, per call, in us.

    The variants' runs are interleaved, so a drift of the machine's speed shifts them all alike."""
    for fn in variants.values():
        for _ in range(max(calls // 10, 10)):  # warm-up: imports, caches, allocator
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.thread_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.thread_time() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def _no_grad_forward(function: type[torch.autograd.Function], *args: Any) -> Any:
    """function.forward(*args) as Function.apply runs it: under no_grad (the torch launchers write into
    preallocated outputs with out=, which autograd refuses when an input requires grad)."""
    with torch.no_grad():
        return function.forward(*args)


def cases() -> tuple[dict[str, dict[str, Callable[[], Any]]], tuple[torch.Tensor, ...]]:
    """(op -> {"public", "named", "apply", "forward", "select"} callables on tiny CPU float32 inputs, the
    inputs that require grad in the `grad` mode)."""
    x, dx = torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2)
    weight, bias = torch.randn(8), torch.randn(8)
    scale, shift, dscale, dshift = torch.randn(4, 1, 8)
    q, k, v, dq, dk, dv = torch.randn(6, 1, 2, 4, 8)
    u, du, v_pred, v_target = torch.randn(4, 2, 3, 4)
    t, r = torch.rand(2), 0.1 * torch.rand(2)
    gn = dict(x=x, num_groups=4, weight=weight, bias=bias, scale=scale, shift=shift, eps=1e-5, act="silu")
    gn_jvp = dict(gn, dx=dx, dscale=dscale, dshift=dshift)
    attn = dict(q=q, k=k, v=v, scale=None)
    attn_jvp = dict(attn, dq=dq, dk=dk, dv=dv)
    imf = dict(u=u, du=du, v=v_pred, v_target=v_target, t=t, r=r, c=0.01, p=1.0)
    mf = dict(u=u, du=du, v_target=v_target, t=t, r=r, c=0.01, p=1.0)
    # (public op with its arguments, Function, Function arguments after the family, select arguments)
    ops = {
        "group_norm_act": (
            lambda backend: imf_kernels.group_norm_act(x, 4, weight, bias, scale=scale, shift=shift, backend=backend),
            api._GroupNormAct,
            (x, 4, weight, bias, scale, shift, 1e-5, "silu"),
            gn,
        ),
        "group_norm_act_jvp": (
            lambda backend: imf_kernels.group_norm_act_jvp(
                x, dx, 4, weight, bias, scale=scale, shift=shift, dscale=dscale, dshift=dshift, backend=backend
            ),
            api._GroupNormActJvp,
            (x, dx, 4, weight, bias, scale, shift, dscale, dshift, 1e-5, "silu"),
            gn_jvp,
        ),
        "attention": (
            lambda backend: imf_kernels.attention(q, k, v, backend=backend),
            api._Attention,
            (q, k, v, 8**-0.5),
            attn,
        ),
        "attention_jvp": (
            lambda backend: imf_kernels.attention_jvp(q, k, v, dq, dk, dv, backend=backend),
            api._AttentionJvp,
            (q, k, v, dq, dk, dv, 8**-0.5),
            attn_jvp,
        ),
        "imf_loss": (
            lambda backend: imf_kernels.imf_loss(u, du, v_pred, v_target, t, r, backend=backend),
            api._ImfLoss,
            (u, du, v_pred, v_target, t, r, 0.01, 1.0),
            imf,
        ),
        "meanflow_loss": (
            lambda backend: imf_kernels.meanflow_loss(u, du, v_target, t, r, backend=backend),
            api._MeanflowLoss,
            (u, du, v_target, t, r, 0.01, 1.0),
            mf,
        ),
    }
    families = {"group_norm": torch_group_norm, "attention": torch_attention, "loss": torch_loss}
    variants = {}
    for op, (public, function, function_args, select_args) in ops.items():
        family = families[dispatch.OP_FAMILIES[op]]
        variants[op] = {
            "public": functools.partial(public, None),
            "named": functools.partial(public, "torch"),
            "apply": functools.partial(function.apply, family, *function_args),
            "forward": functools.partial(_no_grad_forward, function, family, *function_args),
            "select": functools.partial(dispatch.select, op, select_args),
        }
    return variants, (x, weight, bias, scale, shift, q, k, v, u, v_pred)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls per timed run")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per row (the median is reported)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    variants, differentiable = cases()
    print(f"per-call thread CPU time, us (median of {options.reps} x {options.calls} calls), torch {torch.__version__}")
    columns = ("public", "named", "apply", "forward", "overhead", "select")
    print(f"{'op':<20}{'mode':<9}" + "".join(f"{column:>10}" for column in columns))
    for mode in ("no_grad", "grad"):
        for tensor in differentiable:
            tensor.requires_grad_(mode == "grad")
        with torch.set_grad_enabled(mode == "grad"):
            for op, calls in variants.items():
                times = per_call_us(calls, options.calls, options.reps)
                times["overhead"] = times["public"] - times["forward"]
                print(f"{op:<20}{mode:<9}" + "".join(f"{times[column]:>10.1f}" for column in columns))


if __name__ == "__main__":
    main()
