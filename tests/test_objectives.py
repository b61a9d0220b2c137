"""The method (DESIGN 2.2/2.3) checked against the formulas written out step by step, on a tiny network whose
outputs and tangents can be computed by hand, and the reference JVP against finite differences."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from imf.model import Cond, IMFNet, ModelConfig
from imf.objectives import FlowMatchingObjective, IMFObjective, MeanFlowObjective, model_jvp, model_jvp_with_v

K = 3  # classes of the tiny network; the null class is K


@dataclass
class TinyCfg:
    num_classes: int = K
    condition_on_t: bool = True
    v_head: str = "aux"


class TinyNet(nn.Module):
    """u = a z + h (b z) + c t + s_y (1 - 1/omega) + m_y + g (t_max - t_min);   v = d z + f t + s_y (1 - 1/omega) + m_y.
    Hand-written tangent along (dz, dh = 1, dt = 1): du = a dz + b z + h b dz + c."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        p = lambda *shape: nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5)
        self.a, self.b, self.c, self.d, self.f, self.g = p(()), p(()), p(()), p(()), p(()), p(())
        self.s, self.m = p(K + 1, 4), p(K + 1, 4)
        self.cfg = TinyCfg()

    def _class_term(self, cond):
        w = (1 - 1 / cond.omega)[:, None]
        return (self.s[cond.y] * w + self.m[cond.y]).view(-1, 1, 2, 2)

    def trunk(self, z, cond):
        return z, cond

    def u_head(self, features):
        return self.u(*features)

    def v_head(self, features):
        return self.v(*features)

    def u(self, z, cond):
        col = lambda a: a.view(-1, 1, 1, 1)
        return (
            self.a * z
            + col(cond.h) * self.b * z
            + self.c * col(cond.t)
            + self._class_term(cond)
            + self.g * col(cond.t_max - cond.t_min)
        )

    def v(self, z, cond):
        return self.d * z + self.f * cond.t.view(-1, 1, 1, 1) + self._class_term(cond)

    def forward(self, z, cond):
        return self.u(z, cond), self.v(z, cond)

    def du_by_hand(self, z, cond, dz):
        return self.a * dz + self.b * z + cond.h.view(-1, 1, 1, 1) * self.b * dz + self.c


def batch(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=gen)
    return x, y


def col(a):
    return a.view(-1, 1, 1, 1)


def imf_by_hand(net, x, y, d, c=0.01, p=1.0):
    """DESIGN 2.2 written out line by line, independently of imf.objectives."""
    n = x.shape[0]
    z = (1 - col(d.t)) * x + col(d.t) * d.e
    v_t = d.e - x
    inside = (d.t_min <= d.t) & (d.t <= d.t_max)
    omega_p = torch.where(inside, d.omega, torch.ones(n, dtype=d.omega.dtype))
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    null = torch.full_like(y, K)
    with torch.no_grad():
        v_c = net.v(z, Cond(zero, y, d.omega, zero, one, d.t))
        v_u = net.v(z, Cond(zero, null, one, zero, one, d.t))
        v_cp = net.v(z, Cond(zero, y, omega_p, zero, one, d.t))
    fm = d.r == d.t
    v_g = torch.where(col(fm), v_t + col(1 - 1 / d.omega) * (v_c - v_u), v_t + col(1 - 1 / omega_p) * (v_cp - v_u))
    y_in = torch.where(d.drop, null, y)
    v_g = torch.where(col(d.drop), v_t, v_g)
    cond = Cond(d.t - d.r, y_in, d.omega, d.t_min, d.t_max, d.t)
    u, v = net(z, cond)
    du = net.du_by_hand(z, cond, v_cp).detach()
    V = u + col(d.t - d.r) * du
    loss_u = ((V - v_g) ** 2).sum(dim=(1, 2, 3))
    loss_v = ((v - v_g) ** 2).sum(dim=(1, 2, 3))
    loss = (loss_u / (loss_u.detach() + c) ** p + loss_v / (loss_v.detach() + c) ** p).mean()
    return dict(loss=loss, V=V, v_g=v_g, u=u, du=du, v_cp=v_cp, loss_u=loss_u, loss_v=loss_v)


