"""Evaluation: the v-head Euler sampler against closed forms, the digits metrics of a model whose samples are
known real digits against a direct computation, the gauss errors of the exact field (zero), and the plots."""

import pytest
import torch
import torch.nn as nn

from imf.data import load_digits_tensor
from imf.evaluate import class_omega_samples, evaluate_digits, evaluate_gauss, sample_v_head
from imf.gauss import GaussClasses
from imf.metrics import DigitsClassifier, digits_metrics, frechet_distance
from imf.model import ModelConfig
from imf.plots import save_loss_curve, save_quality_plot, save_sample_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return DigitsClassifier.pretrained(path=tmp_path_factory.mktemp("cache") / "digits_classifier.safetensors")


class FieldModel(nn.Module):
    """A stand-in network with given u and v fields; records the conditions it was called with."""

    def __init__(self, u=None, v=None, num_classes: int = 10, dtype=torch.float32):
        super().__init__()
        self.cfg = ModelConfig(num_classes=num_classes)
        self.anchor = nn.Parameter(torch.zeros((), dtype=dtype))  # the device and dtype the sampler checks against
        self.u_field, self.v_field, self.calls = u, v, []
        self.v_level = None if v is None else nn.Identity()

    def u(self, z, cond):
        self.calls.append(("u", cond))
        return self.u_field(z, cond)

    def v(self, z, cond):
        self.calls.append(("v", cond))
        return self.v_field(z, cond)


def test_v_head_euler_matches_closed_forms():
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 4, 9])
    constant = FieldModel(v=lambda z, c: torch.full_like(z, 0.25), dtype=torch.float64)
    assert torch.allclose(sample_v_head(constant, z, y, steps=7), z - 0.25, atol=1e-14)
    # v = z: every step multiplies by (1 - 1/N)
    linear = FieldModel(v=lambda z, c: z, dtype=torch.float64)
    assert torch.allclose(sample_v_head(linear, z, y, steps=32), z * (1 - 1 / 32) ** 32, atol=1e-14)
    ts = [c.t[0].item() for _, c in linear.calls]
    assert ts == pytest.approx([1 - k / 32 for k in range(32)])
    assert all(float(c.h.abs().max()) == 0.0 and torch.equal(c.y, y) for _, c in linear.calls)


def test_class_omega_samples_reuse_noise_across_omega():
    model = FieldModel(u=lambda z, c: z * (1 - 1 / c.omega.view(-1, 1, 1, 1)) + c.y.view(-1, 1, 1, 1))
    noise = torch.randn(3 * 2, 1, 8, 8)
    out = class_omega_samples(model, noise, [2, 5, 7], [1.0, 4.0], interval=(0.3, 0.6))
    assert out.shape == (2, 3, 2, 1, 8, 8)
    y = torch.tensor([2, 2, 5, 5, 7, 7]).view(-1, 1, 1, 1).float()
    assert torch.allclose(out[0].reshape(6, 1, 8, 8), noise - y)  # 1-NFE: x = e - u(e)
    assert torch.allclose(out[1].reshape(6, 1, 8, 8), noise - (0.75 * noise + y))
    assert all(float(c.t_min[0]) == pytest.approx(0.3) and float(c.h[0]) == 1.0 for _, c in model.calls)


