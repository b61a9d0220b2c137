"""Backend registry and selection (DESIGN 4.1): `backends()`, `use_backend`, `IMF_KERNELS_BACKEND`, `auto`,
and the ValueErrors that list every reason a backend gives for not taking a call."""

import importlib.util
import re
import sys
import types

import pytest
import torch

import imf_kernels
from imf_kernels import api, dispatch, reference
from imf_kernels.torch_ops import attention as torch_attention

HAS_CUDA = torch.cuda.is_available()
# One small fp32 call per family, which every backend must take on CPU (triton through the interpreter).
_MAPS = {name: torch.randn(2, 3, 4) for name in ("u", "du", "v", "v_target")}
SMALL_CALLS = {
    "group_norm": (
        "group_norm_act",
        dict(
            x=torch.randn(1, 40, 5, 7),
            num_groups=8,
            weight=None,
            bias=None,
            scale=None,
            shift=None,
            eps=1e-5,
            act="silu",
        ),
    ),
    "attention": (
        "attention",
        dict(q=torch.randn(1, 2, 24, 32), k=torch.randn(1, 2, 20, 32), v=torch.randn(1, 2, 20, 32), scale=None),
    ),
    "loss": ("imf_loss", dict(**_MAPS, t=torch.rand(2), r=0.1 * torch.rand(2), c=0.01, p=1.0)),
}


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    """Each test starts from the default (auto) unless it sets the variable itself."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def gn_args():
    return dict(SMALL_CALLS["group_norm"][1])


def test_backends_lists_every_backend_in_priority_order():
    statuses = imf_kernels.backends()
    assert [status.name for status in statuses] == ["cuda", "triton", "torch"]
    for status in statuses:
        assert isinstance(status, imf_kernels.BackendStatus)
        assert status.usable == (status.reason is None)
        assert status.usable or (isinstance(status.reason, str) and status.reason)


def test_torch_and_triton_actually_run_here():
    """CI must exercise torch always, and triton (through the interpreter) wherever its modules exist."""
    usable = {status.name: status for status in imf_kernels.backends()}
    assert usable["torch"].usable
    for family, (op, args) in SMALL_CALLS.items():
        assert dispatch.not_supported_reasons("torch", op, args) == []
        if importlib.util.find_spec(f"imf_kernels.triton.{family}") is None:
            continue
        assert usable["triton"].usable, usable["triton"].reason
        assert dispatch.not_supported_reasons("triton", op, args) == [], family


@pytest.mark.parametrize("family", list(SMALL_CALLS))
def test_triton_refuses_a_device_it_cannot_run_in_words(family):
    """A tensor on neither CUDA nor (with the interpreter) the CPU, e.g. the meta device, is refused by each
    family's reasons (the attention family let meta tensors into the interpreter, which failed copying them)."""
    op, args = SMALL_CALLS[family]
    if importlib.util.find_spec(f"imf_kernels.triton.{family}") is None:
        pytest.skip(f"no imf_kernels.triton.{family}")
    meta = {name: value.to("meta") if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    reasons = dispatch.not_supported_reasons("triton", op, meta)
    assert any("device meta needs CUDA" in reason for reason in reasons), reasons
    with pytest.raises(ValueError, match="device meta needs CUDA"):
        getattr(imf_kernels, op)(**meta, backend="triton")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_a_gpu_only_backend_refuses_cpu_tensors_in_words():
    reason = dispatch.unavailable_reason("cuda")
    assert reason
    message = f"group_norm_act: backend 'cuda' cannot take this call: {reason}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, backend="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU triton is usable whatever TRITON_INTERPRET says")
def test_triton_needs_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in dispatch.unavailable_reason("triton")
    with pytest.raises(
        ValueError, match=r"^group_norm_act: backend 'triton' cannot take this call: .*TRITON_INTERPRET=1"
    ):
        imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, backend="triton")


def test_auto_runs_cpu_tensors_on_torch():
    assert dispatch.current_backend() == "auto"
    name, family = dispatch.select("group_norm_act", gn_args())
    assert name == "torch" and family.__name__ == "imf_kernels.torch_ops.group_norm"