def test_draws_follow_the_recipe():
    obj = IMFObjective()
    x = torch.zeros(20000, 1, 2, 2)
    d = obj.draw(x, torch.Generator().manual_seed(0))
    fm = d.r == d.t
    assert (d.r <= d.t).all()
    assert abs(fm.float().mean() - 0.5) < 0.02
    assert abs(d.drop.float().mean() - 0.1) < 0.01
    assert (d.omega >= 1).all() and (d.omega <= 8).all()
    # log-uniform on [1, 8]: log8(omega) ~ U(0, 1), mean 1/2
    assert abs((torch.log(d.omega) / torch.log(torch.tensor(8.0))).mean() - 0.5) < 0.01
    assert (d.t_min[fm] == 0).all() and (d.t_max[fm] == 1).all()
    assert (d.t_min[~fm] <= 0.5).all() and (d.t_max[~fm] >= 0.5).all()
    # t, r ~ sigmoid(N(-0.4, 1)) before ordering: the logit of the pair's mean is -0.4
    logit = lambda a: torch.log(a / (1 - a))
    both = torch.cat([logit(d.t[~fm]), logit(d.r[~fm])])
    assert abs(both.mean() + 0.4) < 0.03 and abs(both.std() - 1.0) < 0.03


def test_to_device_together_gives_views_of_one_copy_in_order():
    """Several CPU tensors of one dtype reach the device in one copy: each a view of its part, with its shape and
    values (empty parts included); the draws' float fields and the row indices come through it."""
    from imf.objectives import to_device_together

    parts = [torch.randn(5), torch.randn(2, 3), torch.randn(0), torch.randn(1)]
    out = to_device_together(parts, torch.device("cpu"))
    assert [tuple(a.shape) for a in out] == [tuple(a.shape) for a in parts]
    assert all(torch.equal(a, b) for a, b in zip(out, parts, strict=True))
    assert len({a.untyped_storage().data_ptr() for a in out}) == 1
    d = IMFObjective().draw(torch.randn(6, 1, 2, 2), torch.Generator().manual_seed(1))
    fields = (d.t, d.r, d.omega, d.t_min, d.t_max)
    assert len({a.untyped_storage().data_ptr() for a in fields}) == 1
    assert all(torch.equal(a, b) for a, b in zip(fields, (d.host.t, d.host.r, d.host.omega, d.host.t_min,
                                                          d.host.t_max), strict=True))  # fmt: skip


