"""Data loaders: digits scaling and split, image folders, npz / safetensors files, and the resumable
InfiniteLoader. Every check is an exact expectation on small generated data."""

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imf.data import DataError, InfiniteLoader, load_digits_tensor, load_image_folder, load_tensor_file

# ------------------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------------------


def _row_counts(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((row.numpy().tobytes(), int(label)) for row, label in zip(x, y, strict=True))


def test_digits_scaling_and_shapes():
    x, y = load_digits_tensor("all")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # the raw pixels are the integers 0..16, so (x + 1) * 8 recovers them exactly
    raw = (x + 1) * 8
    assert torch.equal(raw, raw.round()) and set(raw.unique().tolist()) == set(range(17))
    assert torch.equal(torch.bincount(y), torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180]))


def test_digits_split_sizes_partition_and_stratification():
    x_all, y_all = load_digits_tensor("all")
    x_train, y_train = load_digits_tensor("train")
    x_test, y_test = load_digits_tensor("test")
    assert len(x_train) == 1437 and len(x_test) == 360
    # train and test together are exactly the whole set (as a multiset of (image, label) rows)
    assert _row_counts(x_train, y_train) + _row_counts(x_test, y_test) == _row_counts(x_all, y_all)
    # stratified: each class's test share is 20% of that class, up to rounding
    expected = 0.2 * torch.bincount(y_all).double()
    assert (torch.bincount(y_test, minlength=10).double() - expected).abs().max() <= 1.0


def test_digits_split_is_deterministic_and_seeded():
    x_a, y_a = load_digits_tensor("test", seed=0)
    x_b, y_b = load_digits_tensor("test", seed=0)
    x_c, _ = load_digits_tensor("test", seed=1)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    assert not torch.equal(x_a, x_c)


def test_digits_bad_split():
    with pytest.raises(DataError, match="split must be one of"):
        load_digits_tensor("val")
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------------------


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _grey(rng, height, width):
    return rng.integers(0, 256, size=(height, width), dtype=np.uint8)


def test_image_folder_labels_from_sorted_subfolders_and_exact_scaling(tmp_path):
    rng = np.random.default_rng(0)
    images = {"dog/b.png": _grey(rng, 5, 7), "cat/a.png": _grey(rng, 5, 7), "dog/a.png": _grey(rng, 5, 7)}
    for name, array in images.items():
        _save(tmp_path / name, array)
    x, y = load_image_folder(tmp_path)
    assert x.shape == (3, 1, 5, 7) and x.dtype == torch.float32
    # order: classes sorted (cat=0, dog=1), files sorted inside each class
    assert y.tolist() == [0, 1, 1]
    for row, name in zip(x, ["cat/a.png", "dog/a.png", "dog/b.png"], strict=True):
        expected = torch.from_numpy(images[name].astype(np.float32) / 255.0 * 2.0 - 1.0)
        torch.testing.assert_close(row[0], expected, rtol=0, atol=1e-6)


