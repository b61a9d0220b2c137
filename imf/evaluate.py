"""Evaluation across the guidance scale ("the quality slider"): for digits, the class accuracy of conditional
1-NFE samples and Frechet distances (pixels and the digits classifier's features) against the training digits,
beside the real-data floor and a 32-step Euler sample of the v-head; for gauss, the exact errors (DESIGN 6).

Every result says which sampling interval, number of steps and seed it used (`imf eval` adds the checkpoint, its
step and the weights). Samples are drawn for the data's classes only (a model may have more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from imf.checks import check_int
from imf.model import Cond
from imf.sampler import DEFAULT_INTERVAL, check_guidance, check_noise_and_labels, check_steps, sample

DEFAULT_OMEGAS = (1.0, 2.0, 4.0, 8.0)


@torch.no_grad()
def sample_v_head(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 32,
    omega: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Euler steps z <- z - (t - r) v(z, t) of the v-head from t = 1 to 0, at h = 0. The default interval is
    (0, 1), the one the training targets ask the v-head for (v_c, v_u, v_c' are all evaluated there)."""
    check_guidance(omega, interval)
    check_steps(steps)
    check_noise_and_labels(model, noise, y)
    b, dev = noise.shape[0], noise.device
    full = lambda value: torch.full((b,), float(value), device=dev)
    t_steps = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, r in zip(t_steps[:-1], t_steps[1:], strict=True):
        cond = Cond(h=full(0.0), y=y, omega=full(omega), t_min=full(interval[0]), t_max=full(interval[1]), t=full(t))
        z = z - (t - r) * model.v(z, cond)
    return z


@torch.no_grad()
def class_omega_samples(
    model: nn.Module,
    noise: torch.Tensor,
    classes: Sequence[int],
    omegas: Sequence[float],
    *,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    steps: int = 1,
) -> torch.Tensor:
    """Samples (len(omegas), len(classes), per_class, C, H, W) with `noise` (len(classes) * per_class, C, H, W):
    the same noise in every omega column, so a grid shows what the slider alone changes."""
    if not classes or not omegas:
        raise ValueError(f"class_omega_samples: classes and omegas must not be empty, got {classes!r} and {omegas!r}")
    if noise.shape[0] < len(classes):
        raise ValueError(
            f"class_omega_samples: noise needs a row per class at least, got {noise.shape[0]} for {len(classes)}"
        )
    dev = next(model.parameters()).device
    per_class = noise.shape[0] // len(classes)
    y = torch.tensor(list(classes), device=dev).repeat_interleave(per_class)
    noise = noise[: len(y)].to(dev)
    out = [sample(model, noise, y, omega=omega, interval=interval, steps=steps).cpu() for omega in omegas]
    return torch.stack(out).view(len(omegas), len(classes), per_class, *noise.shape[1:])


def _balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def _check_evaluation(
    name: str, model: nn.Module, image_shape: tuple, num_classes: int, omegas: Sequence[float], n: int, seed: int
) -> None:
    """The model fits the evaluation's data (its image shape, at least its classes), n >= 2, omegas given, an int
    seed."""
    cfg = model.cfg
    got = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if got != tuple(image_shape) or cfg.num_classes < num_classes:
        raise ValueError(
            f"{name}: the model must take images of shape {tuple(image_shape)} and at least {num_classes} classes "
            f"(the data's), got {got} and {cfg.num_classes}"
        )
    check_int(name, "n", n, 2, " (a covariance needs two samples)")
    if type(seed) is not int:
        raise ValueError(f"{name}: seed must be an int, got {seed!r}")
    try:
        count = len(omegas)
    except TypeError:
        count = 0
    if not count:
        raise ValueError(f"{name}: omegas must be a non-empty sequence of guidance scales, got {omegas!r}")


