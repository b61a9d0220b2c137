"""The training loop: AdamW (betas 0.9/0.95, no weight decay), linear warm-up, constant lr and an optional
linear cool-down, gradient clipping, EMA of the weights, optional bf16 target evaluations, exact resume.
`Trainer.step()` is one objective step on one batch; `train()` is a whole run (data, model, progress bar,
sample grids, checkpoints).

Under `torchrun` the same code runs on every rank (DDP by default, FSDP2 as an option; `imf.distributed` says how
a step is split so that N processes equal one process on the combined batch). Faults: a NaN or inf loss stops the
run with a `NonFiniteLossError` naming the step and the last good checkpoint (or, with `skip_nonfinite`, skips the
update); SIGINT/SIGTERM finish the current step, write a checkpoint and return.

Read top to bottom: EMA, the bf16 wrapper, the Trainer, the data streams, then `train()`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imf.checks import check_flag, check_flags
from imf.config import Preset, TrainConfig, get_preset
from imf.distributed import DistInfo, all_mean, any_rank, full_tensors, shard_like, shard_optimizer_state, slice_rows
from imf.model import Cond, IMFNet, ModelConfig, bf16_parameters
from imf.objectives import to_device


@contextlib.contextmanager
def frozen_heap():
    """Python's cyclic garbage collector told to leave alone every object that exists on entry (`gc.freeze`) until
    the block ends (`gc.unfreeze`): the model, the optimizer, torch's and Triton's modules, ~280k tracked objects
    in a latent-b run. Building them leaves a full collection due, which otherwise lands within the first ~60 steps
    (a walk of the whole heap, 127 ms on a 2-core CPU, nothing to collect; the GPU idles once the host stalls longer
    than its queue), and so does any later burst of long-lived objects (a checkpoint, an evaluation); in steady
    state none came in 300 steps either way. Objects made inside the block are collected as usual; a cycle among
    the frozen ones waits for the block's end. Nothing is done where the collector is off or something else has
    already frozen the heap (it stays frozen)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or inf. `checkpoint` is the last good checkpoint (folder and step), when known."""

    def __init__(self, step: int, value: float, checkpoint: tuple[Path, int] | None = None, known: bool = False):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        message = f"loss is {'NaN' if math.isnan(value) else value} at step {step}"
        if checkpoint is not None:
            message += f"; last good checkpoint: {checkpoint[0]} (step {checkpoint[1]})"
        elif known:
            message += "; last good checkpoint: none (no checkpoint was written before this step)"
        super().__init__(message)


class EMA:
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """One multi-tensor lerp over the parameters and one multi-tensor copy of the buffers (on a GPU a few
        launches, not one per tensor: latent-b has 340 parameters); FSDP2 shards one whole tensor at a time."""
        # warm-start: average over the steps seen so far while that is shorter than the EMA's horizon
        decay = min(self.decay, (1 + step) / (10 + step))
        ema, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(ema) != len(params):
            raise ValueError(f"EMA.update: the model has {len(params)} parameters, the average {len(ema)}")
        if any(hasattr(p, "full_tensor") for p in params):  # (all of them at once would be a second whole model)
            for e, p in zip(ema, params, strict=True):
                e.lerp_(_full(p), 1 - decay)
        elif ema:
            torch._foreach_lerp_(ema, params, 1 - decay)
        ema_buffers, buffers = list(self.model.buffers()), list(model.buffers())
        if len(ema_buffers) != len(buffers):
            raise ValueError(f"EMA.update: the model has {len(buffers)} buffers, the average {len(ema_buffers)}")
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)


def _stacked_by_device(values: list) -> list[tuple[list[int], torch.Tensor]]:
    """The tensors among `values` (one element each), per device: their indices and one tensor of them stacked in
    their promoted dtype (float64 stays exact)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"host_floats: tensors of one element only, got shape {tuple(value.shape)}")
            by_device.setdefault(value.device, []).append(index)
    stacks = []
    for indices in by_device.values():
        tensors = [values[i].detach().reshape(()) for i in indices]
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        stacks.append((indices, torch.stack([t.to(dtype) for t in tensors])))
    return stacks


def host_floats(values: list) -> list[float]:
    """`values` (tensors of one element, or numbers) as Python floats, the tensors of each device read in one copy
    (one wait for a GPU, not one per value), each in its own dtype's precision (float64 stays exact)."""
    out = [value if isinstance(value, torch.Tensor) else float(value) for value in values]
    for indices, stacked in _stacked_by_device(values):
        for i, number in zip(indices, stacked.tolist(), strict=True):
            out[i] = float(number)
    return out