def test_image_folder_rgb_grey_mix_and_flat_folder(tmp_path):
    rng = np.random.default_rng(1)
    grey = _grey(rng, 4, 6)
    rgb = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(4, 6, 4), dtype=np.uint8)
    _save(tmp_path / "a.png", grey)
    _save(tmp_path / "b.png", rgb)
    _save(tmp_path / "c.png", rgba)
    x, y = load_image_folder(tmp_path)
    assert y is None and x.shape == (3, 3, 4, 6)
    scale = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0 * 2.0 - 1.0)
    torch.testing.assert_close(x[0], scale(grey)[None].expand(3, 4, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[1], scale(rgb).permute(2, 0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[2], scale(rgba[:, :, :3]).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_image_folder_16_bit_png_and_jpeg(tmp_path):
    values = np.array([[0, 65535, 1000], [30000, 12345, 65000]], dtype=np.uint16)
    _save(tmp_path / "deep" / "a.png", values)
    x, _ = load_image_folder(tmp_path)
    expected = torch.from_numpy(values.astype(np.float32) / 65535.0 * 2.0 - 1.0)
    torch.testing.assert_close(x[0, 0], expected, rtol=0, atol=1e-6)

    jpeg_folder = tmp_path / "jpeg"
    _save(jpeg_folder / "flat.JPG", np.full((8, 8, 3), 200, dtype=np.uint8))
    x, _ = load_image_folder(jpeg_folder)
    # a constant image survives JPEG compression up to one grey level
    assert x.shape == (1, 3, 8, 8)
    assert (x - (200 / 255 * 2 - 1)).abs().max() <= 2 / 255 + 1e-6


def test_image_folder_resize(tmp_path):
    _save(tmp_path / "a" / "small.png", np.full((6, 4), 51, dtype=np.uint8))
    _save(tmp_path / "b" / "large.png", np.full((10, 12), 204, dtype=np.uint8))
    x, y = load_image_folder(tmp_path, size=(5, 3))
    assert x.shape == (2, 1, 5, 3) and y.tolist() == [0, 1]
    # resampling a constant image gives the same constant
    torch.testing.assert_close(x[0], torch.full((1, 5, 3), 51 / 255 * 2 - 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[1], torch.full((1, 5, 3), 204 / 255 * 2 - 1), rtol=0, atol=1e-6)
    assert load_image_folder(tmp_path, size=8)[0].shape == (2, 1, 8, 8)


def test_image_folder_mixed_sizes_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(2)
    _save(tmp_path / "a" / "first.png", _grey(rng, 8, 8))
    _save(tmp_path / "a" / "second.png", _grey(rng, 8, 8))
    _save(tmp_path / "b" / "odd.png", _grey(rng, 10, 12))
    with pytest.raises(DataError) as error:
        load_image_folder(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "first.png is 8x8" in message and "odd.png is 10x12" in message and "size=" in message


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([], "no images"),
        (["cls/empty_class_only/"], "no images"),
        (["cls/notes.txt"], "unsupported extension '.txt'"),
        (["a.png", "cls/b.png"], "both class subfolders and images"),
        (["cls/broken.png"], "cannot read"),
    ],
)
def test_image_folder_errors(tmp_path, files, match):
    for name in files:
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        elif name.endswith(".png") and "broken" not in name:
            _save(path, np.zeros((2, 2), dtype=np.uint8) + 7)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image")
    with pytest.raises(DataError, match=match):
        load_image_folder(tmp_path)


def test_image_folder_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "missing")


def test_image_folder_ignores_hidden_files(tmp_path):
    _save(tmp_path / "c" / "a.png", np.full((3, 3), 9, dtype=np.uint8))
    (tmp_path / "c" / ".DS_Store").write_bytes(b"\0")
    x, y = load_image_folder(tmp_path)
    assert x.shape == (1, 1, 3, 3) and y.tolist() == [0]


# ------------------------------------------------------------------------------------------------------------
# npz / safetensors
# ------------------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 3, 3)).astype(np.float16)
    y = np.array([0, 3, 1, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "data.npz", x=x, y=y, extra=np.arange(3))
    x_loaded, y_loaded = load_tensor_file(tmp_path / "data.npz")
    assert x_loaded.dtype == torch.float32 and y_loaded.dtype == torch.int64
    assert torch.equal(x_loaded, torch.from_numpy(x.astype(np.float32)))
    assert y_loaded.tolist() == y.tolist()
    np.savez(tmp_path / "unlabelled.npz", x=x.astype(np.float64))
    x_only, y_none = load_tensor_file(tmp_path / "unlabelled.npz")
    assert y_none is None and torch.equal(x_only, torch.from_numpy(x.astype(np.float32)))


def test_safetensors_round_trip(tmp_path):
    x = torch.randn(6, 4, 2, 5, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = torch.tensor([9, 0, 1, 2, 3, 4], dtype=torch.int16)
    save_file({"x": x, "y": y}, str(tmp_path / "latents.safetensors"))
    x_loaded, y_loaded = load_tensor_file(tmp_path / "latents.safetensors")
    assert x_loaded.dtype == torch.float32 and torch.equal(x_loaded, x.float())
    assert y_loaded.dtype == torch.int64 and y_loaded.tolist() == y.tolist()


def _x(shape=(4, 1, 2, 2), dtype=np.float32):
    return np.random.default_rng(5).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": _x()}, r"has no key 'x'; keys found: \['images'\]"),
        ({"x": _x((4, 2, 2))}, r"x must be 4-D \(N, C, H, W\), got shape \(4, 2, 2\)"),
        ({"x": _x().astype(np.uint8)}, "x must be a float tensor, got torch.uint8"),
        ({"x": _x((0, 1, 2, 2))}, "x is empty"),
        ({"x": np.where(_x() > 0, np.nan, _x())}, "non-finite"),
        ({"x": _x(), "y": np.zeros(4, dtype=np.float32)}, "y must be an integer tensor"),
        ({"x": _x(), "y": np.zeros(3, dtype=np.int64)}, r"y must be 1-D with one label per row of x \(4\)"),
        ({"x": _x(), "y": np.array([0, 1, -1, 2])}, "class ids >= 0"),
    ],
)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_tensor_file_errors(tmp_path, arrays, match, suffix):
    file = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(file, **arrays)
    else:
        save_file({key: torch.from_numpy(value) for key, value in arrays.items()}, str(file))
    with pytest.raises(DataError, match=match):
        load_tensor_file(file)


def test_tensor_file_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tensor_file(tmp_path / "missing.npz")
    (tmp_path / "data.pt").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"must end in \.npz or \.safetensors"):
        load_tensor_file(tmp_path / "data.pt")
    for name in ("garbage.npz", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"this is not a tensor file")
        with pytest.raises(DataError, match="cannot read"):
            load_tensor_file(tmp_path / name)


# ------------------------------------------------------------------------------------------------------------
# InfiniteLoader
# ------------------------------------------------------------------------------------------------------------


def _rows(n):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    return x, torch.arange(n)


def test_infinite_loader_epochs_cover_every_row_once():
    x, y = _rows(10)
    loader = InfiniteLoader(x, y, batch_size=4, generator=torch.Generator().manual_seed(0))
    batches = [next(loader) for _ in range(5)]  # 20 rows = exactly two epochs, crossing mid-batch
    for x_batch, y_batch in batches:
        assert x_batch.shape == (4, 3) and torch.equal(x_batch[:, 0].long(), y_batch)
    order = torch.cat([y_batch for _, y_batch in batches])
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:].tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:])  # reshuffled
    assert loader.epoch == 1


