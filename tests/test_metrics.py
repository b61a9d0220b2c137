"""Evaluation metrics: the Frechet distance against closed forms and a scipy float64 reference, the digits
classifier (accuracy, determinism, cache), digits_metrics and the real-data floor."""

import numpy as np
import pytest
import scipy.linalg
import torch

from imf import metrics
from imf.data import load_digits_tensor
from imf.metrics import DigitsClassifier, digits_metrics, frechet_distance, real_data_floor

# ------------------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------------------


def _whitened(rng, n, d):
    """n rows whose sample mean is exactly 0 and sample (unbiased) covariance exactly I."""
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    cholesky = np.linalg.cholesky(np.cov(z, rowvar=False))
    return np.linalg.solve(cholesky, z.T).T


def _scipy_reference(a, b):
    """The textbook formula, with scipy's general (non-symmetric) matrix square root of S_a S_b."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sqrt_product = scipy.linalg.sqrtm(cov_a @ cov_b).real
    mean_term = ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
    return mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrt_product)


def test_fd_identical_sets_is_zero():
    a = np.random.default_rng(0).standard_normal((300, 17)) * 3.0
    assert frechet_distance(a, a) <= 1e-9 * np.trace(np.cov(a, rowvar=False))


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_fd_translated_copy_is_squared_shift(dim):
    rng = np.random.default_rng(dim)
    a = rng.standard_normal((200, dim)) @ rng.standard_normal((dim, dim))
    shift = rng.standard_normal(dim)
    expected = float((shift**2).sum())
    assert frechet_distance(a, a + shift) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_fd_diagonal_gaussians_closed_form():
    # FD = ||mu_a - mu_b||^2 + sum_i (sqrt(lambda_a_i) - sqrt(lambda_b_i))^2 for diagonal covariances
    rng = np.random.default_rng(1)
    d = 12
    lambda_a, lambda_b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a = _whitened(rng, 150, d) * np.sqrt(lambda_a) + mu_a
    b = _whitened(rng, 90, d) * np.sqrt(lambda_b) + mu_b
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(lambda_a) - np.sqrt(lambda_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fd_commuting_covariances_closed_form():
    # S_a = Q diag(lambda_a) Q^T, S_b = Q diag(lambda_b) Q^T share eigenvectors: the diagonal formula holds
    rng = np.random.default_rng(2)
    d = 20
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lambda_a, lambda_b = rng.uniform(0.01, 9.0, d), rng.uniform(0.01, 9.0, d)
    a = (_whitened(rng, 120, d) * np.sqrt(lambda_a)) @ q.T + 1.5
    b = (_whitened(rng, 400, d) * np.sqrt(lambda_b)) @ q.T - 0.5
    expected = d * 2.0**2 + ((np.sqrt(lambda_a) - np.sqrt(lambda_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fd_singular_covariances_constant_columns():
    # Constant columns (like the digits' always-blank corners) make both covariances singular; they add
    # exactly (c_a - c_b)^2 per column and nothing else.
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((80, 6)), rng.standard_normal((50, 6)) * 2 + 1
    base = frechet_distance(a, b)
    constants_a, constants_b = np.array([-1.0, -1.0, 0.5]), np.array([-1.0, 0.0, 0.5])
    a_padded = np.hstack([a, np.tile(constants_a, (80, 1))])
    b_padded = np.hstack([b, np.tile(constants_b, (50, 1))])
    assert frechet_distance(a_padded, b_padded) == pytest.approx(base + 1.0, rel=1e-10)


def test_fd_rank_deficient_many_features_matches_scipy():
    # more features than rows on one side: S_a has rank 39 of 60
    rng = np.random.default_rng(4)
    a = rng.standard_normal((40, 60))
    b = rng.standard_normal((500, 60)) @ rng.standard_normal((60, 60)) * 0.3
    expected = _scipy_reference(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-7)


def test_fd_general_gaussians_match_scipy_and_accepts_tensors():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64)) * 0.2
    b = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)) * 0.25 + 0.1
    expected = _scipy_reference(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # torch input in (N, 1, 8, 8) form is flattened to the same 64 features
    a_images = torch.from_numpy(a).reshape(256, 1, 8, 8)
    b_images = torch.from_numpy(b).reshape(300, 1, 8, 8)
    assert frechet_distance(a_images, b_images) == pytest.approx(expected, rel=1e-8)


def test_fd_errors():
    a = np.zeros((5, 3)) + np.arange(15).reshape(5, 3)
    with pytest.raises(ValueError, match="same feature size, got 3 and 4"):
        frechet_distance(a, np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"feats_b must be \(N, \.\.\.\) with N >= 2 rows"):
        frechet_distance(a, a[:1])
    with pytest.raises(ValueError, match="feats_a has 1 non-finite"):
        frechet_distance(np.where(a == 4, np.nan, a), a)


# ------------------------------------------------------------------------------------------------------------
# Digits classifier
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty cache folder in place of ~/.cache/imf for this module."""
    folder = tmp_path_factory.mktemp("imf_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMF_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def classifier(cache):
    """Trained once (about 6 s on one core) through the cache path."""
    return DigitsClassifier.pretrained()


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensor("train"), load_digits_tensor("test")


def test_classifier_held_out_accuracy(classifier, digits):
    _, (x_test, y_test) = digits
    predicted = classifier.predict(x_test)
    assert predicted.dtype == torch.int64 and predicted.shape == (360,)
    accuracy = float((predicted == y_test).double().mean())
    assert accuracy == classifier.test_accuracy
    assert accuracy >= 0.95
    assert classifier.features(x_test).shape == (360, DigitsClassifier.feature_dim)


def test_classifier_training_is_deterministic():
    first = DigitsClassifier.train_new(seed=3, epochs=1)
    second = DigitsClassifier.train_new(seed=3, epochs=1)
    other = DigitsClassifier.train_new(seed=4, epochs=1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.fc.weight, other.fc.weight)


def test_classifier_leaves_global_rng_and_threads_alone(classifier):
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    DigitsClassifier.train_new(seed=0, epochs=1)
    DigitsClassifier.pretrained()
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


def _refuse_training(*args, **kwargs):
    raise AssertionError("retrained although a valid cache file exists")


def test_classifier_cache_round_trip(classifier, cache, monkeypatch, digits):
    file = cache / "digits_classifier.safetensors"
    assert file.is_file() and sorted(p.name for p in cache.iterdir()) == [file.name]  # no temp files left
    monkeypatch.setattr(DigitsClassifier, "train_new", classmethod(_refuse_training))
    loaded = DigitsClassifier.pretrained()
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    _, (x_test, _) = digits
    assert torch.equal(loaded.features(x_test), classifier.features(x_test))
    assert loaded.test_accuracy == classifier.test_accuracy


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing", "other_seed"])
def test_classifier_cache_retrains_when_unusable(classifier, cache, tmp_path, monkeypatch, damage):
    file = tmp_path / "digits_classifier.safetensors"
    trained = []

    def fake_train(cls, seed=0, split_seed=0):
        trained.append(seed)
        return classifier  # stands in for a fresh training run, which test_classifier_* cover

    valid = (cache / "digits_classifier.safetensors").read_bytes()  # written for seed 0 by the fixture
    if damage == "corrupt":
        file.write_bytes(b"\x00garbage, not safetensors")
    elif damage == "truncated":
        file.write_bytes(valid[:1000])
    elif damage == "other_seed":
        file.write_bytes(valid)
    monkeypatch.setattr(DigitsClassifier, "train_new", classmethod(fake_train))
    seed = 1 if damage == "other_seed" else 0
    model = DigitsClassifier.pretrained(seed=seed, path=file)
    assert trained == [seed] and model is classifier
    # the rewritten file is valid and now loads without training
    monkeypatch.setattr(DigitsClassifier, "train_new", classmethod(_refuse_training))
    reloaded = DigitsClassifier.pretrained(seed=seed, path=file)
    assert torch.equal(reloaded.head.weight, classifier.head.weight)


def test_classifier_cache_write_failure_only_warns(classifier, tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_bytes(b"")
    file = tmp_path / "not_a_folder" / "digits_classifier.safetensors"
    monkeypatch.setattr(DigitsClassifier, "train_new", classmethod(lambda cls, **kwargs: classifier))
    with pytest.warns(UserWarning, match="could not cache weights"):
        assert DigitsClassifier.pretrained(path=file) is classifier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_classifier_input_check(classifier):
    with pytest.raises(ValueError, match=r"x must be \(N, 1, 8, 8\) in \[-1, 1\], got shape \(2, 64\)"):
        classifier.predict(torch.zeros(2, 64))


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMF_CACHE", str(tmp_path / "here"))
    assert metrics.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("IMF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert metrics.cache_dir() == tmp_path / "xdg" / "imf"


# ------------------------------------------------------------------------------------------------------------
# digits_metrics and the real-data floor
# ------------------------------------------------------------------------------------------------------------


def test_digits_metrics_exact_values(classifier, digits):
    (x_train, _), (x_test, y_test) = digits
    result = digits_metrics(x_test, y_test, classifier, x_train)
    assert set(result) == {"class_accuracy", "fd_pixel", "fd_features"}
    assert result["class_accuracy"] == classifier.test_accuracy
    assert result["fd_pixel"] == frechet_distance(x_test.flatten(1), x_train.flatten(1))
    assert result["fd_features"] == frechet_distance(classifier.features(x_test), classifier.features(x_train))

    # the training set against itself: both distances vanish
    same = digits_metrics(x_train, None, classifier, x_train)
    assert set(same) == {"fd_pixel", "fd_features"}
    assert same["fd_pixel"] < 1e-9 and same["fd_features"] < 1e-9

    # wrong labels: accuracy is the fraction of predictions that happen to match them
    shifted = (y_test + 1) % 10
    expected = float((classifier.predict(x_test) == shifted).double().mean())
    assert digits_metrics(x_test, shifted, classifier, x_train)["class_accuracy"] == expected
    assert expected < 0.05


def test_digits_metrics_errors(classifier, digits):
    (x_train, _), (x_test, y_test) = digits
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(360,\)"):
        digits_metrics(x_test, y_test[:5], classifier, x_train)
    with pytest.raises(ValueError, match=r"samples must be \(N, 1, 8, 8\)"):
        digits_metrics(x_test[:, :, :4], y_test, classifier, x_train)
    broken = x_test.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="samples have 1 non-finite"):
        digits_metrics(broken, y_test, classifier, x_train)


def test_real_data_floor(classifier):
    floor = real_data_floor(classifier)
    # held-out vs training digits with the default split (the issue quotes about 0.41)
    assert floor["fd_pixel"] == pytest.approx(0.411606, abs=1e-5)
    assert floor["class_accuracy"] == classifier.test_accuracy
    assert floor["fd_features"] > 0.0  # its exact value is checked in test_digits_metrics_exact_values
