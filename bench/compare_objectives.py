"""Compare the objectives fairly on `gauss` (analytic Gaussian classes, exact answers): same model code, same
data stream, same optimizer, same budget; errors are relative errors of EMA samples against the exact map of the
same noise (a one-step Euler sample of the exact field, i.e. the class mean, scores 1.0).

    python bench/compare_objectives.py --minutes 10 --jobs 5   # the issue's 10-minute budget per run
    python bench/compare_objectives.py --minutes 0.3 --jobs 2  # a quick look
    python bench/compare_objectives.py --table RESULTS.jsonl   # the table of an earlier (or killed) run

Shared settings (defaults; every run gets the same): batch 64, AdamW lr 2e-3 with a linear cool-down to 0 over the
last 30% of the budget, EMA 0.995, the gauss preset's model at width 24 (the best of the settings compared in
BENCHMARKS.md, "Objectives on gauss", for every iMF and MF run).

Runs (each its own process, one thread, so runs can share a machine; the clock is the process's CPU time, which
is what the run would take alone on one core, so a loaded machine does not favour anyone):
  (1) the loss alone:  imf-w1  = iMF with omega fixed at 1        vs  mf     = MF without CFG;   both at omega 1
  (2) guidance:        imf     = iMF, omega a runtime input (2)   vs  mf-cfg2 = MF trained at effective scale 2;
                       both against the exact guided flow map (fine RK4 solve of v_u + 2 (v_c - v_u)), guidance
                       interval (0, 1) everywhere, as in the exact map
  (3) fm               = flow matching, sampled with 1, 2, 4, 16 and 64 Euler steps
Every model is sampled with the guidance-interval inputs it was trained on: MF and FM always saw (0, 1); iMF at
omega 1 gets the sampler's default interior interval ("w1") and, as a second metric, (0, 1) as MF does ("w1_full");
the interval does not change the omega-1 target.

Each run evaluates its EMA every `--eval-every` steps (1-NFE metrics only) and at the end of its budget (every
metric); evaluations are not charged to the budget. Every evaluation is appended to the results file (JSON lines,
flushed) as it happens, so a killed run leaves what it measured. Columns: "at equal CPU time" is each run's final
evaluation; "at equal steps" is the largest checkpoint step that every run reached. FM's multi-step metrics at
that step come from an EMA snapshot kept at each checkpoint and evaluated once all runs have finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# run as `python bench/compare_objectives.py` from a checkout: the repository root holds the `imf` package (the
# spawned runs re-import this file, so they get the same path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EVAL_SEED = 1234  # the same noise and labels for every evaluation of every run
INTERIOR = (0.4, 0.65)  # imf.sampler.DEFAULT_INTERVAL, iMF's omega-1 sampling interval
FULL = (0.0, 1.0)
# the comparison's model width, the same for every run: of widths 16 / 24 / 32 / 48 at 10 CPU minutes (cool-down
# 0.3) width 24 gave every iMF and MF run its best error (BENCHMARKS.md, "Objectives on gauss"); the runs are
# step-bound there, so the narrower model wins by its extra steps. The gauss preset itself is unchanged.
DEFAULT_WIDTH = 24


@dataclass(frozen=True)
class Metric:
    """Sample with `omega` and `interval` in `steps` steps (Euler on the velocity, h = 0, when `euler`), score
    against the exact map at guidance `target_omega`."""

    key: str
    omega: float
    target_omega: float
    interval: tuple[float, float]
    steps: int = 1
    euler: bool = False


# iMF at omega 1 is also scored with the interval input (0, 1) that MF and FM always get ("w1_full"): the omega-1
# target does not depend on the interval, so either input is a valid omega-1 sample
RUNS = {
    "imf-w1": dict(
        objective="imf",
        kwargs=dict(omega_max=1.0),
        v_head="aux",
        metrics=[Metric("w1", 1, 1, INTERIOR), Metric("w1_full", 1, 1, FULL)],
    ),
    "mf": dict(objective="mf", kwargs=dict(cfg_kappa=0.0), v_head="boundary", metrics=[Metric("w1", 1, 1, FULL)]),
    "imf": dict(
        objective="imf",
        kwargs={},
        v_head="aux",
        metrics=[Metric("w1", 1, 1, INTERIOR), Metric("w1_full", 1, 1, FULL), Metric("w2", 2, 2, FULL)],
    ),
    # MF's guidance is baked in at training: sampled with omega input 1, scored against the omega-2 exact map
    "mf-cfg2": dict(
        objective="mf",
        kwargs=dict(cfg_omega=1.0, cfg_kappa=0.5),
        v_head="boundary",
        metrics=[Metric("w2", 1, 2, FULL)],
    ),
    "fm": dict(
        objective="fm",
        kwargs={},
        v_head="boundary",
        metrics=[Metric(f"w1_s{s}", 1, 1, FULL, steps=s, euler=True) for s in (1, 2, 4, 16, 64)],
    ),
}


def checkpoint_metrics(name: str) -> list[Metric]:
    """What is evaluated at every checkpoint: the 1-NFE metrics (the rest only at the end and at equal steps)."""
    return [m for m in RUNS[name]["metrics"] if m.steps == 1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, metrics: list[Metric], n: int) -> dict[str, float]:
    from imf.gauss import relative_error
    from imf.sampler import sample

    out = {}
    for m in metrics:
        e, y, x_star = data.evaluation_set(n, m.target_omega, EVAL_SEED)
        noise = e.float().view(n, *data.image_shape)
        x_hat = sample(model, noise, y, omega=m.omega, interval=m.interval, steps=m.steps, euler=m.euler)
        out[m.key] = relative_error(x_hat, x_star, data.mu[y])
    return out


def append_record(path: str, record: dict) -> None:
    """One JSON line, written with a single O_APPEND write (parallel runs share the file) and flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def build_model(name: str, model_overrides: dict | None = None) -> torch.nn.Module:
    """The gauss preset's model (with the same `model_overrides`, e.g. width, for every run) and the run's v-head."""
    import dataclasses

    from imf.config import get_preset
    from imf.model import IMFNet

    cfg = dataclasses.replace(get_preset("gauss").model, **(model_overrides or {}))
    cfg.v_head = RUNS[name]["v_head"]
    return IMFNet(cfg)


