"""The fused forward-with-tangent (DESIGN 3.3) against the reference path (`torch.func.jvp` over plain ops), with
the same weights and inputs: u, du, v, the loss and every parameter gradient, per preset and per backend; the
fused sampler; the bf16 option; and a short training run through each path on `gauss`."""

import copy
import math

import pytest
import torch

import imf.model
import imf_kernels
from imf.config import get_preset
from imf.gauss import GaussClasses, one_step_error
from imf.model import Cond, CondTangent, IMFNet, ModelConfig
from imf.objectives import (
    FlowMatchingObjective,
    IMFObjective,
    MeanFlowObjective,
    model_fused_jvp,
    model_jvp,
    model_jvp_with_v,
)
from imf.sampler import CudaGraphSampler, sample
from imf_kernels import dispatch, reference

FLOAT64_RTOL = 1e-9  # the two float64 paths differ by rounding only
# relative to max |expected|, as the op tests, at 10x their float32 floor: the whole model's parameter gradients are
# sums over the batch and the positions through every layer (a bias's terms cancel), which reached 0.9 of the ops'
# floor in one run
FLOOR = 10 * reference.FLOOR[torch.float32]


def randomised(cfg: ModelConfig, dtype=torch.float64, seed: int = 0) -> IMFNet:
    """The model with every weight perturbed, so that the zero-initialised layers contribute to u, du and v."""
    torch.manual_seed(seed)
    net = IMFNet(cfg).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def tiny_config(**overrides) -> ModelConfig:
    """Small enough for the Triton interpreter; head dim 16 (the smallest the Triton attention takes)."""
    base = dict(
        width=16,
        channel_mult=(1, 2),
        context_dim=16,
        num_classes=4,
        condition_on_t=True,
        cross_attn_resolutions=(8, 4),
        self_attn_resolutions=(4,),
        head_dim=16,
    )
    return ModelConfig(**{**base, **overrides})


def inputs(cfg: ModelConfig, n: int, dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, cfg.image_channels, cfg.image_size, cfg.image_size)
    z = torch.randn(shape, generator=gen, dtype=dtype)
    dz = torch.randn(shape, generator=gen, dtype=dtype)
    a, b = torch.rand(n, generator=gen, dtype=dtype), torch.rand(n, generator=gen, dtype=dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)  # the null class included
    omega = 1 + 7 * torch.rand(n, generator=gen, dtype=dtype)
    t_min, t_max = (
        0.5 * torch.rand(n, generator=gen, dtype=dtype),
        0.5 + 0.5 * torch.rand(n, generator=gen, dtype=dtype),
    )
    return z, dz, Cond(t - r, y, omega, t_min, t_max, t)


def training_batch(cfg: ModelConfig, n: int, dtype=torch.float64, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.image_channels, cfg.image_size, cfg.image_size, generator=gen, dtype=dtype)
    return x, torch.randint(0, cfg.num_classes, (n,), generator=gen)


def loss_and_grads(objective, net, x, y, draws):
    net.zero_grad(set_to_none=True)
    loss, metrics = objective.loss_from_draws(net, x, y, draws)
    loss.backward()
    return loss.detach(), metrics, {name: p.grad.clone() for name, p in net.named_parameters()}


def assert_imf_step_matches_reference(net, reference_net, cfg: ModelConfig, n: int, seed: int, rtol: float, what: str):
    """The fused iMF loss and every parameter gradient of `net` (torch backend) against the reference path's of
    `reference_net` (the same weights) on one fresh batch and draw."""
    x, y = training_batch(cfg, n)
    draws = IMFObjective().draw(x, torch.Generator().manual_seed(seed))
    with imf_kernels.use_backend("torch"):
        loss, _, grads = loss_and_grads(IMFObjective(), net, x, y, draws)
    loss_ref, _, grads_ref = loss_and_grads(IMFObjective(jvp="reference"), reference_net, x, y, draws)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0)
    assert_close_everywhere(grads, grads_ref, rtol, what)


def assert_close_everywhere(got: dict, want: dict, rtol: float, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=rtol * max(scale, 1e-12), msg=f"{what} {name}"
        )


# --------------------------------------------------------------------------- float64, torch backend, presets


@pytest.mark.parametrize("preset", ["gauss", "digits"])
def test_fused_outputs_match_reference_jvp_float64(preset):
    cfg = get_preset(preset).model
    net = randomised(cfg)
    z, dz, cond = inputs(cfg, 3)
    ones = torch.ones_like(cond.h)
    with imf_kernels.use_backend("torch"):
        u, du, v = net(z, cond, dz, CondTangent(ones, ones))
    u_ref, du_ref, v_ref = model_jvp_with_v(net, z, cond, dz)
    assert du.abs().max() > 1e-2 and not du.requires_grad  # a non-trivial tangent, and no graph on it
    for name, got, want in (("u", u, u_ref), ("du", du, du_ref), ("v", v, v_ref)):
        torch.testing.assert_close(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * want.abs().max().item(), msg=name)
    # the conditions' tangent alone (dz = 0) and dz alone (conditions fixed) add up to the joint tangent
    _, du_cond, _ = net(z, cond, None, CondTangent(ones, ones))
    _, du_z, _ = net(z, cond, dz)
    torch.testing.assert_close(du_cond + du_z, du, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * du.abs().max().item())
    assert du_cond.abs().max() > 1e-3  # the h and t tokens really move