def test_use_backend_sets_the_default_and_restores_it():
    assert imf_kernels.current_backend() == "auto"
    with imf_kernels.use_backend("torch"):
        assert imf_kernels.current_backend() == "torch"
        with imf_kernels.use_backend("cuda"):
            assert imf_kernels.current_backend() == "cuda"
            # an explicit backend= wins over the block
            assert dispatch.select("group_norm_act", gn_args(), backend="torch")[0] == "torch"
        assert imf_kernels.current_backend() == "torch"
    assert imf_kernels.current_backend() == "auto"
    with pytest.raises(RuntimeError), imf_kernels.use_backend("torch"):
        raise RuntimeError("leaves the block early")
    assert imf_kernels.current_backend() == "auto"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert imf_kernels.current_backend() == "torch"
    with imf_kernels.use_backend("auto"):  # the block wins over the variable
        assert imf_kernels.current_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=re.escape("$IMF_KERNELS_BACKEND: unknown backend 'tpu'; accepted: auto,")):
        imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2)


def test_unknown_backend_names_are_refused():
    with pytest.raises(
        ValueError, match=re.escape("use_backend: unknown backend 'tpu'; accepted: auto, cuda, triton, torch")
    ):
        with imf_kernels.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match=re.escape("attention: unknown backend 'tpu'")):
        imf_kernels.attention(*torch.randn(3, 1, 1, 4, 8), backend="tpu")


# ------------------------------------------------------------------------------ registry with stand-in backends


def stand_in_backend(name, refuse, calls):
    """A backend package whose attention launchers are torch's, counting calls; `refuse(op, args)` -> reasons."""
    package = types.ModuleType(name)
    package.unavailable_reason = lambda: None
    package.not_supported_reasons = refuse
    family = types.ModuleType(f"{name}.attention")
    family.not_supported_reasons = refuse

    def attention_fwd(*args):
        calls.append("attention_fwd")
        return torch_attention.attention_fwd(*args)

    family.attention_fwd = attention_fwd
    family.attention_bwd = torch_attention.attention_bwd
    return {name: package, f"{name}.attention": family}


def long_context_refusal(op, args):
    length = args["k"].shape[2]
    return [f"{op}: Lk={length} > 4096 supported by fake"] if length > 4096 else []


@pytest.fixture
def fake_backend(monkeypatch):
    """A registry with a `fake` backend first; returns the list its launchers append to."""
    calls = []
    for module_name, module in stand_in_backend("imf_fake_backend", long_context_refusal, calls).items():
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(dispatch, "BACKENDS", {"fake": "imf_fake_backend", **dispatch.BACKENDS})
    return calls


def test_the_chosen_backend_runs_the_op(fake_backend, monkeypatch):
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    truth, baseline = reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v)
    with imf_kernels.use_backend("fake"):
        reference.check_parity("o", imf_kernels.attention(q, k, v), truth, baseline, 1e-5)
    assert fake_backend == ["attention_fwd"]
    monkeypatch.setenv(dispatch.ENV_VAR, "fake")
    reference.check_parity("o", imf_kernels.attention(q, k, v), truth, baseline, 1e-5)
    assert fake_backend == ["attention_fwd"] * 2
    imf_kernels.attention(q, k, v, backend="torch")
    assert fake_backend == ["attention_fwd"] * 2


def test_a_context_longer_than_the_chosen_backend_takes_is_refused(fake_backend):
    q, k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 5000, 16), torch.randn(1, 1, 5000, 16)
    message = "attention: backend 'fake' cannot take this call: attention: Lk=5000 > 4096 supported by fake"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        imf_kernels.attention(q, k, v, backend="fake")
    assert fake_backend == []


def test_auto_lists_every_backends_reasons_when_none_fits(monkeypatch):
    """With the CPU backend replaced by one that refuses, auto names each backend and its reasons."""
    refuse = lambda op, args: [f"{op}: refused by the stand-in"]  # noqa: E731
    for module_name, module in stand_in_backend("imf_refusing_backend", refuse, []).items():
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(dispatch, "BACKENDS", {**dispatch.BACKENDS, "torch": "imf_refusing_backend"})
    with pytest.raises(ValueError) as refusal:
        imf_kernels.attention(*torch.randn(3, 1, 1, 4, 8))
    message = str(refusal.value)
    assert message.startswith("attention: no backend takes this call: cuda: ")
    assert "| triton: auto uses it only for CUDA tensors" in message or HAS_CUDA
    assert message.endswith("| torch: attention: refused by the stand-in")


