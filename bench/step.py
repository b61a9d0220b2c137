"""Model-level benchmark (DESIGN 7): one training step of each path side by side, per preset and per backend.

    python bench/step.py                       # CPU: digits preset, batch 128, 1 and 2 threads
    python bench/step.py --quick               # smoke run: small batch, 2 repetitions, no torch.compile
    python bench/step.py --preset latent-b     # GPU: bf16 targets, CUDA events, CUDA-graph sampling

A step is: the objective's targets (no-grad v-head passes), the loss and its backward, on fixed draws (the same
randomness for every variant, so torch.compile sees one shape); the AdamW update, identical for all, is not timed.
Variants:
  reference   iMF through torch.func.jvp over the plain-ops model, eager (the oracle path)
  compiled    torch.compile of the reference step the way the official PyTorch MeanFlow code trains: primal with
              grad, torch.func.jvp under no_grad (a second forward), the loss; the backward through AOTAutograd.
              Compile time (the first calls) is reported separately and kept out of the timed region. Dynamo
              cannot trace torch.func.jvp through an affine F.group_norm / F.layer_norm (torch 2.11-2.14: an
              internal assert in _fw_primal/_make_dual), so this process computes the norms' affine outside the
              norm (`norm_affine_outside`: the same math, plain ops; Inductor fuses the multiply-add).
  compiled-modules  the same step with torch.compile applied to the model's modules (trunk, u-head, v-head)
              instead of the whole step, the norms unchanged: the no-grad targets and the primal forward with
              grad (and its backward) run compiled, the JVP pass (torch.func.jvp under no_grad) the eager modules.
  fused-<b>   iMF through the fused forward-with-tangent on imf_kernels backend <b> (every usable one)
  fused-triton-jit  GPU: fused-triton with every Triton launch through Triton's own JITFunction.run, the launchers'
              compiled-kernel cache off (imf_kernels/triton/_launch.py): what that cache saves the host-bound step
  graph-<b>   GPU: the fused step with static rows (IMFObjective(static_rows=True): every step the same shapes, more
              device work) captured whole, loss and backward, in one CUDA graph and replayed: no host time per
              kernel. The capture (after 3 eager steps on a side stream) is its warm-up; its peak memory counts
              from before the warm-up (the graph's pool holds the step's memory)
  <v>-cl      GPU: variant <v> (fused-triton, graph-triton: the two this script runs) with the model's
              feature maps channels-last (ModelConfig.channels_last: cuDNN's NHWC convolutions without their layout
              transposes, 661 a step of 10.4 ms device time in the eighth lease's profile; the triton GroupNorm
              kernels read the maps as they are)
  fm, mf      flow matching and MeanFlow steps of the same model on the fused path (default backend)
  trainer     one whole `imf train` step on the default backend: Trainer.step with the default TrainConfig (fresh
              draws each step, the fused loss and backward, clipping, AdamW, the EMA, and the step's numbers
              read back once), the optimizer's moments and the EMA allocated in the warm-up
  trainer-pipelined  the same with TrainConfig(pipelined=True), timed as Trainer.run over 4 steps a call (its times
              per step): each step's numbers read after the next step's loss and backward are queued, so the host
              prepares a step while the device finishes the one before (fused AdamW)
JVP overhead = (forward + tangent + backward) / (forward + backward) of the model on the same loss of u and v.
Each variant runs in its own process (spawned). Peak memory is that of one warm step above what was held before it
(model, inputs, compiled code): on GPU the allocator's, measured in the timing process; on CPU the peak RSS (reset
through /proc/self/clear_refs), measured in a second process whose glibc maps every block over 64 KiB on its own
and unmaps it when freed (MALLOC_MMAP_THRESHOLD_), so that the RSS tracks the live tensors. That setting costs a
page fault per fresh page (it made every step 2-2.5x slower in CPU time), so the timing process runs with the
default allocator, as training does.
Times are medians over repetitions of wall-clock (CUDA-synchronised on GPU) and, on CPU, of the process CPU time;
the ratios use CPU time on CPU (wall-clock medians on a shared machine swing with its load) and wall-clock on GPU.
`queued` is the time per step of the same number of steps queued back to back with one wait at the end: a training
loop that never waits for the device (`imf train` waits once a step, for the loss: see `trainer`), where the host
prepares a step while the device finishes the one before; on a CPU there is no queue (it is the wall time).
The ratios fused_vs_compiled_queued (of the queued times), graph_vs_compiled, pipelined_vs_trainer,
channels_last_vs_fused and channels_last_vs_compiled (fused-<b>-cl's) have no target.
On a GPU every variant runs with torch.backends.cudnn.benchmark on (--no-cudnn-benchmark: off) but the `trainer`
variants, which set it as `imf train` does (off for iMF without a CUDA graph: its row count, so its shapes, change
every step).
With --rounds R (default 3 on CPU) every variant's process runs R times, the variants interleaved, and each time is
the median of the R per-process medians (the tables show their range; the ratio table each round's own ratios):
on a shared machine the load drifts between one variant's process and the next.
A variant that fails (e.g. a torch.compile baseline on a torch whose dynamo cannot trace it) is a row with the
reason, not a crashed run.
Results: a rich table and bench/results/<device>-step.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# fused_vs_compiled_modules carries the compiled target too: the stand-in where the whole step does not compile
TARGETS_CPU = dict(
    fused_vs_reference=0.75, overhead=1.6, fused_vs_compiled=1.0, fused_vs_compiled_modules=1.0, imf_vs_fm=2.3
)
TARGETS_GPU = dict(
    fused_vs_reference=0.5,
    graph_vs_reference=0.5,
    overhead=1.5,
    fused_vs_compiled=0.8,
    fused_vs_compiled_modules=0.8,
    imf_vs_fm=2.3,
)
RATIO_KEYS = (
    "fused_vs_reference",
    "graph_vs_reference",
    "fused_vs_compiled",
    "fused_vs_compiled_modules",
    "graph_vs_compiled",
    "fused_vs_compiled_queued",
    "pipelined_vs_trainer",
    "channels_last_vs_fused",
    "channels_last_vs_compiled",
    "overhead",
    "reference_overhead",
    "imf_vs_fm",
    "mf_vs_fm",
)


# ------------------------------------------------------------------------------------------- the timed steps


def official_style_loss(model, objective, x, y, d, modules=None):
    """The reference iMF loss as the official PyTorch MeanFlow code computes it: the targets, the primal u and v
    with grad through the plain model, du from torch.func.jvp under no_grad, the loss by its formula.

    `modules` (optional): a stand-in for the model in the targets and the primal pass (e.g. `CompiledModules`);
    the JVP always runs the model's own eager methods."""
    import torch

    from imf.model import Cond
    from imf.objectives import _col, adaptive_weighted, model_jvp, per_sample_sum

    modules = model if modules is None else modules
    z, v_t, v_g, v_cp = objective.guided_target(modules, x, y, d)  # v_g after class dropout
    y = torch.where(d.drop, torch.full_like(y, model.cfg.num_classes), y)
    cond = Cond(h=d.t - d.r, y=y, omega=d.omega, t_min=d.t_min, t_max=d.t_max, t=d.t)
    features = modules.trunk(z, cond)
    u, v = modules.u_head(features), modules.v_head(features)
    with torch.no_grad():
        _, du = model_jvp(model, z, cond, v_cp)
    loss_u = per_sample_sum((u + _col(d.t - d.r, u) * du - v_g) ** 2)
    loss_v = per_sample_sum((v - v_g) ** 2)
    return (
        adaptive_weighted(loss_u, objective.c, objective.p) + adaptive_weighted(loss_v, objective.c, objective.p)
    ).mean()