@pytest.mark.parametrize("config", ["digits", "self-attention"])
def test_tangent_on_some_rows_only_float64(config):
    """A tangent on the first m rows gives those rows' du of the whole-batch tangent and every row's u and v;
    `model_fused_jvp(rows=...)` (what the losses call: du only where h != 0) gives du on the chosen rows, exactly 0
    on the others, and u, v on all, in the original row order."""
    cfg = get_preset("digits").model if config == "digits" else tiny_config(head_dim=8)
    net = randomised(cfg)
    z, dz, cond = inputs(cfg, 5)
    ones = torch.ones_like(cond.h)
    with imf_kernels.use_backend("torch"):
        u, du, v = net(z, cond, dz, CondTangent(ones, ones))
        u_head, du_head, v_head = net(z, cond, dz[:3], CondTangent(ones[:3], ones[:3]))
        assert du_head.shape[0] == 3
        close = lambda got, want, name: torch.testing.assert_close(
            got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * want.abs().max().item(), msg=name
        )
        for name, got, want in (("u", u_head, u), ("du", du_head, du[:3]), ("v", v_head, v)):
            close(got, want, f"leading rows: {name}")
        for rows in ([True, False, True, False, True], [False] * 5, [True] * 5):
            rows = torch.tensor(rows)
            u_rows, du_rows, v_rows = model_fused_jvp(net, z, cond, dz, rows=rows)
            close(u_rows, u, f"rows {rows.tolist()}: u")
            close(v_rows, v, f"rows {rows.tolist()}: v")
            if rows.any():
                close(du_rows[rows], du[rows], f"rows {rows.tolist()}: du")
            assert (du_rows[~rows] == 0).all()


@pytest.mark.parametrize("preset", ["gauss", "digits"])
def test_imf_loss_and_every_gradient_match_reference_float64(preset):
    cfg = get_preset(preset).model
    net = randomised(cfg)
    x, y = training_batch(cfg, 6)
    fused, ref = IMFObjective(jvp="fused"), IMFObjective(jvp="reference")
    draws = ref.draw(x, torch.Generator().manual_seed(3))
    assert (draws.r < draws.t).any() and (draws.r == draws.t).any()
    with imf_kernels.use_backend("torch"):
        loss, metrics, grads = loss_and_grads(fused, net, x, y, draws)
    loss_ref, metrics_ref, grads_ref = loss_and_grads(ref, net, x, y, draws)
    # the fused loss kernel takes t and r in float32 (imf_kernels.imf_loss): h = t - r carries a 6e-8 rounding
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for key in ("loss_u", "loss_v"):
        torch.testing.assert_close(metrics[key], metrics_ref[key], rtol=1e-6, atol=0, msg=key)
    assert_close_everywhere(grads, grads_ref, 1e-6, f"{preset} grad")
    # the terms (plain formulas on the fused pass's outputs) agree with the reference to float64 rounding
    with imf_kernels.use_backend("torch"):
        terms = fused.terms(net, x, y, draws)
    terms_ref = ref.terms(net, x, y, draws)
    for key in ("v_g", "v_cp", "u", "du", "v", "loss"):
        torch.testing.assert_close(terms[key], terms_ref[key], rtol=FLOAT64_RTOL, atol=1e-12, msg=key)


@pytest.mark.parametrize("v_head", ["aux", "boundary"])
def test_fused_step_takes_v_c_of_kept_fm_rows_from_its_own_forward(v_head):
    """The fused step's no-grad call leaves out the flow-matching rows that keep their class: their v_c is the
    training forward's own v (same z, h = 0, omega, interval (0, 1), class) and they need no tangent. It evaluates
    v_c' on the rows with h != 0 (plus any guided row without such a twin) and v_u on the guided kept rows; the
    loss and every gradient equal the reference path's, which evaluates v_c' on every row (float64)."""
    cfg = tiny_config(v_head=v_head, head_dim=8)
    net = randomised(cfg)
    x, y = training_batch(cfg, 32)
    fused, ref = IMFObjective(jvp="fused"), IMFObjective(jvp="reference")
    draws = ref.draw(x, torch.Generator().manual_seed(11))
    omega_p = torch.where(
        (draws.t_min <= draws.t) & (draws.t <= draws.t_max), draws.omega, torch.ones_like(x[:, 0, 0, 0])
    )
    guided_kept = (omega_p != 1) & ~draws.drop
    fm_kept = (draws.t == draws.r) & ~draws.drop
    assert (
        (fm_kept & guided_kept).any() and (guided_kept & ~fm_kept).any() and (draws.drop & (draws.t == draws.r)).any()
    )
    calls = []
    for name in ("fused_v", "v"):
        method = getattr(net, name)
        setattr(
            net, name, lambda z, cond, method=method, name=name: calls.append((name, z.shape[0])) or method(z, cond)
        )
    with imf_kernels.use_backend("torch"):
        loss, metrics, grads = loss_and_grads(fused, net, x, y, draws)
    assert calls == [("fused_v", int((draws.t != draws.r).sum()) + int(guided_kept.sum()))]
    calls.clear()
    loss_ref, metrics_ref, grads_ref = loss_and_grads(ref, net, x, y, draws)
    assert calls == [("v", len(y) + int(guided_kept.sum()))]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for key in ("loss_u", "loss_v"):
        torch.testing.assert_close(metrics[key], metrics_ref[key], rtol=1e-6, atol=0, msg=key)
    assert_close_everywhere(grads, grads_ref, 1e-6, f"{v_head} grad")


