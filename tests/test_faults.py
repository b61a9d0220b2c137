"""Faults: a NaN loss stops the run naming the step and the last good checkpoint (or is skipped by a flag), an
exploding run stops the CLI with exit code 1, SIGINT/SIGTERM write a checkpoint and exit 0, and a process killed
in the middle of a checkpoint write resumes from the previous checkpoint exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import imf.train
from imf.checkpoint import load_checkpoint, read_history
from imf.config import get_preset
from imf.data import DataError
from imf.train import NonFiniteLossError, build_trainer, make_stream, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "gauss", "--width", "8", "--batch-size", "8", "--warmup-steps", "1", "--threads", "1"]
TINY += ["--no-progress", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def tensor_preset():
    """The gauss model at width 8 on in-memory tensors (data kind `tensors`), a checkpoint after every step."""
    preset = get_preset("gauss")
    preset.data = "tensors"
    preset.model.width, preset.model.context_dim = 8, 16
    t = preset.train
    t.batch_size, t.steps, t.warmup_steps, t.checkpoint_every = 8, 5, 1, 1
    return preset


def clean_data():
    """40 random rows, 5 batches of 8 per epoch."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(40, 1, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator)


class NaNAtStep:
    """A data stream whose batch of step `step` has a NaN in its first row (data with a NaN is refused before
    training, in memory as in a file, so the NaN comes in on the way)."""

    def __init__(self, stream, step: int):
        self.stream, self.step, self.drawn = stream, step, 0

    def __call__(self):
        x, y = self.stream()
        self.drawn += 1
        if self.drawn == self.step:
            x = x.clone()
            x[0, 0, 3, 5] = float("nan")
        return x, y

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def nan_at_step(monkeypatch, step: int):
    """The clean data, and `train`'s stream wrapped in NaNAtStep."""
    made = imf.train.make_stream
    monkeypatch.setattr(imf.train, "make_stream", lambda *args, **kwargs: NaNAtStep(made(*args, **kwargs), step))
    return clean_data()


def test_in_memory_data_with_a_nan_is_refused_before_training(tmp_path):
    x, y = clean_data()
    x[7, 0, 3, 5] = float("nan")
    with pytest.raises(DataError, match=r"^data \(in memory\): x has 1 non-finite values \(NaN or inf\)$"):
        train(tensor_preset(), tmp_path / "run", data=(x, y), progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_nan_data_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as caught:
        train(tensor_preset(), out, data=nan_at_step(monkeypatch, 3), progress=False, log=lambda m: None)
    assert str(caught.value) == f"loss is NaN at step 3; last good checkpoint: {out} (step 2)"
    manifest, state = load_checkpoint(out)
    assert manifest["step"] == state["step_count"] == 2
    assert all(torch.isfinite(w).all() for w in state["model"].values())


def test_nan_on_the_first_step_says_no_checkpoint_exists(tmp_path, monkeypatch):
    data = nan_at_step(monkeypatch, 1)
    with pytest.raises(NonFiniteLossError, match=r"^loss is NaN at step 1; last good checkpoint: none \(no check"):
        train(tensor_preset(), tmp_path / "run", data=data, progress=False, log=lambda m: None)


def test_skip_nonfinite_skips_exactly_the_nan_step():
    preset = tensor_preset()
    stream = NaNAtStep(make_stream(preset, data=clean_data()), 3)
    trainer = build_trainer(preset, stream, skip_nonfinite=True)
    trainer.run(steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.opt.state_dict()["state"][0].items()}
    skipped = trainer.step()
    assert skipped["skipped"] == 1.0 and skipped["loss"] != skipped["loss"]  # NaN
    assert trainer.step_count == 3 and trainer.skipped_steps == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in trainer.ema.model.state_dict().items():
        assert torch.equal(value, ema_before[name]), name
    for key, value in trainer.opt.state_dict()["state"][0].items():
        assert torch.equal(value, moments[key]), key  # Adam's moments and step count untouched
    after = trainer.step()
    assert "skipped" not in after and torch.isfinite(torch.tensor(after["loss"]))
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_skip_nonfinite_run_finishes_and_logs_the_skip(tmp_path, monkeypatch):
    messages = []
    result = train(
        tensor_preset(),
        tmp_path / "run",
        data=nan_at_step(monkeypatch, 3),
        progress=False,
        log=messages.append,
        skip_nonfinite=True,
    )
    assert result.trainer.step_count == 5 and result.stopped_by == "steps"
    assert [h["step"] for h in result.history if h.get("skipped")] == [3]
    assert "skipped step 3: loss is nan (--skip-nonfinite)" in messages


def test_cli_exploding_run_exits_1_naming_the_checkpoint(tmp_path):
    """lr 1e30: the first update throws the weights to ~1e30, the second step's forward overflows."""
    out = tmp_path / "run"
    args = [*TINY, "--steps", "4", "--lr", "1e30", "--checkpoint-every", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "imf.cli", "train", *args], env=env(), cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imf: error: loss is ")
    assert lines[0].endswith(f" at step 2; last good checkpoint: {out} (step 1)")
    assert load_checkpoint(out)[0]["step"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_exits_0(tmp_path, signum):
    out = tmp_path / "run"
    args = [*TINY, "--steps", "100000", "--checkpoint-every", "5", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "imf.cli", "train", *args],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.json").exists():  # training is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    name = signal.Signals(signum).name
    manifest, state = load_checkpoint(out)
    step = manifest["step"]
    assert 5 <= step < 100000 and state["step_count"] == step
    assert f"stopped by {name} at step {step}; checkpoint: {out}" in stdout
    assert f"trained to step {step} in" in stdout and f"(stopped by {name})" in stdout
    assert len(read_history(out, manifest)) == step


KILL_MID_WRITE = """
import os, signal, sys
import safetensors.torch
from imf.cli import main

real_save = safetensors.torch.save_file

def save_then_die(tensors, name, *args, **kwargs):
    real_save(tensors, name, *args, **kwargs)
    if os.path.basename(name).startswith(".ema-00000004."):  # the step-4 checkpoint's second file
        with open(name, "r+b") as handle:
            handle.truncate(os.path.getsize(name) // 2)  # half written
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_resumes_from_last_good(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)]
    run = lambda *command: subprocess.run(  # noqa: E731
        [sys.executable, *command], env=env(), cwd=REPO, capture_output=True, text=True
    )
    killed = run("-c", KILL_MID_WRITE, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the kill landed inside the step-4 checkpoint: its model file is complete, its EMA file half written
    assert (out / "model-00000004.safetensors").exists()
    assert [p.name.split(".")[1] for p in out.glob(".*.tmp")] == ["ema-00000004"]
    manifest, state = load_checkpoint(out)
    assert manifest["step"] == 2 and state["step_count"] == 2

    resumed = run("-m", "imf.cli", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 2" in resumed.stdout
    assert "trained to step 6" in resumed.stdout
    assert not list(out.glob(".*.tmp"))  # the dead writer's temporaries are gone
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"{part}-00000006.safetensors" for part in ("ema", "model", "optimizer", "state")
    ]

    preset = get_preset("gauss")
    preset.model.width = 8
    t = preset.train
    t.batch_size, t.warmup_steps, t.steps, t.checkpoint_every = 8, 1, 6, 2
    straight = train(preset, tmp_path / "straight", progress=False, log=lambda m: None)
    _, state = load_checkpoint(out)
    for name, value in straight.trainer.model.state_dict().items():
        assert torch.equal(state["model"][name], value), name
    history = read_history(out)
    assert [h["loss"] for h in history] == [round(h["loss"], 6) for h in straight.history]
