"""Sampling (DESIGN 2.4): N steps from t = 1 to 0, z <- z - (t - r) u(z, h = t - r, omega, interval, y).

1-NFE is x = e - u(e, h = 1, ...). Only the u-head runs and there is no CFG doubling: omega and the guidance
interval are plain inputs, changed per call without retraining. `euler=True` evaluates u at h = 0 (the
instantaneous velocity), which is how a flow-matching model is sampled.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from imf.model import Cond

DEFAULT_INTERVAL = (0.4, 0.65)  # interior: rows with r != t never saw (0, 1) in training (DESIGN 2.4)


def check_guidance(omega: float, interval: tuple[float, float]) -> None:
    if not omega >= 1.0:
        raise ValueError(f"omega must be >= 1 (1 = no guidance), got {omega}")
    t_min, t_max = interval
    if not (0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"interval must satisfy 0 <= t_min <= t_max <= 1, got ({t_min}, {t_max})")


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    omega: float = 1.0,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    steps: int = 1,
    euler: bool = False,
) -> torch.Tensor:
    """Samples from noise e ~ N(0, I) of shape (B, C, H, W) with class ids y (B,)."""
    check_guidance(omega, interval)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, dev = noise.shape[0], noise.device
    full = lambda value: torch.full((b,), float(value), device=dev)
    t_steps = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, r in zip(t_steps[:-1], t_steps[1:], strict=True):
        cond = Cond(
            h=full(0.0 if euler else t - r),
            y=y,
            omega=full(omega),
            t_min=full(interval[0]),
            t_max=full(interval[1]),
            t=full(t),
        )
        z = z - (t - r) * model.u(z, cond)
    return z