def test_auto_tries_triton_before_cuda_for_cuda_tensors(monkeypatch):
    """On CUDA tensors auto takes triton when both GPU backends accept (measured faster on an H200), cuda when
    triton refuses, torch last; CPU tensors keep the registry's order. Stand-ins play both GPU backends, and the
    call is made to look like one on CUDA tensors (no GPU here)."""
    calls = {"gpu_a": [], "gpu_b": []}
    refuse_when = {"gpu_a": False, "gpu_b": False}

    def refusal(name):
        return lambda op, args: [f"{op}: refused by {name}"] if refuse_when[name] else []

    for name in calls:
        for module_name, module in stand_in_backend(f"imf_{name}", refusal(name), calls[name]).items():
            monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(
        dispatch, "BACKENDS", {"cuda": "imf_gpu_a", "triton": "imf_gpu_b", "torch": "imf_kernels.torch_ops"}
    )
    assert dispatch.auto_order(on_gpu=True) == ["triton", "cuda", "torch"]
    assert dispatch.auto_order(on_gpu=False) == ["cuda", "triton", "torch"]
    monkeypatch.setattr(dispatch, "_device_of", lambda args: torch.device("cuda"))
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    imf_kernels.attention(q, k, v)
    assert calls == {"gpu_a": [], "gpu_b": ["attention_fwd"]}
    refuse_when["gpu_b"] = True
    dispatch.clear_cache()  # refusals are never cached, but the accepted selection above is
    imf_kernels.attention(q, k, v)
    assert calls == {"gpu_a": ["attention_fwd"], "gpu_b": ["attention_fwd"]}


def test_a_backend_that_cannot_be_imported_is_unusable_not_a_crash(monkeypatch):
    monkeypatch.setattr(dispatch, "BACKENDS", {"broken": "imf_kernels_no_such_backend", **dispatch.BACKENDS})
    statuses = {status.name: status for status in imf_kernels.backends()}
    assert not statuses["broken"].usable
    assert statuses["broken"].reason.startswith("cannot import imf_kernels_no_such_backend")
    assert statuses["torch"].usable
    with pytest.raises(ValueError, match=r"^group_norm_act: backend 'broken' cannot take this call: cannot import"):
        imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, backend="broken")


# ---------------------------------------------------------------------------------------- the selection cache


def test_switching_the_default_between_calls_changes_the_backend(fake_backend, monkeypatch):
    """Selections are cached per call signature, but the block and the variable are read on every call."""
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    imf_kernels.attention(q, k, v)  # auto: torch for CPU tensors
    assert fake_backend == []
    with imf_kernels.use_backend("fake"):
        imf_kernels.attention(q, k, v)
        assert fake_backend == ["attention_fwd"]
        imf_kernels.attention(q, k, v, backend="torch")
        assert fake_backend == ["attention_fwd"]
    imf_kernels.attention(q, k, v)
    assert fake_backend == ["attention_fwd"]
    monkeypatch.setenv(dispatch.ENV_VAR, "fake")
    imf_kernels.attention(q, k, v)
    assert fake_backend == ["attention_fwd"] * 2
    with imf_kernels.use_backend("torch"):
        imf_kernels.attention(q, k, v)
    assert fake_backend == ["attention_fwd"] * 2
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    imf_kernels.attention(q, k, v)
    monkeypatch.setenv(dispatch.ENV_VAR, "fake")
    imf_kernels.attention(q, k, v)
    assert fake_backend == ["attention_fwd"] * 3
    monkeypatch.delenv(dispatch.ENV_VAR)
    imf_kernels.attention(q, k, v)
    assert fake_backend == ["attention_fwd"] * 3


def test_repeated_calls_do_not_probe_the_backends_again(fake_backend, monkeypatch):
    """A call like an earlier successful one (shapes, dtypes, devices, options) reuses its selection; a new
    shape is probed; a refusal is never cached, so its error is raised in full every time."""
    probes = []
    unavailable_reason = dispatch.unavailable_reason
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name: probes.append(name) or unavailable_reason(name))
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    with imf_kernels.use_backend("fake"):
        for _ in range(5):
            imf_kernels.attention(q, k, v)
        assert probes == ["fake"]
        imf_kernels.attention(q, k[:, :, :4].contiguous(), v[:, :, :4].contiguous())
        assert probes == ["fake"] * 2
        long_context = torch.randn(1, 2, 5000, 16)
        for calls in (3, 4):
            with pytest.raises(ValueError, match=re.escape("attention: Lk=5000 > 4096 supported by fake")):
                imf_kernels.attention(q, long_context, long_context)
            assert probes == ["fake"] * calls
    assert fake_backend == ["attention_fwd"] * 6


