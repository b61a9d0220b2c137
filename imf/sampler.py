"""Sampling (DESIGN 2.4): N steps from t = 1 to 0, z <- z - (t - r) u(z, h = t - r, omega, interval, y).

1-NFE is x = e - u(e, h = 1, ...). Only the u-head runs and there is no CFG doubling: omega and the guidance
interval are plain inputs, changed per call without retraining. `euler=True` evaluates u at h = 0 (the
instantaneous velocity), which is how a flow-matching model is sampled.

u runs through the model's fused primal ops (`IMFNet.fused_u`) when it has them. `bf16=True` runs the network
under bf16 autocast (the update of z stays in the noise's dtype). `CudaGraphSampler` captures the whole N-step
loop for one batch shape as a CUDA graph and replays it; omega and the interval stay runtime inputs there too.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from imf.checks import check_int, is_real
from imf.model import Cond, check_model_batch

DEFAULT_INTERVAL = (0.4, 0.65)  # interior: rows with r != t never saw (0, 1) in training (DESIGN 2.4)


def check_guidance(omega: float, interval: tuple[float, float]) -> None:
    if not is_real(omega):
        raise TypeError(f"omega must be a number (one guidance scale for the batch), got {type(omega).__name__}")
    if not (isinstance(interval, (tuple, list)) and len(interval) == 2):
        raise TypeError(f"interval must be a pair (t_min, t_max), got {interval!r}")
    if not all(is_real(t) for t in interval):
        raise TypeError(f"interval must be a pair of numbers (t_min, t_max), got {interval!r}")
    if not 1.0 <= omega < math.inf:
        raise ValueError(f"omega must be a finite number >= 1 (1 = no guidance), got {omega}")
    t_min, t_max = interval
    if not (0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"interval must satisfy 0 <= t_min <= t_max <= 1, got ({t_min}, {t_max})")


def _u_of(model: nn.Module):
    return model.fused_u if getattr(model, "takes_tangents", False) else model.u


def _steps(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    omega: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    steps: int,
    euler: bool,
    bf16: bool,
) -> torch.Tensor:
    """The N-step loop on per-row condition tensors (B,): shared by `sample` and the captured graph."""
    u_of = _u_of(model)
    full = lambda value: torch.full_like(omega, float(value))
    t_steps = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, r in zip(t_steps[:-1], t_steps[1:], strict=True):
        cond = Cond(h=full(0.0 if euler else t - r), y=y, omega=omega, t_min=t_min, t_max=t_max, t=full(t))
        with torch.autocast(device_type=noise.device.type, dtype=torch.bfloat16, enabled=bf16):
            u = u_of(z, cond)
        z = z - (t - r) * u.to(z.dtype)
    return z


def check_steps(steps: int) -> None:
    check_int(None, "steps", steps, 1)


def check_noise_and_labels(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, same_device: bool = True) -> None:
    """`imf.model.check_model_batch` of the sampler's inputs, the class ids' range included where y is on the CPU."""
    check_model_batch(model, noise, y, names=("noise", "y"), class_range=True, same_device=same_device)


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
    bf16: bool = False,
) -> torch.Tensor:
    """Samples from noise e ~ N(0, I) of shape (B, C, H, W) with class ids y (B,)."""
    check_guidance(omega, interval)
    check_steps(steps)
    check_noise_and_labels(model, noise, y)
    full = lambda value: torch.full((noise.shape[0],), float(value), device=noise.device)
    return _steps(model, noise, y, full(omega), full(interval[0]), full(interval[1]), steps, euler, bf16)


def capture_cuda_graph(run, warmup: int = 3):
    """(graph, what run() returned under capture): `warmup` calls of run() on a side stream first (lazy init,
    autotuning and the allocator outside the capture), then one captured; graph.replay() reruns it in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


class CudaGraphSampler:
    """`sample` for one fixed batch shape, captured once as a CUDA graph and replayed on each call (batch-1
    latency is launch-bound without it). noise, y, omega and the interval are copied into the graph's static
    inputs, so they change per call without a new capture; the model's weights are read at replay time."""

    def __init__(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        *,
        steps: int = 1,
        euler: bool = False,
        bf16: bool = False,
        warmup: int = 3,
    ):
        check_steps(steps)
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphSampler: the model must be on a CUDA device, got {device}")
        self.model = model
        self.shape = tuple(shape)
        cfg = getattr(model, "cfg", None)
        want = None if cfg is None else (cfg.image_channels, cfg.image_size, cfg.image_size)
        if len(self.shape) != 4 or self.shape[0] < 1 or (want is not None and self.shape[1:] != want):
            raise ValueError(
                f"CudaGraphSampler: shape must be (B >= 1, {', '.join(map(str, want or 'CHW'))}), got {shape}"
            )
        b = self.shape[0]
        self.noise = torch.randn(self.shape, device=device)
        self.y = torch.zeros(b, dtype=torch.long, device=device)
        self.omega = torch.ones(b, device=device)
        self.t_min = torch.full((b,), DEFAULT_INTERVAL[0], device=device)
        self.t_max = torch.full((b,), DEFAULT_INTERVAL[1], device=device)
        run = lambda: _steps(model, self.noise, self.y, self.omega, self.t_min, self.t_max, steps, euler, bf16)
        with torch.no_grad():
            self.graph, self.out = capture_cuda_graph(run, warmup)

    @torch.no_grad()
    def __call__(
        self,
        noise: torch.Tensor,
        y: torch.Tensor,
        *,
        omega: float = 1.0,
        interval: tuple[float, float] = DEFAULT_INTERVAL,
    ) -> torch.Tensor:
        check_guidance(omega, interval)
        if tuple(noise.shape) != self.shape:
            got = tuple(noise.shape)
            raise ValueError(f"CudaGraphSampler: noise must have the captured shape {self.shape}, got {got}")
        check_noise_and_labels(self.model, noise, y, same_device=False)  # copied into the graph's inputs
        self.noise.copy_(noise)
        self.y.copy_(y)
        self.omega.fill_(omega)
        self.t_min.fill_(interval[0])
        self.t_max.fill_(interval[1])
        self.graph.replay()
        return self.out.clone()