def evaluate_digits(
    model: nn.Module,
    *,
    omegas: Sequence[float] = DEFAULT_OMEGAS,
    n: int = 1000,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    steps: int = 1,
    v_head_steps: int = 32,
    seed: int = 0,
    classifier=None,
) -> dict:
    """Metrics of conditional samples (n, classes balanced) at each omega against the training digits.
    Samples are clamped to [-1, 1], the range of the data, as any image output is."""
    from imf.data import load_digits_tensor
    from imf.metrics import DigitsClassifier, digits_metrics, real_data_floor

    _check_evaluation("evaluate_digits", model, (1, 8, 8), 10, omegas, n, seed)
    for omega in omegas:
        check_guidance(omega, interval)
    classifier = classifier if classifier is not None else DigitsClassifier.pretrained()
    x_train, _ = load_digits_tensor("train")
    dev = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    y = _balanced_labels(n, 10)  # the digits' classes (a model of more classes would be scored on ids it never saw)
    noise = torch.randn(n, 1, 8, 8, generator=generator)
    per_omega = []
    for omega in omegas:
        x = sample(model, noise.to(dev), y.to(dev), omega=omega, interval=interval, steps=steps).cpu()
        metrics = digits_metrics(x.clamp(-1, 1), y, classifier, x_train)
        per_omega.append({"omega": float(omega), **metrics})
    result = {
        "data": "digits",
        "sampler": {"steps": steps, "interval": list(interval), "n_samples": n, "seed": seed, "clamped": True},
        "reference": "training digits (1437)",
        "per_omega": per_omega,
        "classifier_test_accuracy": classifier.test_accuracy,
        "real_data_floor": real_data_floor(classifier),
    }
    if v_head_steps and getattr(model, "v_level", None) is not None:
        x = sample_v_head(model, noise.to(dev), y.to(dev), steps=v_head_steps).cpu()
        result["v_head_euler"] = {
            "steps": v_head_steps,
            "omega": 1.0,
            "interval": [0.0, 1.0],
            **digits_metrics(x.clamp(-1, 1), y, classifier, x_train),
        }
    return result


def evaluate_gauss(
    model: nn.Module,
    *,
    omegas: Sequence[float] = DEFAULT_OMEGAS,
    n: int = 512,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    steps: int = 1,
    v_head_steps: int = 32,
    seed: int = 1234,
) -> dict:
    """Exact errors on the analytic Gaussian classes: the relative one-step error at each omega (1.0 = as bad
    as returning the class mean), the relative error of u over random (z, r, t), and the v-head's Euler error."""
    from imf.gauss import GaussClasses, one_step_error, relative_error, u_error

    data = GaussClasses.from_digits()
    _check_evaluation("evaluate_gauss", model, data.image_shape, data.num_classes, omegas, n, seed)
    for omega in omegas:
        check_guidance(omega, interval)
    per_omega = [
        {"omega": float(omega), "sample_error": one_step_error(model, data, n, omega, interval, steps, seed=seed)}
        for omega in omegas
    ]
    result = {
        "data": "gauss",
        "sampler": {"steps": steps, "interval": list(interval), "n_samples": n, "seed": seed},
        "reference": "exact map of the same noise (omega > 1: guided field over the whole path, RK4)",
        "per_omega": per_omega,
        "u_error": u_error(model, data, n),
    }
    if v_head_steps and getattr(model, "v_level", None) is not None:
        generator = torch.Generator().manual_seed(seed)
        y = torch.randint(0, data.num_classes, (n,), generator=generator)
        e = torch.randn(n, data.dim, generator=generator, dtype=torch.float64)
        dev = next(model.parameters()).device
        x = sample_v_head(model, e.float().view(n, *data.image_shape).to(dev), y.to(dev), steps=v_head_steps)
        result["v_head_euler"] = {
            "steps": v_head_steps,
            "omega": 1.0,
            "sample_error": relative_error(x.cpu(), data.one_step_map(e, y), data.mu[y]),
        }
    return result


def evaluate(model: nn.Module, data: str, **kwargs) -> dict:
    """`evaluate_digits` or `evaluate_gauss` by the preset's data kind."""
    if data == "digits":
        return evaluate_digits(model, **kwargs)
    if data == "gauss":
        return evaluate_gauss(model, **kwargs)
    raise ValueError(f"evaluate: metrics exist for the digits and gauss data only, got {data!r}")