def snapshot_path(snapshots: str, name: str, step: int) -> Path:
    return Path(snapshots) / f"{name}-{step}.pt"


def run_one(name: str, args: dict, out: str, snapshots: str) -> None:
    """Train one run for its CPU budget, appending every evaluation to `out`."""
    torch.set_num_threads(1)
    from imf.config import TrainConfig
    from imf.gauss import GaussClasses
    from imf.objectives import make_objective
    from imf.train import Trainer

    spec = RUNS[name]
    data = GaussClasses.from_digits()
    torch.manual_seed(args["seed"])
    model = build_model(name, args.get("model"))
    data_gen = torch.Generator().manual_seed(args["seed"])
    trainer = Trainer(
        model,
        make_objective(spec["objective"], **spec["kwargs"]),
        lambda: data.sample(args["batch"], data_gen),
        TrainConfig(
            batch_size=args["batch"],
            lr=args["lr"],
            warmup_steps=50,
            ema_decay=args["ema_decay"],
            seed=args["seed"],
        ),
    )
    # only runs with multi-step metrics need their checkpoints kept for the equal-steps evaluation
    keep_snapshots = len(checkpoint_metrics(name)) < len(spec["metrics"])
    wall_start, train_cpu = time.perf_counter(), 0.0
    budget, max_steps = args["minutes"] * 60, args["steps"]

    def record(final: bool) -> None:
        metrics = spec["metrics"] if final else checkpoint_metrics(name)
        errors = evaluate(trainer.ema.model, data, metrics, args["n_eval"])
        step = trainer.step_count
        append_record(
            out,
            {
                "kind": "eval",
                "run": name,
                "step": step,
                "cpu_s": round(train_cpu, 3),
                "wall_s": round(time.perf_counter() - wall_start, 1),
                "steps_per_cpu_s": step / max(train_cpu, 1e-9),
                "final": final,
                "errors": errors,
            },
        )
        if keep_snapshots or final:
            torch.save(trainer.ema.model.state_dict(), snapshot_path(snapshots, name, step))
        shown = "  ".join(f"{k} {v:.3f}" for k, v in errors.items())
        print(f"[{name}] step {step}  cpu {train_cpu:.0f}s{'  final' if final else ''}  {shown}", file=sys.stderr)

    base_lr, cooldown = args["lr"], args.get("cooldown", 0.0)
    while train_cpu < budget and (max_steps is None or trainer.step_count < max_steps):
        # the same schedule for every run: constant, then (--cooldown) a linear decay over the last fraction of
        # the CPU budget, reaching 0 at its end; the Trainer's warm-up still applies on top
        left = 1.0 - train_cpu / budget
        trainer.cfg.lr = base_lr * (min(1.0, left / cooldown) if cooldown > 0 else 1.0)
        start = time.process_time()
        trainer.step()
        train_cpu += time.process_time() - start  # evaluation time is not charged to the run
        if trainer.step_count % args["eval_every"] == 0:
            record(final=False)
    record(final=True)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def equal_steps(records: list[dict], runs: list[str]) -> int | None:
    """The largest step at which every run (of those that have evaluated at all: a run still going or killed
    early may have nothing yet) has an evaluation."""
    steps = [{r["step"] for r in records if r["kind"] == "eval" and r["run"] == name} for name in runs]
    steps = [s for s in steps if s]
    common = set.intersection(*steps) if steps else set()
    return max(common) if common else None