def test_a_backend_that_takes_every_call_is_selected_without_probing(fake_backend, monkeypatch):
    """A package that declares TAKES_EVERY_CALL (torch) is selected without being asked and without a cache entry,
    by name and as auto's first choice for CPU tensors; the declaration is read from the registered package."""
    probes = []
    unavailable_reason = dispatch.unavailable_reason
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name: probes.append(name) or unavailable_reason(name))
    dispatch.clear_cache()
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    args = dict(q=q, k=k, v=v, scale=None)
    assert dispatch.select("attention", args) == ("torch", torch_attention)  # auto: fake is not for CPU tensors
    assert dispatch.select("attention", args, backend="torch") == ("torch", torch_attention)
    assert probes == [] and dispatch._selections == {}
    assert dispatch.select("attention", args, backend="fake")[0] == "fake"  # no declaration: probed, cached
    assert probes == ["fake"] and len(dispatch._selections) == 1
    monkeypatch.setattr(sys.modules["imf_fake_backend"], "TAKES_EVERY_CALL", True, raising=False)
    dispatch.clear_cache()
    long_context = torch.randn(1, 1, 5000, 16)  # the fake's own check would refuse it, but it declared otherwise
    assert dispatch.select("attention", dict(q=q[:1], k=long_context, v=long_context, scale=None), "fake")[0] == "fake"
    assert probes == ["fake"]


def test_replacing_the_registry_forgets_cached_selections(monkeypatch):
    q, k, v = torch.randn(3, 1, 1, 4, 8)
    imf_kernels.attention(q, k, v)  # auto picks torch, and the selection is cached
    refuse = lambda op, args: [f"{op}: refused by the stand-in"]  # noqa: E731
    for module_name, module in stand_in_backend("imf_refusing_backend", refuse, []).items():
        monkeypatch.setitem(sys.modules, module_name, module)
    with monkeypatch.context() as patch:
        patch.setattr(dispatch, "BACKENDS", {**dispatch.BACKENDS, "torch": "imf_refusing_backend"})
        with pytest.raises(ValueError, match=re.escape("torch: attention: refused by the stand-in")):
            imf_kernels.attention(q, k, v)
    truth = reference.attention(q.double(), k.double(), v.double())
    reference.check_parity("o", imf_kernels.attention(q, k, v), truth, reference.attention(q, k, v), 1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU triton is usable whatever TRITON_INTERPRET says")
def test_the_cache_follows_the_triton_interpreter_switch(monkeypatch):
    """TRITON_INTERPRET is part of the cache key: a call triton took with it on is refused with it off."""
    if importlib.util.find_spec("imf_kernels.triton.group_norm") is None:
        pytest.skip("imf_kernels.triton.group_norm is not written yet")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 8, 2, 2)
    truth, baseline = reference.group_norm_act(x.double(), 2), reference.group_norm_act(x, 2)
    reference.check_parity("y", imf_kernels.group_norm_act(x, 2, backend="triton"), truth, baseline, 1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ValueError, match=r"^group_norm_act: backend 'triton' cannot take this call: .*TRITON_INTERPRET"
    ):
        imf_kernels.group_norm_act(x, 2, backend="triton")


# ----------------------------------------------------------------------------------- calls without a graph


def test_calls_without_a_graph_skip_the_autograd_function(monkeypatch):
    """With nothing for autograd to record (no_grad, or no input requiring grad) the op runs the Function's
    forward directly, with the same result; with an input requiring grad it goes through the apply of the
    Function's old-style twin (`_plain`, which skips apply's argument binding)."""
    q, k, v = torch.randn(3, 1, 2, 6, 16)
    expected = api._Attention.apply(torch_attention, q, k, v, 16**-0.5)[0]
    applied = []
    apply = api._Attention._plain.apply
    monkeypatch.setattr(api._Attention._plain, "apply", lambda *args: applied.append(1) or apply(*args))
    assert torch.equal(imf_kernels.attention(q, k, v), expected)
    with torch.no_grad():
        assert torch.equal(imf_kernels.attention(q, k, v.requires_grad_()), expected)
    assert applied == []
    out = imf_kernels.attention(q, k, v)
    assert applied == [1] and out.requires_grad
    (grad_v,) = torch.autograd.grad(out.sum(), v)
    # o = p v, so d sum(o) / dv = column sums of p
    p = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5, dim=-1)
    torch.testing.assert_close(grad_v, p.sum(-2)[..., None].expand_as(v), rtol=1e-6, atol=1e-6)