def test_meanflow_and_flow_matching_match_reference_float64():
    cfg = tiny_config(v_head="boundary", head_dim=8)
    net = randomised(cfg)
    x, y = training_batch(cfg, 6)
    mf = MeanFlowObjective(cfg_kappa=0.5, cfg_t_min=0.2, cfg_t_max=0.9)
    draws = mf.draw(x, torch.Generator().manual_seed(4))
    with imf_kernels.use_backend("torch"):
        loss, _, grads = loss_and_grads(mf, net, x, y, draws)
    loss_ref, _, grads_ref = loss_and_grads(MeanFlowObjective(**{**vars(mf), "jvp": "reference"}), net, x, y, draws)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert_close_everywhere(grads, grads_ref, 1e-6, "mf grad")
    # MF's (u, du) from the fused forward without the v-head equal torch.func.jvp's
    z, dz, cond = inputs(cfg, 2)
    u, du, v = model_fused_jvp(net, z, cond, dz, with_v=False)
    u_ref, du_ref = model_jvp(net, z, cond, dz)
    assert v is None
    torch.testing.assert_close(du, du_ref, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * du_ref.abs().max().item())

    def fm_grads(jvp):
        net.zero_grad(set_to_none=True)
        loss, _ = FlowMatchingObjective(jvp=jvp).loss(net, x, y, torch.Generator().manual_seed(5))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    fm_loss, fm_g = fm_grads("fused")
    fm_loss_ref, fm_g_ref = fm_grads("reference")
    torch.testing.assert_close(fm_loss, fm_loss_ref, rtol=FLOAT64_RTOL, atol=0)
    assert_close_everywhere(fm_g, fm_g_ref, FLOAT64_RTOL, "fm grad")


def test_boundary_v_head_matches_reference_float64():
    cfg = tiny_config(v_head="boundary", head_dim=8)
    net = randomised(cfg)
    assert_imf_step_matches_reference(net, net, cfg, 5, seed=6, rtol=1e-6, what="boundary grad")


def test_tangent_never_reaches_a_weight_gradient():
    """The gradient of a loss through u only is the same whether or not the tangent is computed alongside."""
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg)
    z, dz, cond = inputs(cfg, 3)
    ones = torch.ones_like(cond.h)
    weights = torch.randn_like(z)

    def grads(**tangents):
        net.zero_grad(set_to_none=True)
        out = net(z, cond, **tangents)
        (out[0] * weights).sum().backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    with_tangent, without = grads(dz=dz, dcond=CondTangent(ones, ones)), grads()
    assert_close_everywhere(with_tangent, without, 1e-12, "grad")