def norm_affine_outside(model) -> Callable[[], None]:
    """From now on the plain model's GroupNorm and LayerNorm compute the norm without its affine, then
    `* weight + bias` (the same function up to rounding), which dynamo can trace under torch.func.jvp; the affine
    inside the norm hits an internal assert there (torch 2.11-2.14). Patches `imf.model`'s `F` and the model's
    LayerNorm instances; returns the function that restores both."""
    import types

    import torch
    import torch.nn.functional as F

    import imf.model

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        h = F.group_norm(x, num_groups, None, None, eps)
        if weight is None:
            return h
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return h * weight.view(shape) + bias.view(shape)

    def layer_norm_forward(norm):
        return lambda x: F.layer_norm(x, norm.normalized_shape, None, None, norm.eps) * norm.weight + norm.bias

    functional = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
    functional.group_norm = group_norm
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine]
    saved = imf.model.F
    imf.model.F = functional
    for norm in layer_norms:
        norm.forward = layer_norm_forward(norm)

    def restore() -> None:
        imf.model.F = saved
        for norm in layer_norms:
            del norm.forward

    return restore


class CompiledModules:
    """torch.compile of the model's trunk, u-head and v-head, for the targets and the primal pass. Kept apart from
    the model: dynamo cannot run under torch.func.jvp, and a compiled function once called inside it is skipped
    from then on, so the JVP must call the eager methods (checked by tests: the compiled graphs run every step)."""

    def __init__(self, model, backend: str | Callable = "inductor") -> None:
        import torch

        self.cfg = model.cfg
        self.trunk = torch.compile(model.trunk, backend=backend)
        self.u_head = torch.compile(model.u_head, backend=backend)
        self.v_head = torch.compile(model.v_head, backend=backend)

    def v(self, z, cond):
        return self.v_head(self.trunk(z, cond)) if self.cfg.v_head == "aux" else self.u_head(self.trunk(z, cond))


