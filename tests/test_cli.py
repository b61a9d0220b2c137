"""The `imf` command through subprocesses: a tiny train -> sample -> eval chain, the demo smoke run, and every
kind of bad input giving one line on stderr, exit code 2 and no output written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imf.cli import build_parser

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--width", "8", "--batch-size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses share one classifier cache (trained once) and run on one thread."""
    return dict(os.environ, IMF_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")


def imf(env, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "imf.cli", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def ckpt(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    done = imf(env, "train", "--preset", "digits", "--steps", 2, *TINY, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "trained to step 2" in done.stdout
    return out


def test_help_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "sample", "eval", "demo"}
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert action.help, (name, action.option_strings)  # every flag says what it does


def test_console_script_help(env):
    done = subprocess.run(["imf", "sample", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "--interval T_MIN T_MAX" in done.stdout


def test_train_sample_eval_chain(env, ckpt, tmp_path):
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert manifest["step"] == 2 and manifest["config"]["model"]["width"] == 8

    grid = tmp_path / "grid.png"
    done = imf(env, "sample", "--ckpt", ckpt, "--omega", 4, "--interval", 0.4, 0.65, "--steps", 1, "--out", grid)
    assert done.returncode == 0, done.stderr
    assert grid.read_bytes()[:8] == PNG_SIGNATURE

    out = tmp_path / "eval"
    done = imf(env, "eval", "--ckpt", ckpt, "--omegas", 1, 2, "--n", 20, "--v-head-steps", 2, "--out", out)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["omega"] for r in metrics["per_omega"]] == [1.0, 2.0]
    assert metrics["sampler"]["interval"] == [0.4, 0.65] and metrics["step"] == 2
    assert (out / "quality.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "FD pixels" in done.stdout

    # resume continues the same run: step count and config come from the checkpoint; how a step runs may change
    # (--pipelined: the fused AdamW takes the plain one's state; --channels-last: the weights load into channels-last
    # convolutions)
    args = ("--resume", "--steps", 3, "--threads", 1, "--no-progress", "--pipelined", "--channels-last")
    done = imf(env, "train", "--out", ckpt, *args)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert manifest["step"] == 3 and manifest["config"]["train"]["pipelined"] is True
    assert manifest["config"]["model"]["channels_last"] is True


def test_resume_keeps_the_runs_own_step_target_and_honours_file_flags(env, tmp_path):
    """--resume without --steps continues to the run's own target (not the preset's default), and --checkpoint-every
    (how often files are written) applies."""
    out = tmp_path / "run"
    done = imf(env, "train", "--steps", 2, "--checkpoint-every", 1, *TINY, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    done = imf(env, "train", "--resume", "--checkpoint-every", 7, "--out", out, "--threads", 1, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "trained to step 2" in done.stdout
    train = json.loads((out / "checkpoint.json").read_text())["config"]["train"]
    assert train["steps"] == 2 and train["checkpoint_every"] == 7 and train["batch_size"] == 8


def test_demo_smoke(env, tmp_path):
    out = tmp_path / "demo"
    done = imf(env, "demo", "--steps", 2, *TINY, "--n", 20, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    for name in ("samples.png", "loss.png", "quality.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["omega"] for r in metrics["per_omega"]] == [1.0, 2.0, 4.0, 8.0]
    assert metrics["steps"] == 2 and metrics["v_head_euler"]["steps"] == 32
    assert "real" in done.stdout and "v-head" in done.stdout


def write_mixed_folder(root):
    for name, size in (("a.png", (8, 8)), ("b.png", (8, 9))):
        Image.fromarray(np.zeros(size, dtype=np.uint8)).save(root / name)


GRID = ["--out", "{tmp}/grid.png"]
BAD_INPUT = [
    ("missing checkpoint", ["sample", "--ckpt", "{tmp}/none", *GRID], "is not a folder"),
    ("corrupt checkpoint", ["sample", "--ckpt", "{tmp}/bad", *GRID], "is corrupt"),
    ("unknown preset", ["train", "--preset", "mnist", "--out", "{tmp}/run"], "unknown preset 'mnist'"),
    ("class out of range", ["sample", "--ckpt", "{ckpt}", "--classes", "3", "12", *GRID], "class id 12"),
    ("omega below 1", ["sample", "--ckpt", "{ckpt}", "--omega", "0.5", *GRID], "--omega must be a finite number >= 1"),
    ("infinite omega", ["eval", "--ckpt", "{ckpt}", "--omegas", "1", "inf", "--out", "{tmp}"], "--omegas must be a"),
    ("resume below its step", ["train", "--out", "{ckpt}", "--resume", "--steps", "1"], "--steps 1: the checkpoint"),
    ("NaN learning rate", ["train", "--lr", "nan", "--out", "{tmp}/run"], "--lr must be a finite number > 0, got nan"),
    ("infinite learning rate", ["train", "--lr", "inf", "--out", "{tmp}/run"], "--lr must be a finite number > 0"),
    ("NaN minutes", ["train", "--minutes", "nan", "--out", "{tmp}/run"], "--minutes must be > 0, got nan"),
    (
        "data for built-in data",
        ["train", "--preset", "gauss", "--data", "{tmp}/mixed", "--out", "{tmp}/run"],
        "the 'gauss' preset trains on its built-in gauss data",
    ),
    ("t_min > t_max", ["eval", "--ckpt", "{ckpt}", "--interval", "0.7", "0.3", "--out", "{tmp}"], "t_min 0.7 is"),
    ("mixed image sizes", ["train", "--preset", "cifar", "--data", "{tmp}/mixed", "--out", "{tmp}/run"], "differ"),
    ("existing run", ["train", "--out", "{ckpt}", "--steps", "9"], "already holds a checkpoint"),
    (
        "resume changing the run",
        ["train", "--out", "{ckpt}", "--resume", "--lr", "0.5", "--width", "16"],
        "--lr (0.001 -> 0.5), --width (8 -> 16) would change it",
    ),
    ("resume as another preset", ["train", "--preset", "gauss", "--out", "{ckpt}", "--resume"], "is a digits run"),
    ("train under a file", ["train", "--steps", "1", "--out", "{tmp}/grid.png/run"], "grid.png/run: cannot write"),
    ("sample under a file", ["sample", "--ckpt", "{ckpt}", "--out", "{tmp}/grid.png/x.png"], "cannot write there"),
    ("eval under a file", ["eval", "--ckpt", "{ckpt}", "--n", "4", "--out", "{tmp}/grid.png/e"], "cannot write there"),
    ("demo over a file", ["demo", "--out", "{tmp}/grid.png"], "is a file, not a folder"),
    ("demo over a training run", ["demo", "--out", "{ckpt}"], "holds files the demo did not write"),
    ("graph on a cpu", ["train", "--cuda-graph", "--device", "cpu", "--out", "{tmp}/run"], "needs --device cuda"),
    (
        "graph of fm",
        ["train", "--cuda-graph", "--objective", "fm", "--device", "cpu", "--out", "{tmp}/run"],
        "--cuda-graph takes the imf or mf objective, got 'fm'",
    ),
]


@pytest.mark.parametrize("case, args, message", BAD_INPUT, ids=[case for case, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, ckpt, tmp_path, case, args, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.json").write_text('{"format": 1, "step": ')
    (tmp_path / "mixed").mkdir()
    write_mixed_folder(tmp_path / "mixed")
    (tmp_path / "grid.png").write_bytes(b"keep me")
    before = {p: p.read_bytes() for p in list(tmp_path.rglob("*")) + list(ckpt.rglob("*")) if p.is_file()}

    done = imf(env, *(a.format(tmp=tmp_path, ckpt=ckpt) for a in args))
    assert done.returncode == 2, (case, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imf: error: ") and message in lines[0], (case, done.stderr)
    after = {p: p.read_bytes() for p in list(tmp_path.rglob("*")) + list(ckpt.rglob("*")) if p.is_file()}
    assert after == before, case


def test_matmul_precision_is_set_on_a_gpu_only(monkeypatch):
    """--matmul-precision (train, sample, eval, demo; default high: TF32 matrix products, as cuDNN's convolutions
    already run) reaches torch.set_float32_matmul_precision on a CUDA device and leaves a CPU run's untouched."""
    import argparse

    import torch

    import imf.cli as cli

    set_to = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    for command in ("train", "sample", "eval", "demo"):
        required = {"sample": ["--ckpt", "c", "--out", "o.png"], "eval": ["--ckpt", "c"]}.get(command, [])
        args = build_parser().parse_args([command, *required])
        assert args.matmul_precision == "high", command
    args = argparse.Namespace(device="cpu", threads=None, matmul_precision="highest")
    assert cli._runtime(args) == torch.device("cpu") and set_to == []
    monkeypatch.setattr(cli, "_device", lambda name: torch.device("cuda"))
    assert cli._runtime(args) == torch.device("cuda") and set_to == ["highest"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--matmul-precision", "medium"])


def test_cudnn_benchmark_follows_the_flag_and_the_objective():
    """--cudnn-benchmark (train; default auto): auto turns cuDNN's search on only on a GPU and where every step has
    the same shapes (fm, --cuda-graph); on / off as asked on a GPU; never on a CPU."""
    import torch

    import imf.cli as cli
    from imf.config import get_preset

    assert build_parser().parse_args(["train"]).cudnn_benchmark == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def preset(objective, cuda_graph=False):
        p = get_preset("digits")
        p.objective, p.train.cuda_graph = objective, cuda_graph
        return p

    def chosen(choice, device, p):
        return cli._cudnn_benchmark(choice, device, p)

    assert [chosen("auto", cuda, preset(o)) for o in ("imf", "mf", "fm")] == [False, False, True]
    assert chosen("auto", cuda, preset("imf", cuda_graph=True)) is True
    assert chosen("on", cuda, preset("imf")) is True and chosen("off", cuda, preset("fm")) is False
    assert not any(chosen(c, cpu, preset("fm", True)) for c in ("auto", "on", "off"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--cudnn-benchmark", "yes"])


def test_the_closing_line_names_the_losses_the_objective_has():
    from imf.cli import _last_losses

    assert _last_losses({"loss": 2.0, "loss_u": 31.5, "loss_v": 40.25}) == "2 (loss_u 31.5, loss_v 40.25)"
    assert _last_losses({"loss": 0.51}) == "0.51"  # flow matching: no u term, not "nan"
    assert _last_losses({}) == "(no step taken)"


def test_eval_of_a_flow_matching_run_says_which_rows_it_learned(env, tmp_path):
    out = tmp_path / "fm"
    done = imf(env, "train", "--objective", "fm", "--steps", 1, *TINY, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "last loss" in done.stdout and "nan" not in done.stdout
    done = imf(env, "eval", "--ckpt", out, "--omegas", 1, "--n", 4, "--v-head-steps", 2, "--out", tmp_path / "e")
    assert done.returncode == 0, done.stderr
    assert "note: this is a flow-matching run, which trains the v-head only" in done.stdout


def test_eval_of_a_meanflow_run_says_its_v_head_is_untrained(env, tmp_path):
    out = tmp_path / "mf"
    done = imf(env, "train", "--objective", "mf", "--steps", 1, *TINY, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    done = imf(env, "eval", "--ckpt", out, "--omegas", 1, "--n", 4, "--v-head-steps", 2, "--out", tmp_path / "e")
    assert done.returncode == 0, done.stderr
    assert "note: a MeanFlow run trains u only: the v-head row samples its untrained aux v-head" in done.stdout
