"""Checkpoints: exact round trip of every tensor and RNG state, exact resume (the resumed run's losses equal an
uninterrupted run's), crash safety of the write, and one-line errors for missing, corrupt or mismatched files."""

import json
import os
from pathlib import Path

import pytest
import torch

import imf.checkpoint as checkpoint
from imf.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_history,
    read_manifest,
    save_checkpoint,
)
from imf.config import get_preset
from imf.train import build_trainer, make_stream, preset_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_preset(data: str = "digits"):
    preset = get_preset(data)
    preset.model.width = 8
    preset.model.context_dim = 16
    preset.train.batch_size = 6
    preset.train.warmup_steps = 3
    return preset


def new_trainer(preset):
    return build_trainer(preset, make_stream(preset))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_round_trip_restores_every_tensor_and_rng(tmp_path):
    preset = tiny_preset()
    trainer = new_trainer(preset)
    for _ in range(2):
        trainer.step()
    saved = trainer.state_dict()
    save_checkpoint(tmp_path, saved, preset_to_dict(preset), history=[{"step": 1, "loss": 2.0}])

    manifest, state = load_checkpoint(tmp_path)
    assert manifest["step"] == 2 and read_history(tmp_path, manifest) == [{"step": 1, "loss": 2.0}]
    assert manifest["config"] == json.loads(json.dumps(preset_to_dict(preset)))
    fresh = new_trainer(preset)
    fresh.load_state_dict(state)
    assert fresh.step_count == 2
    restored = fresh.state_dict()
    assert_same_tensors(saved["model"], restored["model"])
    assert_same_tensors(saved["ema"], restored["ema"])
    for index, per_param in saved["optimizer"]["state"].items():
        assert_same_tensors(per_param, restored["optimizer"]["state"][index])
    assert saved["optimizer"]["param_groups"] == restored["optimizer"]["param_groups"]
    assert torch.equal(saved["generator"], restored["generator"])
    assert torch.equal(saved["global_rng"], restored["global_rng"])
    assert torch.equal(saved["data"]["generator_state"], restored["data"]["generator_state"])
    assert {k: v for k, v in saved["data"].items() if k != "generator_state"} == {
        k: v for k, v in restored["data"].items() if k != "generator_state"
    }


@pytest.mark.parametrize("data", ["digits", "gauss"])
def test_resumed_losses_equal_uninterrupted_losses(tmp_path, data):
    preset = tiny_preset(data)
    uninterrupted = new_trainer(preset)
    expected = [uninterrupted.step() for _ in range(5)]

    first = new_trainer(preset)
    got = [first.step() for _ in range(2)]
    save_checkpoint(tmp_path, first.state_dict(), preset_to_dict(preset))
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    _, state = load_checkpoint(tmp_path)
    resumed = new_trainer(preset)
    resumed.load_state_dict(state)
    got += [resumed.step() for _ in range(3)]
    assert got == expected  # exactly: same batches, same draws, same optimizer state


def test_new_checkpoint_replaces_old_files(tmp_path):
    preset = tiny_preset()
    trainer = new_trainer(preset)
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    names = sorted(p.name for p in tmp_path.iterdir())
    parts = [f"{part}-00000002.safetensors" for part in checkpoint._PARTS]
    assert names == sorted(["checkpoint.json", "history-00000002.jsonl", *parts])  # an empty history: written whole