def _function_cases():
    """(Function, its arguments on the torch family, the indices of the arguments that require grad) for each of
    the public ops' Functions, on fresh random inputs of odd sizes."""
    from imf_kernels.torch_ops import group_norm as torch_group_norm
    from imf_kernels.torch_ops import loss as torch_loss

    x, dx = torch.randn(2, 6, 3, 5, dtype=torch.float64), torch.randn(2, 6, 3, 5, dtype=torch.float64)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    scale, shift, dscale, dshift = torch.randn(4, 2, 6, dtype=torch.float64)
    q, k, v, dq, dk, dv = torch.randn(6, 2, 3, 5, 8, dtype=torch.float64)
    u, du, v_pred, v_target = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    t, r = torch.rand(3, dtype=torch.float64), 0.3 * torch.rand(3, dtype=torch.float64)
    gn, attn, loss = torch_group_norm, torch_attention, torch_loss
    return [
        (api._GroupNormAct, (gn, x, 3, weight, bias, scale, shift, 1e-5, "silu"), (1, 3, 4, 5, 6)),
        (api._GroupNormActJvp, (gn, x, dx, 3, weight, bias, scale, shift, dscale, dshift, 1e-5, "silu"), (1, 4, 7)),
        (api._Attention, (attn, q, k, v, 8**-0.5), (1, 2, 3)),
        (api._AttentionJvp, (attn, q, k, v, dq, dk, dv, 8**-0.5), (1, 2, 3)),
        (api._ImfLoss, (loss, u, du, v_pred, v_target, t, r, 0.01, 1.0), (1, 3)),
        (api._MeanflowLoss, (loss, u, du, v_target, t, r, 0.01, 1.0), (1,)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_the_plain_twin_records_the_functions_graph(case):
    """Each Function's old-style twin returns the same outputs, marks the same ones non-differentiable and
    back-propagates the same gradients as the Function's own apply (float64, every differentiable input)."""
    function, args, graded = _function_cases()[case]
    results = []
    for apply in (function.apply, function._plain.apply):
        inputs = [a.detach().requires_grad_() if i in graded else a for i, a in enumerate(args)]
        outputs = apply(*inputs)
        differentiable = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
        seeds = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i)) for i, o in
                 enumerate(differentiable)]  # fmt: skip
        grads = torch.autograd.grad(differentiable, [inputs[i] for i in graded], seeds)
        results.append(([o for o in outputs if isinstance(o, torch.Tensor)], len(differentiable), grads))
    (outputs, count, grads), (twin_outputs, twin_count, twin_grads) = results
    assert count == twin_count >= 1
    assert all(torch.equal(a, b) for a, b in zip(outputs, twin_outputs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, twin_grads, strict=True))


def test_transforms_and_forward_ad_use_the_ctx_free_function(monkeypatch):
    """torch.func.jvp and forward-mode AD need the ctx-free Function (its setup_context and jvp): the op calls
    its own apply there, and the twin only for a plain graph."""
    calls = []
    for function in (api._Attention, api._Attention._plain):
        apply = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, _f=function, _apply=apply: calls.append(_f) or _apply(*a))
    q, k, v, dq = torch.randn(4, 1, 2, 5, 8, dtype=torch.float64)
    out, tangent = torch.func.jvp(lambda q: imf_kernels.attention(q, k, v), (q,), (dq,))
    assert calls and set(calls) == {api._Attention}  # (functorch applies it again one level down)
    calls.clear()
    with torch.autograd.forward_ad.dual_level():
        dual = imf_kernels.attention(torch.autograd.forward_ad.make_dual(q, dq), k, v)
        forward_tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
    assert calls == [api._Attention]
    imf_kernels.attention(q.requires_grad_(), k, v)
    assert calls == [api._Attention, api._Attention._plain]
    truth_out, truth_tangent = torch.func.jvp(lambda q: reference.attention(q, k, v), (q.detach(),), (dq,))
    torch.testing.assert_close(out, truth_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, truth_tangent, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward_tangent, truth_tangent, rtol=1e-10, atol=1e-12)