def build(preset_name: str, batch: int, device: str, seed: int = 0):
    import torch

    from imf.config import get_preset
    from imf.model import IMFNet
    from imf.objectives import IMFObjective

    torch.manual_seed(seed)
    cfg = get_preset(preset_name).model
    model = IMFNet(cfg).to(device)
    with torch.no_grad():  # no zero-initialised layer: every branch computes something
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    draws = IMFObjective().draw(x, torch.Generator().manual_seed(seed + 1))
    return model, x, y, draws


def make_step(variant: str, model, x, y, draws, bf16: bool):
    """A no-argument function running one step of `variant` (loss and backward); also returns a label."""
    import torch

    import imf_kernels
    from imf.model import Cond, CondTangent
    from imf.objectives import FlowMatchingObjective, IMFObjective, MeanFlowObjective

    def with_backward(loss_fn, backend=None):
        def step():
            model.zero_grad(set_to_none=True)
            if backend is None:
                loss = loss_fn()
            else:
                with imf_kernels.use_backend(backend):
                    loss = loss_fn()
            loss.backward()

        return step

    if variant == "reference":
        objective = IMFObjective(jvp="reference", bf16=bf16)
        return with_backward(lambda: objective.loss_from_draws(model, x, y, draws)[0])
    if variant == "compiled":
        objective = IMFObjective(jvp="reference", bf16=bf16)
        compiled = torch.compile(official_style_loss)
        norm_affine_outside(model)  # for the life of this variant's process
        return with_backward(lambda: compiled(model, objective, x, y, draws))
    if variant == "compiled-modules":
        objective = IMFObjective(jvp="reference", bf16=bf16)
        modules = CompiledModules(model)
        return with_backward(lambda: official_style_loss(model, objective, x, y, draws, modules))
    if variant.endswith("-cl"):  # the same step with channels-last maps (ModelConfig.channels_last)
        model.to(memory_format=torch.channels_last)  # (this variant's process only)
        variant = variant.removesuffix("-cl")
    if variant == "fused-triton-jit":
        from imf_kernels.triton import _launch

        _launch.ENABLED = False  # for the life of this variant's process
        variant = "fused-triton"
    if variant.startswith("fused-"):
        objective = IMFObjective(bf16=bf16)
        return with_backward(lambda: objective.loss_from_draws(model, x, y, draws)[0], variant.removeprefix("fused-"))
    if variant.startswith("graph-"):
        objective = IMFObjective(bf16=bf16, static_rows=True)
        eager = with_backward(lambda: objective.loss_from_draws(model, x, y, draws)[0], variant.removeprefix("graph-"))
        return graphed(model, eager)
    if variant in ("trainer", "trainer-pipelined"):
        from imf.config import TrainConfig
        from imf.train import Trainer, cudnn_benchmark_pays

        cfg = TrainConfig(batch_size=x.shape[0], bf16=bf16, pipelined=variant == "trainer-pipelined")
        # as `imf train` sets it (whatever --cudnn-benchmark says): off for iMF without a CUDA graph, whose row
        # count changes every step (each new count a new cuDNN search: 2 s steps on an H200)
        if not cudnn_benchmark_pays("imf", cfg.cuda_graph):
            torch.backends.cudnn.benchmark = False
        trainer = Trainer(model, IMFObjective(), lambda: (x, y), cfg, torch.Generator().manual_seed(2))

        def trainer_step():
            if cfg.pipelined:  # the overlap is between the steps of one run
                trainer.run(steps=steps_per_call(variant))
            else:
                trainer.step()

        trainer_step.trainer = trainer  # (for the tests)
        return trainer_step
    if variant == "fm":
        objective = FlowMatchingObjective()
        return with_backward(lambda: objective.loss(model, x, y, torch.Generator().manual_seed(0))[0])
    if variant == "mf":
        objective = MeanFlowObjective(bf16=bf16)
        mf_draws = objective.draw(x, torch.Generator().manual_seed(1))
        return with_backward(lambda: objective.loss_from_draws(model, x, y, mf_draws)[0])

    # forward(+tangent)+backward of the model alone, on sum(u g_u) + sum(v g_v): the JVP overhead's two terms
    b = x.shape[0]
    ones = torch.ones(b, device=x.device)
    cond = Cond(h=draws.t - draws.r, y=y, omega=draws.omega, t_min=draws.t_min, t_max=draws.t_max, t=draws.t)
    dz, g_u, g_v = (torch.randn_like(x) for _ in range(3))
    if variant == "fwd-bwd":
        return with_backward(lambda: sum((a * g).sum() for a, g in zip(model(x, cond), (g_u, g_v), strict=True)))
    if variant == "fwd-tan-bwd":

        def loss_fn():
            u, du, v = model(x, cond, dz, CondTangent(ones, ones))
            return (u * g_u).sum() + (v * g_v).sum()

        return with_backward(loss_fn)
    if variant == "ref-fwd-bwd":

        def loss_fn():
            features = model.trunk(x, cond)
            return (model.u_head(features) * g_u).sum() + (model.v_head(features) * g_v).sum()

        return with_backward(loss_fn)
    if variant == "ref-fwd-tan-bwd":
        from imf.objectives import model_jvp_with_v

        def loss_fn():
            u, du, v = model_jvp_with_v(model, x, cond, dz)
            return (u * g_u).sum() + (v * g_v).sum()

        return with_backward(loss_fn)
    raise ValueError(f"bench/step.py: unknown variant {variant!r}")


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter and return the current usage: CUDA allocator stats on GPU; on CPU (Linux)
    writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def _peak_bytes(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"bench/step.py: no {field} in /proc/self/status")


