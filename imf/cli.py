"""The `imf` command: `train`, `sample`, `eval` and `demo` (run `imf COMMAND --help` for every flag).

Problems with the user's input (a missing or corrupt checkpoint, an unknown preset, a class id out of range,
omega < 1, an interval with t_min > t_max, unreadable data) print one line, `imf: error: ...`, to stderr and
exit with code 2, before any output file is written.

`imf train` under `torchrun` (e.g. `torchrun --nproc_per_node 2 -m imf.cli train ...`) trains on every process
(DDP, or FSDP2 with `--parallel fsdp`); rank 0 prints and writes. A NaN or inf loss prints one line naming the
step and the last good checkpoint and exits with code 1 (`--skip-nonfinite` skips such steps instead).
SIGINT/SIGTERM finish the current step, write a checkpoint, print where, and exit with code 0.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1  # training stopped on a non-finite loss


class CLIError(ValueError):
    """A problem with the command line itself."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(EXIT_USAGE, f"imf: error: {message} (see imf {self.prog.split(' ', 1)[-1]} --help)\n")


# --------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------


MATMUL_PRECISIONS = ("high", "highest")


def _add_runtime_flags(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"CPU threads for torch (default: {threads or 'one per core'}; on a busy machine 1 is much faster)",
    )
    p.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="high",
        help="float32 matrix products on a GPU: high runs them on TF32 tensor cores, as PyTorch's cuDNN convolutions "
        "already run by default; highest keeps full float32 (default: high)",
    )


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (each overrides the preset's value)")
    g.add_argument("--steps", type=int, help="total optimizer steps to reach (a resumed run counts its old steps)")
    g.add_argument("--minutes", type=float, help="wall-clock limit of this invocation's training, in minutes")
    g.add_argument("--batch-size", type=int, help="images per step")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW (betas 0.9/0.95, no weight decay)")
    g.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up")
    g.add_argument("--ema-decay", type=float, help="EMA decay of the weights used for sampling")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clipping threshold")
    g.add_argument("--seed", type=int, help="seed of the model initialisation, the objective's and the data's RNG")
    g.add_argument("--width", type=int, help="base channel count of the U-Net")
    g.add_argument("--objective", choices=("imf", "mf", "fm"), help="training objective (default: imf)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the no-grad target evaluations (GPU)")
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each step's loss and backward from one CUDA graph (one GPU; imf or mf objective)",
    )
    g.add_argument(
        "--pipelined",
        action="store_true",
        help="read each step's numbers after queuing the next step's loss and backward (the host prepares a step "
        "while the device finishes the one before; fused AdamW; a NaN or inf loss skips its update on the device); "
        "not with --parallel fsdp",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="feature maps channels-last (torch.channels_last): cuDNN's NHWC convolutions without layout "
        "transposes; the GroupNorm kernels (triton) read such maps as they are (the same numbers either way)",
    )
    g.add_argument(
        "--cudnn-benchmark",
        choices=("auto", "on", "off"),
        default="auto",
        help="cuDNN's convolution algorithm search on a GPU (torch.backends.cudnn.benchmark); auto: on only where "
        "every step has the same shapes (fm, --cuda-graph): iMF and MF draw their tangent row count each step, and "
        "each new count is searched again (default: auto)",
    )
    g.add_argument("--sample-every", type=int, help="steps between sample grids in OUT/samples (0: end only)")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (one is always written last)")