def test_digits_metrics_of_known_samples(classifier):
    """A model that maps the noise of row i to a fixed real test digit of class y_i: the evaluation must report
    exactly the metrics of those digits (clamping changes nothing, they lie in [-1, 1])."""
    x_test, y_test = load_digits_tensor("test")
    n = 60
    y = torch.arange(n) % 10
    chosen = torch.stack([x_test[y_test == c][i // 10] for i, c in enumerate(y.tolist())])

    def u(z, cond):  # x = z - u = chosen digit for the matching rows
        assert torch.equal(cond.y, y)
        return z - chosen

    model = FieldModel(u=u)
    result = evaluate_digits(model, omegas=[1.0, 3.0], n=n, v_head_steps=0, classifier=classifier)
    x_train, _ = load_digits_tensor("train")
    expected = digits_metrics(chosen, y, classifier, x_train)
    assert result["sampler"]["interval"] == [0.4, 0.65] and result["sampler"]["n_samples"] == n
    assert [r["omega"] for r in result["per_omega"]] == [1.0, 3.0]
    for row in result["per_omega"]:
        assert row["class_accuracy"] == expected["class_accuracy"]
        # equal up to the float32 round-off of x = e - (e - digit)
        assert row["fd_pixel"] == pytest.approx(frechet_distance(chosen, x_train), rel=1e-6)
        assert row["fd_features"] == pytest.approx(expected["fd_features"], rel=1e-6)
    assert result["classifier_test_accuracy"] > 0.95
    assert result["real_data_floor"]["fd_pixel"] == pytest.approx(0.41, abs=0.03)
    assert "v_head_euler" not in result


def test_a_model_of_more_classes_is_asked_for_the_digits_classes_only(classifier):
    """A model of 12 classes: its samples are drawn for classes 0-9 (ids 10, 11 were scored against the digits
    classifier's 10 classes)."""
    seen = []
    model = FieldModel(u=lambda z, c: (seen.append(c.y.clone()), z)[1], num_classes=12)
    evaluate_digits(model, omegas=[1.0], n=24, v_head_steps=0, classifier=classifier)
    assert torch.equal(seen[0], torch.arange(24) % 10)


def test_digits_v_head_sample_is_evaluated(classifier):
    x_test, _ = load_digits_tensor("test")
    n = 40
    target = x_test[:n]
    # the velocity of the straight path from the target x (t = 0) to the noise (t = 1): v = (z - x) / t
    model = FieldModel(u=lambda z, c: z - target, v=lambda z, c: (z - target) / c.t.view(-1, 1, 1, 1))
    result = evaluate_digits(model, omegas=[1.0], n=n, v_head_steps=4, classifier=classifier)
    # each Euler step scales z - x by t_next / t, so the last one lands on x: the same samples as the u-head's
    assert result["v_head_euler"]["fd_pixel"] == pytest.approx(result["per_omega"][0]["fd_pixel"], rel=1e-5)
    assert result["v_head_euler"]["steps"] == 4


def test_gauss_errors_of_the_exact_field_are_zero():
    data = GaussClasses.from_digits()

    def exact_u(z, cond):
        u = data.average_velocity(z, cond.t - cond.h, cond.t, cond.y)
        return u.float().view_as(z)

    def exact_v(z, cond):
        return data.velocity(z, cond.t, cond.y).float().view_as(z)

    model = FieldModel(u=exact_u, v=exact_v)
    result = evaluate_gauss(model, omegas=[1.0], n=64, v_head_steps=64)
    assert result["per_omega"][0]["sample_error"] < 1e-8  # float32 round-off of the exact one-step map
    assert result["u_error"] < 1e-8
    # Euler on the exact velocity: a discretisation error that is small but not zero at 64 steps
    assert 0.0 < result["v_head_euler"]["sample_error"] < 0.05
    assert result["sampler"]["interval"] == [0.4, 0.65]


def test_plots_write_pngs(tmp_path):
    digits = {
        "data": "digits",
        "sampler": {"steps": 1, "interval": [0.4, 0.65], "n_samples": 100},
        "per_omega": [
            {"omega": w, "class_accuracy": 0.9, "fd_pixel": 1.0 / w, "fd_features": 2.0 / w} for w in (1, 2, 4)
        ],
        "real_data_floor": {"fd_pixel": 0.41},
    }
    gauss = {
        "data": "gauss",
        "sampler": {"steps": 1, "interval": [0.4, 0.65], "n_samples": 100},
        "per_omega": [{"omega": w, "sample_error": 0.1 * w} for w in (1, 2)],
    }
    save_quality_plot(digits, tmp_path / "q_digits.png")
    save_quality_plot(gauss, tmp_path / "q_gauss.png")
    history = [{"step": s, "loss": 2.0, "loss_u": 10.0 / s, "loss_v": 5.0 / s} for s in range(1, 80)]
    save_loss_curve(history, tmp_path / "l.png")
    save_sample_grid(torch.rand(4, 10, 3, 1, 8, 8) * 2 - 1, [1, 2, 4, 8], list(range(10)), tmp_path / "g.png")
    for name in ("q_digits.png", "q_gauss.png", "l.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