def errors_at(records: list[dict], name: str, step: int) -> dict[str, float]:
    """Every error measured for `name` at `step` (checkpoint, final and post-run records merged)."""
    out: dict[str, float] = {}
    for r in records:
        if r["kind"] == "eval" and r["run"] == name and r["step"] == step:
            out.update(r["errors"])
    return out


def complete_equal_steps(
    out: str, snapshots: str, runs: list[str], n_eval: int, model_overrides: dict | None = None
) -> None:
    """Evaluate, from the kept snapshots, the metrics that a run's checkpoint at the equal-steps point lacks."""
    from imf.gauss import GaussClasses

    torch.set_num_threads(1)
    records = read_records(out)
    common = equal_steps(records, runs)
    if common is None:
        return
    data = None
    for name in runs:
        have = errors_at(records, name, common)
        missing = [m for m in RUNS[name]["metrics"] if m.key not in have]
        path = snapshot_path(snapshots, name, common)
        if not missing or not path.exists():
            continue
        data = data or GaussClasses.from_digits()
        model = build_model(name, model_overrides)
        model.load_state_dict(torch.load(path))
        errors = evaluate(model, data, missing, n_eval)
        checkpoint = next(r for r in records if r["kind"] == "eval" and r["run"] == name and r["step"] == common)
        append_record(
            out,
            {**checkpoint, "final": False, "errors": errors, "wall_s": None, "from_snapshot": True},
        )
        shown = "  ".join(f"{k} {v:.3f}" for k, v in errors.items())
        print(f"[{name}] step {common}  (snapshot, equal steps)  {shown}", file=sys.stderr)


def table_rows(records: list[dict]) -> tuple[dict, int | None, list[list[str]]]:
    """(the run's header record, the equal-steps point, one row per run and metric)."""
    header = next(r for r in records if r["kind"] == "args")
    runs = header["args"]["runs"]
    common = equal_steps(records, runs)
    rows = []
    for name in runs:
        evals = [r for r in records if r["kind"] == "eval" and r["run"] == name]
        final = next((r for r in evals if r["final"]), None)
        last = max(evals, key=lambda r: r["step"], default=None)
        at_common = errors_at(records, name, common) if common is not None else {}
        for m in RUNS[name]["metrics"]:
            rows.append(
                [
                    name,
                    m.key,
                    f"{last['steps_per_cpu_s']:.2f}" if last else "-",
                    str(final["step"]) if final else f"({last['step']}, unfinished)" if last else "-",
                    f"{final['cpu_s']:.0f}" if final else "-",
                    f"{final['errors'][m.key]:.3f}" if final and m.key in final["errors"] else "-",
                    f"{at_common[m.key]:.3f}" if m.key in at_common else "-",
                ]
            )
    return header, common, rows