def test_infinite_loader_batch_larger_than_data():
    x, y = _rows(3)
    loader = InfiniteLoader(x, None, batch_size=7, generator=torch.Generator().manual_seed(1))
    x_batch, y_batch = next(loader)
    assert y_batch is None and x_batch.shape == (7, 3)
    counts = torch.bincount(x_batch[:, 0].long(), minlength=3).tolist()
    assert sorted(counts) == [2, 2, 3]


@pytest.mark.parametrize("warmup", [0, 2, 5, 7])
def test_infinite_loader_state_round_trip(warmup):
    x, y = _rows(13)
    loader = InfiniteLoader(x, y, batch_size=4, generator=torch.Generator().manual_seed(2))
    for _ in range(warmup):
        next(loader)
    epoch_at_save = loader.epoch
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as a checkpoint would hold it
    expected = [next(loader)[1] for _ in range(9)]  # crosses at least two epoch boundaries

    buffer.seek(0)
    resumed = InfiniteLoader(x, y, batch_size=4, generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == epoch_at_save
    for want in expected:
        x_batch, y_batch = next(resumed)
        assert torch.equal(y_batch, want) and torch.equal(x_batch[:, 0].long(), want)
    assert resumed.state_dict()["position"] == loader.state_dict()["position"]
    assert resumed.epoch == loader.epoch


def test_infinite_loader_errors():
    x, y = _rows(5)
    with pytest.raises(DataError, match="batch_size must be a positive int"):
        InfiniteLoader(x, y, batch_size=0)
    with pytest.raises(DataError, match=r"one label per row of x \(5\)"):
        InfiniteLoader(x, y[:4], batch_size=2)
    with pytest.raises(DataError, match="at least one row"):
        InfiniteLoader(x[:0], None, batch_size=2)
    state = InfiniteLoader(x, y, batch_size=2).state_dict()
    with pytest.raises(DataError, match="saved state is for 5 rows but this data has 6"):
        InfiniteLoader(*_rows(6), batch_size=2).load_state_dict(state)