def _add_guidance_flags(p: argparse.ArgumentParser, many: bool) -> None:
    if many:
        p.add_argument(
            "--omegas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="guidance scales, each >= 1"
        )
    else:
        p.add_argument("--omega", type=float, default=1.0, help="guidance scale, >= 1 (1 = no guidance)")
    p.add_argument(
        "--interval",
        type=float,
        nargs=2,
        metavar=("T_MIN", "T_MAX"),
        default=[0.4, 0.65],
        help="guidance interval in t, 0 <= T_MIN <= T_MAX <= 1 (default 0.4 0.65, DESIGN 2.4)",
    )
    p.add_argument("--steps", dest="sample_steps", type=int, default=1, help="sampling steps (default 1 = 1-NFE)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imf", description="Train and sample Improved MeanFlow (iMF) one-step models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train a preset",
        description="Train a preset; checkpoints go to --out. Several processes: torchrun --nproc_per_node N "
        "-m imf.cli train ... (DDP, or FSDP2 with --parallel fsdp; NCCL on GPUs, gloo on the CPU). SIGINT/SIGTERM "
        "write a checkpoint and exit 0; a NaN or inf loss exits 1 naming the last good checkpoint.",
    )
    p.add_argument("--preset", help="gauss, digits, cifar or latent-b (default digits; with --resume, the run's)")
    p.add_argument("--data", help="image folder (cifar) or .npz/.safetensors file with x and y (latent-b)")
    p.add_argument("--out", help="checkpoint folder (default runs/PRESET)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out exactly: its preset, model and knobs (flags that would change them "
        "are refused); --steps, --minutes and the file and step-running flags may change",
    )
    p.add_argument("--channels", type=int, help="image channels of the model (user data)")
    p.add_argument("--image-size", type=int, help="image height = width of the model (user data)")
    p.add_argument("--num-classes", type=int, help="number of classes of the model (user data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="under torchrun: DDP (default) or FSDP2 sharding; --batch-size is the global batch over all processes",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip the update of a step whose loss is NaN or inf (default: stop, naming the last good checkpoint)",
    )
    _add_training_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser(
        "sample",
        help="write a PNG grid of samples",
        description="Sample a checkpoint: rows = classes, --per-class samples each, to a PNG.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (holds checkpoint.json)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--classes", type=int, nargs="+", help="class ids to draw (default: up to the first 10)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    _add_guidance_flags(p, many=False)
    _add_runtime_flags(p)

    p = sub.add_parser(
        "eval",
        help="metrics over omega and the quality-diversity plot",
        description="Evaluate a digits or gauss checkpoint at several omega: writes metrics.json and quality.png.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder")
    p.add_argument("--out", help="folder for metrics.json and quality.png (default: CKPT/eval)")
    p.add_argument(
        "--n",
        type=int,
        help="samples per omega (default: 1000 for digits, where FD wants >= 500; 256 for gauss, whose exact "
        "guided reference is an RK4 solve of ~0.25 CPU s per sample and omega > 1)",
    )
    p.add_argument("--v-head-steps", type=int, default=32, help="Euler steps of the v-head sample (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    _add_guidance_flags(p, many=True)
    _add_runtime_flags(p)

    p = sub.add_parser(
        "demo",
        help="train digits on the CPU, sample, evaluate, plot",
        description="Train the digits preset from scratch (stops at --steps or --minutes), then write samples.png "
        "(rows = classes, columns = omega 1, 2, 4, 8), loss.png, quality.png and metrics.json to --out.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; replaced on rerun)")
    p.add_argument("--steps", type=int, help="training steps (default: the digits preset's)")
    p.add_argument("--minutes", type=float, default=5.5, help="wall-clock limit of training (default 5.5)")
    p.add_argument("--width", type=int, help="base channel count of the U-Net (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--n", type=int, default=1000, help="samples per omega for the metrics (default 1000)")
    p.add_argument("--seed", type=int, help="seed (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_runtime_flags(p, threads=1)  # robust on a shared machine: two threads ran 6x slower on a loaded 2-core box
    return parser


# --------------------------------------------------------------------------------------------------------
# Checks of user input (all before any file is written)
# --------------------------------------------------------------------------------------------------------


def _positive(name: str, value, allow_zero: bool = False, finite: bool = False) -> None:
    """value > 0 (>= 0 with allow_zero; NaN is neither), and not infinite with `finite`."""
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0) or (finite and value == math.inf):
        bound = ">= 0" if allow_zero else "> 0"
        raise CLIError(f"--{name} must be {'a finite number ' + bound if finite else bound}, got {value}")


def _check_guidance(
    omegas: Sequence[float], interval: Sequence[float], steps: int, flag: str = "--omega"
) -> tuple[float, float]:
    for omega in omegas:
        if not 1.0 <= omega < math.inf:
            raise CLIError(f"{flag} must be a finite number >= 1 (1 = no guidance), got {omega:g}")
    t_min, t_max = interval
    if t_min > t_max:
        raise CLIError(f"--interval: t_min {t_min:g} is greater than t_max {t_max:g}")
    if not (0.0 <= t_min and t_max <= 1.0):
        raise CLIError(f"--interval must lie in [0, 1], got {t_min:g} {t_max:g}")
    _positive("steps", steps)
    return float(t_min), float(t_max)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    return device


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        _positive("threads", threads)
        torch.set_num_threads(threads)


def _runtime(args: argparse.Namespace):
    """The device of --device, with --threads and, on a GPU, --matmul-precision applied: the latent-b step's
    float32 batched matrix products ran on CUDA cores (cutlass SIMT sgemm, ~9 ms of its 93 ms of device time on an
    H200, 2026-11-27) while its convolutions ran on TF32 tensor cores (cuDNN's default)."""
    import torch

    device = _device(args.device)
    _set_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(args.matmul_precision)
    return device


def _preset_with_overrides(args: argparse.Namespace):
    from imf.config import get_preset

    try:
        preset = get_preset(args.preset)
    except ValueError as error:
        raise CLIError(str(error)) from None
    t, m = preset.train, preset.model
    for name in ("steps", "batch_size", "minutes", "grad_clip", "width", "channels", "image_size", "num_classes"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("lr", args.lr, finite=True)  # (an infinite --minutes or --grad-clip means no limit)
    for name in ("warmup_steps", "sample_every", "checkpoint_every"):
        _positive(name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise CLIError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    train_knobs = ("steps", "minutes", "batch_size", "lr", "warmup_steps", "ema_decay", "grad_clip", "seed")
    for name in train_knobs + ("sample_every", "checkpoint_every"):
        if getattr(args, name) is not None:
            setattr(t, name, getattr(args, name))
    t.bf16 = t.bf16 or args.bf16
    t.cuda_graph = t.cuda_graph or args.cuda_graph
    t.pipelined = t.pipelined or args.pipelined
    m.channels_last = m.channels_last or args.channels_last
    model_knobs = {
        "width": "width",
        "channels": "image_channels",
        "image_size": "image_size",
        "num_classes": "num_classes",
    }
    for flag, field in model_knobs.items():
        if getattr(args, flag) is not None:
            setattr(m, field, getattr(args, flag))
    if args.objective is not None:
        preset.objective = args.objective
    try:
        m.__post_init__()  # re-checks the model config after the overrides
    except ValueError as error:
        raise CLIError(str(error)) from None
    return preset


def _load_model(ckpt: str, weights: str, device):
    """(model on device in eval mode, preset, manifest) from a checkpoint folder."""
    from imf.checkpoint import load_model

    return load_model(ckpt, weights, device)


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


def _check_writable(flag: str, folder: Path) -> None:
    """Make `folder` and write a file in it before any work, so a path that cannot hold the output fails in one
    line now, not in a traceback after the training or sampling it would have lost."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".imf-write-check.", dir=folder)
        os.close(descriptor)
        os.remove(probe)
    except OSError as error:
        raise CLIError(f"{flag} {folder}: cannot write there ({error.strerror or error})") from None


def _cudnn_benchmark(choice: str, device, preset) -> bool:
    """--cudnn-benchmark: on / off as asked, on a GPU; auto: where the search pays (imf.train.cudnn_benchmark_pays:
    every step the same shapes)."""
    from imf.train import cudnn_benchmark_pays

    if device.type != "cuda" or choice == "off":
        return False
    return choice == "on" or cudnn_benchmark_pays(preset.objective, preset.train.cuda_graph)


DEFAULT_PRESET = "digits"
# imf train's flags that set what a run is (its model, objective, data order, optimisation) -> the preset's field:
# --resume continues the run its checkpoint describes, so one that differs from it is refused rather than ignored
RUN_FLAGS = {
    "batch_size": "train.batch_size", "lr": "train.lr", "warmup_steps": "train.warmup_steps",
    "ema_decay": "train.ema_decay", "grad_clip": "train.grad_clip", "seed": "train.seed", "bf16": "train.bf16",
    "width": "model.width", "channels": "model.image_channels", "image_size": "model.image_size",
    "num_classes": "model.num_classes", "objective": "objective",
}  # fmt: skip


def _saved_run(args: argparse.Namespace, out: Path):
    """The preset a checkpoint in `out` was trained with (--resume), after refusing a --preset that differs."""
    from imf.checkpoint import MANIFEST, read_manifest
    from imf.train import preset_from_dict

    manifest = read_manifest(out)
    saved = preset_from_dict(manifest["config"], f"checkpoint: {out}/{MANIFEST}'s config")
    if args.preset is not None and args.preset != saved.name:
        raise CLIError(f"--preset {args.preset}: the checkpoint in {out} is a {saved.name} run; --resume continues it")
    if args.steps is not None and args.steps < manifest["step"]:
        raise CLIError(
            f"--steps {args.steps}: the checkpoint in {out} is at step {manifest['step']} already; --steps is the "
            "total to reach"
        )
    return saved


def _resumed_preset(args: argparse.Namespace, saved, flags):
    """The saved run with what may change on --resume (imf.train.RESUMABLE: when it stops, --steps defaulting to
    the run's own; how often it writes files; how a step runs), after refusing a flag that would change the run."""
    from imf.train import resumed_preset

    def value(preset, path: str):
        for part in path.split("."):
            preset = getattr(preset, part)
        return preset

    changed = [
        f"--{name.replace('_', '-')} ({value(saved, path)!r} -> {value(flags, path)!r})"
        for name, path in RUN_FLAGS.items()
        if getattr(args, name) not in (None, False) and value(flags, path) != value(saved, path)
    ]
    if changed:
        raise CLIError(
            f"--resume continues the run as its checkpoint describes it; {', '.join(changed)} would change it "
            "(leave them out, or start a new run in another --out)"
        )
    for name in ("steps", "minutes", "sample_every", "checkpoint_every"):  # the run's own unless given
        if getattr(args, name) is None:
            setattr(flags.train, name, getattr(saved.train, name))
    return resumed_preset(saved, flags)


def _last_losses(record: dict[str, float]) -> str:
    """The last step's loss and, where the objective has them, its u and v terms (fm has neither)."""
    if not record:
        return "(no step taken)"
    terms = [f"{name} {record[name]:.4g}" for name in ("loss_u", "loss_v") if name in record]
    return f"{record['loss']:.4g}" + (f" ({', '.join(terms)})" if terms else "")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from imf.checkpoint import MANIFEST
    from imf.distributed import init_distributed, shutdown
    from imf.train import train

    out = Path(args.out or f"runs/{args.preset or DEFAULT_PRESET}")
    saved = _saved_run(args, out) if args.resume else None
    args.preset = saved.name if saved is not None else args.preset or DEFAULT_PRESET
    preset = _preset_with_overrides(args)
    if saved is not None:
        preset = _resumed_preset(args, saved, preset)
    device = _runtime(args)
    torch.backends.cudnn.benchmark = _cudnn_benchmark(args.cudnn_benchmark, device, preset)
    if not args.resume and (out / MANIFEST).exists():
        raise CLIError(f"{out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    if preset.train.cuda_graph and preset.objective not in ("imf", "mf"):
        raise CLIError(f"--cuda-graph takes the imf or mf objective, got {preset.objective!r}")
    if preset.train.cuda_graph and device.type != "cuda":
        raise CLIError(f"--cuda-graph needs --device cuda, got {device}")
    _check_writable("--out", out)
    dist = init_distributed(device)
    try:
        if dist.enabled:
            if preset.train.cuda_graph:
                raise CLIError("--cuda-graph runs in one process; leave it out under torchrun")
            if preset.train.pipelined and args.parallel == "fsdp":
                raise CLIError("--pipelined takes one process or --parallel ddp; leave it out with --parallel fsdp")
            if preset.model.channels_last and args.parallel == "fsdp":
                raise CLIError("--channels-last takes one process or --parallel ddp (FSDP2 shards contiguous weights)")
            try:
                dist.check_batch(preset.train.batch_size)
            except ValueError as error:
                raise CLIError(f"--batch-size: {error}") from None
        result = train(
            preset,
            out,
            data_path=args.data,
            resume=args.resume,
            device=device,
            progress=not args.no_progress,
            parallel=args.parallel,
            skip_nonfinite=args.skip_nonfinite,
        )
    finally:
        shutdown(dist)
    last = result.history[-1] if result.history else {}
    if dist.is_main:
        print(
            f"trained to step {result.trainer.step_count} in {result.seconds:.0f} s (stopped by {result.stopped_by}); "
            f"last loss {_last_losses(last)}; checkpoint: {out}"
        )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from imf.evaluate import class_omega_samples
    from imf.plots import save_sample_grid

    interval = _check_guidance([args.omega], args.interval, args.sample_steps)
    _positive("per-class", args.per_class)
    if Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {args.out}")
    device = _runtime(args)
    model, _, _ = _load_model(args.ckpt, args.weights, device)
    k = model.cfg.num_classes
    classes = args.classes if args.classes is not None else list(range(min(k, 10)))
    for c in classes:
        if not 0 <= c < k:
            raise CLIError(f"--classes: class id {c} is out of range; this model has {k} classes (0..{k - 1})")
    _check_writable("--out's folder", Path(args.out).parent)
    noise = torch.randn(
        len(classes) * args.per_class, model.cfg.image_channels, model.cfg.image_size, model.cfg.image_size,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    samples = class_omega_samples(model, noise, classes, [args.omega], interval=interval, steps=args.sample_steps)
    title = f"{args.sample_steps}-step samples, interval ({interval[0]:g}, {interval[1]:g}), {args.weights} weights"
    save_sample_grid(samples, [args.omega], classes, args.out, title=title)
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from imf.checkpoint import write_json
    from imf.evaluate import evaluate
    from imf.plots import save_quality_plot

    interval = _check_guidance(args.omegas, args.interval, args.sample_steps, flag="--omegas")
    if args.n is not None and args.n < 2:
        raise CLIError(f"--n must be >= 2 (a Frechet distance needs a covariance), got {args.n}")
    _positive("v-head-steps", args.v_head_steps, allow_zero=True)
    device = _runtime(args)
    model, preset, manifest = _load_model(args.ckpt, args.weights, device)
    if preset.data not in ("digits", "gauss"):
        raise CLIError(f"imf eval has metrics for the digits and gauss presets only, not {preset.name!r}")
    out = Path(args.out or Path(args.ckpt) / "eval")
    _check_writable("--out", out)
    result = evaluate(
        model,
        preset.data,
        omegas=args.omegas,
        n=args.n if args.n is not None else {"digits": 1000, "gauss": 256}[preset.data],
        interval=interval,
        steps=args.sample_steps,
        v_head_steps=args.v_head_steps,
        seed=args.seed,
    )
    result.update(checkpoint=str(args.ckpt), step=manifest["step"], weights=args.weights)
    write_json(out / "metrics.json", result)
    save_quality_plot(result, out / "quality.png")
    print(format_summary(result))
    if preset.objective == "fm":
        print(
            "note: this is a flow-matching run, which trains the v-head only: the rows above sample its untrained "
            "u-head; its v-head row (--v-head-steps) is what it learned"
        )
    if preset.objective == "mf" and "v_head_euler" in result:
        print("note: a MeanFlow run trains u only: the v-head row samples its untrained aux v-head")
    print(f"wrote {out / 'metrics.json'} and {out / 'quality.png'}")
    return 0


def format_summary(result: dict) -> str:
    """A small table of the metrics per omega."""
    s = result["sampler"]
    lines = [f"{s['steps']}-step samples, interval ({s['interval'][0]:g}, {s['interval'][1]:g}), n = {s['n_samples']}"]
    if result["data"] == "digits":
        lines.append(f"{'omega':>6} {'class acc':>10} {'FD pixels':>10} {'FD features':>12}")
        for r in result["per_omega"]:
            lines.append(
                f"{r['omega']:>6g} {100 * r['class_accuracy']:>9.1f}% {r['fd_pixel']:>10.3f} {r['fd_features']:>12.3f}"
            )
        floor = result["real_data_floor"]
        lines.append(
            f"{'real':>6} {100 * floor['class_accuracy']:>9.1f}% {floor['fd_pixel']:>10.3f} "
            f"{floor['fd_features']:>12.3f}   (held-out real digits: the floor; accuracy = classifier's own)"
        )
        if "v_head_euler" in result:
            v = result["v_head_euler"]
            lines.append(
                f"{'v-head':>6} {100 * v['class_accuracy']:>9.1f}% {v['fd_pixel']:>10.3f} {v['fd_features']:>12.3f}"
                f"   ({v['steps']}-step Euler of the v-head, omega 1)"
            )
    else:
        lines.append(f"{'omega':>6} {'sample error':>13}")
        for r in result["per_omega"]:
            lines.append(f"{r['omega']:>6g} {r['sample_error']:>13.4f}")
        lines.append(f"u error (omega 1): {result['u_error']:.4f}")
        if "v_head_euler" in result:
            v = result["v_head_euler"]
            lines.append(f"v-head {v['steps']}-step Euler sample error: {v['sample_error']:.4f}")
    return "\n".join(lines)


DEMO_FILES = ("checkpoint.json", "metrics.json", "samples.png", "loss.png", "quality.png")


def _is_demo_output(out: Path) -> bool:
    """Whether a folder holds what `imf demo` writes and nothing else: its files (metrics.json among them, which
    `imf train` does not write), the checkpoint's parts and the training's sample grids."""
    from imf.checkpoint import is_checkpoint_file

    if not (out / "metrics.json").is_file():
        return False
    for entry in out.iterdir():
        if entry.name == "samples" and entry.is_dir():
            if not all(re.fullmatch(r"step_\d+\.png", grid.name) for grid in entry.iterdir()):
                return False
        elif not (entry.name in DEMO_FILES or is_checkpoint_file(entry.name)):
            return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from imf.checkpoint import write_json
    from imf.config import get_preset
    from imf.evaluate import DEFAULT_OMEGAS, class_omega_samples, evaluate_digits
    from imf.model import count_parameters
    from imf.plots import save_loss_curve, save_quality_plot, save_sample_grid
    from imf.sampler import DEFAULT_INTERVAL
    from imf.train import train

    preset = get_preset("digits")
    for name in ("steps", "minutes", "width", "batch_size", "n"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.n < 2:
        raise CLIError(f"--n must be >= 2, got {args.n}")
    for name in ("steps", "minutes", "batch_size", "seed"):
        if getattr(args, name) is not None:
            setattr(preset.train, name, getattr(args, name))
    if args.width is not None:
        preset.model.width = args.width
    preset.train.checkpoint_every = 0  # one checkpoint, at the end
    device = _runtime(args)
    out = Path(args.out)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--out {out} is a file, not a folder")
        if any(out.iterdir()) and not _is_demo_output(out):
            raise CLIError(
                f"--out {out} holds files the demo did not write (a training run's, or your own), and a rerun "
                "replaces the folder: choose another --out"
            )
        shutil.rmtree(out)  # a rerun starts from scratch
    _check_writable("--out", out)

    started = time.perf_counter()
    print(
        f"imf demo: digits, iMF, {preset.train.steps} steps or {preset.train.minutes:g} minutes, batch "
        f"{preset.train.batch_size}, width {preset.model.width}, {torch.get_num_threads()} thread(s), {device}"
    )
    result = train(preset, out, device=device, progress=not args.no_progress)
    model = result.trainer.ema.model.eval()
    print(
        f"trained {count_parameters(model) / 1e6:.2f}M parameters for {result.trainer.step_count} steps in "
        f"{result.seconds:.0f} s ({result.trainer.step_count / max(result.seconds, 1e-9):.2f} steps/s, "
        f"stopped by {result.stopped_by})"
    )
    omegas = list(DEFAULT_OMEGAS)
    noise = torch.randn(10 * 6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    samples = class_omega_samples(model, noise, range(10), omegas, interval=DEFAULT_INTERVAL)
    save_sample_grid(
        samples,
        omegas,
        list(range(10)),
        out / "samples.png",
        title=f"1-NFE samples after {result.trainer.step_count} steps; interval {DEFAULT_INTERVAL}",
    )
    save_loss_curve(result.history, out / "loss.png")
    metrics = evaluate_digits(model, omegas=omegas, n=args.n, interval=DEFAULT_INTERVAL)
    metrics.update(
        steps=result.trainer.step_count,
        train_seconds=round(result.seconds, 1),
        stopped_by=result.stopped_by,
        parameters=count_parameters(model),
        threads=torch.get_num_threads(),
        weights="ema",
    )
    write_json(out / "metrics.json", metrics)
    save_quality_plot(metrics, out / "quality.png")
    print(format_summary(metrics))
    print(f"wrote {out}/samples.png, loss.png, quality.png, metrics.json and the checkpoint ({out}/checkpoint.json)")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    from imf.checkpoint import CheckpointError
    from imf.data import DataError
    from imf.train import NonFiniteLossError

    # torch's forward-AD decompositions call the deprecated torch.jit.script on the first jvp: not the user's
    # concern, and it would clutter the demo's output
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, DataError, CheckpointError) as error:
        print(f"imf: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; rank 0 speaks for the job
            print(f"imf: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("imf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
