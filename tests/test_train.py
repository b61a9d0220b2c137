"""The training loop: the AdamW step with warm-up and clipping against its formula, the EMA recursion, the bf16
target wrapper, and whole runs through `train()` (stopping rules, files, exact resume from disk)."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

from imf.checkpoint import CheckpointError, load_model, read_history, read_manifest
from imf.config import TrainConfig, get_preset
from imf.data import DataError
from imf.model import Cond, IMFNet
from imf.objectives import IMFObjective, MeanFlowObjective
from imf.train import EMA, BF16Targets, Trainer, build_trainer, make_stream, preset_from_dict, preset_to_dict, train

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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ema_update_equals_a_lerp_per_tensor_bit_for_bit(device):
    """EMA.update's multi-tensor lerp and buffer copy give exactly the per-tensor lerp_ / copy_ results, on every
    parameter and buffer of a model (IMFNet's, and a BatchNorm's running statistics as buffers)."""
    torch.manual_seed(3)
    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model = nn.ModuleDict({"net": IMFNet(tiny_digits().model), "norm": norm}).to(device)
    ema = EMA(model, decay=0.9)
    twin = [p.detach().clone() for p in ema.model.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(torch.randn_like(b))
        ema.update(model, step)
        decay = min(0.9, (1 + step) / (10 + step))
        for t, p in zip(twin, model.parameters(), strict=True):
            t.lerp_(p.detach(), 1 - decay)
    for t, got in zip(twin, ema.model.parameters(), strict=True):
        assert torch.equal(got, t)
    for b, got in zip(model.buffers(), ema.model.buffers(), strict=True):
        assert torch.equal(got, b)
    with pytest.raises(ValueError, match="the model has 2 parameters, the average"):
        ema.update(nn.Linear(2, 2).to(device), 0)


def test_host_floats_reads_each_devices_tensors_in_one_copy():
    from imf.train import host_floats

    third = torch.tensor(1 / 3, dtype=torch.float64)
    got = host_floats([third, 2, torch.tensor([0.5]), torch.tensor(7, dtype=torch.int64), 1.25])
    assert got == [1 / 3, 2.0, 0.5, 7.0, 1.25]  # float64 exact: the tensors promoted together, not through float32
    assert all(type(value) is float for value in got) and host_floats([]) == []
    with pytest.raises(ValueError, match=r"host_floats: tensors of one element only, got shape \(2,\)"):
        host_floats([torch.zeros(2)])


def test_a_step_reads_the_device_once_after_the_backward_and_before_the_update(monkeypatch):
    """Trainer.step waits for the device once: the loss, its terms and the gradient norm in one host_floats call,
    made when the backward has run (every gradient there) and the update has not (the weights as before), so a
    non-finite loss can still skip the update."""
    import imf.train as train_module

    preset = tiny_digits()
    torch.manual_seed(4)
    model = IMFNet(preset.model)
    data = iter(batches(2))
    trainer = Trainer(model, IMFObjective(), lambda: next(data), preset.train)
    calls, read = [], train_module.host_floats

    def recording(values):
        before = [p.detach().clone() for p in model.parameters()]
        calls.append((all(p.grad is not None for p in model.parameters()), before))
        return read(values)

    monkeypatch.setattr(train_module, "host_floats", recording)
    weights = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.step()
    assert len(calls) == 1
    graded, at_read = calls[0]
    assert graded and all(torch.equal(a, b) for a, b in zip(at_read, weights, strict=True))
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))  # then updated
    assert set(metrics) == {"loss", "loss_u", "loss_v", "grad_norm"} and all(type(v) is float for v in metrics.values())


@pytest.mark.gpu
def test_a_trainer_step_waits_for_the_device_once():
    """On a GPU the whole Trainer.step (the loss and backward, clipping, AdamW, the EMA) synchronises with the device
    once, at the copy of its numbers (torch's sync debug mode warns at each wait): the forward's loss is no longer
    read before the backward is queued, and no value is read after the update is queued."""
    import warnings

    preset = tiny_digits()
    torch.manual_seed(6)
    model = IMFNet(preset.model).cuda()
    data = iter([(x.cuda(), y.cuda()) for x, y in batches(3)])
    trainer = Trainer(model, IMFObjective(), lambda: next(data), preset.train)
    trainer.step()  # warm-up: compiles, autotunes and the optimizer's state may synchronise
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            metrics = trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # one warning per wait ("called a synchronizing CUDA operation"); the mode's own notice that it is a prototype
    # ("Synchronization debug mode is a prototype feature ...", once a process) is not a wait
    waits = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(waits) == 1, [str(w.message) for w in caught]
    assert math.isfinite(metrics["loss"])


def test_cudnn_benchmark_pays_only_where_every_step_has_the_same_shapes():
    """imf train's torch.backends.cudnn.benchmark: FM and CUDA-graph steps keep their shapes; iMF and MF draw a new
    count of tangent rows each step, and each count would start cuDNN's algorithm search again (2 s steps on an
    H200)."""
    from imf.train import cudnn_benchmark_pays

    assert [cudnn_benchmark_pays(name, False) for name in ("imf", "mf", "fm")] == [False, False, True]
    assert [cudnn_benchmark_pays(name, True) for name in ("imf", "mf", "fm")] == [True, True, True]
    with pytest.raises(ValueError, match="objective must be one of imf, mf, fm, got 'gan'"):
        cudnn_benchmark_pays("gan", False)


def test_the_imf_step_changes_its_row_count_between_steps():
    """Why the above: without static rows, the number of rows that carry a tangent (so the shapes the convolutions
    see) is drawn each step."""
    x = torch.randn(64, 1, 8, 8)
    generator = torch.Generator().manual_seed(3)
    counts = set()
    for _ in range(8):
        draws = IMFObjective().draw(x, generator)
        counts.add(int((draws.t != draws.r).sum()))  # the rows whose du the loss uses (h = t - r != 0)
    assert len(counts) > 1, counts


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
    trainer.cfg.steps = 5
    assert [h["step"] for h in trainer.run()] == [4, 5]  # no steps given: to cfg.steps in all (it ran forever)
    assert trainer.run() == [] and trainer.step_count == 5


@pytest.mark.parametrize("pipelined", [False, True])
def test_run_freezes_the_heap_for_the_collector_and_thaws_it_after(pipelined):
    """Trainer.run keeps the garbage collector off the objects that exist when it starts (gc.freeze) and gives them
    back on the way out, after an error too; a heap that something else froze, or a collector that is off, it
    leaves as it found them."""
    import gc

    from imf.train import build_trainer, make_stream

    preset = tiny_digits()
    preset.train.pipelined = pipelined
    trainer = build_trainer(preset, make_stream(preset))
    assert gc.get_freeze_count() == 0
    seen = []
    trainer.run(steps=2, callback=lambda tr, metrics: seen.append(gc.get_freeze_count()))
    assert len(seen) == 2 and min(seen) > 1000  # the model, torch's modules, ... (each step's new objects are not)
    assert gc.get_freeze_count() == 0

    def fail(tr, metrics):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.run(steps=2, callback=fail)
    assert gc.get_freeze_count() == 0

    gc.freeze()  # someone else's freeze: kept, not thawed by the run
    try:
        frozen = gc.get_freeze_count()
        trainer.run(steps=1)
        assert gc.get_freeze_count() > frozen // 2  # still frozen (less what reference counts freed meanwhile)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        trainer.run(steps=1, callback=lambda tr, metrics: seen.append(gc.get_freeze_count()))
        assert seen[-1] == 0 and not gc.isenabled()
    finally:
        gc.enable()


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
    assert manifest["step"] == 4 and [h["step"] for h in read_history(tmp_path / "whole", manifest)] == [1, 2, 3, 4]

    part = tiny_digits()
    part.train.steps = 2
    train(part, tmp_path / "part", progress=False, log=lambda _: None)
    part.train.steps = 4
    resumed = train(part, tmp_path / "part", resume=True, progress=False, log=lambda _: None)
    assert resumed.trainer.step_count == 4
    assert resumed.history == whole.history  # every logged loss of steps 1..4, bit for bit
    for name, tensor in whole.trainer.ema.model.state_dict().items():
        assert torch.equal(resumed.trainer.ema.model.state_dict()[name], tensor), name


def test_train_refuses_a_folder_with_a_checkpoint_unless_told(tmp_path):
    """train() into a folder that holds a run replaced its checkpoint (the CLI refused; the library did not)."""
    quiet = dict(progress=False, log=lambda _: None)
    preset = tiny_digits()
    preset.train.steps = 2
    train(preset, tmp_path, **quiet)
    before = (tmp_path / "model-00000002.safetensors").read_bytes()
    preset.train.steps = 1
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass resume=True .* overwrite=True"):
        train(preset, tmp_path, **quiet)
    assert (tmp_path / "model-00000002.safetensors").read_bytes() == before
    result = train(preset, tmp_path, overwrite=True, **quiet)
    assert result.trainer.step_count == 1 and read_manifest(tmp_path)["step"] == 1
    assert not (tmp_path / "model-00000002.safetensors").exists()


def test_resume_continues_the_saved_run_and_refuses_a_changed_one(tmp_path):
    quiet = dict(progress=False, log=lambda _: None)
    preset = tiny_digits()
    preset.train.steps = 2
    train(preset, tmp_path, **quiet)
    preset.train.steps = 3  # as the preset: its own steps (resume=True with preset None: the saved run's)
    assert train(preset, tmp_path, resume=True, **quiet).trainer.step_count == 3
    result = train(None, tmp_path, resume=True, **quiet)  # finished at its own 3 steps: no step more
    assert result.trainer.step_count == 3 and result.trainer.cfg.steps == 3
    changed = tiny_digits()
    changed.train.lr, changed.model.width = 5.0, 16
    with pytest.raises(CheckpointError, match=r"model\.width \(8 -> 16\), train\.lr \(0\.001 -> 5\.0\)"):
        train(changed, tmp_path, resume=True, **quiet)
    with pytest.raises(ValueError, match="preset is required"):
        train(None, tmp_path / "new", **quiet)


def test_a_presets_objective_options_reach_the_trainer_and_the_checkpoint(tmp_path):
    preset = tiny_digits()
    preset.train.steps = 1
    preset.objective_options = {"fm_fraction": 0.75, "omega_max": 4.0}
    result = train(preset, tmp_path, progress=False, log=lambda _: None)
    objective = result.trainer.objective
    assert (objective.fm_fraction, objective.omega_max) == (0.75, 4.0)
    assert read_manifest(tmp_path)["config"]["objective_options"] == {"fm_fraction": 0.75, "omega_max": 4.0}
    loaded = load_model(tmp_path).preset
    assert loaded.objective_options == preset.objective_options
    changed = tiny_digits()
    changed.train.steps, changed.objective_options = 2, {"fm_fraction": 0.5, "omega_max": 4.0}
    with pytest.raises(CheckpointError, match=r"objective_options.fm_fraction \(0.75 -> 0.5\)"):
        train(changed, tmp_path, resume=True, progress=False, log=lambda _: None)
    bad = tiny_digits()
    bad.objective_options = {"fm_fraction": 0.5, "cfg_omega": 2.0}
    with pytest.raises(ValueError, match=r"objective_options \['cfg_omega'\] are not settings of the 'imf' objective"):
        build_trainer(bad, make_stream(bad))
    bad.objective_options = {"omega_max": 0.5}
    with pytest.raises(ValueError, match="IMFObjective: omega_max"):
        build_trainer(bad, make_stream(bad))


def test_a_checkpoint_from_before_objective_options_reads_as_none():
    config = preset_to_dict(tiny_digits())
    del config["objective_options"]
    assert preset_from_dict(config).objective_options == {}


def test_a_run_on_tensors_in_memory_resumes_only_with_them(tmp_path):
    """A run trained on data=(x, y) resumed without them read the preset's own data (digits: 1437 rows, as many as
    these, so the loader's row-count check let it through): refused now, and resumed exactly with them."""
    quiet = dict(progress=False, log=lambda _: None)
    generator = torch.Generator().manual_seed(3)
    data = (torch.rand(1437, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 10, (1437,), generator=generator))
    preset = tiny_digits()
    preset.train.steps = 2
    whole = train(preset, tmp_path / "whole", data=data, **quiet)
    preset.train.steps = 1
    train(preset, tmp_path / "part", data=data, **quiet)
    with pytest.raises(DataError, match=r"trained on tensors given in memory .* pass the same data to resume it"):
        train(None, tmp_path / "part", resume=True, **quiet)
    preset.train.steps = 2
    resumed = train(preset, tmp_path / "part", resume=True, data=data, **quiet)
    assert resumed.history == whole.history


