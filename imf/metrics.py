"""Evaluation: the Frechet distance between Gaussians fitted to two feature sets, a small digits classifier
(class accuracy of conditional samples and a feature space for the Frechet distance), and the real-data floor
those numbers should be read against.

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imf.data import load_digits_tensor

# --------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------


def _as_float64_rows(feats: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().to("cpu", torch.float64).numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim < 2 or feats.shape[0] < 2:
        raise ValueError(f"frechet_distance: {name} must be (N, ...) with N >= 2 rows, got shape {tuple(feats.shape)}")
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).sum())
        raise ValueError(f"frechet_distance: {name} has {bad} non-finite values (NaN or inf)")
    return feats.reshape(feats.shape[0], -1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; round-off can leave
    eigenvalues of a singular covariance slightly negative, and those are set to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two sets of rows (N, ...),
    each flattened to (N, D), computed in float64.

    tr((S_a S_b)^1/2) is taken as tr((S_a^1/2 S_b S_a^1/2)^1/2): the same eigenvalues, but of a symmetric PSD
    matrix, so a symmetric eigensolver gives them stably even when both covariances are singular (e.g. the
    always-blank corner pixels of the digits)."""
    a = _as_float64_rows(feats_a, "feats_a")
    b = _as_float64_rows(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"frechet_distance: feats_a and feats_b must have the same feature size, got {a.shape[1]} and {b.shape[1]}"
        )
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    cov_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
    sqrt_cov_a = _psd_sqrt(cov_a)
    middle = sqrt_cov_a @ cov_b @ sqrt_cov_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    # Identical sets give 0 up to round-off, which may be a tiny negative number; a distance is >= 0.
    return max(distance, 0.0)


# --------------------------------------------------------------------------------------------------------
# Digits classifier
# --------------------------------------------------------------------------------------------------------

CACHE_ENV = "IMF_CACHE"
# Bump when the architecture or the training recipe changes, so cached weights of an older one are retrained.
CLASSIFIER_VERSION = "1"


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """The classifier runs on one CPU thread: for a network this small, intra-op threads only add
    synchronisation, and on a loaded 2-core machine they made training 30x and inference 4x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_dir() -> Path:
    """Where trained helper weights are cached: $IMF_CACHE, else $XDG_CACHE_HOME/imf, else ~/.cache/imf."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imf"