def print_table(path: str, markdown: bool) -> None:
    header, common, rows = table_rows(read_records(path))
    a = header["args"]
    # as main's model_overrides: an option left at None or 0 means the preset's value
    model = ", ".join(f"{k} {a[k]}" for k in ("width", "context_dim") if a.get(k))
    title = (
        f"gauss{f' ({model})' if model else ''}, relative error of EMA samples against the exact map, "
        f"{a['minutes']:g} CPU-min per run, batch {a['batch']}, lr {a['lr']:g}"
        + (f" with a linear cool-down over the last {a['cooldown']:.0%}" if a.get("cooldown") else "")
        + f", n_eval {a['n_eval']} ({header['date']}, commit {header['commit']})"
    )
    columns = [
        "run",
        "metric",
        "steps/CPU-s",
        "steps",
        "CPU-s",
        "at equal CPU time",
        f"at equal steps ({common if common is not None else '-'})",
    ]
    note = (
        "metric: w<omega> = error against the exact map at that guidance scale (1-NFE); w1_full = iMF at omega 1 "
        "with the guidance-interval input (0, 1) instead of the sampler's default; fm w1_s<N> = N Euler steps. "
        "A one-step Euler sample of the exact field scores 1.0."
    )
    if markdown:
        print(f"{title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\n{note}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
    print(note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of training per run (default 10)")
    ap.add_argument("--steps", type=int, default=None, help="also stop each run after this many steps")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each uses one thread)")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluate the EMA every N steps (default 100)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate, the same for every run (default 2e-3)")
    ap.add_argument(
        "--ema-decay", type=float, default=0.995, help="EMA decay of the evaluated weights, every run (default 0.995)"
    )
    ap.add_argument(
        "--cooldown",
        type=float,
        default=0.3,
        help="linear lr decay to 0 over this last fraction of each run's CPU budget, the same for every run "
        "(default 0.3; 0: constant lr)",
    )
    ap.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        help=f"model width, every run (default {DEFAULT_WIDTH}; 0: the gauss preset's)",
    )
    ap.add_argument(
        "--context-dim", type=int, default=None, help="context token dim, every run (default: the gauss preset's)"
    )
    ap.add_argument("--n-eval", type=int, default=512, help="noise samples per evaluation (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default=None,
        help="results file, JSON lines, must not exist (default bench/results/compare_objectives-cpu-<UTC time>.jsonl)",
    )
    ap.add_argument("--snapshots", default=None, help="folder for EMA snapshots (default a temporary folder)")
    ap.add_argument("--table", metavar="FILE", default=None, help="print the table of an existing results file")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()

    if args.table:
        try:
            read_records(args.table)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            ap.error(f"--table {args.table}: not a results file of this script ({error})")
        print_table(args.table, args.markdown)
        return
    if args.eval_every < 1:
        ap.error(f"--eval-every must be >= 1, got {args.eval_every}")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or str(
        Path(__file__).resolve().parent / "results" / f"compare_objectives-cpu-{stamp:%Y%m%dT%H%M%S}.jsonl"
    )
    if os.path.exists(out):
        ap.error(f"--out {out} exists; choose a new file (print its table with --table {out})")
    snapshots = args.snapshots or tempfile.mkdtemp(prefix="compare_objectives-")
    os.makedirs(snapshots, exist_ok=True)

    from common import run_tags

    tags = run_tags(torch.device("cpu"), bench="compare_objectives")
    append_record(out, {"kind": "args", "args": vars(args), **tags})
    print(f"results: {out}", file=sys.stderr)
    model_overrides = {
        field: value for field, value in (("width", args.width), ("context_dim", args.context_dim)) if value
    }
    run_args = dict(
        minutes=args.minutes,
        steps=args.steps,
        eval_every=args.eval_every,
        batch=args.batch,
        lr=args.lr,
        ema_decay=args.ema_decay,
        cooldown=args.cooldown,
        n_eval=args.n_eval,
        seed=args.seed,
        model=model_overrides,
    )
    jobs = [(name, run_args, out, snapshots) for name in args.runs]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            pool.starmap(run_one, jobs, chunksize=1)
    else:
        for job in jobs:
            run_one(*job)
    complete_equal_steps(out, snapshots, args.runs, args.n_eval, model_overrides)
    if not args.snapshots:
        shutil.rmtree(snapshots)
    print_table(out, args.markdown)


if __name__ == "__main__":
    main()
