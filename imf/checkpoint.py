"""Checkpoints: a folder holding safetensors weights (model, EMA, optimizer, RNG and data-loader state) and one
JSON manifest, `checkpoint.json`, with the run's config and step count; the loss history, one JSON row per logged
step, is `history-<step>.jsonl` (<step>: the checkpoint that started the file), where the manifest records its rows
and byte length.

Crash safety: every file is written to a temporary name and renamed into place (`os.replace` is atomic), the
tensor files carry the step in their names, and the manifest that points at them is written last. A crash at
any moment leaves either the previous manifest with its files, or the new one with its files; files that no
manifest points at, and the temporary files a killed writer left behind, are removed after the new manifest is
in place. The history file is the exception to write-then-rename: a checkpoint that continues the history the
folder's manifest records appends its new rows past the recorded length (a whole history rewritten at every
checkpoint was ~40-55 MB and seconds of JSON at latent-b's 400k steps), and readers read only that length, so
rows a crashed writer appended after it are never seen and are cut off by the next save.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

MANIFEST = "checkpoint.json"
# 2: the loss history in its own file (`history`: a record of it); 1: the history inline in the manifest, still read
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
_PARTS = ("model", "ema", "optimizer", "state")
# What Trainer.state_dict() holds: what save_checkpoint writes and Trainer.load_state_dict takes, whole
TRAINER_STATE_KEYS = ("step_count", "model", "ema", "optimizer", "generator", "global_rng")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint: printed on one line by the CLI."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(temp_name)` for a temporary file next to `path`, then renames it onto `path`, so a reader
    never sees a half-written file and a crash leaves the old file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(temp_name)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600
        _fsync(temp_name)  # the data on disk before the name: a machine crash after the rename keeps it
        os.replace(temp_name, path)
        _fsync(path.parent)  # the rename itself
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def _fsync(path: str | os.PathLike) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(name: str) -> None:
        with open(name, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")

    atomic_write(path, write)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda name: save_file(cpu, name))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing (the manifest points at it)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint: cannot read {path}: {error}") from None


# --------------------------------------------------------------------------------------------------------
# Optimizer and RNG state as flat tensors (safetensors holds tensors only; the rest goes into the manifest)
# --------------------------------------------------------------------------------------------------------


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    # JSON turned tuples (betas) into lists; give them back their type so the state compares equal
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in param_groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: str | os.PathLike,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> Path:
    """Writes `Trainer.state_dict()` plus the run config (JSON-able) and loss history to `folder`; returns the
    manifest path. Checks its arguments before it writes anything."""
    missing = [key for key in TRAINER_STATE_KEYS if key not in trainer_state]
    if missing:
        raise CheckpointError(
            f"save_checkpoint: trainer_state must be Trainer.state_dict(); it has no {', '.join(missing)}"
        )
    history = history or []
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"save_checkpoint: {folder} exists and is not a folder")
    try:
        json.dumps(config)
        # only the rows this save writes are encoded: those since the last checkpoint, when the history continues it
        previous, start = _continuation(folder, history)
        rows = [_history_line(row) for row in history[start:]]
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"save_checkpoint: config and history must be JSON-able (imf.train.preset_to_dict(preset)): {error}"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    step = int(trainer_state["step_count"])
    opt_tensors, param_groups = _flatten_optimizer(trainer_state["optimizer"])
    rng = {"generator": trainer_state["generator"], "global": trainer_state["global_rng"]}
    data_state = dict(trainer_state.get("data") or {})
    data_tensors = {k: v for k, v in data_state.items() if torch.is_tensor(v)}
    rng.update({f"data.{k}": v for k, v in data_tensors.items()})
    parts = {
        "model": trainer_state["model"],
        "ema": trainer_state["ema"],
        "optimizer": opt_tensors,
        "state": rng,
    }
    files = {}
    for part, tensors in parts.items():
        files[part] = f"{part}-{step:08d}.safetensors"
        _save_tensors(folder / files[part], tensors)
    history_record = _write_history(folder, previous, rows, len(history), step)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": files,
        "config": config,
        "optimizer_param_groups": param_groups,
        "data_state": {k: v for k, v in data_state.items() if not torch.is_tensor(v)},
        "history": history_record,
    }
    write_json(folder / MANIFEST, manifest)  # the commit point
    keep = {*files.values(), history_record["file"]}
    for stale in folder.iterdir():  # only names this function writes: a user's own files stay
        if stale.name not in keep and is_checkpoint_file(stale.name) and stale.name != MANIFEST:
            stale.unlink()
    return folder / MANIFEST


def is_checkpoint_file(name: str) -> bool:
    """Whether a file name is one save_checkpoint writes: the manifest, a part (`model-00000400.safetensors`), a
    history (`history-00000400.jsonl`) or atomic_write's temporary of any (`.model-00000400.safetensors.x1y2.tmp`,
    `.checkpoint.json.x1y2.tmp`)."""
    return name == MANIFEST or bool(_PART_FILE.fullmatch(name) or _TEMP_FILE.fullmatch(name))


# The files save_checkpoint writes (`model-00000400.safetensors`, `history-00000400.jsonl`) and atomic_write's
# temporaries of them and of the manifest (`.model-00000400.safetensors.x1y2.tmp`, `.checkpoint.json.x1y2.tmp`).
_HISTORY_FILE_NAME = re.compile(r"history-\d{8,}\.jsonl")
_PART_FILE = re.compile(rf"(?:(?:{'|'.join(_PARTS)})-\d{{8,}}\.safetensors|{_HISTORY_FILE_NAME.pattern})")
_TEMP_FILE = re.compile(rf"\.(?:{_PART_FILE.pattern}|{re.escape(MANIFEST)})\.[^.]+\.tmp")


# --------------------------------------------------------------------------------------------------------
# The loss history: one JSON row a line, appended checkpoint by checkpoint
# --------------------------------------------------------------------------------------------------------


def _history_line(row: dict[str, float]) -> bytes:
    if not isinstance(row, dict):
        raise TypeError(f"a history row must be a dict of numbers, got {type(row).__name__}")
    return (json.dumps(row) + "\n").encode()


def _continuation(folder: Path, history: list[dict]) -> tuple[dict | None, int]:
    """(the history record of the folder's current manifest, its row count) when `history` continues it (at least
    as many rows, the same row at its end), else (None, 0): the history is then written whole. An older format or
    a manifest that cannot be read counts as no history."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        record = manifest["history"]
        count, length, last = record["rows"], record["bytes"], record["last"]
        path = folder / record["file"]
        if not (
            manifest["format"] == 2
            and _HISTORY_FILE_NAME.fullmatch(record["file"])
            and isinstance(count, int)
            and isinstance(length, int)
            and 0 < count <= len(history)
            and path.is_file()
            and path.stat().st_size >= length
        ):
            return None, 0
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0
    if _history_line(history[count - 1]).decode() != last:
        return None, 0
    return record, count


