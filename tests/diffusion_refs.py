"""Float64 references for the GaussianDiffusion tests, written from the papers' formulas with plain Python
loops, and small stand-in networks. Index convention of the code (0-based): buffer index i is step i+1 of
the paper; alphas_cumprod[0] = 1 - beta_1."""
import math

import numpy as np
import torch
import torch.nn as nn

BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2")


# ---- float64 references, written from the papers' formulas with plain Python loops -------------------------

def ref_linear_betas(T, beta_start, beta_end):
    return [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]


def ref_cosine_betas(T, s=0.008):
    """Nichol & Dhariwal 2021: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2); beta_t clipped at 0.999."""
    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = [f(t) / f(0) for t in range(T + 1)]
    return [min(1 - abar[t] / abar[t - 1], 0.999) for t in range(1, T + 1)]


def ref_schedule(betas):
    """Every buffer in float64; the posterior by Bayes' rule: precision = alpha/beta + 1/(1 - abar_prev)."""
    T = len(betas)
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    var, c1, c2 = [], [], []
    for i in range(T):
        alpha, beta = 1.0 - betas[i], betas[i]
        if i == 0:  # q(x_{t-1} | x_t, x_0) at the first step is a point mass at x_0
            var.append(0.0), c1.append(1.0), c2.append(0.0)
            continue
        v = 1.0 / (alpha / beta + 1.0 / (1.0 - abar_prev[i]))
        var.append(v)
        c1.append(math.sqrt(abar_prev[i]) / (1.0 - abar_prev[i]) * v)  # coefficient of x_0 in the mean
        c2.append(math.sqrt(alpha) / beta * v)                          # coefficient of x_t in the mean
    ref = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in abar],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in abar],
        "posterior_variance": var,
        "posterior_log_variance_clipped": [math.log(var[1])] + [math.log(v) for v in var[1:]],
        "posterior_mean_coef1": c1,
        "posterior_mean_coef2": c2,
    }
    return {k: np.array(v, dtype=np.float64) for k, v in ref.items()}


def assert_close64(actual: torch.Tensor, expected, rtol, atol, msg=""):
    actual = actual.detach().double().cpu().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (f"{msg}: max violation at flat index {worst}: got {actual.flat[worst]}, "
                                  f"expected {expected.flat[worst]}")


class FakeEps(nn.Module):
    """A fixed smooth 'model' whose output the tests can recompute in float64: out = sin(x) (1 + t/T) / 2."""

    num_classes = None

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, x, t, y=None):
        return (torch.sin(x.double()) * (1 + t.double() / self.T).reshape(-1, 1, 1, 1) / 2).float()

    def ref(self, x64, t):
        return np.sin(x64) * (1 + np.asarray(t, dtype=np.float64) / self.T).reshape(-1, 1, 1, 1) / 2


class ExactEps(nn.Module):
    """The Bayes-optimal model when the data is one fixed image x0*: eps = (x_t - sqrt(abar_t) x0*)/sqrt(1-abar_t)."""

    num_classes = None

    def __init__(self, x0_star, abar64):
        super().__init__()
        self.x0 = x0_star.double()
        self.abar = torch.tensor(abar64, dtype=torch.float64)

    def forward(self, x, t, y=None):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x0) / (1 - a).sqrt()).float()


class GaussianEps(nn.Module):
    """Data with a known score: x_0 ~ N(mu, s^2 I). With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
    x_t ~ N(alpha_t mu, (alpha_t^2 s^2 + sigma_t^2) I), so the optimal noise prediction E[eps | x_t] is
    eps(x_t, t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), computed in float64. Its
    probability-flow ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed, which gives the
    exact solution `exact_x0`. `wiggle` adds wiggle * tanh(x_t): then it is no longer optimal, but a smooth
    nonlinear stand-in network on which two implementations of a solver can be compared."""

    num_classes = None

    def __init__(self, abar64, mu=0.3, s=0.5, wiggle=0.0):
        super().__init__()
        self.abar = torch.tensor(np.asarray(abar64), dtype=torch.float64)
        self.mu, self.s, self.wiggle = mu, s, wiggle

    def forward(self, x, t, y=None):
        a = self.abar[t].reshape(-1, *([1] * (x.ndim - 1)))
        alpha, sigma, x = a.sqrt(), (1 - a).sqrt(), x.double()
        return (sigma * (x - alpha * self.mu) / (a * self.s ** 2 + sigma ** 2) + self.wiggle * torch.tanh(x)).float()

    def exact_x0(self, x_T):
        """x_0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2), float64 (x_T at index T-1)."""
        a = self.abar[-1]
        return self.mu + self.s * (x_T.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a).sqrt()