class _HostRead:
    """`host_floats(values)` started now and finished by `floats()`: on a GPU the values of each device are copied
    into pinned host memory behind the work queued so far, so `floats()` waits for that work only, not for what the
    host queued after (a pipelined step's successor); on a CPU the values are already computed."""

    def __init__(self, values: list):
        self.numbers = [None if isinstance(value, torch.Tensor) else float(value) for value in values]
        self.reads: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]] = []
        for indices, stacked in _stacked_by_device(values):
            event = None
            if stacked.device.type == "cuda":
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                host.copy_(stacked, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(stacked.device))
                stacked = host
            self.reads.append((indices, stacked, event))

    def floats(self) -> list[float]:
        out = list(self.numbers)
        for indices, stacked, event in self.reads:
            if event is not None:
                event.synchronize()
            for i, number in zip(indices, stacked.tolist(), strict=True):
                out[i] = float(number)
        return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class BF16Targets(nn.Module):
    """Runs the model's no-grad calls (the objective's target evaluations: v_c, v_u, v_c') under bf16 autocast
    and returns fp32; calls with grad enabled (the JVP pass the loss is built from) run untouched in fp32.

    It exposes what the objectives read from the model (`cfg`, `takes_tangents`) and the fused path's entry points
    (`forward` with tangents, `fused_u`, `fused_v`), so a model with a fused forward-with-tangent keeps it: the
    targets through the fused primal in bf16, the graded pass `model(z, cond, dz, dcond)` in fp32."""

    def __init__(self, model: nn.Module, cache: bool = True):
        super().__init__()
        self.inner = model
        self.cfg = model.cfg
        self.takes_tangents = getattr(model, "takes_tangents", False)
        self.cache = cache  # autocast's weight-cast cache; off for a step captured in a CUDA graph (torch's advice)

    def _maybe_autocast(self, fn: Callable, z: torch.Tensor, *args: Any, fused: bool = True, **kwargs: Any):
        """fn under bf16 autocast when grad is off; a fused entry point with the weights cast once beforehand
        (`bf16_parameters`: one multi-tensor copy, not a cast per layer)."""
        if torch.is_grad_enabled():
            return fn(z, *args, **kwargs)
        with (
            torch.autocast(device_type=z.device.type, dtype=torch.bfloat16, cache_enabled=self.cache),
            bf16_parameters(self.inner, fused),
        ):
            out = fn(z, *args, **kwargs)
        return tuple(o if o is None else o.float() for o in out) if isinstance(out, tuple) else out.float()

    def forward(self, z: torch.Tensor, cond: Cond, *args: Any, **kwargs: Any):
        """The model's own forward: (u, v), or (u, du, v) with tangents (`IMFNet.forward`)."""
        return self._maybe_autocast(self.inner, z, cond, *args, fused=self.takes_tangents, **kwargs)

    def u(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._maybe_autocast(self.inner.u, z, cond, fused=False)

    def v(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._maybe_autocast(self.inner.v, z, cond, fused=False)

    def fused_u(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._maybe_autocast(self.inner.fused_u, z, cond)

    def fused_v(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._maybe_autocast(self.inner.fused_v, z, cond)


class CapturedBackward:
    """`run` (zero_grad, loss, backward) captured by `capture` (default `imf.sampler.capture_cuda_graph`: warm-up
    calls on a side stream, then one captured). Each call replays it and points the parameters' `.grad` at the
    gradients the graph writes (a zero_grad(set_to_none=True) between calls detaches them); returns what `run`
    returned under capture, tensors the next replay overwrites."""

    def __init__(self, model: nn.Module, run: Callable, capture: Callable | None = None):
        from imf.sampler import capture_cuda_graph

        self.graph, self.out = (capture if capture is not None else capture_cuda_graph)(run)
        self.grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]

    def __call__(self):
        self.graph.replay()
        for param, grad in self.grads:
            param.grad = grad
        return self.out


class GraphedStep:
    """The objective's loss and its backward for one fixed batch shape, captured in one CUDA graph on the first call
    and replayed on every call after (`TrainConfig.cuda_graph`): the host queues one graph instead of a thousand
    kernels a step (eager, the fused latent-b step on an H100 was host-bound: device busy 65% of the step).

    Each call draws the step's randomness from `generator` exactly as `objective.loss` does (so a run resumes the
    same way with or without the graph), copies x, y and the draws into the graph's static inputs, replays, and
    points the parameters' `.grad` at the gradients the graph writes (`CapturedBackward`). It returns (loss,
    metrics), tensors the graph overwrites on its next replay. The objective must choose nothing on the host
    (`static_rows`). `capture(run)` -> (graph, run's outputs): `CapturedBackward`'s, or a stand-in in the CPU tests."""

    def __init__(self, model: nn.Module, objective, loss_model: nn.Module, capture: Callable | None = None):
        if not getattr(objective, "static_rows", False):
            raise ValueError(f"GraphedStep: objective {objective!r} must have static_rows=True")
        self.model, self.objective, self.loss_model, self.capture = model, objective, loss_model, capture
        self.captured: CapturedBackward | None = None

    def _run(self):
        self.model.zero_grad(set_to_none=True)  # the backward under capture allocates the gradients in its pool
        loss, metrics = self.objective.loss_from_draws(self.loss_model, self.x, self.y, self.draws)
        loss.backward()
        return loss.detach(), metrics

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        draws = self.objective.draw(x, generator)
        tensors = {f.name: getattr(draws, f.name) for f in dataclasses.fields(draws)}
        tensors = {name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)}
        if self.captured is None:
            # host=None: a static-rows step reads no host copy; one that did would wait for the device under capture
            self.x, self.y = x.clone(), y.clone()
            self.draws = dataclasses.replace(draws, host=None, **{k: v.clone() for k, v in tensors.items()})
            self.captured = CapturedBackward(self.model, self._run, self.capture)
        else:
            if x.shape != self.x.shape:
                raise ValueError(
                    f"GraphedStep: every batch must have the captured shape {tuple(self.x.shape)} (cuda_graph), got "
                    f"{tuple(x.shape)}"
                )
            self.x.copy_(x)
            self.y.copy_(y)
            for name, value in tensors.items():
                getattr(self.draws, name).copy_(value)
        return self.captured()


@dataclasses.dataclass
class _PendingStep:
    """A pipelined step whose update is queued: its number (1-based), its metrics' names, and the read of its loss,
    gradient norm and metrics."""

    step: int
    names: list[str]
    read: _HostRead


class Trainer:
    """`next_batch()` returns (x, y) on the model's device; if it also has `state_dict` / `load_state_dict`
    (a `DataStream`), its position is part of the checkpoint. `generator` drives the objective's randomness.

    With `dist` of world size > 1, `next_batch()` must return the same global batch on every rank (the same seeded
    stream) and `cfg.batch_size` is that global batch; each rank trains on its slice through DDP (`parallel="ddp"`)
    or FSDP2 (`parallel="fsdp"`). `self.model` is the module itself (sharded in place under FSDP2); its state_dict
    holds whole tensors, so checkpoints do not depend on the world size or the mode.
    `skip_nonfinite`: a NaN or inf loss skips the update instead of raising `NonFiniteLossError`.
    `cfg.cuda_graph`: each step's loss and backward replayed from one CUDA graph (`GraphedStep`; one process, the
    model on a CUDA device, the imf or mf objective); the optimizer step, clipping and EMA stay eager.
    `cfg.pipelined`: `run` reads each step's numbers after it has queued the next step's loss and backward, so the host
    prepares that step while the device finishes the one before (the plain loop waits for every step's backward
    before its update). A non-finite loss then skips the AdamW step on the device (fused AdamW's `found_inf`), and the
    EMA is updated once the step's numbers are read (queued behind the next step's backward, which does not change
    the weights); the states, numbers and errors are those of the plain loop with fused AdamW. Not with
    `parallel="fsdp"`."""

    def __init__(
        self,
        model: nn.Module,
        objective,
        next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        cfg: TrainConfig,
        generator: torch.Generator | None = None,
        *,
        dist: DistInfo | None = None,
        parallel: str = "ddp",
        skip_nonfinite: bool = False,
    ):
        from imf.distributed import PARALLEL_MODES, shard_fsdp, wrap_ddp

        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"Trainer: cfg must be a TrainConfig (a preset's .train), got {type(cfg).__name__}")
        cfg.check()  # again: knobs may have been set after construction
        if not callable(getattr(objective, "loss", None)):
            raise TypeError(
                f"Trainer: objective must be an objective object (imf.make_objective(name)), got {objective!r}"
            )
        if dataclasses.is_dataclass(objective) and callable(getattr(objective, "__post_init__", None)):
            objective.__post_init__()  # its settings' checks again: they may have been set after construction
        if not callable(next_batch):
            raise TypeError(f"Trainer: next_batch must be a function returning (x, y), got {type(next_batch).__name__}")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"Trainer: parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
        check_flag("Trainer", "skip_nonfinite", skip_nonfinite)
        if cfg.cuda_graph:
            self._check_cuda_graph(model, objective, dist if dist is not None else DistInfo())
        if cfg.pipelined and dist is not None and dist.enabled and parallel == "fsdp":
            raise ValueError(
                "Trainer: pipelined takes one process or parallel='ddp' (its fused AdamW is not used on FSDP2 shards "
                "here); train with parallel='fsdp' without it"
            )
        self.model, self.objective, self.next_batch, self.cfg = model, objective, next_batch, cfg
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.dist = dist if dist is not None else DistInfo()
        self.parallel, self.skip_nonfinite, self.skipped_steps = parallel, skip_nonfinite, 0
        self.ema = EMA(model, cfg.ema_decay)  # a full copy on every rank, also under FSDP
        self.train_model = model  # what the objective calls: the module, or its DDP / FSDP2 wrapper
        if self.dist.enabled:
            self.dist.check_batch(cfg.batch_size)
            if not hasattr(objective, "draw"):
                raise ValueError(
                    f"Trainer: objective {getattr(objective, 'name', objective)!r} has no draw(); distributed training "
                    "draws the global batch's randomness once and gives each rank its rows"
                )
            if parallel == "fsdp":
                laid_out = next((name for name, p in model.named_parameters() if not p.is_contiguous()), None)
                if laid_out is not None:
                    raise ValueError(
                        f"Trainer: parallel='fsdp' shards contiguous parameters only (FSDP2), got {laid_out} with "
                        "strides of its own (a channels-last model, ModelConfig.channels_last); train it with "
                        "parallel='ddp'"
                    )
                self.train_model = shard_fsdp(model)
            else:
                # every parameter is in the graded pass only for iMF with the aux v-head
                all_used = getattr(objective, "name", "") == "imf" and getattr(model.cfg, "v_head", "") == "aux"
                self.train_model = wrap_ddp(model, self.dist, find_unused_parameters=not all_used)
        # pipelined: the fused implementation, whose `found_inf` skips a step's update on the device
        fused = True if cfg.pipelined else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
        self.step_count = 0
        # pipelined, between a step's draws and its update: the draw state before them (what `state_dict` saves)
        self._in_flight_draws: dict[str, Any] | None = None
        self._loss_model = BF16Targets(self.train_model) if cfg.bf16 else self.train_model
        self.graphed: GraphedStep | None = None  # cfg.cuda_graph: the loss and backward of every step from one graph
        if cfg.cuda_graph:
            self.objective = dataclasses.replace(objective, static_rows=True)
            loss_model = BF16Targets(model, cache=False) if cfg.bf16 else model
            self.graphed = GraphedStep(model, self.objective, loss_model)

    @staticmethod
    def _check_cuda_graph(model: nn.Module, objective, dist: DistInfo) -> None:
        """TrainConfig.cuda_graph's conditions: one process, a model on a CUDA device, an objective with a static-rows
        form (imf, mf: the same loss, more rows computed, none chosen on the host)."""
        name = getattr(objective, "name", objective)
        is_dataclass = dataclasses.is_dataclass(objective)
        if "static_rows" not in ({f.name for f in dataclasses.fields(objective)} if is_dataclass else ()):
            raise ValueError(f"Trainer: cuda_graph takes the imf or mf objective, got {name!r}")
        if dist.enabled:
            raise ValueError(
                f"Trainer: cuda_graph runs in one process, got a world size of {dist.world_size}; train without it "
                "under torchrun"
            )
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"Trainer: cuda_graph needs the model on a CUDA device, got {device}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then (with `cfg.cooldown` > 0) a linear decay that reaches 0 at `cfg.steps`."""
        warmup = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        cooldown_steps = self.cfg.cooldown * self.cfg.steps
        cooldown = min(1.0, (self.cfg.steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0
        return self.cfg.lr * warmup * max(0.0, cooldown)

    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        if not self.dist.enabled:
            return self.objective.loss(self._loss_model, x, y, self.generator)
        # the global batch's draws from the shared generator, then this rank's rows (imf.distributed)
        draws = self.objective.draw(x, self.generator)
        rows = self.dist.rows(x.shape[0])
        return self.objective.loss_from_draws(self._loss_model, x[rows], y[rows], slice_rows(draws, rows))

    def step(self) -> dict[str, float]:
        """One update. The host waits for the device once a step, after the backward and the clipping are queued:
        the loss, its terms and the gradient norm come back in one copy, which decides whether the update runs (a
        NaN or inf loss drops the backward's gradients). The optimizer step and the EMA are queued behind it, and
        the next step's work behind them, so the device stays busy while the host prepares it. (Pipelined: the
        update is queued before the read, skipped on the device where the loss is not finite.)"""
        if self.cfg.pipelined:
            return self._finish(self._queue_update(*self._forward_backward()))
        loss, metrics = self._forward_backward()
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        loss_value, grad_norm_value, *terms = host_floats([loss, grad_norm, *metrics.values()])
        if not math.isfinite(loss_value):
            self.opt.zero_grad(set_to_none=True)  # (under DDP / FSDP every rank ran its backward: the same bookkeeping)
            if not self.skip_nonfinite:
                raise NonFiniteLossError(self.step_count + 1, loss_value)
            self.step_count += 1
            self.skipped_steps += 1
            return {"loss": loss_value, "skipped": 1.0}
        self.opt.step()
        self.ema.update(self.model, self.step_count)
        self.step_count += 1
        out = dict(zip(metrics, terms, strict=True))
        out["loss"] = loss_value
        out["grad_norm"] = grad_norm_value
        return out

    def _forward_backward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A step's first half: its batch and learning rate, the loss (averaged over the ranks) and the backward. It
        draws the step's data and randomness and updates no state."""
        self.train_model.train()
        batch = self.next_batch()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):  # a bare 2-row tensor unpacks as x and y
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise TypeError(f"Trainer: next_batch() must return a pair (x, y), got {type(batch).__name__}{length}")
        x, y = batch
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        if self.graphed is not None:  # zero_grad, the loss and the backward, replayed
            return self.graphed(x, y, self.generator)
        self.opt.zero_grad(set_to_none=True)
        loss, metrics = self._loss(x, y)
        loss.backward()
        return all_mean(loss.detach(), self.dist), metrics  # the global batch's loss, the same on every rank

    def _queue_update(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> _PendingStep:
        """Pipelined, a step's second half, queued without a wait: clipping, the AdamW step (skipped on the device
        where the loss is not finite) and the copy of its numbers to the host; the EMA follows in `_finish`."""
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        # read by the fused AdamW step (as under torch.amp's GradScaler): 1 skips the update, its step count too
        self.opt.found_inf = (~torch.isfinite(loss)).to(torch.float32).reshape(())
        self.opt.step()
        pending = _PendingStep(self.step_count + 1, list(metrics), _HostRead([loss, grad_norm, *metrics.values()]))
        self.step_count += 1
        return pending

    def _finish(self, pending: _PendingStep) -> dict[str, float]:
        """Pipelined: a queued step's numbers (one wait, for that step's work only), then its EMA update (the weights
        are still that step's: the next step's update is not queued yet), or the plain loop's bookkeeping of a
        non-finite loss (its AdamW step was skipped on the device)."""
        loss_value, grad_norm_value, *terms = pending.read.floats()
        if not math.isfinite(loss_value):
            if self._in_flight_draws is None:  # (else they are the queued step's gradients: `_run_pipelined` owns them)
                self.opt.zero_grad(set_to_none=True)
            if not self.skip_nonfinite:
                self.step_count = pending.step - 1  # as the plain loop, which raises before counting the step
                raise NonFiniteLossError(pending.step, loss_value)
            self.skipped_steps += 1
            return {"loss": loss_value, "skipped": 1.0}
        self.ema.update(self.model, pending.step - 1)
        out = dict(zip(pending.names, terms, strict=True))
        out["loss"] = loss_value
        out["grad_norm"] = grad_norm_value
        return out

    def run(
        self,
        steps: int | None = None,
        seconds: float | None = None,
        callback: Callable[[Trainer, dict], None] | None = None,
        progress: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Steps until `steps` more steps (None: until `cfg.steps` in all) or `seconds` of wall-clock (None: no
        limit) have passed, whichever comes first, or until `stop()` (asked after each step) says so. Writes no
        files: `imf.train.train` adds checkpoints, sample grids and `cfg.minutes`. `progress` shows a tqdm bar
        (rank 0 only) with the loss terms and the throughput in images per second. `callback(trainer, metrics)`
        sees the trainer as that step left it (pipelined too: the next step's loss and backward may be queued, its
        draws are not in `state_dict`)."""
        from tqdm.auto import tqdm

        if steps is None:
            steps = max(0, self.cfg.steps - self.step_count)
        history, start, done = [], time.perf_counter(), 0
        bar = tqdm(total=steps, disable=not progress or not self.dist.is_main, unit="step", dynamic_ncols=True)

        def record(metrics: dict) -> bool:
            """Books one finished step; whether to stop."""
            nonlocal done
            metrics["step"] = self.step_count
            metrics["time"] = time.perf_counter() - start
            history.append(metrics)
            done += 1
            bar.update(1)
            bar.set_postfix(
                loss_u=f"{metrics.get('loss_u', metrics['loss']):.3g}",
                loss_v=f"{metrics.get('loss_v', float('nan')):.3g}",
                img_s=f"{done * self.cfg.batch_size / metrics['time']:.0f}",
                refresh=False,
            )
            if callback is not None:
                callback(self, metrics)
            return stop is not None and stop()

        try:
            with frozen_heap():  # the full collection that building the model left due skips the model (~127 ms)
                if self.cfg.pipelined:
                    self._run_pipelined(steps, seconds, start, record)
                else:
                    while (steps is None or done < steps) and (
                        seconds is None or time.perf_counter() - start < seconds
                    ):
                        if record(self.step()):
                            break
        finally:
            bar.close()
        return history

    def _run_pipelined(self, steps: int | None, seconds: float | None, start: float, record) -> None:
        """`run`'s loop, pipelined: queue step k's loss and backward, then read step k-1's numbers (its work is done
        or nearly: it was queued before) and book it, then queue step k's update. A step whose loss and backward were
        queued when the loop ends (stop, an error) is undone: its draws are put back and its gradients dropped."""
        pending: _PendingStep | None = None
        queued = 0
        try:
            while True:
                more = (steps is None or queued < steps) and (seconds is None or time.perf_counter() - start < seconds)
                if more:
                    self._in_flight_draws = self._draw_state()
                    loss, metrics = self._forward_backward()
                if pending is not None:
                    finished, pending = pending, None
                    if record(self._finish(finished)):
                        break
                if not more:
                    break
                pending = self._queue_update(loss, metrics)
                self._in_flight_draws = None
                queued += 1
        finally:
            if self._in_flight_draws is not None:
                self._set_draw_state(self._in_flight_draws)
                self._in_flight_draws = None
                self.opt.zero_grad(set_to_none=True)

    def _draw_state(self) -> dict[str, Any]:
        """What a step draws from: the objective's generator, the global RNG and the data stream's position."""
        data_state = getattr(self.next_batch, "state_dict", None)
        return {
            "generator": self.generator.get_state(),
            "global_rng": torch.get_rng_state(),
            "data": data_state() if data_state is not None else None,
        }

    def _set_draw_state(self, state: dict[str, Any]) -> None:
        """Sets what `_draw_state` (and `state_dict`, under the same keys) returns."""
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["global_rng"])
        if state.get("data") is not None and hasattr(self.next_batch, "load_state_dict"):
            self.next_batch.load_state_dict(state["data"])

    # --- exact resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on: weights, EMA, optimizer, step count, the objective's generator,
        the global RNG and the data stream's position (pipelined, inside `run`'s callback: before the draws of the
        step whose loss and backward are queued, which a resume draws again). The weight, EMA and optimizer
        tensors are the trainer's own (as `nn.Module.state_dict`'s), the rest copies: save it (`save_checkpoint`)
        or clone it before the next step to keep this step's state."""
        draws = self._in_flight_draws if self._in_flight_draws is not None else self._draw_state()
        return {  # under FSDP2 the shards are gathered into whole tensors (call on every rank)
            "model": full_tensors(self.model.state_dict()),
            "ema": self.ema.model.state_dict(),
            "optimizer": full_tensors(self.opt.state_dict()),
            "step_count": self.step_count,
            "generator": draws["generator"],
            "global_rng": draws["global_rng"],
            "data": draws["data"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The whole state `state_dict` returns (`imf.checkpoint.load_checkpoint` with every part); nothing is
        changed when a part is missing."""
        from imf.checkpoint import TRAINER_STATE_KEYS, CheckpointError, load_weights

        missing = [key for key in TRAINER_STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"Trainer.load_state_dict: the state has no {', '.join(missing)}: it takes the whole state "
                "(Trainer.state_dict(), or load_checkpoint(folder) with every part); for the weights alone, "
                "load_checkpoint(folder, parts=('model',)) and model.load_state_dict(state['model'])"
            )
        load_weights(self.model, shard_like(state["model"], self.model.state_dict()), "model weights")
        load_weights(self.ema.model, state["ema"], "EMA weights")
        optimizer = shard_optimizer_state(state["optimizer"], list(self.model.parameters()))
        # how AdamW runs is this trainer's (pipelined: fused), not the checkpoint's; its step counts follow it
        groups = [
            {**saved, **{key: current[key] for key in ("foreach", "fused") if key in current}}
            for saved, current in zip(optimizer["param_groups"], self.opt.param_groups, strict=True)
        ]
        self.opt.load_state_dict({**optimizer, "param_groups": groups})
        self.step_count = int(state["step_count"])
        self._set_draw_state(state)


# --------------------------------------------------------------------------------------------------------
# Data streams: callable, resumable batch sources on the training device
# --------------------------------------------------------------------------------------------------------


class GaussBatches:
    """Endless exact samples of the analytic Gaussian classes (DESIGN 6), drawn from their own generator."""

    def __init__(self, batch_size: int, generator: torch.Generator):
        from imf.gauss import GaussClasses

        self.data = GaussClasses.from_digits()
        self.batch_size, self.generator = batch_size, generator

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.sample(self.batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator_state"])


class DataStream:
    """`stream()` -> (x, y) on `device`; rows without labels get the null class. Delegates its state to the
    underlying `InfiniteLoader` or `GaussBatches`, and says in it whether the data was given `in_memory`
    (`train(..., data=...)`): a resume without those tensors would read the preset's own data instead."""

    def __init__(self, source, num_classes: int, device: torch.device | str = "cpu", in_memory: bool = False):
        self.source, self.num_classes, self.device = source, num_classes, torch.device(device)
        self.in_memory = in_memory

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.source)
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        return to_device(x, self.device), to_device(y, self.device)  # the host does not wait for the device

    def state_dict(self) -> dict[str, Any]:
        return {**self.source.state_dict(), "in_memory": self.in_memory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from imf.data import DataError

        state = dict(state)
        if state.pop("in_memory", False) and not self.in_memory:  # absent in checkpoints before 2026-11-28
            raise DataError(
                "the checkpoint's run trained on tensors given in memory (train(..., data=(x, y))); pass the same "
                "data to resume it (without them it would train on the preset's own data)"
            )
        self.source.load_state_dict(state)


def load_training_data(kind: str, path: str | os.PathLike | None = None, image_size: int | None = None):
    """(x, y) in memory for the `digits`, `folder` and `tensors` data kinds; y may be None (unlabelled)."""
    from imf.data import DataError, load_digits_tensor, load_image_folder, load_tensor_file

    if kind == "digits":
        return load_digits_tensor("train")
    if path is None:
        raise DataError(f"data {kind!r} needs a path: data_path (imf train --data PATH)")
    if kind == "folder":
        return load_image_folder(path, size=image_size)
    if kind == "tensors":
        return load_tensor_file(path)
    raise DataError(f"unknown data kind {kind!r}; choose one of gauss, digits, folder, tensors")


def make_stream(
    preset: Preset,
    data_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> DataStream:
    """The preset's training stream, seeded from `preset.train.seed` (its own generator). Checks that the
    data's shape and labels fit the model; `data` (x, y) in memory is checked as a file's tensors are
    (`imf.data.check_data`: floating x, returned as float32; integer class ids >= 0)."""
    from imf.data import DataError, InfiniteLoader, check_data

    generator = torch.Generator().manual_seed(preset.train.seed + 1)
    m = preset.model
    if data_path is not None and preset.data in ("gauss", "digits"):
        raise DataError(
            f"--data {data_path}: the {preset.name!r} preset trains on its built-in {preset.data} data; --data is "
            "read by the presets that load files (cifar: an image folder, latent-b: an .npz or .safetensors file)"
        )
    if data is not None and data_path is not None:
        raise DataError(f"pass data (tensors in memory) or data_path ({data_path}), not both")
    if preset.data == "gauss":
        if data is not None:
            raise DataError(f"data: the {preset.name!r} preset generates its gauss data; pass no data to it")
        return DataStream(GaussBatches(preset.train.batch_size, generator), m.num_classes, device)
    if data is not None:
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise DataError(f"data must be a pair (x, y) of tensors (y may be None), got {type(data).__name__}")
        x, y = check_data(*data, "data (in memory)")
    else:
        x, y = load_training_data(preset.data, data_path)
    want = (m.image_channels, m.image_size, m.image_size)
    if tuple(x.shape[1:]) != want:
        raise DataError(
            f"data has shape (C, H, W) = {tuple(x.shape[1:])} but the {preset.name!r} model takes {want}; "
            "set preset.model.image_channels / image_size (imf train --channels / --image-size) or use another preset"
        )
    if y is not None and int(y.max()) >= m.num_classes:
        raise DataError(
            f"data has class id {int(y.max())} but the model has {m.num_classes} classes; set "
            "preset.model.num_classes (imf train --num-classes)"
        )
    loader = InfiniteLoader(x, y, preset.train.batch_size, generator)
    return DataStream(loader, m.num_classes, device, in_memory=data is not None)


# --------------------------------------------------------------------------------------------------------
# Configs as JSON, and whole runs
# --------------------------------------------------------------------------------------------------------


def preset_to_dict(preset: Preset) -> dict[str, Any]:
    return dataclasses.asdict(preset)


def preset_from_dict(data: dict[str, Any], source: str = "config") -> Preset:
    """The preset `preset_to_dict` wrote (a checkpoint's config); a CheckpointError naming `source` when it is not
    one, or holds a knob out of range."""
    from imf.checkpoint import CheckpointError

    try:
        return Preset(
            name=data["name"],
            data=data["data"],
            model=ModelConfig(**data["model"]),
            train=TrainConfig(**data["train"]),
            objective=data["objective"],
            objective_options=dict(data.get("objective_options", {})),  # absent before 2026-11-28: none
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source} is not a preset this version reads: {error!r}") from None


def cudnn_benchmark_pays(objective: str, cuda_graph: bool) -> bool:
    """Whether `torch.backends.cudnn.benchmark` suits a training run: only where every step has the same shapes, the
    FM objective or a CUDA-graph step (static rows). The iMF and MF steps draw each step how many rows carry a
    tangent, and cuDNN searches its convolution algorithms again for each new row count: on an H200 (2026-11-27,
    latent-b batch 64, bf16) that made Trainer.step 1.6-2.3 s for most of its first ten steps (127-134 ms without),
    while on fixed shapes the search gained nothing measurable (the fused step 130 / 130 ms with it, 118 / 148 ms
    without; bench/results/nvidia-h200-2026-11-27h-trainer-probe.txt)."""
    if objective not in ("imf", "mf", "fm"):
        raise ValueError(f"cudnn_benchmark_pays: objective must be one of imf, mf, fm, got {objective!r}")
    return objective == "fm" or bool(cuda_graph)


def seed_everything(seed: int) -> None:
    """The global RNG (model initialisation); the objective and the data use their own generators."""
    torch.manual_seed(seed)


def make_preset_objective(preset: Preset):
    """The preset's objective with its settings (`Preset.objective_options`); a ValueError naming an option the
    objective does not have or a value out of its range."""
    from imf.objectives import OBJECTIVES, make_objective

    options = preset.objective_options
    if not isinstance(options, dict):
        raise ValueError(f"Preset: objective_options must be a dict of settings, got {type(options).__name__}")
    if preset.objective in OBJECTIVES:  # else make_objective names the objective
        known = [f.name for f in dataclasses.fields(OBJECTIVES[preset.objective]) if f.name != "name"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"Preset: objective_options {unknown} are not settings of the {preset.objective!r} objective "
                f"({', '.join(known)})"
            )
    return make_objective(preset.objective, **options)


def build_trainer(
    preset: Preset,
    stream: DataStream,
    device: torch.device | str = "cpu",
    *,
    dist: DistInfo | None = None,
    parallel: str = "ddp",
    skip_nonfinite: bool = False,
) -> Trainer:
    seed_everything(preset.train.seed)  # the same initial weights on every rank
    model = IMFNet(preset.model).to(device)
    objective = make_preset_objective(preset)
    generator = torch.Generator().manual_seed(preset.train.seed)
    return Trainer(
        model, objective, stream, preset.train, generator, dist=dist, parallel=parallel, skip_nonfinite=skip_nonfinite
    )


@dataclasses.dataclass
class RunResult:
    trainer: Trainer
    history: list[dict[str, float]]
    seconds: float  # wall-clock of this invocation's training
    stopped_by: str  # "steps", "minutes", or the signal's name ("SIGTERM", "SIGINT")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _SignalFlag:
    """Records SIGINT/SIGTERM instead of dying, so the loop can finish its step and write a checkpoint. Only the
    main thread may install handlers; elsewhere this is a flag that never rises."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# What may change when a run resumes (`train(resume=True)`, `imf train --resume`): the run's identity comes from its
# checkpoint; only the stopping rule, how often files are written and how a step runs (with or without a CUDA graph,
# pipelined or not, the maps channels-last or not: the same loss from the same draws).
RESUMABLE = (
    ("train", "steps"), ("train", "minutes"), ("train", "checkpoint_every"), ("train", "sample_every"),
    ("train", "cuda_graph"), ("train", "pipelined"), ("model", "channels_last"),
)  # fmt: skip


def resumed_preset(saved: Preset, preset: Preset) -> Preset:
    """`saved` (a checkpoint's preset) with the RESUMABLE knobs taken from `preset`."""
    for part, name in RESUMABLE:
        setattr(getattr(saved, part), name, getattr(getattr(preset, part), name))
    return saved


def check_resumed_preset(saved: Preset, preset: Preset, source: str) -> None:
    """A CheckpointError naming every field of `preset` outside RESUMABLE that differs from the checkpoint's run
    `saved` (old -> new): a resumed run continues the run the checkpoint describes."""
    from imf.checkpoint import CheckpointError

    resumable = {f"{part}.{name}" for part, name in RESUMABLE}

    def fields(p: Preset) -> dict[str, Any]:
        flat = {}
        for key, value in preset_to_dict(p).items():
            for name, inner in value.items() if isinstance(value, dict) else [(None, value)]:
                flat[key if name is None else f"{key}.{name}"] = inner
        return {key: value for key, value in flat.items() if key not in resumable}

    old, new = fields(saved), fields(preset)
    changed = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in {**old, **new} if old.get(key) != new.get(key)
    ]
    if changed:
        raise CheckpointError(
            f"train: resume=True continues the run {source} describes; the preset's {', '.join(changed)} would "
            "change it (pass preset=None to continue it as saved, or start a new run in another folder)"
        )


def train(
    preset: Preset | str | None,
    out: str | os.PathLike,
    *,
    data_path: str | os.PathLike | None = None,
    data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    parallel: str = "ddp",
    skip_nonfinite: bool = False,
) -> RunResult:
    """Trains `preset` (a Preset or a preset's name) until `preset.train.steps` total steps or
    `preset.train.minutes` of wall-clock, writing checkpoints to `out` (every `checkpoint_every` steps and at the
    end) and sample grids to `out/samples` (every `sample_every` steps and at the end). `data` gives the (x, y)
    tensors in memory instead of reading `data_path`.

    `resume` continues the checkpoint in `out` exactly: with preset=None as saved (its own steps and minutes),
    with a preset the knobs of imf.train.RESUMABLE (when it stops, how often it writes, how a step runs) from it,
    and a CheckpointError if it differs from the saved run in any other field. Without `resume`, a folder that
    holds a checkpoint is refused unless `overwrite` (which replaces the run's files there).

    Under `torchrun` every rank runs this: it joins the process group, trains its slice of each global batch
    (`parallel` "ddp" or "fsdp"), and only rank 0 logs and writes files. A checkpoint resumes on any world size.
    A NaN or inf loss raises `NonFiniteLossError` naming the step and the last good checkpoint, unless
    `skip_nonfinite`; SIGINT/SIGTERM end the run after the current step with a checkpoint (`stopped_by` says
    which signal)."""
    from imf.checkpoint import MANIFEST, CheckpointError, load_checkpoint, read_history, save_checkpoint
    from imf.distributed import init_distributed, rank_device
    from imf.evaluate import class_omega_samples
    from imf.plots import save_sample_grid

    out = Path(out)
    check_flags("train", resume=resume, overwrite=overwrite)
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif preset is None and not resume:
        raise ValueError("train: preset is required (a Preset or a preset's name) unless resume=True")
    elif preset is not None and not isinstance(preset, Preset):
        raise TypeError(f"train: preset must be a Preset, a preset's name or None, got {type(preset).__name__}")
    if not resume and not overwrite and (out / MANIFEST).is_file():
        raise CheckpointError(
            f"train: {out} already holds a checkpoint; pass resume=True to continue it, overwrite=True to replace "
            "it, or another folder"
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"train: device must be a torch device or its name (cpu, cuda, cuda:1), got {device!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train: device {device}, but no CUDA device is visible here (torch.cuda.is_available())")
    dist = init_distributed(device)
    device = rank_device(device, dist)
    if not dist.is_main:
        log = lambda message: None  # noqa: E731 (rank 0 speaks for the job)
    history: list[dict[str, float]] = []
    last_good: tuple[Path, int] | None = None
    if resume:
        manifest, state = load_checkpoint(out)
        saved = preset_from_dict(manifest["config"], f"checkpoint: {out}/{MANIFEST}'s config")
        if preset is None:
            preset = saved
        else:
            check_resumed_preset(saved, preset, f"the checkpoint in {out}")
            if preset.train.steps > saved.train.steps and saved.train.cooldown > 0:
                log(
                    f"note: steps {saved.train.steps} -> {preset.train.steps} with cooldown {saved.train.cooldown:g}: "
                    "the learning rate follows the new schedule from here (a run past its cooldown rises again)"
                )
            preset = resumed_preset(saved, preset)
        history = read_history(out, manifest)
        last_good = (out, int(manifest["step"]))
    stream = make_stream(preset, data_path, device, data=data)
    trainer = build_trainer(preset, stream, device, dist=dist, parallel=parallel, skip_nonfinite=skip_nonfinite)
    if resume:
        trainer.load_state_dict(state)
        log(f"resumed {out} at step {trainer.step_count} on {dist.world_size} process(es)")
    cfg = preset.train
    config = preset_to_dict(preset)
    classes = list(range(min(10, preset.model.num_classes)))
    noise_generator = torch.Generator().manual_seed(cfg.seed + 2)
    sample_noise = torch.randn(4 * len(classes), *_image_shape(preset), generator=noise_generator)

    def write_samples(tr: Trainer) -> None:
        """EMA weights, 1-NFE, omega 1, default interval: one row per class."""
        if dist.is_main:
            samples = class_omega_samples(tr.ema.model, sample_noise, classes, [1.0])
            save_sample_grid(samples, [1.0], classes, out / "samples" / f"step_{tr.step_count:08d}.png")

    def save(tr: Trainer) -> None:
        nonlocal last_good
        state = tr.state_dict()  # on every rank: FSDP2 gathers the shards here
        if dist.is_main:
            save_checkpoint(out, state, config, history)
        last_good = (out, tr.step_count)

    def callback(tr: Trainer, metrics: dict) -> None:
        history.append({k: round(v, 6) if math.isfinite(v) else v for k, v in metrics.items() if k != "time"})
        if metrics.get("skipped"):
            log(f"skipped step {tr.step_count}: loss is {metrics['loss']} (--skip-nonfinite)")
        if cfg.sample_every and tr.step_count % cfg.sample_every == 0:
            write_samples(tr)
        if cfg.checkpoint_every and tr.step_count % cfg.checkpoint_every == 0:
            save(tr)

    remaining = max(0, cfg.steps - trainer.step_count)
    seconds = None if cfg.minutes is None else 60.0 * cfg.minutes
    start = time.perf_counter()
    with _SignalFlag() as signals:

        def stop() -> bool:
            # every rank must agree (a signal may reach one rank, clocks differ), so the decision is all-reduced
            late = dist.enabled and seconds is not None and time.perf_counter() - start >= seconds
            return any_rank(signals.received is not None or late, dist, device)

        try:
            trainer.run(
                steps=remaining,
                seconds=None if dist.enabled else seconds,
                callback=callback,
                progress=progress,
                stop=stop,
            )
        except NonFiniteLossError as error:
            raise NonFiniteLossError(error.step, error.value, last_good, known=True) from None
        elapsed = time.perf_counter() - start
        save(trainer)
        write_samples(trainer)
    received = any_rank(signals.received is not None, dist, device)
    if trainer.step_count >= cfg.steps:
        stopped_by = "steps"
    elif received:
        name = signal.Signals(signals.received).name if signals.received is not None else "a signal"
        stopped_by = name
        log(f"stopped by {name} at step {trainer.step_count}; checkpoint: {out}")
    else:
        stopped_by = "minutes"
    return RunResult(trainer, history, elapsed, stopped_by)


def _image_shape(preset: Preset) -> tuple[int, int, int]:
    m = preset.model
    return (m.image_channels, m.image_size, m.image_size)
