"""TrainConfig.pipelined: `Trainer.run` reads a step's numbers after queuing the next step's loss and backward, and a
non-finite loss skips its update on the device. Everything it leaves (weights, EMA, AdamW's state, the draws, the
history, the errors) is checked bit for bit against the plain loop with the same (fused) AdamW."""

import copy
import json
import math

import pytest
import torch
from test_train import tiny_digits as plain_tiny_digits

from imf.checkpoint import read_history
from imf.config import TrainConfig
from imf.objectives import make_objective
from imf.train import NonFiniteLossError, Trainer, _HostRead, build_trainer, make_stream, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_digits(pipelined: bool):
    """test_train's tiny digits run, pipelined or not."""
    preset = plain_tiny_digits()
    preset.train.pipelined = pipelined
    return preset


class NaNAt:
    """The objective, with the loss of its `at`-th call (1-based) made NaN: its backward gives NaN gradients."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, x, y, generator=None):
        self.calls += 1
        loss, metrics = self.inner.loss(model, x, y, generator)
        return (loss * float("nan") if self.calls == self.at else loss), metrics


def make_trainer(pipelined: bool, nan_at: int | None = None, skip_nonfinite: bool = False, device="cpu") -> Trainer:
    preset = tiny_digits(pipelined)
    trainer = build_trainer(preset, make_stream(preset, device=device), device, skip_nonfinite=skip_nonfinite)
    if not pipelined:  # the plain loop with the fused AdamW the pipelined one takes
        assert not trainer.opt.defaults["fused"]
        trainer.opt = torch.optim.AdamW(
            trainer.model.parameters(), lr=preset.train.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True
        )
    else:
        assert trainer.opt.defaults["fused"]
    if nan_at is not None:
        trainer.objective = NaNAt(trainer.objective, nan_at)
    return trainer


def assert_same_state(a: Trainer, b: Trainer) -> None:
    assert (a.step_count, a.skipped_steps) == (b.step_count, b.skipped_steps)
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[name], tensor), name
    for name, tensor in a.ema.model.state_dict().items():
        assert torch.equal(b.ema.model.state_dict()[name], tensor), name
    state_a, state_b = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key, values in state_a.items():
        for name, value in values.items():
            assert torch.equal(state_b[key][name], value), (key, name)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    data_a, data_b = a.next_batch.state_dict(), b.next_batch.state_dict()
    assert data_a.keys() == data_b.keys()
    for key, value in data_a.items():
        same = torch.equal(value, data_b[key]) if isinstance(value, torch.Tensor) else value == data_b[key]
        assert same, key


def same_numbers(a: list[dict], b: list[dict]) -> bool:
    """Histories equal key by key, NaN equal to NaN, the wall-clock left out."""
    if len(a) != len(b):
        return False
    for row_a, row_b in zip(a, b, strict=True):
        keys = set(row_a) - {"time"}
        if keys != set(row_b) - {"time"}:
            return False
        for key in keys:
            x, y = row_a[key], row_b[key]
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
    return True


def test_a_pipelined_run_trains_as_the_plain_loop_bit_for_bit():
    plain, pipelined = make_trainer(False), make_trainer(True)
    history = plain.run(steps=5)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert same_numbers(pipelined.run(steps=5), history)
    assert_same_state(plain, pipelined)
    # step() itself, pipelined: queue and read at once, the same numbers and states again
    assert same_numbers([pipelined.step()], [plain.step()])
    assert_same_state(plain, pipelined)


def test_a_stop_undoes_the_queued_step_so_the_next_run_continues_exactly():
    whole, parts = make_trainer(True), make_trainer(True)
    history = whole.run(steps=5)
    first = parts.run(steps=5, stop=lambda: parts.step_count >= 2)  # step 3's loss and backward were queued
    assert [h["step"] for h in first] == [1, 2] and parts.step_count == 2
    second = parts.run(steps=3)
    assert same_numbers(first + second, history)
    assert_same_state(whole, parts)


def test_the_state_saved_inside_a_callback_is_that_of_the_finished_step():
    """A checkpoint written by the callback of step 2 (step 3's loss and backward already queued) resumes into the
    same steps 3 and 4 as the uninterrupted run."""
    whole, saved = make_trainer(True), {}
    callback = lambda tr, m: saved.update(copy.deepcopy(tr.state_dict())) if m["step"] == 2 else None  # noqa: E731
    history = whole.run(steps=4, callback=callback)
    resumed = make_trainer(True)
    resumed.load_state_dict(saved)
    assert same_numbers(resumed.run(steps=2), history[2:])
    assert_same_state(whole, resumed)


def test_a_nonfinite_step_is_skipped_on_the_device_as_the_plain_loop_skips_it():
    plain = make_trainer(False, nan_at=3, skip_nonfinite=True)
    pipelined = make_trainer(True, nan_at=3, skip_nonfinite=True)
    history = plain.run(steps=5)
    assert history[2]["skipped"] == 1.0 and math.isnan(history[2]["loss"]) and plain.skipped_steps == 1
    assert same_numbers(pipelined.run(steps=5), history)
    assert_same_state(plain, pipelined)


def test_a_nonfinite_loss_raises_at_its_step_and_leaves_the_plain_loops_state():
    plain, pipelined = make_trainer(False, nan_at=3), make_trainer(True, nan_at=3)
    for trainer in (plain, pipelined):
        with pytest.raises(NonFiniteLossError, match="loss is NaN at step 3") as error:
            trainer.run(steps=5)
        assert error.value.step == 3 and trainer.step_count == 2
    # the plain loop drew step 3's batch and randomness before it raised; the pipelined one had also queued step 4's
    # loss and backward, and put their draws back
    assert_same_state(plain, pipelined)


def test_run_queues_the_next_steps_loss_and_backward_before_it_reads_a_step(monkeypatch):
    trainer, events = make_trainer(True), []
    forward_backward, finish, floats = Trainer._forward_backward, Trainer._finish, _HostRead.floats

    def logged_forward_backward(self):
        events.append(f"queue {self.step_count + 1}")
        return forward_backward(self)

    def logged_finish(self, pending):
        events.append(f"read {pending.step}")
        return finish(self, pending)

    def counted_floats(self):
        events.append("wait")
        return floats(self)

    monkeypatch.setattr(Trainer, "_forward_backward", logged_forward_backward)
    monkeypatch.setattr(Trainer, "_finish", logged_finish)
    monkeypatch.setattr(_HostRead, "floats", counted_floats)
    trainer.run(steps=3)
    assert events == ["queue 1", "queue 2", "read 1", "wait", "queue 3", "read 2", "wait", "read 3", "wait"]


def test_train_pipelined_writes_checkpoints_that_resume_exactly(tmp_path):
    whole_preset = tiny_digits(True)
    whole_preset.train.steps, whole_preset.train.checkpoint_every = 4, 2
    whole = train(whole_preset, tmp_path / "whole", progress=False, log=lambda _: None)
    manifest = json.loads((tmp_path / "whole" / "checkpoint.json").read_text())
    assert manifest["step"] == 4 and [h["step"] for h in read_history(tmp_path / "whole", manifest)] == [1, 2, 3, 4]
    part = tiny_digits(True)
    part.train.steps = 2
    train(part, tmp_path / "part", progress=False, log=lambda _: None)
    part.train.steps = 4
    resumed = train(part, tmp_path / "part", resume=True, progress=False, log=lambda _: None)
    assert resumed.history == whole.history
    assert_same_state(whole.trainer, resumed.trainer)


def test_pipelined_refuses_fsdp_by_name():
    from imf.distributed import DistInfo

    dist = DistInfo(rank=0, world_size=2, local_rank=0)
    objective = make_objective("imf")
    with pytest.raises(ValueError, match="pipelined takes one process or parallel='ddp'"):
        Trainer(torch.nn.Linear(2, 2), objective, lambda: None, TrainConfig(pipelined=True), dist=dist, parallel="fsdp")


def test_a_checkpoint_moves_between_the_plain_and_the_pipelined_loop():
    """AdamW's implementation is the trainer's, not the checkpoint's: a plain run's state loaded into a pipelined
    trainer steps with fused AdamW (its found_inf), and the other way round with the plain one's."""
    plain = build_trainer(tiny_digits(False), make_stream(tiny_digits(False)))
    pipelined = make_trainer(True)
    plain.run(steps=2)
    pipelined.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert [group["fused"] for group in pipelined.opt.param_groups] == [True]
    assert [h["step"] for h in pipelined.run(steps=2)] == [3, 4]
    plain.load_state_dict(copy.deepcopy(pipelined.state_dict()))
    assert [group["fused"] for group in plain.opt.param_groups] == [None]
    assert [h["step"] for h in plain.run(steps=1)] == [5]


@pytest.mark.gpu
def test_a_pipelined_run_on_a_gpu_trains_as_the_plain_loop():
    """The same steps on a GPU (the reads through pinned memory and events, fused AdamW's found_inf on the device),
    a NaN loss at step 3 skipped; within rounding: cuDNN's backward algorithms need not be deterministic."""
    plain = make_trainer(False, nan_at=3, skip_nonfinite=True, device="cuda")
    pipelined = make_trainer(True, nan_at=3, skip_nonfinite=True, device="cuda")
    history, piped = plain.run(steps=5), pipelined.run(steps=5)
    assert [h["step"] for h in piped] == [1, 2, 3, 4, 5] and piped[2]["skipped"] == 1.0 and math.isnan(piped[2]["loss"])
    for row, expected in zip(piped, history, strict=True):
        assert set(row) == set(expected)
        keys = set(row) - {"time"} - ({"loss"} if "skipped" in row else set())  # (the skipped step's loss: NaN)
        for key in keys:
            assert row[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert (pipelined.step_count, pipelined.skipped_steps) == (plain.step_count, plain.skipped_steps) == (5, 1)
    for a, b in ((plain.model, pipelined.model), (plain.ema.model, pipelined.ema.model)):
        for name, tensor in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_a_pipelined_run_on_a_gpu_never_synchronises_the_device():
    """Its reads wait on each step's own event (torch's sync debug mode does not count those), so no call in `run`
    synchronises the device: the host queues the next step while the device runs the last."""
    import warnings

    trainer = make_trainer(True, device="cuda")
    trainer.run(steps=2)  # warm-up: compiles, autotunes, the optimizer's state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            history = trainer.run(steps=3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert waits == [] and [h["step"] for h in history] == [3, 4, 5]