def test_a_new_checkpoint_leaves_the_users_own_files(tmp_path):
    """Only the names save_checkpoint writes are replaced: a user's `model-best.safetensors` beside them stays."""
    preset = tiny_preset()
    trainer = new_trainer(preset)
    own = ["model-best.safetensors", "state-of-the-art.safetensors", ".model-notes.tmp", "notes.txt", "history.jsonl"]
    for name in own:
        (tmp_path / name).write_text("mine")
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    parts = [f"{part}-00000002.safetensors" for part in checkpoint._PARTS]
    names = ["checkpoint.json", "history-00000002.jsonl", *parts, *own]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert all((tmp_path / name).read_text() == "mine" for name in own)


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A machine crash (not only a process's) keeps the old file or the whole new one: the data reaches the disk
    before the new name does, and the rename is synced too."""
    events = []
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: events.append(("fsync", Path(path))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b))), real_replace(a, b)))
    checkpoint.write_json(tmp_path / "x.json", {"a": 1})
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].parent == tmp_path and events[0][1].name.startswith(".x.json.")  # the temporary
    assert events[2][1] == tmp_path  # the folder


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    preset = tiny_preset()
    trainer = new_trainer(preset)
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    trainer.step()

    from safetensors.torch import save_file

    calls = []

    def crash_on_second_file(tensors, name, **kwargs):
        calls.append(name)
        if len(calls) == 2:  # the model file is written, the EMA file dies half-way
            with open(name, "wb") as handle:
                handle.write(b"half a file")
            raise OSError("disk full")
        save_file(tensors, name, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_file", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    monkeypatch.undo()

    manifest, state = load_checkpoint(tmp_path)
    assert manifest["step"] == 1 and state["step_count"] == 1
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing(name):
        with open(name, "w") as handle:
            handle.write("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_errors_are_one_line_and_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        read_manifest(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_manifest(tmp_path)

    preset = tiny_preset()
    trainer = new_trainer(preset)
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    (tmp_path / "ema-00000000.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read .*ema-00000000.safetensors") as error:
        load_checkpoint(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "ema-00000000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema-00000000.safetensors is missing"):
        load_checkpoint(tmp_path)


def test_weights_of_another_model_are_rejected(tmp_path):
    small, big = tiny_preset(), tiny_preset()
    big.model.width = 16
    save_checkpoint(tmp_path, new_trainer(small).state_dict(), preset_to_dict(small))
    _, state = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="has shape"):
        new_trainer(big).load_state_dict(state)


def rows(steps, loss: float = 1.0):
    return [{"loss": loss / step, "grad_norm": 0.5, "step": step} for step in steps]


@pytest.fixture(scope="module")
def saved_state():
    preset = tiny_preset()
    return new_trainer(preset).state_dict(), preset_to_dict(preset)


def save_at(folder, saved_state, step: int, history) -> dict:
    state, config = saved_state
    save_checkpoint(folder, {**state, "step_count": step}, config, history)
    return read_manifest(folder)


def test_history_is_appended_checkpoint_by_checkpoint(tmp_path, saved_state):
    """Each checkpoint appends the rows logged since the last one to the same file (not the whole history again,
    ~40-55 MB at latent-b's 400k steps); the manifest records rows and bytes and stays small."""
    first = rows(range(1, 501))
    first[-1]["loss"] = float("nan")  # a skipped step's row where the next save looks for the continuation
    save_at(tmp_path, saved_state, 500, first)
    path = tmp_path / "history-00000500.jsonl"
    before = path.read_bytes()
    history = first + rows(range(501, 1001))
    manifest = save_at(tmp_path, saved_state, 1000, history)
    after = path.read_bytes()
    assert after.startswith(before) and len(after.splitlines()) == 1000
    assert manifest["history"]["file"] == path.name
    assert manifest["history"]["rows"] == 1000 and manifest["history"]["bytes"] == len(after)
    got = read_history(tmp_path)
    assert json.dumps(got) == json.dumps(history)  # NaN included
    assert (tmp_path / "checkpoint.json").stat().st_size < 4096
    assert sorted(p.name for p in tmp_path.glob("history-*")) == [path.name]


def test_rows_a_crashed_save_appended_are_not_read_and_are_cut_by_the_next(tmp_path, saved_state, monkeypatch):
    save_at(tmp_path, saved_state, 3, rows(range(1, 4)))
    monkeypatch.setattr(checkpoint, "write_json", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # the rows of steps 4, 5 appended, the manifest not written
        save_at(tmp_path, saved_state, 5, rows(range(1, 6)))
    monkeypatch.undo()
    assert len((tmp_path / "history-00000003.jsonl").read_bytes().splitlines()) == 5
    manifest, state = load_checkpoint(tmp_path)
    assert state["step_count"] == 3 and read_history(tmp_path, manifest) == rows(range(1, 4))
    # the run resumed from step 3 logs other values for step 4: its save cuts the crashed rows first
    resumed = rows(range(1, 4)) + rows([4], loss=7.0)
    save_at(tmp_path, saved_state, 4, resumed)
    assert read_history(tmp_path) == resumed
    assert len((tmp_path / "history-00000003.jsonl").read_bytes().splitlines()) == 4


def test_a_history_that_does_not_continue_the_saved_one_is_written_whole(tmp_path, saved_state):
    save_at(tmp_path, saved_state, 3, rows(range(1, 4)))
    other = rows(range(1, 3), loss=5.0)  # another run saved into the folder: fewer rows, other values
    manifest = save_at(tmp_path, saved_state, 2, other)
    assert manifest["history"]["file"] == "history-00000002.jsonl" and read_history(tmp_path) == other
    assert not (tmp_path / "history-00000003.jsonl").exists()  # no manifest points at it
    changed = rows(range(1, 5), loss=5.0)
    changed[1]["loss"] = 9.0  # as many rows and more, but the last saved one differs
    manifest = save_at(tmp_path, saved_state, 4, changed)
    assert manifest["history"]["file"] == "history-00000004.jsonl" and read_history(tmp_path) == changed


def test_a_format_1_checkpoint_with_the_history_inline_still_loads(tmp_path, saved_state):
    manifest = save_at(tmp_path, saved_state, 2, rows([1, 2]))
    (tmp_path / manifest["history"]["file"]).unlink()
    manifest.update(format=1, history=rows([1, 2]))
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    loaded, state = load_checkpoint(tmp_path)
    assert state["step_count"] == 2 and read_history(tmp_path, loaded) == rows([1, 2])
    save_at(tmp_path, saved_state, 3, rows([1, 2, 3]))  # saved over: the new format, written whole
    assert read_manifest(tmp_path)["format"] == 2 and read_history(tmp_path) == rows([1, 2, 3])


def test_history_errors_name_the_file(tmp_path, saved_state):
    manifest = save_at(tmp_path, saved_state, 2, rows([1, 2]))
    path = tmp_path / manifest["history"]["file"]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=f"{path.name} is corrupt: 2 rows in .* bytes, the manifest records 2"):
        read_history(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match=f"{path.name} is missing"):
        read_history(tmp_path)
    with pytest.raises(CheckpointError, match="history must be JSON-able"):
        save_at(tmp_path, saved_state, 3, [{"loss": object()}])
    (tmp_path / "checkpoint.json").write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(CheckpointError, match="has format 3, this version reads 1 and 2"):
        read_manifest(tmp_path)


def test_a_save_encodes_only_the_rows_since_the_last(tmp_path, saved_state, monkeypatch):
    """The cost of a save does not grow with the run: the rows already in the file are not encoded again (one, the
    last saved, is compared)."""
    history = rows(range(1, 1001))
    save_at(tmp_path, saved_state, 1000, history)
    encoded = []
    real = checkpoint._history_line
    monkeypatch.setattr(checkpoint, "_history_line", lambda row: (encoded.append(row["step"]), real(row))[1])
    save_at(tmp_path, saved_state, 1010, history + rows(range(1001, 1011)))
    assert encoded == [1000, *range(1001, 1011)]
    assert read_history(tmp_path) == history + rows(range(1001, 1011))


def test_load_model_gives_the_runs_model_with_the_chosen_weights(tmp_path):
    from imf.checkpoint import load_model

    preset = tiny_preset()
    trainer = new_trainer(preset)
    trainer.step()
    save_checkpoint(tmp_path, trainer.state_dict(), preset_to_dict(preset))
    for weights, source in (("ema", trainer.ema.model), ("model", trainer.model)):
        model, loaded_preset, manifest = load_model(tmp_path, weights)
        assert not model.training and manifest["step"] == 1 and loaded_preset == preset
        assert_same_tensors(model.state_dict(), source.state_dict())
    ema, raw = (load_model(tmp_path, w).model.state_dict() for w in ("ema", "model"))
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)  # one step: the EMA lags the weights
    with pytest.raises(ValueError, match="weights must be one of 'ema', 'model', got 'best'"):
        load_model(tmp_path, "best")
