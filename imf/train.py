"""The training loop core: AdamW (betas 0.9/0.95, no weight decay), linear warm-up then constant lr, gradient
clipping, EMA of the weights. One `Trainer.step()` is one objective step on one batch."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from imf.config import TrainConfig


class EMA:
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # warm-start: average over the steps seen so far while that is shorter than the EMA's horizon
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective,
        next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        cfg: TrainConfig,
        generator: torch.Generator | None = None,
    ):
        self.model, self.objective, self.next_batch, self.cfg = model, objective, next_batch, cfg
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.ema = EMA(model, cfg.ema_decay)
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def step(self) -> dict[str, float]:
        self.model.train()
        x, y = self.next_batch()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        loss, metrics = self.objective.loss(self.model, x, y, self.generator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.model, self.step_count)
        self.step_count += 1
        out = {k: float(v) for k, v in metrics.items()}
        out["grad_norm"] = float(grad_norm)
        return out

    def run(self, steps: int | None = None, seconds: float | None = None, callback=None) -> list[dict]:
        """Steps until `steps` more steps or `seconds` of wall-clock have passed (whichever comes first)."""
        history, start, done = [], time.perf_counter(), 0
        while (steps is None or done < steps) and (seconds is None or time.perf_counter() - start < seconds):
            metrics = self.step()
            metrics["step"] = self.step_count
            metrics["time"] = time.perf_counter() - start
            history.append(metrics)
            done += 1
            if callback is not None:
                callback(self, metrics)
        return history