def test_imf_loss_equals_the_formula_step_by_step():
    net = TinyNet()
    x, y = batch()
    obj = IMFObjective()
    d = obj.draw(x, torch.Generator().manual_seed(1))
    terms = obj.terms(net, x, y, d)
    ref = imf_by_hand(net, x, y, d)
    for key in ("v_g", "v_cp", "u", "du", "V", "loss_u", "loss_v", "loss"):
        torch.testing.assert_close(terms[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("omega_max", [8.0, 1.0])
def test_target_call_evaluates_only_the_rows_it_needs(omega_max):
    """One no-grad v-head call: v_c' on every row (it is v_c where omega' == omega, the only rows whose guidance
    term uses v_c) and v_u only where the row is guided (1 - 1/omega' != 0) and keeps its class (a dropped row
    regresses on v_t): B + (guided, kept) rows, B when omega is always 1; the same targets as the three full
    evaluations."""
    net = TinyNet()
    calls = []
    v = net.v
    net.v = lambda z, cond: calls.append(z.shape[0]) or v(z, cond)
    x, y = batch()
    obj = IMFObjective(omega_max=omega_max)
    d = obj.draw(x, torch.Generator().manual_seed(6))
    terms = obj.terms(net, x, y, d)
    omega_p = torch.where((d.t_min <= d.t) & (d.t <= d.t_max), d.omega, torch.ones_like(d.omega))
    n, guided = len(y), omega_p != 1
    want = n + int((guided & ~d.drop).sum())
    assert calls[0] == want  # calls[1] is the forward pass's v
    if omega_max > 1:  # the draw has rows of every kind: outside the interval, guided and kept, guided and dropped
        assert (~guided).any() and (guided & ~d.drop).any() and (guided & d.drop).any()
    else:
        assert want == n
    del net.v
    ref = imf_by_hand(net, x, y, d)
    for key in ("v_g", "v_cp", "loss"):
        torch.testing.assert_close(terms[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)


def test_fm_rows_give_u_at_h_zero_and_dropped_rows_regress_on_e_minus_x():
    net = TinyNet()
    x, y = batch()
    obj = IMFObjective()
    d = obj.draw(x, torch.Generator().manual_seed(2))
    terms = obj.terms(net, x, y, d)
    fm = d.r == d.t
    assert fm.any() and d.drop.any()
    null = torch.full_like(y, K)
    y_in = torch.where(d.drop, null, y)
    u0 = net.u(terms["z"], Cond(torch.zeros_like(d.t), y_in, d.omega, d.t_min, d.t_max, d.t))
    torch.testing.assert_close(terms["V"][fm], u0[fm], rtol=0, atol=0)
    torch.testing.assert_close(terms["v_g"][d.drop], (d.e - x)[d.drop], rtol=0, atol=0)
    assert (terms["y"][d.drop] == K).all() and (terms["y"][~d.drop] == y[~d.drop]).all()


def grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("net_kind", ["tiny", "unet"])
def test_no_gradient_reaches_du_or_the_guidance_terms(net_kind):
    """Perturbation test: the gradient of the objective equals the gradient of the same loss in which du, v_c',
    v_u and v_g are precomputed constants. A gradient through any of them would add a term."""
    if net_kind == "tiny":
        net = TinyNet()
        x, y = batch(32)
    else:
        net = small_unet()
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(4))
    obj = IMFObjective()
    d = obj.draw(x, torch.Generator().manual_seed(5))
    params = [p for p in net.parameters()]
    g_obj = grads(obj.terms(net, x, y, d)["loss"], params)
    # the same loss with every stop-gradient quantity taken as a constant from a separate no-grad pass
    with torch.no_grad():
        const = obj.terms(net, x, y, d)
    cond = Cond(d.t - d.r, const["y"], d.omega, d.t_min, d.t_max, d.t)
    u, v = net(const["z"], cond)
    V = u + col(d.t - d.r) * const["du"]
    loss_u = ((V - const["v_g"]) ** 2).flatten(1).sum(1)
    loss_v = ((v - const["v_g"]) ** 2).flatten(1).sum(1)
    loss = (loss_u / (const["loss_u"] + 0.01) + loss_v / (const["loss_v"] + 0.01)).mean()
    g_const = grads(loss, params)
    for a, b in zip(g_obj, g_const, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the tangent itself carries no graph
    assert not const["du"].requires_grad and not obj.terms(net, x, y, d)["du"].requires_grad


def small_unet(**overrides):
    cfg = ModelConfig(
        width=16,
        channel_mult=(1, 2),
        context_dim=16,
        num_classes=4,
        condition_on_t=True,
        cross_attn_resolutions=(4,),
        self_attn_resolutions=(4,),
        head_dim=8,
        **overrides,
    )
    torch.manual_seed(0)
    net = IMFNet(cfg).double()
    with torch.no_grad():  # leave the zero init: every layer must contribute to u for the JVP check to mean much
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def test_reference_jvp_matches_central_finite_difference():
    net = small_unet()
    gen = torch.Generator().manual_seed(7)
    n = 3
    z = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    dz = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.05], dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    omega = torch.tensor([1.0, 3.0, 7.5], dtype=torch.float64)
    cond = Cond(
        t - r,
        y,
        omega,
        torch.full((n,), 0.2, dtype=torch.float64),
        torch.full((n,), 0.7, dtype=torch.float64),
        t,
    )
    u, du = model_jvp(net, z, cond, dz)
    eps = 1e-6

    def at(s):
        return net.u(z + s * dz, cond._replace(h=cond.h + s, t=cond.t + s))

    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert du.abs().max() > 1e-2  # a non-trivial tangent
    torch.testing.assert_close(du, fd, rtol=1e-6, atol=1e-8)
    # the variant that also returns the v-head from the same trunk pass gives the same u, du and the plain v
    u2, du2, v2 = model_jvp_with_v(net, z, cond, dz)
    u_plain, v_plain = net(z, cond)
    torch.testing.assert_close(u2, u_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du2, du, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v2, v_plain, rtol=1e-12, atol=1e-12)


def test_meanflow_loss_equals_the_formula():
    net = TinyNet()
    net.cfg.v_head = "boundary"
    x, y = batch()
    obj = MeanFlowObjective(cfg_omega=1.0, cfg_kappa=0.5, cfg_t_min=0.1, cfg_t_max=0.9)
    d = obj.draw(x, torch.Generator().manual_seed(8))
    loss, _ = obj.loss_from_draws(net, x, y, d)
    # by hand (DESIGN 2.3)
    n = x.shape[0]
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    null = torch.full_like(y, K)
    z = (1 - col(d.t)) * x + col(d.t) * d.e
    v_t = d.e - x
    with torch.no_grad():
        v_c = net.u(z, Cond(zero, y, one, zero, one, d.t))
        v_u = net.u(z, Cond(zero, null, one, zero, one, d.t))
    inside = (d.t >= 0.1) & (d.t <= 0.9)
    v_g = torch.where(col(inside), 1.0 * v_t + 0.5 * v_c + (1 - 1.0 - 0.5) * v_u, v_t)
    v_g = torch.where(col(d.drop), v_t, v_g)
    cond = Cond(d.t - d.r, torch.where(d.drop, null, y), one, zero, one, d.t)
    u = net.u(z, cond)
    du = net.du_by_hand(z, cond, v_g)
    u_tgt = v_g - col((d.t - d.r).clamp(0, 1)) * du
    per = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    ref = (per / (per.detach() + 0.01)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert abs((d.r == d.t).float().mean() - 0.75) < 0.15


def test_flow_matching_loss_is_plain_regression_on_e_minus_x():
    net = TinyNet()
    x, y = batch()
    obj = FlowMatchingObjective(class_dropout=0.0)
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    loss, _ = obj.loss(net, x, y, gen)
    gen.set_state(state)
    n = x.shape[0]
    t = torch.sigmoid(-0.4 + torch.randn(n, generator=gen)).double()
    e = torch.randn(x.shape, generator=gen).double()
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    z = (1 - col(t)) * x + col(t) * e
    u = net.u(z, Cond(zero, y, one, zero, one, t))
    torch.testing.assert_close(loss, ((u - (e - x)) ** 2).sum(dim=(1, 2, 3)).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", [IMFObjective, MeanFlowObjective], ids=["imf", "mf"])
def test_bf16_targets_cast_the_weights_once_with_the_same_results(objective, monkeypatch):
    """The fused path's bf16 target evaluation takes the conv, linear and GroupNorm weights as bf16 copies made by
    one multi-tensor copy (`bf16_parameters`) instead of autocast's cast of each weight (a kernel each): the same
    loss and gradients bit for bit, no weight cast left (and every cast gone is a weight's), and the fp32 weights
    back after."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    import imf.objectives
    import imf_kernels
    from imf.model import BF16_CAST_MODULES

    torch.manual_seed(11)
    model = IMFNet(ModelConfig(width=16, context_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {p.data_ptr() for m in model.modules() if isinstance(m, BF16_CAST_MODULES) for p in m.parameters(False)}
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    obj = objective(bf16=True)
    draws = obj.draw(x, torch.Generator().manual_seed(13))

    class Casts(TorchDispatchMode):
        """_to_copy calls: of a weight (or of weights concatenated or stacked, as the FiLM layers' by
        `imf.layers.film_bank`, the scalar tokens' MLPs' by `imf.model.scalar_tokens_bank`), and of anything else;
        and the multi-tensor copies."""

        def __init__(self):
            super().__init__()
            self.weights, self.others, self.foreach = 0, 0, 0
            self.joined, self.kept = set(), []  # data pointers of concatenations of weights, kept alive (no reuse)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "_to_copy":
                if args[0].data_ptr() in weights | self.joined:
                    self.weights += 1
                else:
                    self.others += 1
            self.foreach += name == "_foreach_copy_"
            out = func(*args, **(kwargs or {}))
            if name in ("cat", "stack") and all(part.data_ptr() in weights for part in args[0]):
                self.joined.add(out.data_ptr())
                self.kept.append(out)
            return out

    def step():
        model.zero_grad(set_to_none=True)
        with imf_kernels.use_backend("torch"), Casts() as casts:
            loss = obj.loss_from_draws(model, x, y, draws)[0]
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], casts

    swapped = step()
    with monkeypatch.context() as patch:
        patch.setattr(imf.objectives, "bf16_parameters", lambda model, enabled=True: contextlib.nullcontext())
        cast = step()
    assert torch.equal(swapped[0], cast[0])
    assert all(torch.equal(a, b) for a, b in zip(swapped[1], cast[1], strict=True))
    assert (swapped[2].weights, swapped[2].foreach) == (0, 1)
    assert cast[2].weights > 0 and cast[2].foreach == 0
    assert swapped[2].others == cast[2].others  # the activations' casts are the same
    assert all(p.dtype == torch.float32 and isinstance(p, nn.Parameter) for p in model.parameters())


def test_bf16_parameters_swaps_only_without_grad_and_reuses_its_buffers():
    from imf.model import bf16_parameters

    model = IMFNet(ModelConfig(width=16, context_dim=16))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with bf16_parameters(model):  # grad enabled: the graded pass keeps its fp32 weights
        assert conv.weight.dtype == torch.float32
    with torch.no_grad():
        with bf16_parameters(model):
            first = conv.weight
            assert first.dtype == torch.bfloat16 and torch.equal(first, conv._parameters["weight"])
        model.apply(lambda m: m.weight.add_(1.0) if m is conv else None)
        with bf16_parameters(model):  # the same buffer, refreshed from the updated weights
            assert conv.weight is first
            refreshed = conv.weight.clone()
        assert torch.equal(refreshed, conv.weight.to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="inside"), bf16_parameters(model):
            raise RuntimeError("inside")
        assert conv.weight.dtype == torch.float32 and isinstance(conv.weight, nn.Parameter)
        with bf16_parameters(model, enabled=False):
            assert conv.weight.dtype == torch.float32
