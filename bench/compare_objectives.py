"""Compare the objectives fairly on `gauss` (analytic Gaussian classes, exact answers): same model code, same
data stream, same optimizer, same budget; errors are 1-NFE relative errors against the exact map of the same noise.

    python bench/compare_objectives.py --minutes 10          # the issue's 10-minute budget per run
    python bench/compare_objectives.py --minutes 2 --jobs 2  # a quick look

Runs (each its own process, one thread, so runs can share a machine; the clock is the process's CPU time, which
is what the run would take alone on one core, so a loaded machine does not favour anyone):
  (1) the loss alone:  imf-w1  = iMF with omega fixed at 1        vs  mf     = MF without CFG;   both at omega 1
  (2) guidance:        imf     = iMF, omega a runtime input (2)   vs  mf-cfg2 = MF trained at effective scale 2;
                       both against the exact guided flow map (fine RK4 solve of v_u + 2 (v_c - v_u)), guidance
                       interval (0, 1) everywhere, as in the exact map
  (3) fm               = flow matching, sampled with 1, 2, 4, 16 and 64 Euler steps
Each run is evaluated (EMA weights) every `--eval-every` steps and at the end of its budget: the table shows the
errors at equal CPU time (end of budget) and at equal steps (the largest step count every run reached).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

RUNS = {
    "imf-w1": dict(objective="imf", kwargs=dict(omega_max=1.0), v_head="aux", evals=[(1.0, 1)]),
    "mf": dict(objective="mf", kwargs=dict(cfg_kappa=0.0), v_head="boundary", evals=[(1.0, 1)]),
    "imf": dict(objective="imf", kwargs={}, v_head="aux", evals=[(1.0, 1), (2.0, 1)]),
    "mf-cfg2": dict(objective="mf", kwargs=dict(cfg_omega=1.0, cfg_kappa=0.5), v_head="boundary", evals=[(1.0, 1)]),
    "fm": dict(objective="fm", kwargs={}, v_head="boundary", evals=[(1.0, s) for s in (1, 2, 4, 16, 64)]),
}


def evaluate(name: str, model, data, n: int) -> dict[str, float]:
    from imf.gauss import one_step_error

    out = {}
    for omega, steps in RUNS[name]["evals"]:
        # the MF model's guidance is baked in at training: it is sampled with omega input 1 and scored against the
        # guided (omega 2) exact map; everything else is scored at the omega it is sampled with
        target_omega = 2.0 if name == "mf-cfg2" else omega
        key = f"w{target_omega:g}" + (f"_s{steps}" if name == "fm" else "")
        interval = (0.0, 1.0) if target_omega != 1.0 else None
        if target_omega != omega:
            err = _error_against(model, data, n, omega, target_omega, interval)
        else:
            err = one_step_error(model, data, n, omega=omega, interval=interval, steps=steps, euler=name == "fm")
        out[key] = err
    return out


@torch.no_grad()
def _error_against(model, data, n, sample_omega, target_omega, interval):
    from imf.gauss import relative_error
    from imf.sampler import sample

    e, y, x_star = data.evaluation_set(n, target_omega, 1234)
    x_hat = sample(model, e.float().view(n, *data.image_shape), y, omega=sample_omega, interval=interval or (0, 1))
    return relative_error(x_hat, x_star, data.mu[y])


def run_one(
    name: str, minutes: float, max_steps: int | None, eval_every: int, batch: int, lr: float, n_eval: int, seed: int
) -> dict:
    torch.set_num_threads(1)
    from imf.config import TrainConfig, get_preset
    from imf.gauss import GaussClasses
    from imf.model import IMFNet
    from imf.objectives import make_objective
    from imf.train import Trainer

    spec = RUNS[name]
    data = GaussClasses.from_digits()
    cfg = get_preset("gauss").model
    cfg.v_head = spec["v_head"]
    torch.manual_seed(seed)
    model = IMFNet(cfg)
    data_gen = torch.Generator().manual_seed(seed)
    trainer = Trainer(
        model,
        make_objective(spec["objective"], **spec["kwargs"]),
        lambda: data.sample(batch, data_gen),
        TrainConfig(batch_size=batch, lr=lr, warmup_steps=50, ema_decay=0.995, seed=seed),
    )
    history, train_cpu = [], 0.0
    budget = minutes * 60
    while train_cpu < budget and (max_steps is None or trainer.step_count < max_steps):
        start = time.process_time()
        trainer.step()
        train_cpu += time.process_time() - start  # evaluation time is not charged to the run
        if trainer.step_count % eval_every == 0:
            history.append(
                {"step": trainer.step_count, "cpu_s": train_cpu, **evaluate(name, trainer.ema.model, data, n_eval)}
            )
    final = {"step": trainer.step_count, "cpu_s": train_cpu, **evaluate(name, trainer.ema.model, data, n_eval)}
    return {
        "name": name,
        "steps_per_cpu_s": trainer.step_count / max(train_cpu, 1e-9),
        "history": history,
        "final": final,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of training per run (default 10)")
    ap.add_argument("--steps", type=int, default=None, help="also stop each run after this many steps")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each uses one thread)")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluate the EMA every N steps (default 100)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate, the same for every run (default 2e-3)")
    ap.add_argument("--n-eval", type=int, default=512, help="noise samples per evaluation (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args()

    jobs = [
        (r, args.minutes, args.steps, args.eval_every, args.batch, args.lr, args.n_eval, args.seed) for r in args.runs
    ]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.starmap(run_one, jobs)
    else:
        results = [run_one(*j) for j in jobs]

    common = min(r["final"]["step"] for r in results)
    common -= common % args.eval_every
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gauss, 1-NFE relative error (EMA), {args.minutes:g} CPU-min per run, batch {args.batch}")
    for col in ("run", "metric", "steps/s", "steps", "at equal CPU time", f"at equal steps ({common})"):
        table.add_column(col)
    for r in results:
        at_common = next((h for h in r["history"] if h["step"] == common), None)
        for key in (k for k in r["final"] if k.startswith("w")):
            table.add_row(
                r["name"],
                key,
                f"{r['steps_per_cpu_s']:.2f}",
                str(r["final"]["step"]),
                f"{r['final'][key]:.3f}",
                f"{at_common[key]:.3f}" if at_common else "-",
            )
    Console().print(table)
    print(
        "metric: w<omega> = error against the exact map at that guidance scale; fm _s<N> = N Euler steps. "
        "A one-step Euler sample of the exact field scores 1.0."
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