def graphed(model, eager_step: Callable[[], None]) -> Callable[[], None]:
    """`eager_step` (zero_grad, loss, backward) captured in one CUDA graph on its first call, after 3 eager steps
    on a side stream (torch's whole-network capture); every call replays it, the parameters' .grad on the gradients
    the graph writes (`imf.train.CapturedBackward`, the trainer's cuda_graph step)."""
    from imf.train import CapturedBackward

    state: dict = {}

    def step():
        if "captured" not in state:
            state["captured"] = CapturedBackward(model, eager_step)
        state["captured"]()

    return step


def warmup_calls(variant: str) -> int:
    """Untimed calls before a variant's step is warm: the compiled baselines compile the forward and the backward
    graphs over their first calls; `trainer` draws how many rows carry a tangent every step, and each count it has
    not met yet is a new shape for the convolutions and matmuls, for which cuDNN and cuBLAS choose their kernels
    again (the likely cause of the ninth lease's three steps after one warm-up call taking 179-309 ms, against
    ~130 ms warm in the eighth's probe; not confirmed), so it meets the common counts first."""
    if variant.startswith("compiled"):
        return 3
    if variant.startswith("trainer"):
        return TRAINER_WARMUP_STEPS // steps_per_call(variant)
    return 1


def steps_per_call(variant: str) -> int:
    """Training steps one call of a variant's step function runs (its times are divided by it)."""
    return PIPELINED_STEPS_PER_CALL if variant == "trainer-pipelined" else 1


# steps per call of `trainer-pipelined` (Trainer.run(steps=4): four steps, the first read after the second is queued)
PIPELINED_STEPS_PER_CALL = 4
# warm-up steps of the `trainer` variants: at batch 64 (iMF, half the rows flow matching: the count is
# Binomial(64, 1/2)) ten counts hold 79% of the draws, and 20 draws meet each of those with probability 0.6-0.9
TRAINER_WARMUP_STEPS = 20


