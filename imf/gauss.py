"""Analytic Gaussian classes (DESIGN 6): data whose velocity, flow map and one-step map are known exactly.

Class c has x ~ N(mu_c, Sigma_c), Sigma_c = Q diag(lam) Q^T low rank plus diagonal, fitted to the digits of class c
(PCA). With z_t = (1 - t) x + t e:
    v(z, t | c)   = -mu_c + (t I - (1 - t) Sigma_c) S_t^{-1} (z - (1 - t) mu_c),  S_t = (1 - t)^2 Sigma_c + t^2 I
    flow map      z_r = (1 - r) mu_c + Q diag(s(r) / s(t)) Q^T (z_t - (1 - t) mu_c),  s(t) = sqrt((1 - t)^2 lam + t^2)
    u*(z, r, t)   = (z - z_r) / (t - r);    one-step map from t = 1:  x = mu_c + Sigma_c^{1/2} e
The unconditional field is the Bayes mixture over classes (uniform prior); the guided field
v_u + omega (v_c - v_u) is exact as a velocity, its flow map comes from a fine RK4 solve. Everything is float64.
"""

from __future__ import annotations

import math

import torch


class GaussClasses:
    def __init__(self, mu: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor, image_shape=(1, 8, 8)):
        self.mu = mu.double()  # (K, n)
        self.Q = eigvecs.double()  # (K, n, n), columns are eigenvectors
        self.lam = eigvals.double()  # (K, n)
        self.image_shape = tuple(image_shape)
        self.num_classes, self.dim = self.mu.shape

    @classmethod
    def from_digits(cls, rank: int = 8, noise_std: float = 0.05) -> GaussClasses:
        """Per digit class: the mean, the top-`rank` principal directions with their variances, plus
        noise_std^2 on the diagonal (so Sigma_c is full rank and the exact answers stay finite)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float64) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
        y = torch.tensor(digits.target)
        mus, qs, lams = [], [], []
        for c in range(10):
            xc = x[y == c]
            mu = xc.mean(0)
            cov = torch.cov((xc - mu).T)
            lam, q = torch.linalg.eigh(cov)
            lam_low = torch.zeros_like(lam)
            lam_low[-rank:] = lam[-rank:].clamp_min(0)
            mus.append(mu)
            qs.append(q)
            lams.append(lam_low + noise_std**2)
        return cls(torch.stack(mus), torch.stack(qs), torch.stack(lams))

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None):
        """(x, y): x (n, 1, 8, 8) float32 drawn exactly from the class Gaussians, y uniform class ids."""
        if y is None:
            y = torch.randint(0, self.num_classes, (n,), generator=generator)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.one_step_map(e, y).float().view(n, *self.image_shape), y

    def one_step_map(self, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The exact map from noise at t = 1 to data: x = mu_c + Q diag(sqrt(lam)) Q^T e (flat, float64)."""
        return self.flow_map(e.double().reshape(len(y), -1), torch.ones(len(y)), torch.zeros(len(y)), y)

    def exact_samples(self, e: torch.Tensor, y: torch.Tensor, omega: float = 1.0) -> torch.Tensor:
        """The exact map of noise e at t = 1 to t = 0 under guidance omega (closed form at omega = 1, else a fine
        RK4 solve)."""
        return self.one_step_map(e, y) if omega == 1.0 else self.guided_flow_map(e, 1.0, 0.0, y, omega)

    def evaluation_set(self, n: int, omega: float, seed: int):
        """(e, y, exact samples) for a fixed seed, cached: every evaluation of a run reuses the same noise."""
        cache = self.__dict__.setdefault("_evaluation_sets", {})
        if (n, omega, seed) not in cache:
            gen = torch.Generator().manual_seed(seed)
            y = torch.randint(0, self.num_classes, (n,), generator=gen)
            e = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
            cache[(n, omega, seed)] = (e, y, self.exact_samples(e, y, omega))
        return cache[(n, omega, seed)]

    # --- exact conditional fields ------------------------------------------------------------------------------
    def _flat(self, z):
        return z.double().reshape(z.shape[0], -1)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v(z, t | y) in the eigenbasis: -mu + Q diag((t - (1 - t) lam) / s(t)^2) Q^T (z - (1 - t) mu)."""
        z, t = self._flat(z), t.double()[:, None]
        mu, Q, lam = self.mu[y], self.Q[y], self.lam[y]
        w = torch.einsum("bnk,bn->bk", Q, z - (1 - t) * mu)
        s2 = (1 - t) ** 2 * lam + t**2
        return -mu + torch.einsum("bnk,bk->bn", Q, (t - (1 - t) * lam) / s2 * w)

    def flow_map(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z_r from z_t along the exact conditional flow."""
        z, t, r = self._flat(z), t.double()[:, None], r.double()[:, None]
        mu, Q, lam = self.mu[y], self.Q[y], self.lam[y]
        w = torch.einsum("bnk,bn->bk", Q, z - (1 - t) * mu)
        ratio = torch.sqrt((1 - r) ** 2 * lam + r**2) / torch.sqrt((1 - t) ** 2 * lam + t**2)
        return (1 - r) * mu + torch.einsum("bnk,bk->bn", Q, ratio * w)

    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """u*(z, r, t) = (z - z_r) / (t - r); at r = t, the velocity itself."""
        z2 = self._flat(z)
        h = (t - r).double()[:, None]
        u = (z2 - self.flow_map(z2, t, r, y)) / h.clamp_min(1e-12)
        return torch.where(h > 0, u, self.velocity(z2, t, y))

    # --- unconditional and guided fields -----------------------------------------------------------------------
    def _every_class(self, z: torch.Tensor, t: torch.Tensor):
        """Eigenbasis coordinates w = Q_c^T (z - (1 - t) mu_c) and variances s^2 for every class: (B, K, n) each."""
        z, t = self._flat(z), t.double().view(-1, 1, 1)
        w = torch.einsum("knj,bkn->bkj", self.Q, z[:, None] - (1 - t) * self.mu[None])
        s2 = (1 - t) ** 2 * self.lam[None] + t**2
        return w, s2, t

    def log_density(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log N(z; (1 - t) mu_c, S_t,c) for every class: (B, K)."""
        w, s2, _ = self._every_class(z, t)
        return -0.5 * ((w**2 / s2).sum(-1) + torch.log(s2).sum(-1) + self.dim * math.log(2 * math.pi))

    def unconditional_velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_u(z, t) = sum_c p(c | z_t) v(z, t | c), uniform class prior, all classes in one batched pass."""
        w, s2, tt = self._every_class(z, t)
        log_p = -0.5 * ((w**2 / s2).sum(-1) + torch.log(s2).sum(-1))  # the constant cancels in the softmax
        post = torch.softmax(log_p, dim=1)  # (B, K)
        v_every = -self.mu[None] + torch.einsum("knj,bkj->bkn", self.Q, (tt - (1 - tt) * self.lam[None]) / s2 * w)
        return torch.einsum("bk,bkn->bn", post, v_every)

    def guided_velocity(self, z, t, y, omega: float) -> torch.Tensor:
        v_c = self.velocity(z, t, y)
        if omega == 1.0:
            return v_c
        v_u = self.unconditional_velocity(z, t)
        return v_u + omega * (v_c - v_u)

    def guided_flow_map(self, z, t: float, r: float, y, omega: float, steps: int = 400) -> torch.Tensor:
        """z_r from z_t along the guided field, by RK4 with `steps` uniform steps (exact field, fine solve)."""
        z = self._flat(z).clone()
        b = z.shape[0]
        dt = (r - t) / steps
        tt = t
        for _ in range(steps):

            def f(zz, s):
                return self.guided_velocity(zz, torch.full((b,), s, dtype=torch.float64), y, omega)

            k1 = f(z, tt)
            k2 = f(z + 0.5 * dt * k1, tt + 0.5 * dt)
            k3 = f(z + 0.5 * dt * k2, tt + 0.5 * dt)
            k4 = f(z + dt * k3, tt + dt)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tt += dt
        return z


def relative_error(x_hat: torch.Tensor, x_star: torch.Tensor, mu: torch.Tensor) -> float:
    """E||x_hat - x*||^2 / E||x* - mu_c||^2 (1.0 for a sampler that returns the class mean)."""
    n = x_star.shape[0]
    x_hat, x_star, mu = (a.double().reshape(n, -1) for a in (x_hat, x_star, mu))
    return float(((x_hat - x_star) ** 2).sum() / ((x_star - mu) ** 2).sum())


@torch.no_grad()
def one_step_error(
    model,
    data: GaussClasses,
    n: int = 512,
    omega: float = 1.0,
    interval=None,
    steps: int = 1,
    euler: bool = False,
    seed: int = 1234,
) -> float:
    """Relative error of `steps`-step samples against the exact map of the same noise (guided for omega > 1)."""
    from imf.sampler import DEFAULT_INTERVAL, sample

    e, y, x_star = data.evaluation_set(n, omega, seed)
    dev = next(model.parameters()).device
    x_hat = sample(
        model,
        e.float().view(n, *data.image_shape).to(dev),
        y.to(dev),
        omega=omega,
        interval=DEFAULT_INTERVAL if interval is None else interval,
        steps=steps,
        euler=euler,
    ).cpu()
    return relative_error(x_hat, x_star, data.mu[y])


@torch.no_grad()
def u_error(model, data: GaussClasses, n: int = 512, omega: float = 1.0, seed: int = 4321) -> float:
    """E||u_theta - u*||^2 / E||u*||^2 over (z_t, r, t) drawn as in training (omega = 1, conditional)."""
    from imf.model import Cond

    gen = torch.Generator().manual_seed(seed)
    x, y = data.sample(n, gen)
    a, b = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    e = torch.randn(x.shape, generator=gen)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    dev = next(model.parameters()).device
    one = torch.ones(n)
    cond = Cond(h=(t - r), y=y, omega=one * omega, t_min=one * 0.4, t_max=one * 0.65, t=t)
    u = model.u(z.to(dev), Cond(*(c.to(dev) for c in cond))).cpu().double().reshape(n, -1)
    u_star = data.average_velocity(z, r, t, y)
    return float(((u - u_star) ** 2).sum() / (u_star**2).sum())
