"""Training data: scikit-learn digits, image folders, npz / safetensors tensor files, and an infinite, seeded,
resumable batch sampler.

Every loader returns `(x, y)`: `x` float32 (N, C, H, W) scaled to [-1, 1] (tensor files are taken as they are:
latents have their own scale), `y` int64 (N,) class ids or None. Problems with the user's input raise
`DataError`, a `ValueError` whose message fits on one line, so the CLI can print it and exit with code 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Modes whose pixels are one grey value; everything else is converted to RGB.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}
_SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """A problem with the user's data (missing file, wrong shape, ...): printed on one line by the CLI."""


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------


def load_digits_tensor(
    split: str = "train", seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 scikit-learn digits (shipped with the package, no download) as x (N, 1, 8, 8) float32 in
    [-1, 1] and y (N,) int64. The train/test split is stratified by class and fixed by `seed`, so the
    real-data floor (held-out vs training digits) is reproducible: with the defaults, 1437 train, 360 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in _SPLITS:
        raise DataError(f"load_digits_tensor: split must be one of {_SPLITS}, got {split!r}")
    digits = load_digits()
    # Pixel values are integers 0..16: x / 8 - 1 maps them onto [-1, 1] exactly.
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    if split == "all":
        return x, y
    index = np.arange(len(y))
    train_index, test_index = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    chosen = torch.from_numpy(np.sort(train_index if split == "train" else test_index))
    return x[chosen].contiguous(), y[chosen].contiguous()


# --------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and _visible(p))
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(
                f"load_image_folder: {p} has an unsupported extension {p.suffix!r}; "
                f"accepted: {', '.join(IMAGE_EXTENSIONS)}"
            )
    return files


_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_array(image: Any, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """PIL image -> (H, W, channels) float32 in [0, 1], resized bicubically to `size` (H, W) if given."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale (Pillow opens 16-bit PNGs as I;16 or I): resample in float ("F") mode.
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)  # mode "F"
        scale = 1.0
    else:
        image = image.convert("L" if channels == 1 else "RGB")
        scale = 1.0 / 255.0
    if size is not None and (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) * scale
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], channels, axis=2)
    return pixels


def load_image_folder(
    path: str | os.PathLike, size: int | tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (PNG / JPEG) under `path` as x (N, C, H, W) float32 in [-1, 1] and y (N,) int64.

    With class subfolders, each subfolder is a class and labels are the subfolders' indices in sorted name
    order; with images directly in `path` (and no subfolders), y is None. C is 1 when every image is
    greyscale, else 3 (greyscale images are repeated, alpha is dropped). `size` (an int or (H, W)) resizes
    every image (bicubic); without it all images must already have the same size."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"load_image_folder: {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    top_files = _image_files(root)
    if class_dirs and top_files:
        raise DataError(
            f"load_image_folder: {root} holds both class subfolders and images ({top_files[0].name}); "
            "put every image in a class subfolder, or use no subfolders for unlabelled data"
        )
    if class_dirs:
        labelled = [(f, label) for label, d in enumerate(class_dirs) for f in _image_files(d)]
    else:
        labelled = [(f, -1) for f in top_files]
    if not labelled:
        raise DataError(
            f"load_image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root} or its class subfolders"
        )
    if isinstance(size, int):
        size = (size, size)
    if size is not None:
        if len(size) != 2 or min(size) < 1:
            raise DataError(f"load_image_folder: size must be a positive int or (H, W), got {size}")
        size = (int(size[0]), int(size[1]))

    images = []
    for file, _ in labelled:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image)
        except OSError as error:
            raise DataError(f"load_image_folder: cannot read {file}: {error}") from None

    if size is None:
        first_file, first = labelled[0][0], images[0]
        for (file, _), image in zip(labelled, images, strict=True):
            if image.size != first.size:
                raise DataError(
                    f"load_image_folder: images differ in size: {first_file} is "
                    f"{first.height}x{first.width} (HxW) but {file} is {image.height}x{image.width}; "
                    "pass size= to resize them"
                )
    channels = 1 if all(image.mode in _GREY_MODES for image in images) else 3
    arrays = [_to_array(image, channels, size) for image in images]
    # (N, H, W, C) in [0, 1] -> (N, C, H, W) in [-1, 1]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    x = x.clamp_(-1.0, 1.0)  # bicubic resampling overshoots [0, 1] slightly near edges
    if not class_dirs:
        return x, None
    y = torch.tensor([label for _, label in labelled], dtype=torch.int64)
    return x, y


# --------------------------------------------------------------------------------------------------------
# npz / safetensors tensor files
# --------------------------------------------------------------------------------------------------------


def _read_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    suffix = file.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as error:
            raise DataError(f"load_tensor_file: cannot read {file} as npz: {error}") from None
        tensors = {}
        for key, array in arrays.items():
            if array.dtype.kind not in "biuf":
                raise DataError(f"load_tensor_file: {file}: key {key!r} has dtype {array.dtype}, not a numeric array")
            tensors[key] = torch.from_numpy(np.ascontiguousarray(array))
        return tensors
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as error:
            raise DataError(f"load_tensor_file: cannot read {file} as safetensors: {error}") from None
    raise DataError(f"load_tensor_file: {file} must end in .npz or .safetensors, got {suffix!r}")


def load_tensor_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensors from an .npz or .safetensors file: key `x` (N, C, H, W), any float dtype, returned as float32
    without rescaling (latents keep their own scale), and optional key `y` (N,) integer class ids, returned as
    int64. Other keys are ignored."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"load_tensor_file: no such file {file}")
    tensors = _read_tensor_file(file)
    if "x" not in tensors:
        raise DataError(f"load_tensor_file: {file} has no key 'x'; keys found: {sorted(tensors) or 'none'}")
    return check_data(tensors["x"], tensors.get("y"), f"load_tensor_file: {file}")


def check_data(x, y, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training tensors as a data source must hold them: x (N, C, H, W) floating, N >= 1, finite, returned as
    float32 (values as they are); y None or (N,) integer class ids >= 0, returned as int64. `where` starts each
    error (the file, or the call that passed the tensors)."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where}: x must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise DataError(f"{where}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(
            f"{where}: x must be a float tensor, got {x.dtype}; store images scaled to [-1, 1] (e.g. uint8 / 127.5 - 1)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{where}: x is empty (shape {tuple(x.shape)})")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{where}: x has {bad} non-finite values (NaN or inf)")
    if y is None:
        return x.contiguous(), None
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{where}: y must be a torch.Tensor of class ids or None, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"{where}: y must be 1-D with one label per row of x ({x.shape[0]}), got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: y must be an integer tensor of class ids, got {y.dtype}")
    y = y.to(torch.int64)
    if int(y.min()) < 0:
        raise DataError(f"{where}: y must be class ids >= 0, got min {int(y.min())}")
    return x.contiguous(), y.contiguous()


# --------------------------------------------------------------------------------------------------------
# Infinite, resumable batch sampler
# --------------------------------------------------------------------------------------------------------


class InfiniteLoader:
    """Endless random batches from in-memory tensors, in reshuffled epochs: every row appears once per epoch,
    and a batch that crosses an epoch boundary takes the rest of one permutation and the start of the next.

    The loader owns `generator` (do not draw from it elsewhere). `state_dict()` holds the generator state from
    just before the current permutation was drawn plus the position in it, so `load_state_dict` redraws the
    same permutation and the resumed loader yields exactly the batches the original would have."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if x.dim() < 1 or x.shape[0] == 0:
            raise DataError(f"InfiniteLoader: x must have at least one row, got shape {tuple(x.shape)}")
        if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
            raise DataError(
                f"InfiniteLoader: y must be 1-D with one label per row of x ({x.shape[0]}), got shape {tuple(y.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"InfiniteLoader: batch_size must be a positive int, got {batch_size!r}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.epoch = -1
        self._new_epoch()

    def __len__(self) -> int:
        """Rows per epoch."""
        return self.x.shape[0]

    def _new_epoch(self) -> None:
        self._epoch_start_state = self.generator.get_state()
        self._permutation = torch.randperm(len(self), generator=self.generator)
        self._position = 0
        self.epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        pieces, needed = [], self.batch_size
        while needed > 0:
            if self._position == len(self):
                self._new_epoch()
            take = min(needed, len(self) - self._position)
            pieces.append(self._permutation[self._position : self._position + take])
            self._position += take
            needed -= take
        index = torch.cat(pieces).to(self.x.device)
        y = None if self.y is None else self.y[index.to(self.y.device)]
        return self.x[index], y

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self._epoch_start_state.clone(),
            "position": self._position,
            "epoch": self.epoch,
            "num_rows": len(self),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self):
            raise DataError(
                f"InfiniteLoader: the saved state is for {state['num_rows']} rows but this data has "
                f"{len(self)}; resume with the same data set"
            )
        self.generator.set_state(state["generator_state"])
        self.epoch = state["epoch"] - 1
        self._new_epoch()
        self._position = int(state["position"])
