"""The public ops inside a torch.compile'd function (the torch backend; aot_eager: the trace runs the ops on fake
tensors, as inductor's does, and the graphs run eagerly). Outputs against the float64 reference by the parity
rule, gradients equal to the uncompiled op's (which the op tests check against float64).

The ops break the graph (backend selection imports modules, which dynamo does not trace): they run inside a
compiled model, not in one graph with it. What this guards: the trace itself. The torch backend's per-sample
GroupNorm (scale or shift, several samples) gave ATen's kernel x as it is with sizes (1, B * C, H * W), which the
kernel reads right and the fake tensors' shape function refused ("Attempting to broadcast a dimension of
length 16"), so a compiled FiLM-modulated GroupNorm failed.
"""

import pytest
import torch

import imf_kernels
from imf_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")
FLOOR = reference.FLOOR[torch.float32]


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager")


def run(fn, inputs: dict, leaves: tuple[str, ...], grad_seed: int = 0):
    """(outputs, {leaf: gradient}) of fn(**inputs) with a random cotangent on the first output."""
    inputs = {name: value.detach().clone().requires_grad_(name in leaves) for name, value in inputs.items()}
    outputs = fn(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    first = outputs[0]
    cotangent = torch.randn(first.shape, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad(first, [inputs[name] for name in leaves], cotangent)
    return outputs, dict(zip(leaves, grads, strict=True))


def check(fn, reference_fn, inputs: dict, leaves: tuple[str, ...], names: tuple[str, ...]):
    eager_out, eager_grads = run(fn, inputs, leaves)
    out, grads = run(compiled(fn), inputs, leaves)
    truth = reference_fn(**{name: value.double() for name, value in inputs.items()})
    baseline = reference_fn(**inputs)
    truth, baseline = (t if isinstance(t, tuple) else (t,) for t in (truth, baseline))
    for name, got, want, base in zip(names, out, truth, baseline, strict=False):
        reference.check_parity(name, got, want, base, FLOOR)
    for name, grad in grads.items():
        assert torch.equal(grad, eager_grads[name]), f"grad_{name}: {(grad - eager_grads[name]).abs().max()}"


def group_norm_inputs(batch: int = 3, channels: int = 12, size: int = 5):
    return {
        "x": torch.randn(batch, channels, size, size),
        "dx": torch.randn(batch, channels, size, size),
        "weight": torch.randn(channels),
        "bias": torch.randn(channels),
        "scale": 0.5 * torch.randn(batch, channels),
        "shift": torch.randn(batch, channels),
    }


@pytest.mark.parametrize("modulation", ["none", "scale", "shift", "both"])
def test_group_norm_act_compiles(modulation):
    inputs = group_norm_inputs()
    del inputs["dx"]
    for name in ("scale", "shift"):
        if modulation not in (name, "both"):
            del inputs[name]

    def fn(**kw):
        return imf_kernels.group_norm_act(kw.pop("x"), 3, backend="torch", **kw)

    def ref(**kw):
        return reference.group_norm_act(kw.pop("x"), 3, **kw)

    check(fn, ref, inputs, tuple(inputs), ("y",))


@pytest.mark.parametrize("rows", [3, 1])
def test_group_norm_act_jvp_compiles(rows):
    inputs = group_norm_inputs()
    inputs["dx"] = inputs["dx"][:rows]

    def fn(x, dx, weight, bias, scale, shift):
        return imf_kernels.group_norm_act_jvp(x, dx, 3, weight, bias, scale=scale, shift=shift, backend="torch")

    def ref(x, dx, weight, bias, scale, shift):
        y, dy = reference.group_norm_act_jvp(x[:rows], dx, 3, weight, bias, scale=scale[:rows], shift=shift[:rows])
        full = reference.group_norm_act(x, 3, weight, bias, scale=scale, shift=shift)
        return full, dy

    check(fn, ref, inputs, ("x", "weight", "bias", "scale", "shift"), ("y", "dy"))


def test_attention_and_its_tangent_compile(monkeypatch):
    from imf_kernels.torch_ops import attention as torch_attention

    # a trace takes the written-out softmax (ATen's CPU flash kernel sits behind a data-dependent check): the eager
    # op too, for gradients to compare equal
    monkeypatch.setattr(torch_attention, "FLASH_CPU_MAX_WORK", 0)
    q, k, v = torch.randn(2, 2, 24, 32), torch.randn(2, 2, 4, 32), torch.randn(2, 2, 4, 32)
    dq = torch.randn_like(q)
    check(
        lambda q, k, v: imf_kernels.attention(q, k, v, backend="torch"),
        lambda q, k, v: reference.attention(q, k, v),
        {"q": q, "k": k, "v": v},
        ("q", "k", "v"),
        ("o",),
    )
    check(
        lambda q, k, v, dq: imf_kernels.attention_jvp(q, k, v, dq, backend="torch"),
        lambda q, k, v, dq: reference.attention_jvp(q, k, v, dq),
        {"q": q, "k": k, "v": v, "dq": dq},
        ("q", "k", "v"),
        ("o", "do"),
    )


def test_losses_compile():
    shape = (4, 3, 8, 8)
    u, du, v, target = (torch.randn(shape) for _ in range(4))
    t = torch.rand(4)
    r = t * torch.rand(4)
    check(
        lambda u, du, v, target, t, r: imf_kernels.imf_loss(u, du, v, target, t, r, backend="torch")[0],
        lambda u, du, v, target, t, r: reference.imf_loss(u, du, v, target, t, r)[0],
        {"u": u, "du": du, "v": v, "target": target, "t": t, "r": r},
        ("u", "v"),
        ("loss",),
    )
    check(
        lambda u, du, target, t, r: imf_kernels.meanflow_loss(u, du, target, t, r, backend="torch")[0],
        lambda u, du, target, t, r: reference.meanflow_loss(u, du, target, t, r)[0],
        {"u": u, "du": du, "target": target, "t": t, "r": r},
        ("u",),
        ("loss",),
    )
