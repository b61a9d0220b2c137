"""Training objectives behind one interface: `objective.loss(model, x, y, generator) -> (loss, metrics)`.

- `IMFObjective`: Improved MeanFlow, DESIGN 2.2, exactly (the default).
- `MeanFlowObjective`: the original MeanFlow, DESIGN 2.3 (CFG baked in at one training scale).
- `FlowMatchingObjective`: r = t always, u(z, h=0) regressed on e - x.

Each objective first draws its randomness (`draw`) and then computes the loss from those draws
(`loss_from_draws`), so that tests can check the loss against the formulas written out step by step.

Two paths compute the same function (`jvp=` on each objective):
- "fused" (default): the model's fused forward-with-tangent (`IMFNet.forward(z, cond, dz, dcond)`, DESIGN 3.3),
  its fused primal for the no-grad targets, and the fused `imf_kernels` losses; the op backend follows
  `imf_kernels` dispatch. A model without a fused path (`takes_tangents` absent, e.g. a hand-checkable test
  network) goes through the reference path.
- "reference": `torch.func.jvp` over the plain-PyTorch model (`model_jvp`, `model_jvp_with_v`), the oracle.
Both evaluate the iMF targets with one no-grad call on only the rows a target uses (`IMFObjective._targets`); the
fused training step also takes v_c of the flow-matching rows from its own forward, which runs the v-head on the
same inputs (the same values, without a second evaluation).
`bf16=True` runs the no-grad target evaluations under bf16 autocast; the JVP pass and the loss stay fp32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import imf_kernels
from imf import layers
from imf.checks import check_flags, check_setting
from imf.model import Cond, CondTangent, bf16_parameters, check_model_batch

Tensor = torch.Tensor


def _col(a: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return a.view(-1, *([1] * (like.dim() - 1)))


def per_sample_sum(a: Tensor) -> Tensor:
    return a.flatten(1).sum(dim=1)


def adaptive_weighted(loss: Tensor, c: float, p: float) -> Tensor:
    """L / stopgrad(L + c)^p, per sample."""
    return loss / (loss.detach() + c) ** p


JVP_PATHS = ("fused", "reference")


def check_jvp_path(owner: str, jvp: str) -> None:
    if jvp not in JVP_PATHS:
        raise ValueError(f"{owner}: jvp must be one of {', '.join(map(repr, JVP_PATHS))}, got {jvp!r}")


def runs_fused(model: nn.Module, jvp: str) -> bool:
    """Whether this call takes the fused path: asked for, and the model has one."""
    return jvp == "fused" and getattr(model, "takes_tangents", False)


def target_autocast(bf16: bool, x: Tensor, cache: bool = True):
    """bf16 autocast around the no-grad target evaluations (DESIGN 2.2), or nothing. cache=False for a step captured
    in a CUDA graph (torch's advice: no autocast weight-cast cache under capture)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, cache_enabled=cache)


def time_dtype(x: Tensor) -> torch.dtype:
    """Times and scales are float32, or float64 for float64 data (exact checks): the embedding's rule
    (`imf.layers.embedding_dtype`, no dispatcher call as torch.promote_types makes)."""
    return layers.embedding_dtype(x.dtype)


def to_device(a: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """`a`, made on the CPU, on `device` without waiting for it: a plain `.to("cuda")` synchronises the stream
    after its copy (the host waits for all the work queued before it); from pinned memory a non_blocking copy is
    queued like a kernel and the host goes on (torch's pinned allocator keeps the buffer until the copy ran). The
    objectives' draws and `imf.train.DataStream`'s batches."""
    if dtype is not None:
        a = a.to(dtype)  # on the CPU first: a copy that also converts would stage a pageable converted copy
    if device.type == "cuda" and not torch.compiler.is_compiling():  # dynamo has no fake pin_memory
        a = a.pin_memory()
    return a.to(device, non_blocking=True)


def to_device_together(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """CPU tensors of one dtype on `device` from one copy (`to_device`) of their concatenation: views of it, in
    order, each of its tensor's shape (a step's draws or row indices: one pinned copy instead of one each)."""
    flat = to_device(torch.cat([a.reshape(-1) for a in tensors]), device)
    parts = flat.split([a.numel() for a in tensors])
    return [part.view(a.shape) for part, a in zip(parts, tensors, strict=True)]


@dataclass
class HostDraws:
    """CPU copies of a step's (B,) draws (those an objective has; the others None). The objectives choose rows
    from them (which rows need a tangent, a guidance term): `torch.nonzero` or `int(mask.sum())` of a device tensor
    makes the host wait for the device (2026-11-27, H100: the fused step's host was 94% of its wall time, the
    device busy 65%)."""

    t: Tensor
    r: Tensor
    omega: Tensor | None = None
    t_min: Tensor | None = None
    t_max: Tensor | None = None
    drop: Tensor | None = None


def host_draws(d: IMFDraws | MFDraws) -> HostDraws:
    """d.host, the copies `draw` keeps; for draws built elsewhere, copies made now and kept in d.host (the host
    waits for the device once per copied tensor)."""
    if d.host is None:
        names = ("t", "r", "omega", "t_min", "t_max", "drop")
        d.host = HostDraws(**{name: getattr(d, name).cpu() for name in names if hasattr(d, name)})
    return d.host


def sample_logit_normal_pair(x: Tensor, p_mean: float, p_std: float, generator) -> tuple[Tensor, Tensor]:
    """t, r ~ sigmoid(N(p_mean, p_std)) independently, then ordered so that r <= t; on the CPU, in x's time dtype."""
    b = x.shape[0]
    a = torch.sigmoid(p_mean + p_std * torch.randn(b, generator=generator)).to(time_dtype(x))
    c = torch.sigmoid(p_mean + p_std * torch.randn(b, generator=generator)).to(time_dtype(x))
    return torch.maximum(a, c), torch.minimum(a, c)


def _jvp_in_time(model: nn.Module, z: Tensor, cond: Cond, dz: Tensor, fn, has_aux: bool = False):
    """torch.func.jvp of fn(z, cond) along (dz, dh = 1, dt = 1 when the model takes t): the time derivative
    d/dt with r fixed (the reference path's JVP; `model_jvp`, `model_jvp_with_v`)."""
    ones = torch.ones_like(cond.h)
    with_t = model.cfg.condition_on_t

    def f(z_, h_, t_):
        return fn(z_, cond._replace(h=h_, t=t_ if with_t else cond.t))

    # t is a view of the draws' one host-to-device copy (`to_device_together`): torch 2.11-2.13's dynamo failed on
    # such a view as a torch.func.jvp primal (the compiled official-style step with bf16 targets on the CPU, an
    # internal assert on the tangent's layout), so the JVP gets its own copy (B floats).
    t_in = cond.t.clone() if cond.t is not None else torch.zeros_like(cond.h)
    return torch.func.jvp(f, (z, cond.h, t_in), (dz, ones, ones), has_aux=has_aux)


def model_jvp(model: nn.Module, z: Tensor, cond: Cond, dz: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du): u and its derivative along the tangent (dz, dh = 1, dt = 1 when the model takes t), i.e. the time
    derivative d/dt u(z_t, r, t) with r fixed, through `torch.func.jvp` (the reference path)."""
    return _jvp_in_time(model, z, cond, dz, model.u)


def model_jvp_with_v(model: nn.Module, z: Tensor, cond: Cond, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u, du, v): as `model_jvp`, plus the aux v-head's primal output from the same trunk pass (no tangent is
    computed for the v-head: nothing needs it)."""

    def u_and_features(z_, cond_):
        features = model.trunk(z_, cond_)
        return model.u_head(features), features

    u, du, features = _jvp_in_time(model, z, cond, dz, u_and_features, has_aux=True)
    return u, du, model.v_head(features)


def model_fused_jvp(
    model: nn.Module, z: Tensor, cond: Cond, dz: Tensor, with_v: bool = True, rows: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(u, du, v) as `model_jvp_with_v` along the same tangent (dz, dh = 1, dt = 1 when the model takes t), through
    the model's fused forward-with-tangent: one ordinary `model(...)` call. v is None without an aux head or
    with with_v=False.

    `rows` (bool, (B,)): the rows whose du is needed. The losses use du times h = t - r, exactly 0 on the r = t
    rows (half of an iMF batch, 3/4 of an MF one), so the tangent is computed on the other rows only (put first,
    `IMFNet.forward`) and du is 0 on the rest; u and v are those of every row. Best on the CPU (the objectives pass
    their draws' host copies): the row count and order are then known without waiting for the device."""
    b = z.shape[0]
    if rows is not None and rows.device.type != "cpu":
        rows = rows.cpu()  # waits for the device
    count = b if rows is None else int(rows.sum())
    if count == b:
        order, tangent_rows = None, b
    else:  # the rows that need du first (a stable sort keeps each group's order)
        order_host = torch.argsort((~rows).to(torch.uint8), stable=True)
        order, inverse = to_device_together([order_host, torch.argsort(order_host)], z.device)
        z, dz = z[order], dz[order[:count]]
        cond = Cond(*(None if a is None else a[order] for a in cond))
        tangent_rows = count
    if tangent_rows == 0:
        u, v = model(z, cond, with_v=with_v)
        du = torch.zeros_like(u)
    else:
        ones = torch.ones(tangent_rows, dtype=cond.h.dtype, device=cond.h.device)
        dcond = CondTangent(h=ones, t=ones if model.cfg.condition_on_t else None)
        u, du, v = model(z, cond, dz, dcond, with_v=with_v)
    if order is None:
        return u, du, v
    du = torch.cat([du, du.new_zeros(b - du.shape[0], *du.shape[1:])])[inverse]
    return u[inverse], du, None if v is None else v[inverse]


@dataclass
class IMFDraws:
    """The randomness of one iMF step, all (B,) except e. `host`: CPU copies of the (B,) fields, from which the
    objective chooses rows; whoever edits a field sets host to None (or edits it too)."""

    t: Tensor
    r: Tensor
    e: Tensor
    omega: Tensor
    t_min: Tensor
    t_max: Tensor
    drop: Tensor  # bool: class dropout rows
    host: HostDraws | None = field(default=None, repr=False, compare=False)  # CPU copies (`draw` makes them)


def _omega_prime(d: IMFDraws | HostDraws) -> Tensor:
    """omega' = omega inside the guidance interval, else 1 (on fm rows the interval is (0, 1): omega' = omega), of
    the draws on the device or of their host copies."""
    return torch.where((d.t_min <= d.t) & (d.t <= d.t_max), d.omega, torch.ones_like(d.omega))


@dataclass
class IMFObjective:
    """DESIGN 2.2: the iMF loss, with the network's own guided velocity as the JVP tangent."""

    p_mean: float = -0.4
    p_std: float = 1.0
    fm_fraction: float = 0.5
    omega_max: float = 8.0  # omega = omega_max ** U(0, 1): log-uniform on [1, omega_max]
    class_dropout: float = 0.1
    c: float = 0.01
    p: float = 1.0
    jvp: str = "fused"  # "fused" or "reference" (module docstring)
    bf16: bool = False  # no-grad target evaluations under bf16 autocast; JVP and loss in fp32
    name: str = "imf"
    # The same shapes every step and nothing chosen on the host (a step that can be captured in a CUDA graph): the
    # target call evaluates v_c' and v_u on every row (2B rows; guidance masked where a row is not guided) and the
    # fused pass computes du on every row. The same loss, with more device work than the rows chosen per step.
    static_rows: bool = False

    def __post_init__(self) -> None:
        owner = "IMFObjective"
        check_jvp_path(owner, self.jvp)
        check_setting(owner, "p_mean", self.p_mean, -math.inf)
        check_setting(owner, "p_std", self.p_std, 0.0, open_low=True)
        check_setting(owner, "fm_fraction", self.fm_fraction, 0.0, 1.0)
        check_setting(owner, "omega_max", self.omega_max, 1.0)
        check_setting(owner, "class_dropout", self.class_dropout, 0.0, 1.0, open_high=True)
        check_setting(owner, "c", self.c, 0.0)
        check_setting(owner, "p", self.p, 0.0)
        check_flags(owner, bf16=self.bf16, static_rows=self.static_rows)

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> IMFDraws:
        b = x.shape[0]
        t, r = sample_logit_normal_pair(x, self.p_mean, self.p_std, generator)
        fm = torch.rand(b, generator=generator) < self.fm_fraction
        r = torch.where(fm, t, r)
        e = to_device(torch.randn(x.shape, generator=generator), x.device, x.dtype)
        uniform = lambda: torch.rand(b, generator=generator).to(time_dtype(x))
        omega = self.omega_max ** uniform()
        t_min = 0.5 * uniform()
        t_max = 0.5 + 0.5 * uniform()
        t_min = torch.where(fm, torch.zeros_like(t_min), t_min)
        t_max = torch.where(fm, torch.ones_like(t_max), t_max)
        drop = torch.rand(b, generator=generator) < self.class_dropout
        host = HostDraws(t, r, omega, t_min, t_max, drop)
        t_d, r_d, omega_d, t_min_d, t_max_d = to_device_together([t, r, omega, t_min, t_max], x.device)
        return IMFDraws(t_d, r_d, e, omega_d, t_min_d, t_max_d, to_device(drop, x.device), host)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None):
        check_model_batch(model, x, y)
        return self.loss_from_draws(model, x, y, self.draw(x, generator))

    @torch.no_grad()
    def guided_target(self, model: nn.Module, x: Tensor, y: Tensor, d: IMFDraws):
        """z, v_t, the guided target v_g after class dropout (v_t on dropped rows) and the tangent v_c' on every row,
        from one no-grad v-head call (`_targets`)."""
        z, v_t, v_g, v_cp, _ = self._targets(model, x, y, d, share_fm_rows=False)
        return z, v_t, v_g, v_cp

    @torch.no_grad()
    def _targets(self, model: nn.Module, x: Tensor, y: Tensor, d: IMFDraws, share_fm_rows: bool):
        """(z, v_t, v_g, v_c', pending) from one batched no-grad v-head call at h = 0, interval (0, 1).

        The call evaluates v_c' = v(omega') where the row needs it (v_c' is v_c where omega' == omega, the only
        rows whose guidance term uses v_c: elsewhere omega' = 1 and v_g = v_t) and v_u where the row is guided
        (1 - 1/omega' != 0) and kept (a dropped row's target is v_t): B + (guided, kept) rows, at most 2B.

        share_fm_rows (the fused training step): the flow-matching rows that keep their class take v_c from the
        training forward itself, whose v-head runs on the same z at h = 0, omega, interval (0, 1) and class, so
        the call leaves them out of its first part (their tangent is not needed either: h = 0); their v_g waits
        for that v: `pending` = (rows, 1 - 1/omega on them, v_u on them) for `_finish_targets`. Else pending is
        None and v_c' covers every row (the reference path's tangent runs on the whole batch)."""
        b = x.shape[0]
        tb = _col(d.t, x)
        z = (1 - tb) * x + tb * d.e
        v_t = d.e - x
        omega_p = _omega_prime(d)
        null = torch.full_like(y, model.cfg.num_classes)
        zero, one = torch.zeros_like(d.t), torch.ones_like(d.t)
        if self.static_rows:  # every row in both parts; the guidance term masked on the device
            shared = needs_cp = None
            cp_rows = u_rows = torch.arange(b, device=x.device)
            idx = torch.cat([cp_rows, u_rows])
        else:  # the rows are chosen on the host copies of the draws (the same values: no wait for the device)
            h = host_draws(d)
            guided = (_omega_prime(h) != 1) & ~h.drop
            if share_fm_rows:
                shared = (h.t == h.r) & (h.t_min == 0) & (h.t_max == 1) & ~h.drop
                needs_cp = (h.t != h.r) | (guided & ~shared)
            else:
                shared = needs_cp = None
            cp_rows_host = torch.arange(b) if needs_cp is None else torch.nonzero(needs_cp).flatten()
            u_rows_host = torch.nonzero(guided).flatten()
            idx = to_device(torch.cat([cp_rows_host, u_rows_host]), x.device)  # one copy; the two parts are views
            cp_rows, u_rows = idx.split([cp_rows_host.numel(), u_rows_host.numel()])
        cond = Cond(
            h=zero[idx],
            y=torch.cat([y[cp_rows], null[u_rows]]),
            omega=torch.cat([omega_p[cp_rows], one[u_rows]]),
            t_min=zero[idx],
            t_max=one[idx],
            t=d.t[idx],
        )
        fused = runs_fused(model, self.jvp)
        with target_autocast(self.bf16, x, cache=not self.static_rows), bf16_parameters(model, self.bf16 and fused):
            v_all = (model.fused_v if fused else model.v)(z[idx], cond)
        v_all = v_all.to(x.dtype)
        v_cp_rows, v_u_all = v_all.split([cp_rows.numel(), u_rows.numel()])
        if needs_cp is None:
            v_cp = v_cp_rows
        else:  # rows left out: no tangent, no guidance term from v_c' (zeros, never read)
            v_cp = torch.zeros_like(x)
            v_cp[cp_rows] = v_cp_rows
        weight = _col(1 - 1 / omega_p, x)
        pending = None
        if self.static_rows:  # weight 0 where a row is not guided: v_g = v_t there, exactly
            guided = _col((omega_p != 1) & ~d.drop, x)
            return z, v_t, v_t + torch.where(guided, weight, 0) * (v_cp - v_u_all), v_cp, pending
        v_g = v_t.clone()
        if shared is None:
            v_g[u_rows] = v_t[u_rows] + weight[u_rows] * (v_cp[u_rows] - v_u_all)
        else:
            from_cp = ~shared[u_rows_host]  # the guided rows (u_rows) whose v_c' is in this call
            in_call, later_in_call = to_device_together(
                [torch.nonzero(m).flatten() for m in (from_cp, ~from_cp)], x.device
            )
            rows, later = u_rows[in_call], u_rows[later_in_call]
            v_g[rows] = v_t[rows] + weight[rows] * (v_cp[rows] - v_u_all[in_call])
            pending = (later, weight[later], v_u_all[later_in_call])
        return z, v_t, v_g, v_cp, pending

    @staticmethod
    def _finish_targets(v_g: Tensor, v_t: Tensor, v: Tensor, pending) -> Tensor:
        """v_g with the shared flow-matching rows' guidance term from the training forward's v (detached)."""
        rows, weight, v_u = pending
        if rows.numel():
            v_g = v_g.clone()
            v_g[rows] = v_t[rows] + weight * (v.detach()[rows].to(v_g.dtype) - v_u)
        return v_g

    def loss_from_draws(self, model: nn.Module, x: Tensor, y: Tensor, d: IMFDraws):
        check_model_batch(model, x, y)
        if runs_fused(model, self.jvp):  # the fused loss kernel on the fused pass's outputs, du where h != 0
            _, _, v_g, _, _, u, du, v = self.outputs(model, x, y, d, du_everywhere=self.static_rows)
            loss, stats = imf_kernels.imf_loss(u, du, v, v_g, d.t, d.r, c=self.c, p=self.p)
            return loss, {"loss": loss.detach(), **stats}
        terms = self.terms(model, x, y, d)
        return terms["loss"], {k: terms[k].detach().mean() for k in ("loss", "loss_u", "loss_v")}

    def outputs(self, model: nn.Module, x: Tensor, y: Tensor, d: IMFDraws, du_everywhere: bool = True):
        """(z, v_t, v_g, v_cp, y, u, du, v): the targets after class dropout and the network's outputs. With
        du_everywhere=False the fused path computes du only where h = t - r != 0 (0 elsewhere: the loss uses h du),
        and takes v_c on the flow-matching rows from its own v (`_targets`); v_cp is then 0 on the rows that need
        neither."""
        share = runs_fused(model, self.jvp) and not du_everywhere
        z, v_t, v_g, v_cp, pending = self._targets(model, x, y, d, share_fm_rows=share)
        # class dropout after guidance: dropped rows are unconditional and regress onto e - x (v_g there is v_t)
        y = torch.where(d.drop, torch.full_like(y, model.cfg.num_classes), y)
        cond = Cond(h=d.t - d.r, y=y, omega=d.omega, t_min=d.t_min, t_max=d.t_max, t=d.t)
        at_h0 = cond._replace(h=torch.zeros_like(d.t))
        if runs_fused(model, self.jvp):
            host = None if du_everywhere else host_draws(d)
            rows = None if host is None else host.t != host.r
            u, du, v = model_fused_jvp(model, z, cond, v_cp, with_v=model.cfg.v_head == "aux", rows=rows)
            if model.cfg.v_head != "aux":  # v_head="boundary": v = u(z, h = 0), its own forward with grad
                v, _ = model(z, at_h0, with_v=False)
        elif model.cfg.v_head == "aux":
            u, du, v = model_jvp_with_v(model, z, cond, v_cp)
        else:
            u, du = model_jvp(model, z, cond, v_cp)
            v = model.u(z, at_h0)
        if pending is not None:
            v_g = self._finish_targets(v_g, v_t, v, pending)
        return z, v_t, v_g, v_cp, y, u, du, v

    def terms(self, model: nn.Module, x: Tensor, y: Tensor, d: IMFDraws) -> dict[str, Tensor]:
        """Every intermediate of the step (for tests and diagnostics); `loss` is the scalar to minimise, here by
        the plain formulas on either path's outputs."""
        z, v_t, v_g, v_cp, y, u, du, v = self.outputs(model, x, y, d)
        V = u + _col(d.t - d.r, u) * du.detach()
        loss_u = per_sample_sum((V - v_g) ** 2)
        loss_v = per_sample_sum((v - v_g) ** 2)
        loss = (adaptive_weighted(loss_u, self.c, self.p) + adaptive_weighted(loss_v, self.c, self.p)).mean()
        return dict(
            z=z,
            v_t=v_t,
            v_g=v_g,
            v_cp=v_cp,
            y=y,
            u=u,
            du=du.detach(),
            v=v,
            V=V,
            loss_u=loss_u,
            loss_v=loss_v,
            loss=loss,
        )


@dataclass
class MFDraws:
    """The randomness of one MF step; `host` as IMFDraws'."""

    t: Tensor
    r: Tensor
    e: Tensor
    drop: Tensor
    host: HostDraws | None = field(default=None, repr=False, compare=False)  # CPU copies (`draw` makes them)


@dataclass
class MeanFlowObjective:
    """DESIGN 2.3: the original MeanFlow loss; CFG baked in at the effective scale omega / (1 - kappa), applied
    where t lies in [cfg_t_min, cfg_t_max]. The network's omega and interval inputs are held at 1 and (0, 1)."""

    p_mean: float = -0.4
    p_std: float = 1.0
    fm_fraction: float = 0.75
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.5
    cfg_t_min: float = 0.0
    cfg_t_max: float = 1.0
    class_dropout: float = 0.1
    c: float = 0.01
    p: float = 1.0
    jvp: str = "fused"  # "fused" or "reference" (module docstring)
    bf16: bool = False  # no-grad target evaluations under bf16 autocast; JVP and loss in fp32
    name: str = "mf"
    static_rows: bool = False  # du on every row: the same shapes every step (IMFObjective's)

    def __post_init__(self) -> None:
        owner = "MeanFlowObjective"
        check_jvp_path(owner, self.jvp)
        check_setting(owner, "p_mean", self.p_mean, -math.inf)
        check_setting(owner, "p_std", self.p_std, 0.0, open_low=True)
        check_setting(owner, "fm_fraction", self.fm_fraction, 0.0, 1.0)
        check_setting(owner, "cfg_omega", self.cfg_omega, 0.0, open_low=True)
        check_setting(owner, "cfg_kappa", self.cfg_kappa, 0.0, 1.0, open_high=True)
        check_setting(owner, "cfg_t_min", self.cfg_t_min, 0.0, 1.0)
        check_setting(owner, "cfg_t_max", self.cfg_t_max, self.cfg_t_min, 1.0)
        check_setting(owner, "class_dropout", self.class_dropout, 0.0, 1.0, open_high=True)
        check_setting(owner, "c", self.c, 0.0)
        check_setting(owner, "p", self.p, 0.0)
        check_flags(owner, bf16=self.bf16, static_rows=self.static_rows)

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> MFDraws:
        b = x.shape[0]
        t, r = sample_logit_normal_pair(x, self.p_mean, self.p_std, generator)
        fm = torch.rand(b, generator=generator) < self.fm_fraction
        r = torch.where(fm, t, r)
        e = to_device(torch.randn(x.shape, generator=generator), x.device, x.dtype)
        drop = torch.rand(b, generator=generator) < self.class_dropout
        host = HostDraws(t, r, drop=drop)
        t_d, r_d = to_device_together([t, r], x.device)
        return MFDraws(t_d, r_d, e, to_device(drop, x.device), host)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None):
        check_model_batch(model, x, y)
        return self.loss_from_draws(model, x, y, self.draw(x, generator))

    def loss_from_draws(self, model: nn.Module, x: Tensor, y: Tensor, d: MFDraws):
        check_model_batch(model, x, y)
        b = x.shape[0]
        tb = _col(d.t, x)
        z = (1 - tb) * x + tb * d.e
        v_t = d.e - x
        one, zero = torch.ones_like(d.t), torch.zeros_like(d.t)
        null = torch.full_like(y, model.cfg.num_classes)
        fused = runs_fused(model, self.jvp)
        if self.cfg_kappa != 0.0 or self.cfg_omega != 1.0:
            with (
                torch.no_grad(),
                target_autocast(self.bf16, x, cache=not self.static_rows),
                bf16_parameters(model, self.bf16 and fused),
            ):  # v_c, v_u at h = 0
                both = Cond(
                    zero.repeat(2),
                    torch.cat([y, null]),
                    one.repeat(2),
                    zero.repeat(2),
                    one.repeat(2),
                    d.t.repeat(2),
                )
                v_both = (model.fused_u if fused else model.u)(torch.cat([z, z]), both)
            v_c, v_u = v_both.to(x.dtype).split(b)
            v_cfg = self.cfg_omega * v_t + self.cfg_kappa * v_c + (1 - self.cfg_omega - self.cfg_kappa) * v_u
            inside = (self.cfg_t_min <= d.t) & (d.t <= self.cfg_t_max)
            v_g = torch.where(_col(inside, x), v_cfg, v_t)
        else:
            v_g = v_t
        y = torch.where(d.drop, null, y)
        v_g = torch.where(_col(d.drop, x), v_t, v_g)
        cond = Cond(h=d.t - d.r, y=y, omega=one, t_min=zero, t_max=one, t=d.t)
        if fused:
            host = None if self.static_rows else host_draws(d)
            rows = None if host is None else host.t != host.r  # du where h = t - r != 0
            u, du, _ = model_fused_jvp(model, z, cond, v_g, with_v=False, rows=rows)
            loss, stats = imf_kernels.meanflow_loss(u, du, v_g, d.t, d.r, c=self.c, p=self.p)
            return loss, {"loss": loss.detach(), "loss_u": stats["loss"]}
        u, du = model_jvp(model, z, cond, v_g)
        u_tgt = (v_g - _col((d.t - d.r).clamp(0, 1), x) * du).detach()
        loss_per = per_sample_sum((u - u_tgt) ** 2)
        loss = adaptive_weighted(loss_per, self.c, self.p).mean()
        return loss, {"loss": loss.detach(), "loss_u": loss_per.detach().mean()}


@dataclass
class FlowMatchingObjective:
    """r = t always: u(z, h = 0) regressed on v_t = e - x (per-sample sum, batch mean); class dropout 0.1."""

    p_mean: float = -0.4
    p_std: float = 1.0
    class_dropout: float = 0.1
    jvp: str = "fused"  # which path runs u (FM has no JVP; the switch is the other objectives'): fused or reference
    name: str = "fm"

    def __post_init__(self) -> None:
        owner = "FlowMatchingObjective"
        check_jvp_path(owner, self.jvp)
        check_setting(owner, "p_mean", self.p_mean, -math.inf)
        check_setting(owner, "p_std", self.p_std, 0.0, open_low=True)
        check_setting(owner, "class_dropout", self.class_dropout, 0.0, 1.0, open_high=True)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None):
        check_model_batch(model, x, y)
        b, dev = x.shape[0], x.device
        t = torch.sigmoid(self.p_mean + self.p_std * torch.randn(b, generator=generator)).to(dev, time_dtype(x))
        e = torch.randn(x.shape, generator=generator).to(dev, x.dtype)
        drop = torch.rand(b, generator=generator).to(dev) < self.class_dropout
        y = torch.where(drop, torch.full_like(y, model.cfg.num_classes), y)
        z = (1 - _col(t, x)) * x + _col(t, x) * e
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        cond = Cond(h=zero, y=y, omega=one, t_min=zero, t_max=one, t=t)
        u = model(z, cond, with_v=False)[0] if runs_fused(model, self.jvp) else model.u(z, cond)
        loss = per_sample_sum((u - (e - x)) ** 2).mean()
        return loss, {"loss": loss.detach()}


OBJECTIVES = {"imf": IMFObjective, "mf": MeanFlowObjective, "fm": FlowMatchingObjective}


def make_objective(name: str, **kwargs):
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
