"""The exact answers of the analytic Gaussian classes (DESIGN 6), checked against independent computations."""

import pytest
import torch

from imf.gauss import GaussClasses, relative_error
from imf.model import Cond
from imf.sampler import sample


@pytest.fixture(scope="module")
def data():
    return GaussClasses.from_digits()


def rk4(f, z, t0, t1, steps):
    dt = (t1 - t0) / steps
    t = t0
    for _ in range(steps):
        k1 = f(z, t)
        k2 = f(z + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = f(z + 0.5 * dt * k2, t + 0.5 * dt)
        k4 = f(z + dt * k3, t + dt)
        z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
    return z


def test_flow_map_matches_rk4_of_exact_velocity(data):
    gen = torch.Generator().manual_seed(0)
    n = 6
    y = torch.randint(0, 10, (n,), generator=gen)
    z = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    t0, t1 = 0.93, 0.17
    full = lambda value: torch.full((n,), value, dtype=torch.float64)
    solved = rk4(lambda zz, s: data.velocity(zz, full(s), y), z, t0, t1, 400)
    exact = data.flow_map(z, full(t0), full(t1), y)
    assert torch.allclose(solved, exact, rtol=0, atol=1e-9), (solved - exact).abs().max()


def test_velocity_is_derivative_of_flow_map(data):
    gen = torch.Generator().manual_seed(1)
    n = 5
    y = torch.randint(0, 10, (n,), generator=gen)
    z = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    eps = 1e-5
    fd = (data.flow_map(z, t, t + eps, y) - data.flow_map(z, t, t - eps, y)) / (2 * eps)
    assert torch.allclose(fd, data.velocity(z, t, y), rtol=0, atol=1e-7)


def test_average_velocity_definition_and_limit(data):
    gen = torch.Generator().manual_seed(2)
    n = 4
    y = torch.randint(0, 10, (n,), generator=gen)
    z = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    t = torch.full((n,), 0.7, dtype=torch.float64)
    r = torch.full((n,), 0.3, dtype=torch.float64)
    u = data.average_velocity(z, r, t, y)
    # z_r = z_t - (t - r) u*: the one-step jump lands on the exact flow map
    assert torch.allclose(z - 0.4 * u, data.flow_map(z, t, r, y), atol=1e-12)
    # r = t: u* is the instantaneous velocity
    assert torch.allclose(data.average_velocity(z, t, t, y), data.velocity(z, t, y), atol=1e-12)


def test_one_step_map_has_the_class_covariance(data):
    y = torch.full((64,), 3)
    columns = data.one_step_map(torch.eye(64, dtype=torch.float64), y) - data.mu[3]  # A e for e = basis
    A = columns.T
    sigma = data.Q[3] @ torch.diag(data.lam[3]) @ data.Q[3].T
    assert torch.allclose(A @ A.T, sigma, atol=1e-12)


def test_log_density_matches_torch_distributions(data):
    gen = torch.Generator().manual_seed(3)
    n = 3
    z = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    got = data.log_density(z, t)
    for i in range(n):
        for c in (0, 7):
            sigma = data.Q[c] @ torch.diag(data.lam[c]) @ data.Q[c].T
            cov = (1 - t[i]) ** 2 * sigma + t[i] ** 2 * torch.eye(64, dtype=torch.float64)
            ref = torch.distributions.MultivariateNormal((1 - t[i]) * data.mu[c], cov).log_prob(z[i])
            assert abs(float(got[i, c] - ref)) < 1e-8


def test_unconditional_velocity_is_the_posterior_mixture(data):
    """Near a class mean at small t the posterior is one-hot, so v_u = v_c; at omega = 1 the guided solve is the
    exact conditional flow map."""
    n = 2
    y = torch.tensor([4, 9])
    t = torch.full((n,), 0.05, dtype=torch.float64)
    z = (1 - t[:, None]) * data.mu[y]
    assert torch.allclose(data.unconditional_velocity(z, t), data.velocity(z, t, y), atol=1e-8)
    e = torch.randn(n, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    guided = data.guided_flow_map(e, 1.0, 0.0, y, omega=1.0, steps=400)
    assert torch.allclose(guided, data.one_step_map(e, y), atol=1e-7)


class ExactModel(torch.nn.Module):
    """A 'network' whose u is the exact average velocity u*(z, t - h, t): sampling with it must be exact."""

    def __init__(self, data):
        super().__init__()
        self.data = data
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def u(self, z, cond: Cond):
        n = z.shape[0]
        out = self.data.average_velocity(z, cond.t - cond.h, cond.t, cond.y)
        return out.float().view(n, 1, 8, 8)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_with_exact_average_velocity_is_exact(data, steps):
    gen = torch.Generator().manual_seed(5)
    n = 64
    y = torch.randint(0, 10, (n,), generator=gen)
    e = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    x = sample(ExactModel(data), e.float().view(n, 1, 8, 8), y, steps=steps)
    err = relative_error(x, data.one_step_map(e, y), data.mu[y])
    assert err < 1e-9


def test_one_step_euler_of_exact_velocity_returns_the_class_mean(data):
    """The scale of the metric: a one-step Euler sample of the exact field returns mu_c and scores 1.0."""
    gen = torch.Generator().manual_seed(6)
    n = 256
    y = torch.randint(0, 10, (n,), generator=gen)
    e = torch.randn(n, 64, generator=gen, dtype=torch.float64)
    x = sample(ExactModel(data), e.float().view(n, 1, 8, 8), y, steps=1, euler=True)
    assert torch.allclose(x.double().view(n, -1), data.mu[y], atol=1e-6)
    assert abs(relative_error(x, data.one_step_map(e, y), data.mu[y]) - 1.0) < 1e-5