def test_more_steps_after_a_cooldown_are_said(tmp_path):
    """Resuming with more steps moves the cooldown: the learning rate rises from where it was (0 at the end of
    a finished run), which the log says."""
    preset = tiny_digits()
    preset.train.steps, preset.train.cooldown = 2, 0.5
    train(preset, tmp_path, progress=False, log=lambda _: None)
    said = []
    preset.train.steps = 4
    train(preset, tmp_path, resume=True, progress=False, log=said.append)
    assert any(line.startswith("note: steps 2 -> 4 with cooldown 0.5: the learning rate follows") for line in said)


def test_train_takes_a_presets_name_and_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        train("nope", tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(TypeError, match="preset must be a Preset, a preset's name or None, got ModelConfig"):
        train(tiny_digits().model, tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="resume must be True or False"):
        train("digits", tmp_path, resume="yes", progress=False, log=lambda _: None)


def test_imfnet_keeps_its_own_checked_copy_of_the_config():
    preset = tiny_digits()
    model = IMFNet(preset.model)
    preset.model.num_classes = 3  # a second variant from the same preset must not change the first model
    assert model.cfg.num_classes == 10 and model.cfg is not preset.model
    preset.model.cross_attn_resolutions = (16,)  # set after construction: checked when a model is built
    with pytest.raises(ValueError, match="cross_attn_resolutions"):
        IMFNet(preset.model)


def test_train_stops_at_the_wall_clock_limit(tmp_path):
    preset = tiny_digits()
    preset.train.steps = 1000
    preset.train.minutes = 1e-7
    result = train(preset, tmp_path, progress=False, log=lambda _: None)
    assert result.stopped_by == "minutes" and result.trainer.step_count <= 1
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == result.trainer.step_count


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: replay() runs the captured step again and writes its outputs and the
    gradients into the tensors the capture returned, where a real replay writes them in place."""

    def __init__(self, run, model):
        self.run, self.model = run, model
        self.out = run()
        self.grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
        self.replays = 0

    def replay(self):
        loss, metrics = self.run()
        self.out[0].copy_(loss)
        for name, value in metrics.items():
            self.out[1][name].copy_(value)
        for param, grad in self.grads:
            grad.copy_(param.grad)
        self.replays += 1


def graphed_trainer(model, objective, next_batch, cfg, **kwargs):
    """A Trainer whose step runs through GraphedStep, EagerGraph for the capture (cuda_graph itself needs a GPU)."""
    from imf.train import GraphedStep

    trainer = Trainer(model, objective, next_batch, cfg, **kwargs)
    graphs = []

    def capture(run):
        graphs.append(EagerGraph(run, model))
        return graphs[-1], graphs[-1].out

    trainer.graphed = GraphedStep(model, dataclasses.replace(objective, static_rows=True), model, capture=capture)
    return trainer, graphs


def batches(count, shape=(6, 1, 8, 8), seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)) for _ in range(count)]


@pytest.mark.parametrize("objective", [IMFObjective(), MeanFlowObjective()], ids=["imf", "mf"])
def test_a_graphed_step_trains_like_the_eager_static_rows_step(objective):
    """cuda_graph's plumbing, the graph replaced by a rerun: one capture, then each step's batch and draws copied into
    the static inputs, the gradients pointed at the captured ones, the optimizer stepped: every logged metric and
    every weight after 4 steps equal the eager trainer's with the static-rows objective, bit for bit."""
    preset = tiny_digits()
    torch.manual_seed(5)
    model = IMFNet(preset.model)
    with torch.no_grad():  # non-zero output layers, so u, du and v are not identically 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    data = batches(4)
    eager_data, graph_data = iter(data), iter(data)
    static = dataclasses.replace(objective, static_rows=True)
    eager = Trainer(twin, static, lambda: next(eager_data), preset.train)
    graphed, graphs = graphed_trainer(model, objective, lambda: next(graph_data), preset.train)
    eager_history = [eager.step() for _ in range(4)]
    graph_history = [graphed.step() for _ in range(4)]
    assert len(graphs) == 1 and graphs[0].replays == 4
    assert graph_history == eager_history
    assert len({h["loss"] for h in graph_history}) == 4  # each step saw its own batch and draws
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    grads = graphed.graphed.captured.grads
    assert grads and all(p.grad is grad for p, grad in grads)  # the captured ones


def test_a_graphed_step_refuses_another_batch_shape_and_skips_a_nonfinite_loss():
    preset = tiny_digits()
    torch.manual_seed(6)
    model = IMFNet(preset.model)
    data = batches(3) + batches(1, shape=(5, 1, 8, 8))
    data[1][0][0, 0, 0, 0] = float("nan")
    stream = iter(data)
    trainer, _ = graphed_trainer(model, IMFObjective(), lambda: next(stream), preset.train, skip_nonfinite=True)
    trainer.step()
    before = [p.detach().clone() for p in model.parameters()]
    assert trainer.step() == {"loss": pytest.approx(float("nan"), nan_ok=True), "skipped": 1.0}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # no update
    assert math.isfinite(trainer.step()["loss"]) and trainer.step_count == 3 and trainer.skipped_steps == 1
    with pytest.raises(ValueError, match=r"captured shape \(6, 1, 8, 8\).*got \(5, 1, 8, 8\)"):
        trainer.step()


def test_cuda_graph_names_what_it_needs():
    from imf.distributed import DistInfo
    from imf.objectives import FlowMatchingObjective

    preset = tiny_digits()
    preset.train.cuda_graph = True
    model = IMFNet(preset.model)
    batch = lambda: batches(1)[0]  # noqa: E731
    with pytest.raises(ValueError, match="cuda_graph takes the imf or mf objective, got 'fm'"):
        Trainer(model, FlowMatchingObjective(), batch, preset.train)
    with pytest.raises(ValueError, match="cuda_graph runs in one process, got a world size of 2"):
        Trainer(model, IMFObjective(), batch, preset.train, dist=DistInfo(rank=0, world_size=2))
    with pytest.raises(ValueError, match="cuda_graph needs the model on a CUDA device, got cpu"):
        Trainer(model, IMFObjective(), batch, preset.train)
    from imf.train import GraphedStep

    with pytest.raises(ValueError, match="must have static_rows=True"):
        GraphedStep(model, IMFObjective(), model)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-targets"])
def test_cuda_graph_training_follows_the_eager_static_rows_training(backend, bf16):
    """TrainConfig.cuda_graph on a GPU: 5 steps of the digits preset through one captured graph against the eager
    trainer with the static-rows objective (same batches and draws). Before each step the eager twin takes the
    graphed model's weights, so every replay is checked on weights the optimizer has moved since the capture (at the
    full lr, no warm-up: a graph reading a stale copy of any weight would be off by far more than rounding): each
    step's loss terms and gradients agree to rounding (cuDNN's weight gradients may sum in another order).

    (Without the re-sync, the two runs' weights part by rounding at each update, and with bf16 targets a rounding
    apart flips bf16 roundings of the targets: on an H200, 2026-11-27, the loss terms of steps 2-5 then differed
    by up to 3.5e-4 relative with the same code that agrees to 1e-4 on the first step.)"""
    import imf_kernels

    preset = get_preset("digits")
    preset.train.batch_size, preset.train.bf16, preset.train.warmup_steps = 16, bf16, 0
    torch.manual_seed(8)
    model = IMFNet(preset.model).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    m = preset.model
    data = [(x.cuda(), y.cuda()) for x, y in batches(5, shape=(16, m.image_channels, m.image_size, m.image_size))]
    eager_data, graph_data = iter(data), iter(data)
    losses = []
    with imf_kernels.use_backend(backend):
        eager = Trainer(twin, IMFObjective(static_rows=True), lambda: next(eager_data), preset.train)
        graphed = Trainer(
            model, IMFObjective(), lambda: next(graph_data), dataclasses.replace(preset.train, cuda_graph=True)
        )
        assert graphed.graphed is not None and graphed.objective.static_rows
        for step in range(5):
            with torch.no_grad():
                for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                    q.copy_(p)
            want, got = eager.step(), graphed.step()
            assert got.keys() == want.keys()
            for key in ("loss", "loss_u", "loss_v"):
                assert got[key] == pytest.approx(want[key], rel=1e-4), (step, key, got, want)
            for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
                assert (p.grad is None) == (q.grad is None), name
                if q.grad is not None:
                    scale = q.grad.abs().max().item()
                    msg = f"step {step}: {name}"
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * max(scale, 1e-6), msg=msg)
            losses.append(got["loss_u"])
    assert len(set(losses)) == 5  # each step its own batch and draws
    moved = max(((p.detach() - s).norm() / s.norm()).item() for p, s in zip(model.parameters(), start, strict=True))
    assert moved > 1e-3  # the replays ran on weights well away from those at the capture


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_train_names_a_device_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="device cuda, but no CUDA device is visible here"):
        train(tiny_digits(), tmp_path, device="cuda", progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="device must be a torch device or its name .* got 'gpu'"):
        train(tiny_digits(), tmp_path, device="gpu", progress=False, log=lambda _: None)
    assert not (tmp_path / "checkpoint.json").exists()