def run_variant(
    preset: str, batch: int, device: str, threads: int, variant: str, reps: int, bf16: bool, timed: bool = True
) -> dict:
    """In a fresh process: build, warm up (compile), measure the peak memory of one step, then time `reps` steps
    (none with timed=False: the CPU memory process)."""
    import torch

    torch.set_num_threads(threads)
    model, x, y, draws = build(preset, batch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step = make_step(variant, model, x, y, draws, bf16)
    graph = variant.startswith("graph-")
    if graph:  # the graph's pool, allocated in the warm-up, is the step's memory
        base = _reset_peak(device)
    start = time.perf_counter()
    calls = warmup_calls(variant)
    for call in range(calls):
        step()
        sync()
        if variant.startswith("compiled"):  # compilation takes minutes: a run cut short shows how far it got
            elapsed = time.perf_counter() - start
            print(f"  {variant}: warm-up call {call + 1}/{calls} done at {elapsed:.1f} s", flush=True)
    warmup_s = time.perf_counter() - start
    if not graph:
        model.zero_grad(set_to_none=True)
        base = _reset_peak(device)  # the peak of a warm step over the model, inputs and compiled code
    step()
    sync()
    peak = _peak_bytes(device) - base
    wall, cpu, per_call = [], [], steps_per_call(variant)
    for _ in range(reps if timed else 0):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append((time.perf_counter() - w0) / per_call)
        cpu.append((time.process_time() - c0) / per_call)
    if not timed:
        return dict(peak_mib=peak / 2**20)
    # the same steps queued back to back, one wait at the end (module docstring: queued)
    w0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    queued_s = (time.perf_counter() - w0) / (reps * per_call) if reps else float("nan")
    return dict(
        variant=variant,
        threads=threads,
        median_s=statistics.median(wall),
        min_s=min(wall),
        cpu_median_s=statistics.median(cpu),
        queued_s=queued_s,
        warmup_s=warmup_s,
        peak_mib=peak / 2**20,
    )


def run_sampling(preset: str, device: str, threads: int, reps: int, bf16: bool) -> dict:
    """1-NFE sampling: throughput at batch 256 and batch-1 latency, fused and reference; CUDA graph on GPU."""
    import types

    import torch

    from imf.sampler import CudaGraphSampler, sample

    torch.set_num_threads(threads)
    model, *_ = build(preset, 1, device)
    cfg = model.cfg
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reference_only = types.SimpleNamespace(u=model.u)  # no fused path: the sampler runs the plain ops
    out = {}
    for batch in (256, 1):
        noise = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        runners = {
            "fused": lambda noise=noise, y=y: sample(model, noise, y, bf16=bf16),
            "reference": lambda noise=noise, y=y: sample(reference_only, noise, y),
        }
        if device == "cuda":
            graphed = CudaGraphSampler(model, tuple(noise.shape), bf16=bf16)
            runners["fused+graph"] = lambda noise=noise, y=y, graphed=graphed: graphed(noise, y)
        for fn in runners.values():  # warm-up (on GPU: cuDNN's and Triton's first-call work)
            fn()
        sync()
        # the runners interleaved, so a drift of a shared machine's load shifts them alike; a batch-1 call is a
        # few ms, so it gets more repetitions
        wall: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(max(reps, 5) if batch > 1 else max(reps, 30)):
            for name, fn in runners.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        for name in runners:
            median = statistics.median(wall[name])
            row = dict(median_s=median, images_per_s=batch / median)
            if device == "cpu":  # the process's CPU time: what the ratio uses on a shared CPU (module docstring)
                row["cpu_median_s"] = statistics.median(cpu[name])
            out[f"{name}@{batch}"] = row
        timed = "cpu_median_s" if device == "cpu" else "median_s"
        out[f"fused/reference@{batch}"] = out[f"fused@{batch}"][timed] / out[f"reference@{batch}"][timed]
    return out


# ------------------------------------------------------------------------------------------------ the driver


# latent-b, bf16: the eager reference step of the 188M model (channel_mult (1, 2, 3), before 2026-11-26 evening) took
# 41 GB at batch 64 on an H200 (4x that at 256); the 91M preset has half its channels at 16x16, two thirds at 8x8
GPU_BATCH = 64

# float32 matmul precision of every timed process (--float32-matmul-precision; children are spawned, so it travels
# in the environment): "highest" is PyTorch's default; "high" lets matmuls and the triton fp32 attention use TF32.
PRECISION_ENV = "IMF_BENCH_FLOAT32_MATMUL_PRECISION"
# torch.backends.cudnn.benchmark of every timed process ("1" or "0"; --cudnn-benchmark): on by default on a GPU, for
# every variant alike but `trainer` (which sets it as `imf train` does): the variants' draws are fixed, so cuDNN
# times its convolution algorithms for each shape in the first (untimed) call instead of picking one by heuristics.
CUDNN_BENCHMARK_ENV = "IMF_BENCH_CUDNN_BENCHMARK"


def _child(queue, fn, args):
    try:
        import torch

        torch.set_float32_matmul_precision(os.environ.get(PRECISION_ENV, "highest"))
        torch.backends.cudnn.benchmark = os.environ.get(CUDNN_BENCHMARK_ENV, "0") == "1"
        queue.put(("ok", fn(*args)))
    except Exception as error:  # reported as a row, not a crash of the whole run
        queue.put(("error", f"{type(error).__name__}: {error}"))


# glibc: blocks of 64 KiB and more get their own mapping, returned to the system when freed (module docstring)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def in_child(fn, *args, env: dict[str, str] | None = None):
    """fn(*args) in a spawned process with `env` added to its environment; {"error": reason} if it raised or died
    (a crash in native code, e.g. an internal assert of the compiler, ends the process without a result)."""
    import queue as queue_module

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(results, fn, args))
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    while True:
        try:
            status, result = results.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                status, result = "error", f"the variant's process died (exit code {proc.exitcode})"
                break
    proc.join()
    if status != "ok":
        return {"error": result}
    return result


