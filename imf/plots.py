"""PNG figures: sample grids (rows = classes, column blocks = omega), the loss curve and the quality-diversity
plot over omega. Every file is written atomically (temporary file, then rename)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from imf.checkpoint import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    plt = _figure()
    atomic_write(path, lambda name: fig.savefig(name, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def _to_display(images: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) in [-1, 1] -> (..., H, W, 3) in [0, 1]; one channel is grey, more than three show the
    first three (latents)."""
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    x = x.repeat_interleave(3, dim=-3) if x.shape[-3] == 1 else x[..., :3, :, :]
    if x.shape[-3] == 2:
        x = torch.cat([x, x[..., :1, :, :]], dim=-3)
    return x.movedim(-3, -1).numpy()


def tile(samples: torch.Tensor, pad: int = 1, block_pad: int = 3) -> np.ndarray:
    """(O, K, P, C, H, W) -> one (H', W', 3) image: K rows; per row, O blocks of P images side by side."""
    o, k, p, _, h, w = samples.shape
    pixels = _to_display(samples)
    block_w = p * (w + pad) - pad
    canvas = np.ones((k * (h + pad) - pad, o * (block_w + block_pad) - block_pad, 3))
    for i in range(o):
        for row in range(k):
            for j in range(p):
                top, left = row * (h + pad), i * (block_w + block_pad) + j * (w + pad)
                canvas[top : top + h, left : left + w] = pixels[i, row, j]
    return canvas


def save_sample_grid(
    samples: torch.Tensor,
    omegas: Sequence[float],
    classes: Sequence[int],
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Samples (O, K, P, C, H, W) from `imf.evaluate.class_omega_samples` as a labelled grid."""
    plt = _figure()
    o, k, p, _, h, w = samples.shape
    canvas = tile(samples)
    fig, ax = plt.subplots(figsize=(max(3.0, canvas.shape[1] / 14), max(3.0, canvas.shape[0] / 14)))
    ax.imshow(canvas, interpolation="nearest")
    block_w = p * (w + 1) - 1
    ax.set_xticks([i * (block_w + 3) + block_w / 2 - 0.5 for i in range(o)])
    ax.set_xticklabels([f"omega = {omega:g}" for omega in omegas])
    ax.xaxis.tick_top()
    ax.set_yticks([row * (h + 1) + h / 2 - 0.5 for row in range(k)])
    ax.set_yticklabels([str(c) for c in classes])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_xlabel(title)
    _save(fig, path)


def save_loss_curve(history: Sequence[dict], path: str | os.PathLike) -> None:
    """The raw loss terms (per-sample sums, before the adaptive weighting that makes the total ~2) against the
    step, with a running mean over 50 steps (over a fifth of a shorter run), on a log scale."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.array([h["step"] for h in history])
    # the iMF/MF terms when the objective reports them, else the total (flow matching)
    keys = [k for k in ("loss_u", "loss_v") if history and k in history[0]] or ["loss"]
    for key in keys:
        values = np.array([h[key] for h in history], dtype=np.float64)
        window = max(1, min(50, len(values) // 5))  # a curve of at least ~5 windows on a short run
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        line = ax.plot(steps, values, alpha=0.25, lw=0.8)[0]
        ax.plot(steps[window - 1 :], smooth, color=line.get_color(), label=f"{key} (mean of {window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-sample loss")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def save_quality_plot(result: dict, path: str | os.PathLike) -> None:
    """The quality slider: FD (pixels and features) and class accuracy against omega for digits, the exact
    one-step error against omega for gauss."""
    plt = _figure()
    rows = result["per_omega"]
    omegas = [r["omega"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sampler = result["sampler"]
    ax.set_title(f"{sampler['steps']}-step samples, interval {tuple(sampler['interval'])}, n = {sampler['n_samples']}")
    if result["data"] == "digits":
        ax.plot(omegas, [r["fd_pixel"] for r in rows], "o-", label="FD, pixels")
        ax.plot(omegas, [r["fd_features"] for r in rows], "s-", label="FD, classifier features")
        ax.axhline(result["real_data_floor"]["fd_pixel"], ls=":", color="C0", label="real-data floor, pixels")
        ax.set_ylabel("Frechet distance to training digits")
        right = ax.twinx()
        right.plot(omegas, [100 * r["class_accuracy"] for r in rows], "^--", color="C2", label="class accuracy")
        right.set_ylabel("class accuracy (%)")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    else:
        ax.plot(omegas, [r["sample_error"] for r in rows], "o-", label="relative error vs exact map")
        ax.set_ylabel("relative sample error")
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(omegas)
    ax.set_xticklabels([f"{o:g}" for o in omegas])
    ax.set_xlabel("omega (guidance scale)")
    ax.grid(alpha=0.3)
    _save(fig, path)
