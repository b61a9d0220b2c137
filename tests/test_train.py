"""The training loop: the AdamW step with warm-up and clipping against its formula, the EMA recursion, the bf16
target wrapper, and whole runs through `train()` (stopping rules, files, exact resume from disk)."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from imf.config import TrainConfig, get_preset
from imf.model import Cond, IMFNet
from imf.objectives import IMFObjective
from imf.train import EMA, BF16Targets, Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


class QuadraticObjective:
    """loss = sum((model(x) - y)^2): a gradient known in closed form."""

    def loss(self, model, x, y, generator=None):
        loss = ((model(x) - y) ** 2).sum()
        return loss, {"loss": loss.detach()}


def test_first_step_is_clipped_adamw_with_warmup():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    cfg = TrainConfig(lr=0.05, warmup_steps=4, grad_clip=0.5, ema_decay=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(((model(x) - y) ** 2).sum(), list(model.parameters()))
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert norm > cfg.grad_clip  # the clip is active

    trainer = Trainer(model, QuadraticObjective(), lambda: (x, y), cfg)
    metrics = trainer.step()
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-12)
    lr = cfg.lr * 1 / cfg.warmup_steps
    for p0, g, p1 in zip(before, grads, model.parameters(), strict=True):
        g = g * cfg.grad_clip / (norm + 1e-6)  # clip_grad_norm_'s scale
        m_hat, v_hat = g, g**2  # Adam's bias correction undoes (1 - beta) on the first step
        expected = p0 - lr * m_hat / (v_hat.sqrt() + 1e-8)
        assert torch.allclose(p1.detach(), expected, rtol=0, atol=1e-12)
    assert trainer.step_count == 1
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([0.0125, 0.025, 0.0375, 0.05, 0.05, 0.05])


def test_lr_schedule_warmup_constant_cooldown():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=20, cooldown=0.25)  # decays over the last 5 steps
    trainer = Trainer(nn.Linear(2, 2), QuadraticObjective(), lambda: None, cfg)
    got = [trainer.lr_at(s) for s in range(21)]
    assert got == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 13 + [0.8, 0.6, 0.4, 0.2, 0.0])


def test_ema_recursion_with_warm_start():
    torch.manual_seed(1)
    model = nn.Linear(4, 2).double()
    ema = EMA(model, decay=0.95)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        decay = min(0.95, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for e, got in zip(expected, ema.model.parameters(), strict=True):
        assert torch.allclose(got, e, rtol=0, atol=1e-12)


def tiny_digits():
    preset = get_preset("digits")
    preset.model.width = 8
    preset.model.context_dim = 16
    preset.train.batch_size = 6
    preset.train.warmup_steps = 3
    return preset


def test_bf16_targets_autocast_only_no_grad_calls():
    torch.manual_seed(2)
    model = IMFNet(tiny_digits().model)
    with torch.no_grad():  # non-zero output layers, so u and v are not identically 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped = BF16Targets(model)
    b = 5
    z = torch.randn(b, 1, 8, 8)
    one = torch.ones(b)
    cond = Cond(h=0.3 * one, y=torch.arange(b), omega=2 * one, t_min=0.2 * one, t_max=0.7 * one, t=0.6 * one)
    u, v = model(z, cond)
    u_w, v_w = wrapped(z, cond)  # grad enabled: untouched fp32
    assert torch.equal(u_w, u) and torch.equal(v_w, v)
    with torch.no_grad():
        v_bf16 = wrapped.v(z, cond)
        exact = model.double().v(z.double(), Cond(*(c.double() if c.is_floating_point() else c for c in cond)))
        model.float()
    assert v_bf16.dtype == torch.float32
    err_bf16 = float((v_bf16.double() - exact).norm() / exact.norm())
    err_fp32 = float((v.detach().double() - exact).norm() / exact.norm())
    assert err_fp32 < 1e-5 < err_bf16 < 3e-2  # it really ran in bf16, and only that far off


def test_bf16_training_keeps_the_fused_path(monkeypatch):
    """Trainer with bf16=True wraps the model in BF16Targets; the step must still take the fused forward-with-tangent
    (no torch.func.jvp, no reference trunk) and give exactly the loss and gradients of the objective's own bf16
    option on the bare model (targets in bf16, JVP pass and loss in fp32), within bf16 error of the fp32 step."""
    preset = tiny_digits()
    preset.train.bf16 = True
    preset.train.grad_clip = 1e9  # no clipping: the step's gradients are compared below through the update
    torch.manual_seed(3)
    model = IMFNet(preset.model)
    with torch.no_grad():  # non-zero output layers, so u, du and v are not identically 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bare, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference path ran")

    calls = []
    fused_v = model.fused_v
    monkeypatch.setattr(model, "fused_v", lambda *a: calls.append("fused_v") or fused_v(*a))
    monkeypatch.setattr(model, "trunk", refuse)
    monkeypatch.setattr(torch.func, "jvp", refuse)
    trainer = Trainer(model, IMFObjective(), lambda: (x, y), preset.train)
    assert isinstance(trainer._loss_model, BF16Targets) and trainer._loss_model.takes_tangents
    loss, metrics = trainer._loss(x, y)
    assert calls == ["fused_v"]  # the targets through the fused primal; the graded pass through model(...)
    monkeypatch.undo()

    want, want_metrics = IMFObjective(bf16=True).loss(bare, x, y, torch.Generator().manual_seed(preset.train.seed))
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    assert torch.equal(metrics["loss_u"], want_metrics["loss_u"])
    loss.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), bare.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    _, plain = IMFObjective().loss(fp32, x, y, torch.Generator().manual_seed(preset.train.seed))
    # the weighted loss L / sg(L + c) is ~1 per term whatever L; the unweighted L_u shows the bf16 targets
    rel = abs(float(metrics["loss_u"] - plain["loss_u"])) / float(plain["loss_u"])
    assert 1e-6 < rel < 1e-2, rel  # bf16 entered the targets, and only that far


def test_run_stops_at_steps_or_seconds():
    preset = tiny_digits()
    from imf.train import build_trainer, make_stream

    trainer = build_trainer(preset, make_stream(preset))
    history = trainer.run(steps=3)
    assert [h["step"] for h in history] == [1, 2, 3]
    history = trainer.run(steps=100, seconds=1e-9)  # the clock is checked before each step
    assert history == [] and trainer.step_count == 3


def test_train_writes_files_and_resumes_exactly_from_disk(tmp_path):
    preset = tiny_digits()
    preset.train.steps = 4
    preset.train.checkpoint_every = 2
    preset.train.sample_every = 2
    whole = train(preset, tmp_path / "whole", progress=False, log=lambda _: None)
    assert whole.stopped_by == "steps" and whole.trainer.step_count == 4
    assert sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == [
        "step_00000002.png",
        "step_00000004.png",
    ]
    manifest = json.loads((tmp_path / "whole" / "checkpoint.json").read_text())
    assert manifest["step"] == 4 and [h["step"] for h in manifest["history"]] == [1, 2, 3, 4]

    part = tiny_digits()
    part.train.steps = 2
    train(part, tmp_path / "part", progress=False, log=lambda _: None)
    part.train.steps = 4
    resumed = train(part, tmp_path / "part", resume=True, progress=False, log=lambda _: None)
    assert resumed.trainer.step_count == 4
    assert resumed.history == whole.history  # every logged loss of steps 1..4, bit for bit
    for name, tensor in whole.trainer.ema.model.state_dict().items():
        assert torch.equal(resumed.trainer.ema.model.state_dict()[name], tensor), name


def test_train_stops_at_the_wall_clock_limit(tmp_path):
    preset = tiny_digits()
    preset.train.steps = 1000
    preset.train.minutes = 1e-7
    result = train(preset, tmp_path, progress=False, log=lambda _: None)
    assert result.stopped_by == "minutes" and result.trainer.step_count <= 1
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == result.trainer.step_count