def usable_backends(device: str) -> list[str]:
    import imf_kernels

    names = [status.name for status in imf_kernels.backends() if status.usable]
    # On CPU only `torch` is a fast path (the Triton interpreter and the CUDA extension are not).
    return names if device == "cuda" else [name for name in names if name == "torch"]


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}"


def ratios(rows: dict[str, dict], backend: str, time_key: str) -> dict[str, float]:
    """The targets' ratios from each variant's `time_key` median (NaN where a variant failed)."""
    t = lambda name: rows.get(name, {}).get(time_key, float("nan"))
    queued = lambda name: rows.get(name, {}).get("queued_s", float("nan"))
    fused = t(f"fused-{backend}")
    return dict(
        fused_vs_reference=fused / t("reference"),
        graph_vs_reference=t(f"graph-{backend}") / t("reference"),
        fused_vs_compiled=fused / t("compiled"),
        fused_vs_compiled_modules=fused / t("compiled-modules"),
        graph_vs_compiled=t(f"graph-{backend}") / t("compiled"),
        fused_vs_compiled_queued=queued(f"fused-{backend}") / queued("compiled"),
        pipelined_vs_trainer=t("trainer-pipelined") / t("trainer"),
        channels_last_vs_fused=t(f"fused-{backend}-cl") / fused,
        channels_last_vs_compiled=t(f"fused-{backend}-cl") / t("compiled"),
        overhead=t("fwd-tan-bwd") / t("fwd-bwd"),
        reference_overhead=t("ref-fwd-tan-bwd") / t("ref-fwd-bwd"),
        imf_vs_fm=fused / t("fm"),
        mf_vs_fm=t("mf") / t("fm"),
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="latent-b" if on_gpu else "digits")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"default: 128 on CPU, {GPU_BATCH} on GPU (the eager reference step at latent-b's training batch 256 "
        "needs more than an H200's 139 GB)",
    )
    parser.add_argument("--threads", default=None, help="CPU thread counts, comma-separated (default 1,2)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps a variant and round (default 7)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run every variant's process this many times, the variants interleaved (round 1: all variants, then "
        "round 2, ...), and report per-variant medians over the rounds: on a shared machine the load drifts "
        "between variants (default: 3 on CPU, 1 on GPU)",
    )
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=on_gpu, help="bf16 targets")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 16, 2 reps, 1 thread (each unless given), no compile unless --variants names one",
    )
    parser.add_argument("--out", default=None, help="default: bench/results/<device>-step.json")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of the variants to time (default: all; e.g. reference,fused-triton,fm for a "
        "short GPU lease); ratios whose variants were not timed print n/a",
    )
    parser.add_argument("--no-sampling", action="store_true", help="skip the 1-NFE sampling measurements")
    parser.add_argument(
        "--float32-matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision for every variant (default: PyTorch's 'highest'; 'high' allows "
        "TF32 in matmuls and in the triton fp32 attention)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=on_gpu,
        help="torch.backends.cudnn.benchmark for every variant but trainer (default: on on a GPU: the variants' "
        "draws are fixed, so are their shapes; trainer sets it as `imf train` does)",
    )
    args = parser.parse_args()
    os.environ[PRECISION_ENV] = args.float32_matmul_precision
    os.environ[CUDNN_BENCHMARK_ENV] = "1" if args.cudnn_benchmark else "0"
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:  # Inductor compiles in this process's thread, not a worker pool beside the timed ones
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if args.quick:  # the smoke run's sizes where the flags do not give them
        args.batch, args.reps = args.batch or 16, args.reps or 2
        args.threads, args.no_compile = args.threads or "1", True
    if args.batch is None:
        args.batch = GPU_BATCH if on_gpu else 128
    args.reps, args.threads = args.reps or 7, args.threads or "1,2"
    if args.rounds is None:
        args.rounds = 1 if on_gpu or args.quick else 3
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    thread_counts = [int(n) for n in args.threads.split(",")] if device == "cpu" else [torch.get_num_threads()]
    backends = usable_backends(device)
    compiled = ["compiled", "compiled-modules"]
    # the compiled baselines last: their compilation takes minutes, and a run cut short (a GPU lease) keeps the rest
    graphs = [f"graph-{b}" for b in backends if b != "torch"] if on_gpu else []  # CUDA graphs: GPU kernels only
    jit = ["fused-triton-jit"] if on_gpu and "triton" in backends else []  # the launch cache off, for its A/B
    # channels-last maps (no cuDNN layout transposes), eager and in the CUDA graph: the triton GroupNorm reads them
    channels_last = ["fused-triton-cl", "graph-triton-cl"] if on_gpu and "triton" in backends else []
    variants = [
        "reference",
        *(f"fused-{b}" for b in backends),
        *jit,
        *graphs,
        *channels_last,
        "trainer",
        "trainer-pipelined",
        "fm",
        "mf",
    ]
    variants += ["fwd-bwd", "fwd-tan-bwd", "ref-fwd-bwd", "ref-fwd-tan-bwd", *compiled]
    if args.variants is not None:
        chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in variants]
        if unknown or not chosen:
            parser.error(
                f"--variants: {', '.join(unknown) or 'nothing given'} not among this run's variants "
                f"({', '.join(variants)})"
            )
        variants = [name for name in variants if name in chosen]  # named here, compiled ones run even with --quick
    elif args.no_compile:
        variants = [name for name in variants if name not in compiled]

    from common import run_tags

    tags = run_tags(torch.device(device), "step")
    results = dict(
        device=device_name(device),
        date=tags["date"],
        commit=tags["commit"],
        dirty=tags["dirty"],
        torch=torch.__version__,
        triton=tags["triton"],
        preset=args.preset,
        batch=args.batch,
        bf16=args.bf16,
        float32_matmul_precision=args.float32_matmul_precision,
        cudnn_benchmark=args.cudnn_benchmark,
        reps=args.reps,
        rounds=args.rounds,
        targets=TARGETS_GPU if on_gpu else TARGETS_CPU,
        ratio_time="median_s" if on_gpu else "cpu_median_s",
        runs=[],
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"{results['device']}-step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for threads in thread_counts:
        run = dict(threads=threads, steps={}, rounds=[], sampling={}, ratios={}, round_ratios={})
        results["runs"].append(run)
        for round_index in range(args.rounds):
            rows = {}
            run["rounds"].append(rows)
            for variant in variants:
                config = (args.preset, args.batch, device, threads, variant, args.reps, args.bf16)
                rows[variant] = in_child(run_variant, *config)
                if device == "cpu" and round_index == 0 and "error" not in rows[variant]:
                    memory = in_child(run_variant, *config, False, env=MEMORY_ENV)
                    rows[variant]["peak_mib"] = memory.get("peak_mib", float("nan"))
                if variant == "compiled" and "error" in rows[variant]:
                    rows[variant]["error"] = f"compile baseline unavailable: {rows[variant]['error']}"
                print(f"[{threads} thread(s), round {round_index + 1}] {variant}: {rows[variant]}", flush=True)
                run["steps"] = merge_rounds(run["rounds"])
                write_results(out, results)  # after every variant: a run cut short keeps what it measured
        if not args.no_sampling:
            run["sampling"] = in_child(run_sampling, args.preset, device, threads, args.reps, args.bf16)
        run["ratios"] = {b: ratios(run["steps"], b, results["ratio_time"]) for b in backends}
        run["round_ratios"] = {b: [ratios(rows, b, results["ratio_time"]) for rows in run["rounds"]] for b in backends}
        write_results(out, results)
        print_table(results, run)
    print(f"wrote {out}")


def merge_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per variant, over the rounds it ran without error: the median of each round's medians, the least minimum,
    the first round's warm-up (compilation) and peak memory, and every round's medians (`round_*`). A variant that
    failed in every round keeps the first round's error."""
    merged = {}
    for variant in rounds[0]:
        done = [rows[variant] for rows in rounds if variant in rows and "error" not in rows[variant]]
        if not done:
            merged[variant] = rounds[0][variant]
            continue
        merged[variant] = dict(
            done[0],
            median_s=statistics.median(row["median_s"] for row in done),
            cpu_median_s=statistics.median(row["cpu_median_s"] for row in done),
            queued_s=statistics.median(row.get("queued_s", float("nan")) for row in done),
            min_s=min(row["min_s"] for row in done),
            round_median_s=[row["median_s"] for row in done],
            round_cpu_median_s=[row["cpu_median_s"] for row in done],
        )
    return merged


def write_results(path: Path, results: dict) -> None:
    """The results file, replaced atomically (a temporary file renamed over it)."""
    from imf.checkpoint import atomic_write

    atomic_write(path, lambda name: Path(name).write_text(json.dumps(_nan_to_none(results), indent=2)))


def _nan_to_none(value):
    """NaN (a ratio whose variant did not run) as JSON's null: `json.dumps` writes a bare NaN, which strict parsers
    refuse."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def _spread_ms(row: dict, key: str) -> str:
    """A row's per-round times as ' (lowest-highest)' in ms; '' for one round."""
    times = row.get(key, ())
    return f" ({1e3 * min(times):.0f}-{1e3 * max(times):.0f})" if len(times) > 1 else ""


def print_table(results: dict, run: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs: the ratio columns unabbreviated
    title = f"{results['device']} {results['preset']} batch {results['batch']} threads {run['threads']}"
    table = Table(title=title)
    for column in ("variant", "median ms", "cpu ms", "queued ms", "warm-up s", "peak MiB"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for name, row in run["steps"].items():
        if "error" in row:
            table.add_row(name, row["error"][:300], "", "", "", "")
            continue
        table.add_row(
            name,
            f"{1e3 * row['median_s']:.1f}{_spread_ms(row, 'round_median_s')}",
            f"{1e3 * row['cpu_median_s']:.1f}{_spread_ms(row, 'round_cpu_median_s')}",
            f"{1e3 * row.get('queued_s', float('nan')):.1f}",
            f"{row['warmup_s']:.1f}",
            f"{row['peak_mib']:.0f}",
        )
    console.print(table)
    targets = results["targets"]
    basis = "CPU time" if results["ratio_time"] == "cpu_median_s" else "wall-clock"
    rounds = len(run["rounds"])
    over = f", each over {rounds} rounds; in brackets each round's own ratio, lowest-highest" if rounds > 1 else ""
    ratio_table = Table(title=f"ratios of {basis} medians{over}")
    backends = list(run["ratios"])
    ratio_table.add_column("ratio")
    ratio_table.add_column("target", justify="right")
    for backend in backends:
        ratio_table.add_column(backend, justify="right")
    not_timed = []
    for key in RATIO_KEYS:
        cells = []
        for backend in backends:
            value = run["ratios"][backend][key]
            if math.isnan(value):  # a variant it needs was not timed or failed (its row says why)
                cells.append("n/a")
                continue
            met = "" if key not in targets else (" ok" if value <= targets[key] else " MISSED")
            cell = f"{value:.3f}{met}"  # 3 places: 0.7505 is not 0.75
            per_round = [r[key] for r in run["round_ratios"][backend] if not math.isnan(r[key])]
            if len(per_round) > 1:
                cell += f" [{min(per_round):.3f}-{max(per_round):.3f}]"
            cells.append(cell)
        if all(cell == "n/a" for cell in cells):
            not_timed.append(key)
            continue
        ratio_table.add_row(key, f"<= {targets[key]}" if key in targets else "-", *cells)
    if ratio_table.row_count:
        console.print(ratio_table)
    if not_timed:
        console.print(f"not timed in this run (their variants were not asked for or failed): {', '.join(not_timed)}")
    if not run["sampling"]:  # --no-sampling
        return
    sampling = Table(title="1-NFE sampling (fused/reference: of CPU time on a CPU, wall-clock on a GPU)")
    for column in ("runner@batch", "median ms", "CPU ms", "images/s"):
        sampling.add_column(column)
    for key, row in run["sampling"].items():
        if isinstance(row, dict):
            cpu_ms = f"{1e3 * row['cpu_median_s']:.2f}" if "cpu_median_s" in row else ""
            sampling.add_row(key, f"{1e3 * row['median_s']:.2f}", cpu_ms, f"{row['images_per_s']:.0f}")
        elif isinstance(row, float):  # a ratio
            sampling.add_row(key, f"{row:.3f}", "", "")
        else:
            sampling.add_row(key, str(row), "", "")
    console.print(sampling)


if __name__ == "__main__":
    main()