@pytest.mark.parametrize("block", ["resblock", "resblock-1x1-skip", "self-attention", "cross-attention"])
@pytest.mark.parametrize("with_tangent", [False, True], ids=["primal", "jvp"])
def test_a_block_adds_no_gradient_of_its_input(block, with_tangent, monkeypatch):
    """The residual blocks take x back from their first GroupNorm (`return_input`), so the skip branch's gradient of x
    is added by the norm's backward kernel: one add fewer in the block's backward than with x returned as it is
    (triton, recorded; self-attention keeps the add of its normed input's two gradients, q's and k/v's), and every
    gradient as the plain forward's (float64 on the torch backend, a copy of the block's weights)."""
    import launches

    from imf.model import AttnBlock, ResBlock
    from imf_kernels import api

    torch.manual_seed(5)
    if block.startswith("resblock"):
        net, side = ResBlock(32, 48 if block.endswith("skip") else 32, 8), torch.randn(3, 8)  # side: pooled context
    else:
        cross = block == "cross-attention"
        net, side = AttnBlock(32, 16, 8 if cross else None), torch.randn(3, 5, 8) if cross else None  # context
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 32, 4, 4)
    tangents = (torch.randn_like(x), None if side is None else torch.randn_like(side)) if with_tangent else ()

    def cast(t, dtype):
        return None if t is None else t.to(dtype)

    def run(module, dtype, backend=None):
        leaf = x.to(dtype).clone().requires_grad_()
        module = module.to(dtype)
        with imf_kernels.use_backend(backend or "torch"):
            if backend is None:  # the plain forward
                y = module(leaf, cast(side, dtype))
            else:
                y, _ = module.fused(leaf, cast(side, dtype), *(cast(t, dtype) for t in tangents))
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
            with launches.recorded() as launched:
                y.backward(grad)
        return launched, [leaf.grad, *(p.grad for p in module.parameters())]

    launched, _ = run(copy.deepcopy(net), torch.float32, "triton")
    assert "triton:_gn_bwd_kernel" in launched
    adds = [name for name in launched if name.startswith("add")]
    assert adds == (["add"] if block == "self-attention" else []), launched
    with monkeypatch.context() as patch:  # x returned as it is: autograd adds its two gradients
        patch.setattr(api, "_input_output", lambda function, *args: (*api._apply(function, *args), args[1]))
        unfused, _ = run(copy.deepcopy(net), torch.float32, "triton")
    assert [name for name in unfused if name.startswith("add")] == [*adds, "add"], unfused
    _, fused = run(copy.deepcopy(net), torch.float64, "torch")
    _, expected = run(copy.deepcopy(net), torch.float64)
    for got, want in zip(fused, expected, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_every_fused_pass_takes_its_film_and_cross_attention_keys_from_one_bank_each(monkeypatch):
    """The fused passes (with tangents on the first rows, the v-head beside; `fused_u`; `fused_v`) compute every
    ResBlock's FiLM in one `imf.layers.film_bank` and every cross-attention block's keys and values in one
    `imf.layers.kv_bank` (no `film` per block, no block projecting its own), with the outputs and every parameter
    gradient of the blocks' own calls, in float64."""
    from imf import layers
    from imf.model import AttnBlock

    cfg = tiny_config(head_dim=8)
    net = randomised(cfg)
    z, dz, cond = inputs(cfg, 5)
    ones = torch.ones_like(cond.h)
    gen = torch.Generator().manual_seed(8)
    weights = torch.randn(2, *z.shape, generator=gen, dtype=z.dtype)

    def passes():
        net.zero_grad(set_to_none=True)
        u, du, v = net(z, cond, dz[:3], CondTangent(ones[:3], ones[:3]))
        ((u * weights[0]).sum() + (v * weights[1]).sum()).backward()
        with torch.no_grad():
            outputs = {"u": u, "du": du, "v": v, "fused_u": net.fused_u(z, cond), "fused_v": net.fused_v(z, cond)}
        return outputs, {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    with imf_kernels.use_backend("torch"):
        with monkeypatch.context() as patch:  # each block its own FiLM, keys and values
            patch.setattr(layers, "film_bank", lambda *args, **kwargs: None)
            patch.setattr(layers, "kv_bank", lambda *args, **kwargs: None)
            want_outputs, want_grads = passes()
        sizes = {"film_bank": [], "kv_bank": []}
        for name, bank in [(name, getattr(layers, name)) for name in sizes]:
            record = lambda *args, name=name, bank=bank, **kwargs: (
                sizes[name].append(len(args[1])) or bank(*args, **kwargs)
            )
            monkeypatch.setattr(layers, name, record)
        monkeypatch.setattr(layers, "film", lambda *args, **kwargs: pytest.fail("a block computed its own FiLM"))
        fused, own_kv = AttnBlock.fused, []

        def spy(self, x, ctx, dx=None, dctx=None, kv=None):
            own_kv.append(ctx is not None and kv is None)  # a cross-attention block left to project its own
            return fused(self, x, ctx, dx, dctx, kv)

        monkeypatch.setattr(AttnBlock, "fused", spy)
        got_outputs, got_grads = passes()
    assert not any(own_kv) and len(own_kv) > 3
    res_blocks = sum(1 for m in net.modules() if type(m).__name__ == "ResBlock")
    cross = sum(1 for m in net.modules() if isinstance(m, AttnBlock) and m.to_kv.in_features == cfg.context_dim)
    head_cross = sum(isinstance(attn, AttnBlock) for attn in net.up[-1].attn)
    head = len(net.up[-1].res)
    assert head_cross > 0  # the heads' cross-attention is banked with the trunk's
    assert sizes["film_bank"] == [res_blocks, res_blocks - head, res_blocks - head]  # training pass, fused_u, fused_v
    assert sizes["kv_bank"] == [cross, cross - head_cross, cross - head_cross]
    assert_close_everywhere(got_outputs, want_outputs, 1e-10, "output")
    assert_close_everywhere(got_grads, want_grads, 1e-10, "grad")
    assert got_grads.keys() == want_grads.keys() and any(".to_kv." in name for name in got_grads)


def _conditioning_case(condition_on_t: bool, tangents: str, batch: int, rows: int):
    """A randomised tiny model's conditions of `batch` rows, and a tangent of the first `rows` on h and/or t."""
    net = randomised(tiny_config(condition_on_t=condition_on_t))
    _, _, cond = inputs(net.cfg, batch, seed=batch + rows)
    gen = torch.Generator().manual_seed(10 * batch + rows)
    dh, dt = (torch.randn(rows, generator=gen, dtype=torch.float64) for _ in range(2))
    dcond = {
        "none": None,
        "h": CondTangent(dh),
        "t": CondTangent(None, dt),
        "h,t": CondTangent(dh, dt),
    }[tangents]
    return net, cond, dcond


@pytest.mark.parametrize(
    "condition_on_t, tangents, batch, rows",
    [(True, "h,t", 5, 3), (True, "t", 4, 4), (True, "h", 3, 1), (True, "none", 5, 5), (False, "h", 6, 2)]
    + [(False, "none", 1, 1), (False, "h", 1, 1)],
)
def test_the_scalar_tokens_come_from_one_bank(condition_on_t, tangents, batch, rows, monkeypatch):
    """`Conditioning.fused` takes the omega, t_min, t_max, h (and t) tokens from one `scalar_tokens_bank`: the
    context, its tangent on the first rows (h's, t's or both) and every conditioning parameter's gradient are those
    of each ScalarTokens block's own call (float64, to rounding), in fewer launches; and where a parameter cannot
    be stacked (e.g. an FSDP2 shard) the bank declines and the blocks' own calls run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launches import recorded

    import imf.model

    net, cond, dcond = _conditioning_case(condition_on_t, tangents, batch, rows)
    upstream = torch.randn(batch, net.cond.norm.normalized_shape[0], dtype=torch.float64)

    def call():
        net.zero_grad(set_to_none=True)
        net.cond.fused(cond, dcond)  # warm: the frequencies and the gather order are kept after the first call
        with recorded() as forward:
            ctx, dctx = net.cond.fused(cond, dcond)
        with recorded() as backward:
            (ctx * upstream[:, None]).sum().backward()
        grads = {name: p.grad for name, p in net.cond.named_parameters()}
        return ctx, dctx, grads, forward, backward

    ctx, dctx, grads, forward, backward = call()
    with monkeypatch.context() as patch:
        patch.setattr(imf.model, "scalar_tokens_bank", lambda *args, **kwargs: None)
        want_ctx, want_dctx, want_grads, own_forward, own_backward = call()
    torch.testing.assert_close(ctx, want_ctx, rtol=1e-12, atol=1e-12)
    if tangents == "none":
        assert dctx is None and want_dctx is None
    else:
        assert dctx.shape == (rows, *ctx.shape[1:])
        torch.testing.assert_close(dctx, want_dctx, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys() and all(grad is not None for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-12, atol=1e-12, msg=name)
    scalars = 5 if condition_on_t else 4
    # each block's own call: a sinusoid (4 kernels), two matmuls, a SiLU, the tokens' add, more for its tangent;
    # the bank: one sinusoid of every value, two batched matmuls, a SiLU, the tokens' gather and add, whatever
    # the count of blocks (their parameters' stacks, 4 + 1, aside)
    assert len(own_forward) - len(forward) >= 5 * (scalars - 1), (forward, own_forward)
    # backward (after the test's own sum): the LayerNorm's, the gather's (a zero fill and an index_add), three
    # batched matmuls (the hidden layer's gradient, both weights' in their own layout), the SiLU's, and sums (the
    # biases', the tokens' and the class tokens' over the batch, the class embedding's over its tokens; a batch of
    # 1 needs fewer); no copy of a block's slice of the stacked weight gradients
    sums = ["sum"] if batch > 1 else []
    assert backward[4:] == [
        "native_layer_norm_backward",
        *sums,
        "new_zeros",
        "index_add",
        "bmm",
        "silu_backward",
        "bmm",
        "sum",
        "bmm",
        "sum",
        "sum",
        *sums,
        "embedding_dense_backward",
    ]
    assert len(own_backward) - len(backward) >= 5 * scalars - 8, own_backward

    class Shard(torch.Tensor):
        pass

    first = net.cond.t_min_tokens.mlp[0]
    first.weight = torch.nn.Parameter(first.weight.detach().as_subclass(Shard))
    blocks = [net.cond.omega_tokens, net.cond.t_min_tokens]
    assert imf.model.scalar_tokens_bank(blocks, [cond.h, cond.h]) is None
    with pytest.raises(ValueError, match=r"^scalar_tokens_bank: dvalues must have at most 1 entries, got 2$"):
        imf.model.scalar_tokens_bank(blocks[:1], [cond.h], [cond.h, cond.h])


def test_the_scalar_tokens_bank_trains_after_its_first_call_ran_under_inference_mode():
    """The tokens' gather order is kept per token counts; one first built inside torch.inference_mode (e.g.
    sampling) is a plain tensor, which the graded pass can save for its backward."""
    import imf.model

    net, cond, _ = _conditioning_case(True, "none", 3, 3)
    imf.model._token_scalars.cache_clear()
    with torch.inference_mode():
        sampled, _ = net.cond.fused(cond)
    graded, _ = net.cond.fused(cond)
    graded.sum().backward()
    assert net.cond.h_tokens.mlp[0].weight.grad is not None
    torch.testing.assert_close(graded, sampled, rtol=0, atol=0)


def test_bad_jvp_path_is_refused():
    with pytest.raises(ValueError, match="IMFObjective: jvp must be one of 'fused', 'reference', got 'fast'"):
        IMFObjective(jvp="fast")


# --------------------------------------------------------------------------- float32, per backend


def skip_unless_runs(backend: str, cfg: ModelConfig) -> None:
    x = torch.randn(2, cfg.width, cfg.image_size, cfg.image_size)
    gn_args = dict(x=x, num_groups=4, weight=None, bias=None, scale=None, shift=None, eps=1e-5, act="silu")
    q = torch.randn(2, 1, 64, cfg.head_dim)
    reasons = [
        *dispatch.not_supported_reasons(backend, "group_norm_act", gn_args),
        *dispatch.not_supported_reasons(backend, "attention", dict(q=q, k=q, v=q, scale=None)),
    ]
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(dict.fromkeys(reasons)))


def check_float32_backend(
    backend: str, cfg: ModelConfig, n: int, device: str = "cpu", channels_last: bool = False
) -> None:
    """u, du, v, the loss and every gradient of the fused path on `backend` in float32 against the float64
    reference path, within 2x the error of the float32 reference path (FlashAttention's rule) plus a floor.
    channels_last: the fused path's model has channels-last weights (ModelConfig.channels_last), the references
    not."""
    skip_unless_runs(backend, cfg)
    net64 = randomised(cfg).to(device)
    net32 = copy.deepcopy(net64).float()
    fused_net = net32 if not channels_last else copy.deepcopy(net32).to(memory_format=torch.channels_last)
    z, dz, cond = inputs(cfg, n)
    as32 = lambda c: Cond(*(a.to(device, torch.float32) if a.is_floating_point() else a.to(device) for a in c))
    z, dz, cond64 = z.to(device), dz.to(device), Cond(*(a.to(device) for a in cond))
    ones = torch.ones(n, device=device)
    with imf_kernels.use_backend(backend):
        fused = fused_net(z.float(), as32(cond), dz.float(), CondTangent(ones, ones))
    exact = model_jvp_with_v(net64, z, cond64, dz)
    baseline = model_jvp_with_v(net32, z.float(), as32(cond), dz.float())
    for name, got, want, base in zip(("u", "du", "v"), fused, exact, baseline, strict=True):
        reference.check_parity(f"{backend} {name}", got.double(), want, base.double(), FLOOR)

    x, y = training_batch(cfg, n)
    x, y = x.to(device), y.to(device)
    draws = IMFObjective().draw(x, torch.Generator().manual_seed(7))
    draws32 = copy.deepcopy(draws)
    draws32.host = None  # the rows are then chosen from the float32 draws themselves
    for key, value in vars(draws32).items():
        if value is not None and value.is_floating_point():
            setattr(draws32, key, value.float())
    with imf_kernels.use_backend(backend):
        loss, _, grads = loss_and_grads(IMFObjective(), fused_net, x.float(), y, draws32)
    loss64, _, grads64 = loss_and_grads(IMFObjective(jvp="reference"), net64, x, y, draws)
    loss32, _, grads32 = loss_and_grads(IMFObjective(jvp="reference"), net32, x.float(), y, draws32)
    reference.check_parity(f"{backend} loss", loss.double(), loss64, loss32.double(), FLOOR)
    for name in grads64:
        reference.check_parity(
            f"{backend} grad {name}", grads[name].double(), grads64[name], grads32[name].double(), FLOOR
        )


def test_torch_backend_float32():
    check_float32_backend("torch", tiny_config(), 3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_triton_backend_under_the_interpreter(channels_last):
    """A tiny model (the interpreter runs every program in Python): every GN, attention and loss call on triton."""
    cfg = tiny_config(channel_mult=(1,), self_attn_resolutions=(), cross_attn_resolutions=(8,))
    check_float32_backend("triton", cfg, 2, channels_last=channels_last)


def test_torch_backend_float32_channels_last():
    check_float32_backend("torch", tiny_config(), 3, channels_last=True)


@pytest.mark.parametrize("config", ["digits", "self-attention"])
def test_channels_last_model_matches_reference_float64(config, monkeypatch):
    """ModelConfig.channels_last: the same numbers as the reference path of the same weights (u, du on the first
    rows, v; the loss and every gradient), every feature map channels-last from the first convolution on (each
    GroupNorm call gets one), u, du, v contiguous."""
    cfg = get_preset("digits").model if config == "digits" else tiny_config()
    net = randomised(cfg)
    cl_cfg = copy.deepcopy(cfg)
    cl_cfg.channels_last = True
    cl_net = IMFNet(cl_cfg).double()
    cl_net.load_state_dict(net.state_dict())
    weight = cl_net.mid1.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    layouts = []
    for name in ("group_norm_act", "group_norm_act_jvp"):
        op, jvp = getattr(imf_kernels, name), name.endswith("_jvp")

        def spy(x, *args, _op=op, _jvp=jvp, **kwargs):
            maps = [x, args[0]] if _jvp else [x]  # (and the tangent dx, as it comes)
            layouts.extend(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in maps)
            return _op(x, *args, **kwargs)

        monkeypatch.setattr(imf_kernels, name, spy)
    z, dz, cond = inputs(cfg, 3)
    rows = 2
    with imf_kernels.use_backend("torch"):
        ones = torch.ones(rows, dtype=z.dtype)  # (h and t move at rate 1, as in model_jvp_with_v)
        u, du, v = cl_net(z, cond, dz[:rows], CondTangent(ones, ones))
    assert layouts and all(layouts), layouts
    u_ref, du_ref, v_ref = model_jvp_with_v(net, z, cond, dz)
    for name, got, want in (("u", u, u_ref), ("du", du, du_ref[:rows]), ("v", v, v_ref)):
        assert got.is_contiguous(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item(), msg=name)

    assert_imf_step_matches_reference(cl_net, net, cfg, 4, seed=7, rtol=1e-9, what="grad")

    # the reference path (torch.func.jvp over the plain ops) of the channels-last model itself, with its GroupNorm
    # input as it comes and made contiguous (imf.model.group_norm: what torch 2.11-2.13's forward-mode GroupNorm needed)
    # (as it comes only on a torch that takes it: where the flag is False)
    for contiguous in sorted({imf.model._GROUP_NORM_INPUT_CONTIGUOUS, True}):
        monkeypatch.setattr(imf.model, "_GROUP_NORM_INPUT_CONTIGUOUS", contiguous)
        got = model_jvp_with_v(cl_net, z, cond, dz)
        for name, out, want in zip(("u", "du", "v"), got, (u_ref, du_ref, v_ref), strict=True):
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9 * want.abs().max().item(), msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", list(dispatch.BACKENDS))
@pytest.mark.parametrize("preset", ["gauss", "digits"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_every_backend_on_gpu(backend, preset, channels_last):
    check_float32_backend(backend, get_preset(preset).model, 8, device="cuda", channels_last=channels_last)


# --------------------------------------------------------------------------- sampling and bf16


def test_fused_sampler_matches_reference_loop():
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg)
    z, _, _ = inputs(cfg, 4)
    y = torch.tensor([0, 1, 4, 2])
    got = sample(net, z, y, omega=2.5, interval=(0.3, 0.7), steps=3)
    full = lambda value: torch.full((4,), float(value), dtype=torch.float64)
    want = z
    for t, r in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
        cond = Cond(full(t - r), y, full(2.5), full(0.3), full(0.7), full(t))
        with torch.no_grad():
            want = want - (t - r) * net.u(want, cond)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # times are float32 in both (sampler's convention)


OMEGA, INTERVAL = "omega must be a finite number >= 1", "interval must satisfy 0 <= t_min <= t_max <= 1"
BAD_GUIDANCE = [
    (0.5, (0.3, 0.7), OMEGA),
    (math.inf, (0.3, 0.7), OMEGA),
    (math.nan, (0.3, 0.7), OMEGA),
    (2.0, (0.7, 0.3), INTERVAL),
    (2.0, (-0.1, 0.5), INTERVAL),
    (2.0, (math.nan, 0.5), INTERVAL),
]


@pytest.mark.parametrize("omega, interval, message", BAD_GUIDANCE)
def test_sampler_refuses_guidance_outside_its_range(omega, interval, message):
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg)
    z, _, _ = inputs(cfg, 2)
    with pytest.raises(ValueError, match=message):
        sample(net, z, torch.tensor([0, 1]), omega=omega, interval=interval, steps=1)


def test_bf16_targets_run_in_bf16_and_stay_close():
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg, dtype=torch.float32)
    x, y = training_batch(cfg, 8, dtype=torch.float32)
    draws = IMFObjective().draw(x, torch.Generator().manual_seed(8))
    exact = IMFObjective(jvp="reference").guided_target(copy.deepcopy(net).double(), x.double(), y, draws)
    fp32 = IMFObjective().guided_target(net, x, y, draws)
    bf16 = IMFObjective(bf16=True).guided_target(net, x, y, draws)
    assert bf16[3].dtype == torch.float32
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    assert rel(fp32[3], exact[3]) < 1e-5 < rel(bf16[3], exact[3]) < 3e-2  # v_c' really ran in bf16, that far off
    # the JVP pass and the loss stay fp32: same loss as without bf16 up to the targets' difference
    loss, _ = IMFObjective(bf16=True).loss_from_draws(net, x, y, draws)
    assert loss.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_graph_sampler_matches_eager():
    cfg = get_preset("digits").model
    net = randomised(cfg, dtype=torch.float32).cuda()
    noise = torch.randn(16, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    graphed = CudaGraphSampler(net, tuple(noise.shape), steps=2)
    for omega, interval in ((1.0, (0.4, 0.65)), (3.0, (0.1, 0.9))):  # runtime inputs, no recapture
        want = sample(net, noise, y, omega=omega, interval=interval, steps=2)
        torch.testing.assert_close(graphed(noise, y, omega=omega, interval=interval), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a training run through each path


@pytest.mark.slow
def test_training_on_gauss_matches_between_paths():
    """200 iMF steps on `gauss` (a tiny model in float64) through each path from the same initialisation, data and
    draws: the loss curves coincide, and so do the 1-NFE errors of the trained networks."""
    data = GaussClasses.from_digits()
    cfg = tiny_config(width=8, context_dim=16, num_classes=10, head_dim=8, self_attn_resolutions=())

    def run(jvp: str):
        net = randomised(cfg, seed=3)
        with torch.no_grad():  # zero-initialised outputs, as the presets start
            for module in (net.out.conv, net.v_out.conv):
                module.weight.zero_()
                module.bias.zero_()
        initial_error = one_step_error(copy.deepcopy(net).float(), data, n=256)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.9, 0.95))
        objective = IMFObjective(jvp=jvp)
        gen, data_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        losses, raw = [], []
        with imf_kernels.use_backend("torch"):
            for _ in range(200):
                x, y = data.sample(16, data_gen)
                loss, metrics = objective.loss(net, x.double(), y, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                raw.append(float(metrics["loss_u"]))
            return torch.tensor(losses), torch.tensor(raw), one_step_error(net.float(), data, n=256), initial_error

    fused_losses, fused_raw, fused_error, initial_error = run("fused")
    ref_losses, ref_raw, ref_error, _ = run("reference")
    # The adaptively weighted loss L / sg(L + c) stays near 2 whatever the fit (L >> c here); the unweighted
    # per-sample sum L_u is what falls as the network learns.
    assert fused_raw[-40:].mean() < fused_raw[:10].mean()  # it trained
    torch.testing.assert_close(fused_losses, ref_losses, rtol=1e-4, atol=0)
    torch.testing.assert_close(fused_raw, ref_raw, rtol=1e-4, atol=0)
    assert abs(fused_error - ref_error) < 1e-3 * ref_error, (fused_error, ref_error)
    # This 200-step width-8 network does not beat the class mean yet (1.79 measured, 1.0 = class mean), but it
    # must have learned: its untrained error (u = 0, x = e) is 10.2.
    assert fused_error < 0.5 * initial_error, (fused_error, initial_error)


# --------------------------------------------------------------------------- rows chosen on the host


def test_the_rows_of_a_step_are_chosen_from_the_host_copies_of_the_draws(monkeypatch):
    """The fused iMF step picks its target rows (v_c' where needed, v_u where guided) and its tangent rows (h != 0)
    from the draws' CPU copies: change only the copies and the calls change with them; a device tensor is never
    read for a row count (on a GPU that read waits for the device)."""
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg, dtype=torch.float32)
    x, y = training_batch(cfg, 8, dtype=torch.float32)
    objective = IMFObjective()
    draws = objective.draw(x, torch.Generator().manual_seed(12))
    assert draws.host is not None and all(a.device.type == "cpu" for a in vars(draws.host).values())
    calls = []
    fused_v, forward = net.fused_v, net.forward
    monkeypatch.setattr(net, "fused_v", lambda z, cond: calls.append(("v", z.shape[0])) or fused_v(z, cond))
    monkeypatch.setattr(
        net,
        "forward",
        lambda z, cond, dz=None, *a, **k: (
            calls.append(("jvp", None if dz is None else dz.shape[0])) or forward(z, cond, dz, *a, **k)
        ),
    )

    def rows_of(d):
        calls.clear()
        objective.loss_from_draws(net, x, y, d)
        return list(calls)

    h = draws.host
    tangent = int((h.t != h.r).sum())
    guided = (torch.where((h.t_min <= h.t) & (h.t <= h.t_max), h.omega, torch.ones_like(h.omega)) != 1) & ~h.drop
    shared = (h.t == h.r) & (h.t_min == 0) & (h.t_max == 1) & ~h.drop
    needs_cp = (h.t != h.r) | (guided & ~shared)
    assert 0 < tangent < 8 and int(guided.sum()) > 0
    assert rows_of(draws) == [("v", int(needs_cp.sum() + guided.sum())), ("jvp", tangent)]
    dropped = copy.deepcopy(draws)
    dropped.host = copy.deepcopy(draws.host)  # on a CPU draw() moves nothing: break the copies' aliasing first
    dropped.host.drop[:] = True  # on the host copies only: no guided row, so only the rows with h != 0 get v_c'
    assert rows_of(dropped) == [("v", tangent), ("jvp", tangent)]
    one_less = copy.deepcopy(draws)
    one_less.host = copy.deepcopy(draws.host)
    row = int(torch.nonzero(h.t != h.r)[0])
    one_less.host.r[row] = one_less.host.t[row]  # on the host copies only: one tangent row less
    assert rows_of(one_less)[-1] == ("jvp", tangent - 1)
    assert torch.equal(dropped.drop, draws.drop) and torch.equal(one_less.r, draws.r)  # the step's own draws: as drawn


def test_draws_without_host_copies_give_the_same_step():
    """Draws built or edited elsewhere (host None) are copied to the host when needed: the same loss, bitwise."""
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg, dtype=torch.float32)
    x, y = training_batch(cfg, 8, dtype=torch.float32)
    for objective in (IMFObjective(), MeanFlowObjective()):
        draws = objective.draw(x, torch.Generator().manual_seed(13))
        bare = copy.deepcopy(draws)
        bare.host = None
        assert torch.equal(
            objective.loss_from_draws(net, x, y, draws)[0], objective.loss_from_draws(net, x, y, bare)[0]
        )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "objective", [IMFObjective(), MeanFlowObjective(), IMFObjective(bf16=True)], ids=["imf", "mf", "imf-bf16"]
)
def test_a_fused_step_never_waits_for_the_device(objective, backend):
    """The draws, the loss and its backward queue without a host-device synchronisation (torch's sync debug mode
    raises at any): a step that waits lets the device idle while the host queues the rest (2026-11-27, H100,
    latent-b batch 64: device busy 65% of the fused step's wall time)."""
    cfg = get_preset("digits").model
    net = randomised(cfg, dtype=torch.float32).cuda()
    x = torch.randn(8, cfg.image_channels, cfg.image_size, cfg.image_size, device="cuda")
    y = torch.randint(0, cfg.num_classes, (8,), device="cuda")
    generator = torch.Generator().manual_seed(14)
    with imf_kernels.use_backend(backend):
        objective.loss(net, x, y, generator)[0].backward()  # warm-up: compiles and autotunes may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = objective.loss(net, x, y, generator)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- static rows (CUDA-graph-able steps)


@pytest.mark.parametrize("jvp", ["fused", "reference"])
@pytest.mark.parametrize("objective_type", [IMFObjective, MeanFlowObjective])
def test_static_rows_give_the_same_loss_and_gradients(objective_type, jvp, monkeypatch):
    """static_rows: every row in the target call (2B for iMF) and du on every row, so every step has the same
    shapes; the loss and every gradient are those of the rows chosen per step (float64). The host copies of the
    draws are never read: poisoned copies change nothing."""
    cfg = tiny_config(head_dim=8)
    net = randomised(cfg)
    x, y = training_batch(cfg, 8)
    draws = objective_type().draw(x, torch.Generator().manual_seed(15))

    def loss_and_grads(objective, d):  # MF leaves the v head without a gradient
        net.zero_grad(set_to_none=True)
        loss = objective.loss_from_draws(net, x, y, d)[0]
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(objective_type(jvp=jvp), draws)
    poisoned = copy.deepcopy(draws)
    poisoned.host = copy.deepcopy(draws.host)
    for value in vars(poisoned.host).values():
        if value is not None:
            value.copy_(value.flip(0) if value.dtype == torch.bool else value.flip(0) * 0.5)
    calls = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda z, *a, **k: calls.append(z.shape[0]) or forward(z, *a, **k))
    if hasattr(net, "fused_v"):
        fused_v = net.fused_v
        monkeypatch.setattr(net, "fused_v", lambda z, cond: calls.append(z.shape[0]) or fused_v(z, cond))
    static_loss, static_grads = loss_and_grads(objective_type(jvp=jvp, static_rows=True), poisoned)
    torch.testing.assert_close(static_loss, loss, rtol=FLOAT64_RTOL, atol=0)
    assert static_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(static_grads[name], grad, rtol=FLOAT64_RTOL, atol=1e-12, msg=name)
    if jvp == "fused" and objective_type is IMFObjective:
        assert calls == [16, 8]  # the target call on 2B rows, the fused pass on B


@pytest.mark.gpu
def test_the_objectives_copies_to_the_gpu_trace_under_torch_compile():
    """bench/step.py's `compiled` baseline compiles the whole reference step, the objectives' host-to-device copies
    of the draws' rows included: eagerly from pinned memory, under dynamo a plain copy (fake tensors have no
    pin_memory: on the H200, 2026-11-27, the compiled baseline failed there)."""
    from imf.objectives import to_device

    cuda = torch.device("cuda")
    copy_twice = torch.compile(lambda a: to_device(a, cuda, torch.float32) * 2, backend="eager", fullgraph=True)
    a = torch.randint(-9, 9, (7,))
    torch.testing.assert_close(copy_twice(a), 2 * a.float().cuda(), rtol=0, atol=0)
    assert to_device(a, cuda).is_cuda  # and eagerly


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_whole_static_step_captured_in_a_cuda_graph_replays_the_eager_step(backend):
    """bench/step.py's graph-<b> variant: the static-rows fused step (loss and backward) captured in one CUDA graph;
    each call (the capture, then a replay) gives the eager static step's gradients, on the parameters' .grad."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import step as bench_step
    finally:
        sys.path.pop(0)
    cfg = get_preset("digits").model
    net = randomised(cfg, dtype=torch.float32).cuda()
    x = torch.randn(16, cfg.image_channels, cfg.image_size, cfg.image_size, device="cuda")
    y = torch.randint(0, cfg.num_classes, (16,), device="cuda")
    draws = IMFObjective().draw(x, torch.Generator().manual_seed(16))
    net.zero_grad(set_to_none=True)
    with imf_kernels.use_backend(backend):  # the same step eagerly (static rows: tests above show them exact)
        IMFObjective(bf16=True, static_rows=True).loss_from_draws(net, x, y, draws)[0].backward()
    want = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    graphed = bench_step.make_step(f"graph-{backend}", net, x, y, draws, bf16=True)
    for _ in range(2):  # the capture, then a replay
        net.zero_grad(set_to_none=True)
        graphed()
        torch.cuda.synchronize()
        got = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for name in want:  # the same kernels on the same inputs; cuDNN's weight gradients may sum in another order
            scale = want[name].abs().max().item()
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * max(scale, 1e-6), msg=name)