class DigitsClassifier(nn.Module):
    """A small CNN for the 8x8 digits: conv3x3(1->16) ReLU, conv3x3(16->32) ReLU, maxpool 2, linear(512->64)
    ReLU (the feature layer), linear(64->10). Trained on the training split of `load_digits_tensor`; about
    99% held-out accuracy.

    Use `DigitsClassifier.pretrained()`: it loads cached weights or trains (about 6 s on one CPU core)."""

    feature_dim = 64
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self.test_accuracy = float("nan")

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsClassifier: x must be (N, 1, 8, 8) in [-1, 1], got shape {tuple(x.shape)}")
        return x.detach().to(self.head.weight.device, torch.float32)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10)."""
        return self.head(self._features(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (N, 64), the feature space of the feature Frechet distance."""
        with _one_cpu_thread():
            return self._features(self._check(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class ids (N,) int64."""
        with _one_cpu_thread():
            return self.forward(self._check(x)).argmax(dim=1)

    @classmethod
    def _initialised(cls, seed: int) -> DigitsClassifier:
        # nn.Module initialisation draws from the global RNG; fork it so that building or loading the
        # classifier in the middle of a training run leaves that run's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls()

    @classmethod
    def train_new(cls, seed: int = 0, split_seed: int = 0, epochs: int = 20) -> DigitsClassifier:
        """Train on the digits training split (deterministic for a given seed on a given machine) and measure
        the held-out test accuracy."""
        with _one_cpu_thread():
            return cls._train(seed, split_seed, epochs)

    @classmethod
    def _train(cls, seed: int, split_seed: int, epochs: int) -> DigitsClassifier:
        x, y = load_digits_tensor("train", seed=split_seed)
        generator = torch.Generator().manual_seed(seed)
        model = cls._initialised(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        batch_size = 64
        steps_per_epoch = (len(x) + batch_size - 1) // batch_size
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                index = order[start : start + batch_size]
                # One-pixel random shifts: a classifier that is not fooled by small misalignments.
                shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
                batch = torch.roll(x[index], shifts=shift, dims=(2, 3))
                loss = F.cross_entropy(model(batch), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        model.test_accuracy = model.measure_test_accuracy(split_seed)
        return model

    def measure_test_accuracy(self, split_seed: int = 0) -> float:
        x_test, y_test = load_digits_tensor("test", seed=split_seed)
        return float((self.predict(x_test) == y_test.to(self.head.weight.device)).double().mean())

    @classmethod
    def pretrained(cls, seed: int = 0, split_seed: int = 0, path: str | os.PathLike | None = None) -> DigitsClassifier:
        """Cached weights from `path` (default `cache_dir() / "digits_classifier.safetensors"`) when they are
        there, readable and from the same version and seeds; otherwise train and cache (atomic write)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file, save_file

        file = Path(path) if path is not None else cache_dir() / "digits_classifier.safetensors"
        expected = {"version": CLASSIFIER_VERSION, "seed": str(seed), "split_seed": str(split_seed)}
        model = cls._initialised(seed)
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if all(metadata.get(key) == value for key, value in expected.items()):
                model.load_state_dict(load_file(str(file)))
                model.eval()
                model.test_accuracy = model.measure_test_accuracy(split_seed)
                return model
        except (OSError, SafetensorError, RuntimeError, ValueError):
            pass  # missing, corrupt or mismatched weights: retrain below
        model = cls.train_new(seed=seed, split_seed=split_seed)
        metadata = dict(expected, test_accuracy=f"{model.test_accuracy:.6f}")
        weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temp_name = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
            os.close(descriptor)
            try:
                save_file(weights, temp_name, metadata=metadata)
                os.chmod(temp_name, 0o644)  # mkstemp creates 0600; a cache is fine to share read-only
                os.replace(temp_name, file)  # atomic: a reader never sees a half-written file
            finally:
                if os.path.exists(temp_name):
                    os.remove(temp_name)
        except OSError as error:
            # The cache only saves time: a read-only or full disk costs a retrain next time, nothing more.
            warnings.warn(f"DigitsClassifier: could not cache weights at {file}: {error}", stacklevel=2)
        return model


# --------------------------------------------------------------------------------------------------------
# Digits metrics and the real-data floor
# --------------------------------------------------------------------------------------------------------


def digits_metrics(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    classifier: DigitsClassifier,
    reference_x: torch.Tensor,
) -> dict[str, float]:
    """Metrics of generated digits (N, 1, 8, 8) in [-1, 1] (not clamped here) against real ones (usually the
    training digits): `class_accuracy`, the fraction classified as their conditioning label (only when
    `labels` is given), `fd_pixel`, the Frechet distance of the flattened pixels, and `fd_features`, the
    Frechet distance in the classifier's feature space."""
    if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 8, 8) or samples.shape[0] < 2:
        raise ValueError(f"digits_metrics: samples must be (N, 1, 8, 8) with N >= 2, got shape {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).sum())
        raise ValueError(f"digits_metrics: samples have {bad} non-finite values (NaN or inf)")
    metrics = {}
    if labels is not None:
        if labels.shape != (samples.shape[0],):
            raise ValueError(
                f"digits_metrics: labels must be (N,) = ({samples.shape[0]},), got shape {tuple(labels.shape)}"
            )
        predicted = classifier.predict(samples).cpu()
        metrics["class_accuracy"] = float((predicted == labels.cpu()).double().mean())
    metrics["fd_pixel"] = frechet_distance(samples, reference_x)
    metrics["fd_features"] = frechet_distance(classifier.features(samples), classifier.features(reference_x))
    return metrics


def real_data_floor(classifier: DigitsClassifier | None = None, split_seed: int = 0) -> dict[str, float]:
    """The metrics of held-out real digits against the training digits: the best a generator trained on the
    training split can be expected to score at this sample size (`class_accuracy` is the classifier's own
    test accuracy)."""
    classifier = classifier if classifier is not None else DigitsClassifier.pretrained(split_seed=split_seed)
    x_train, _ = load_digits_tensor("train", seed=split_seed)
    x_test, y_test = load_digits_tensor("test", seed=split_seed)
    return digits_metrics(x_test, y_test, classifier, x_train)