def _write_history(folder: Path, previous: dict | None, rows: list[bytes], total: int, step: int) -> dict:
    """Writes the history's rows (encoded lines: all of them, or with `previous` those past its rows) and returns
    the manifest's record of the `total` rows: {file, rows, bytes, last} (`last`: the last row's line, how the
    next save tells that its history continues this one). With `previous`, the rows are appended past its
    recorded length, cutting whatever a crashed save appended there; without, the whole history goes to a new
    file, `history-<step>.jsonl`, written and renamed."""
    if previous is not None:
        with open(folder / previous["file"], "r+b") as handle:
            handle.truncate(previous["bytes"])
            handle.seek(previous["bytes"])
            handle.write(b"".join(rows))
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        last = rows[-1].decode() if rows else previous["last"]
        return {"file": previous["file"], "rows": total, "bytes": size, "last": last}
    name = f"history-{step:08d}.jsonl"
    data = b"".join(rows)

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            handle.write(data)

    atomic_write(folder / name, write)
    return {"file": name, "rows": total, "bytes": len(data), "last": rows[-1].decode() if rows else ""}


def read_history(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """The loss history a checkpoint records: one dict per logged step (`manifest`: the folder's, read if not
    given). Reads the recorded length of the history file only (rows past it belong to no checkpoint)."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    record = manifest.get("history", [])
    if isinstance(record, list):  # format 1: inline
        return record
    try:
        path = folder / record["file"]
        count, length = int(record["rows"]), int(record["bytes"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint: {folder / MANIFEST}'s history record is malformed: {record!r}") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing (the manifest points at it)")
    with open(path, "rb") as handle:
        data = handle.read(length)
    lines = data.splitlines()
    try:
        if len(data) != length or len(lines) != count:
            raise ValueError(f"{len(lines)} rows in {len(data)} bytes, the manifest records {count} in {length}")
        return [json.loads(line) for line in lines]
    except ValueError as error:
        raise CheckpointError(f"checkpoint: {path} is corrupt: {error}") from None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint: {folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no {MANIFEST} in {folder}; is this a checkpoint folder?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint: {path} is corrupt: {error}") from None
    missing = [k for k in ("format", "step", "files", "config") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint: {path} lacks {', '.join(missing)}")
    if manifest["format"] not in READ_FORMATS:
        raise CheckpointError(
            f"checkpoint: {path} has format {manifest['format']}, this version reads "
            f"{' and '.join(map(str, READ_FORMATS))}"
        )
    return manifest


def load_checkpoint(folder: str | os.PathLike, parts: tuple[str, ...] = _PARTS) -> tuple[dict[str, Any], dict]:
    """(manifest, trainer_state): the manifest and the tensors of the requested parts, assembled in the form
    `Trainer.load_state_dict` takes (parts not requested are left out)."""
    if isinstance(parts, str) or not set(parts) <= set(_PARTS):
        raise ValueError(f"load_checkpoint: parts must be a tuple of {', '.join(map(repr, _PARTS))}, got {parts!r}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    loaded = {part: _load_tensors(folder / manifest["files"][part]) for part in parts}
    state: dict[str, Any] = {"step_count": int(manifest["step"])}
    if "model" in loaded:
        state["model"] = loaded["model"]
    if "ema" in loaded:
        state["ema"] = loaded["ema"]
    if "optimizer" in loaded:
        state["optimizer"] = _unflatten_optimizer(loaded["optimizer"], manifest["optimizer_param_groups"])
    if "state" in loaded:
        rng = loaded["state"]
        state["generator"] = rng["generator"]
        state["global_rng"] = rng["global"]
        data = dict(manifest.get("data_state") or {})
        data.update({k[len("data.") :]: v for k, v in rng.items() if k.startswith("data.")})
        state["data"] = data or None
    return manifest, state


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # an imf.model.IMFNet in eval mode
    preset: Any  # the run's imf.config.Preset
    manifest: dict[str, Any]


WEIGHTS = ("ema", "model")


def load_model(folder: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu") -> LoadedModel:
    """(model, preset, manifest) from a checkpoint folder: an IMFNet of the run's config holding its `weights`
    ("ema", the averaged weights sampling and evaluation use, or "model", the raw trained ones), on `device`, in
    eval mode. Reads only that weights file."""
    from imf.model import IMFNet
    from imf.train import preset_from_dict

    if weights not in WEIGHTS:
        raise ValueError(f"load_model: weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    manifest, state = load_checkpoint(folder, parts=(weights,))
    preset = preset_from_dict(manifest["config"], f"checkpoint: {folder}/{MANIFEST}'s config")
    model = IMFNet(preset.model)
    load_weights(model, state[weights], f"{folder} ({weights} weights)")
    return LoadedModel(model.to(device).eval(), preset, manifest)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(weights)` with a one-line error when the checkpoint does not fit the model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {source} does not fit the model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected tensors (e.g. {(missing + unexpected)[0]})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"checkpoint: {source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)
