"""GaussianDiffusion against independent float64 references written here: the schedules' formulas, the
forward process (Monte Carlo), the posterior (Bayes' rule on Gaussians, also by numerical integration),
one DDPM / DDIM step (DDPM Algorithm 2, DDIM eq. 12), the objectives, and whole sampling loops.

Index convention of the code (0-based): buffer index i is step i+1 of the paper; alphas_cumprod[0] = 1 - beta_1.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusion import GaussianDiffusion
from model import UNet

BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2")


@pytest.fixture(autouse=True)
def _one_thread():
    # runs after conftest's set_num_threads(2): these tensors are tiny, and when the 2 cores are shared with
    # other processes two spinning OpenMP threads make them 10-40 times slower than one thread
    torch.set_num_threads(1)


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


def make_diffusion(model=None, **kw):
    return GaussianDiffusion(model if model is not None else nn.Identity(), **kw)


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


def tiny_unet(seed=0, **kw):
    """A small random-weight U-Net whose output is not identically zero: the zero-initialised layers get small
    random weights instead."""
    torch.manual_seed(seed)
    args = dict(image_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), image_size=16, dropout=0.0)
    args.update(kw)
    model = UNet(**args)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()


# ---- schedules and buffers -----------------------------------------------------------------------------------

def test_linear_schedule_is_evenly_spaced_and_zero_based():
    d = make_diffusion(timesteps=1000, beta_start=1e-4, beta_end=0.02)
    assert_close64(d.betas, ref_linear_betas(1000, 1e-4, 0.02), rtol=1e-6, atol=0, msg="betas")
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    # equal gaps (float64 differences of float32 values: each value carries at most 6e-8 relative rounding)
    gaps = torch.diff(d.betas.double())
    assert torch.allclose(gaps, torch.full_like(gaps, (0.02 - 1e-4) / 999), rtol=0, atol=5e-9)
    # index 0 is the first step: alpha-bar_0 = 1 - beta_start, and the 'previous' of index 0 is 1
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert d.alphas_cumprod_prev[0].item() == 1.0
    assert len(d.betas) == 1000


def test_cosine_schedule_matches_nichol_dhariwal():
    T = 1000
    d = make_diffusion(timesteps=T, beta_schedule="cosine")
    ref = ref_cosine_betas(T)
    assert_close64(d.betas, ref, rtol=1e-6, atol=0, msg="cosine betas")
    # the last beta hits the clip (f(T) = cos^2(pi/2) = 0), none is above it
    assert d.betas[-1].item() == pytest.approx(0.999, rel=1e-7)
    assert d.betas.max().item() <= 0.999 + 1e-7
    # before the clip, alpha-bar is exactly f(t)/f(0) (index i <-> t = i + 1)
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = [f[i + 1] / f[0] for i in range(T - 1)]
    assert_close64(d.alphas_cumprod[:-1], abar, rtol=2e-6, atol=0, msg="cosine alpha-bar")
    # betas increase (up to float32 rounding of nearly equal neighbours at the start)
    assert torch.all(torch.diff(d.betas.double()) > -1e-9)


@pytest.mark.parametrize("kw, betas", [
    (dict(timesteps=1000), ref_linear_betas(1000, 1e-4, 0.02)),
    (dict(timesteps=50, beta_start=1e-3, beta_end=0.2), ref_linear_betas(50, 1e-3, 0.2)),
    (dict(timesteps=1000, beta_schedule="cosine"), ref_cosine_betas(1000)),
    (dict(timesteps=20, beta_schedule="cosine"), ref_cosine_betas(20)),
], ids=["linear1000", "linear50", "cosine1000", "cosine20"])
def test_every_buffer_matches_float64_formulas(kw, betas):
    d = make_diffusion(**kw)
    ref = ref_schedule(betas)
    for name in BUFFERS:
        buf = getattr(d, name)
        assert buf.dtype == torch.float32, name
        # float32 storage of a float64 value: relative error at most 2^-24 = 6e-8; allow a little slack
        assert_close64(buf, ref[name], rtol=1e-6, atol=1e-12, msg=name)
    assert d.posterior_variance[0].item() == 0.0
    assert d.num_timesteps == kw["timesteps"]


def test_fixed_large_log_variance_buffer():
    betas = ref_linear_betas(1000, 1e-4, 0.02)
    ref = ref_schedule(betas)
    d = make_diffusion(timesteps=1000)
    expected = [math.log(ref["posterior_variance"][1])] + [math.log(b) for b in betas[1:]]
    assert_close64(d.fixed_large_log_variance, expected, rtol=1e-6, atol=0, msg="fixed_large")


def test_buffers_move_with_to():
    d = make_diffusion(timesteps=10)
    d64 = d.to(torch.float64)
    for name in BUFFERS:
        assert getattr(d64, name).dtype == torch.float64, name
    d_meta = make_diffusion(timesteps=10).to("meta")
    for name in BUFFERS:
        assert getattr(d_meta, name).device.type == "meta", name


def test_unknown_options_raise():
    with pytest.raises(ValueError):
        make_diffusion(beta_schedule="quadratic")
    with pytest.raises(ValueError):
        make_diffusion(objective="score")
    with pytest.raises(ValueError):
        make_diffusion(variance="learned")


# ---- forward process -----------------------------------------------------------------------------------------

def test_q_sample_with_given_noise_is_the_closed_form():
    T = 1000
    ref = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))
    d = make_diffusion(timesteps=T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 100, 500, 999])
    a = ref["alphas_cumprod"][t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()
    assert_close64(d.q_sample(x0, t, noise), expected, rtol=1e-6, atol=1e-6, msg="q_sample")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t_idx", [0, 1, 300, 999])
def test_q_sample_mean_and_variance_monte_carlo(schedule, t_idx):
    """x_t ~ N(sqrt(abar_t) x0, (1 - abar_t) I): sample mean and variance within 5 standard errors."""
    T, n = 1000, 200_000
    betas = ref_linear_betas(T, 1e-4, 0.02) if schedule == "linear" else ref_cosine_betas(T)
    abar = ref_schedule(betas)["alphas_cumprod"][t_idx]
    d = make_diffusion(timesteps=T, beta_schedule=schedule)
    x0_values = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    x0 = x0_values.repeat(n, 1)                           # (n, 4): n draws for each of 4 fixed x0
    torch.manual_seed(1234 + t_idx)
    xt = d.q_sample(x0, torch.full((n,), t_idx, dtype=torch.long)).double()
    mean_ref = math.sqrt(abar) * x0_values.double()
    var_ref = 1.0 - abar
    se_mean = math.sqrt(var_ref / n)
    se_var = var_ref * math.sqrt(2.0 / (n - 1))
    mean = xt.mean(0)
    var = xt.var(0, unbiased=True)
    assert torch.all((mean - mean_ref).abs() <= 5 * se_mean), (mean, mean_ref, se_mean)
    assert torch.all((var - var_ref).abs() <= 5 * se_var), (var, var_ref, se_var)


# ---- the posterior q(x_{t-1} | x_t, x_0) ---------------------------------------------------------------------

def bayes_posterior(alpha, abar_prev, x_t, x0):
    """Normalised product of N(x_t; sqrt(alpha) x, beta) and N(x; sqrt(abar_prev) x0, 1 - abar_prev) in x."""
    beta = 1.0 - alpha
    precision = alpha / beta + 1.0 / (1.0 - abar_prev)
    mean = (math.sqrt(alpha) * x_t / beta + math.sqrt(abar_prev) * x0 / (1.0 - abar_prev)) / precision
    return mean, 1.0 / precision


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_is_bayes_rule(schedule):
    T = 1000
    betas = ref_linear_betas(T, 1e-4, 0.02) if schedule == "linear" else ref_cosine_betas(T)
    d = make_diffusion(timesteps=T, beta_schedule=schedule)
    g = torch.Generator().manual_seed(2)
    ts = [1, 2, 10, 500, T - 2, T - 1]
    x0 = torch.rand(len(ts), 2, 3, 3, generator=g) * 2 - 1
    x_t = torch.randn(len(ts), 2, 3, 3, generator=g)
    mean, var, log_var = d.q_posterior(x0, x_t, torch.tensor(ts))
    abar = np.cumprod([1.0 - b for b in betas])  # (checked against a loop in test_every_buffer_...)
    for row, i in enumerate(ts):
        alpha, abar_prev = 1.0 - betas[i], abar[i - 1]
        m_ref, v_ref = bayes_posterior(alpha, abar_prev, x_t[row].double().numpy(), x0[row].double().numpy())
        assert_close64(mean[row], m_ref, rtol=1e-5, atol=1e-5, msg=f"posterior mean t={i}")
        assert var[row].item() == pytest.approx(v_ref, rel=1e-5), i
        assert log_var[row].item() == pytest.approx(math.log(v_ref), rel=1e-6, abs=1e-6), i


def test_q_posterior_at_first_step_is_x0_with_zero_variance():
    d = make_diffusion(timesteps=1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    x_t = torch.randn(3, 1, 4, 4, generator=g)
    mean, var, log_var = d.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(mean, x0, rtol=0, atol=1e-6)
    assert torch.all(var == 0)
    # the clipped log variance at index 0 is that of index 1 (finite), not log 0
    betas = ref_linear_betas(1000, 1e-4, 0.02)
    _, v1 = bayes_posterior(1 - betas[1], 1 - betas[0], 0.0, 0.0)
    assert torch.allclose(log_var.double(), torch.full_like(log_var.double(), math.log(v1)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("t_idx", [1, 40, 999])
def test_q_posterior_by_numerical_integration(t_idx):
    """Normalise q(x_t | x_{t-1}) q(x_{t-1} | x_0) on a fine grid; its mean and variance match q_posterior."""
    T = 1000
    betas = ref_linear_betas(T, 1e-4, 0.02)
    abar = np.cumprod([1.0 - b for b in betas])
    alpha, abar_prev = 1.0 - betas[t_idx], abar[t_idx - 1]
    x0, x_t = 0.6, -0.2
    # the two factors as Gaussians in x = x_{t-1}
    m1, s1 = x_t / math.sqrt(alpha), math.sqrt((1 - alpha) / alpha)
    m2, s2 = math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev)
    smax = max(s1, s2)
    grid = np.linspace(min(m1, m2) - 12 * smax, max(m1, m2) + 12 * smax, 400_001)
    log_p = (-(x_t - math.sqrt(alpha) * grid) ** 2 / (2 * (1 - alpha))
             - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(p, grid)
    m_num = np.trapezoid(grid * p, grid)
    v_num = np.trapezoid((grid - m_num) ** 2 * p, grid)

    d = make_diffusion(timesteps=T)
    mean, var, _ = d.q_posterior(torch.full((1, 1), x0), torch.full((1, 1), x_t), torch.tensor([t_idx]))
    assert mean.item() == pytest.approx(m_num, rel=1e-5, abs=1e-6)
    assert var.item() == pytest.approx(v_num, rel=1e-4)


# ---- one sampling step ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_one_ddpm_step_against_float64(variance, clip):
    """DDPM Algorithm 2: x_{t-1} = posterior mean at the predicted x_0 + sigma_t z, no noise at the last step;
    sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large)."""
    T = 1000
    betas = ref_linear_betas(T, 1e-4, 0.02)
    ref = ref_schedule(betas)
    fake = FakeEps(T)
    d = make_diffusion(fake, timesteps=T, variance=variance, clip_denoised=clip)
    g = torch.Generator().manual_seed(4)
    ts = np.array([0, 1, 2, 7, 500, 998, 999])
    x_t = torch.randn(len(ts), 2, 3, 3, generator=g) * 1.5
    z = torch.randn(len(ts), 2, 3, 3, generator=g)
    x_prev, x0_out = d.p_sample(x_t, torch.tensor(ts), z)

    x64, z64 = x_t.double().numpy(), z.double().numpy()
    col = (-1, 1, 1, 1)
    a = ref["alphas_cumprod"][ts].reshape(col)
    eps = fake.ref(x64, ts)
    x0 = (x64 - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = ref["posterior_mean_coef1"][ts].reshape(col) * x0 + ref["posterior_mean_coef2"][ts].reshape(col) * x64
    var = ref["posterior_variance"][ts] if variance == "fixed_small" else np.array(betas)[ts]
    sigma = np.where(ts > 0, np.sqrt(var), 0.0).reshape(col)
    expected = mean + sigma * z64
    # x0 = x_t / sqrt(abar) is amplified up to 1/sqrt(abar_999) = 157 times at the last index
    assert_close64(x0_out, x0, rtol=1e-5, atol=1e-4, msg="predicted x0")
    assert_close64(x_prev, expected, rtol=1e-5, atol=2e-5, msg="x_{t-1}")
    if clip:
        assert x0_out.abs().max().item() <= 1.0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_one_ddim_step_against_eq12(eta, clip):
    """Song et al. 2021 eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev), a_prev = 1 when stepping to the data.
    With clip_denoised the eps is the one implied by the clipped x0 (as the code documents)."""
    T = 1000
    ref = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))
    fake = FakeEps(T)
    d = make_diffusion(fake, timesteps=T, clip_denoised=clip)
    pairs = np.array([(999, 979), (999, 0), (500, 480), (20, 0), (3, 1), (0, -1), (7, -1)])
    ts, tps = pairs[:, 0], pairs[:, 1]
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(len(ts), 3, 2, 2, generator=g)
    z = torch.randn(len(ts), 3, 2, 2, generator=g)
    x_prev, x0_out = d.ddim_step(x_t, torch.tensor(ts), torch.tensor(tps), z, eta)

    col = (-1, 1, 1, 1)
    x64, z64 = x_t.double().numpy(), z.double().numpy()
    a_t = ref["alphas_cumprod"][ts].reshape(col)
    a_prev = np.where(tps >= 0, ref["alphas_cumprod"][np.maximum(tps, 0)], 1.0).reshape(col)
    eps = fake.ref(x64, ts)
    x0 = (x64 - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    if clip:
        x0 = np.clip(x0, -1, 1)
        eps = (x64 - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * z64
    assert_close64(x0_out, x0, rtol=1e-5, atol=1e-4, msg="predicted x0")
    assert_close64(x_prev, expected, rtol=1e-5, atol=5e-5, msg="DDIM x_prev")


def test_ddim_eta1_full_steps_has_ddpm_posterior_variance():
    """With every step and eta=1, sigma^2 of DDIM eq. 16 is DDPM's beta-tilde_t. At x_t = 0 with a model that
    predicts eps = 0 the predicted x0 is 0, so the step returns exactly sigma * z; z = 1 reads sigma off."""
    T = 100
    ref = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))

    class Zero(nn.Module):
        num_classes = None

        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    d = make_diffusion(Zero(), timesteps=T, clip_denoised=False)
    ts = torch.arange(1, T)
    x_t = torch.zeros(T - 1, 1, 1, 1)
    z = torch.ones(T - 1, 1, 1, 1)
    out, _ = d.ddim_step(x_t, ts, ts - 1, z, 1.0)  # x_t = 0 and eps = 0: x0 = 0, so x_prev = sigma * 1
    # the code forms 1 - a_t/a_prev in float32, where a_t/a_prev = 1 - beta_t: an absolute error of about
    # 2 ulp(1) = 2.4e-7 there, times (1 - a_prev)/(1 - a_t) < 1 in sigma^2
    assert_close64(out.flatten() ** 2, ref["posterior_variance"][1:], rtol=1e-5, atol=2.4e-7, msg="sigma^2")


# ---- objectives ------------------------------------------------------------------------------------------------

class TargetModel(nn.Module):
    """Outputs a target computed in float64 from the known x0 and noise (what a perfect model would output)."""

    num_classes = None

    def __init__(self, x0, noise, abar64, what):
        super().__init__()
        self.x0, self.noise, self.abar, self.what = x0.double(), noise.double(), torch.tensor(abar64), what

    def forward(self, x, t, y=None):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        out = {"eps": self.noise, "x0": self.x0,
               "v": a.sqrt() * self.noise - (1 - a).sqrt() * self.x0}[self.what]
        return out.float()


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_loss_target_per_objective(objective):
    T = 1000
    abar = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))["alphas_cumprod"]
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    for what in ("eps", "x0", "v"):
        d = make_diffusion(TargetModel(x0, noise, abar, what), timesteps=T, objective=objective)
        loss = d.loss(x0, t=t, noise=noise)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        if what == objective:
            assert loss.item() < 1e-12
        else:  # the wrong target is far off (the mean squared difference of unrelated unit-scale tensors)
            assert loss.item() > 0.05


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_predict_converts_objective_to_eps_and_x0(objective):
    """A model outputting the true target at x_t = sqrt(abar) x0 + sqrt(1-abar) eps: predict() returns (eps, x0);
    v = sqrt(abar) eps - sqrt(1-abar) x0."""
    T = 1000
    abar = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))["alphas_cumprod"]
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 1.8 - 0.9
    eps = torch.randn(5, 3, 4, 4, generator=g)
    ts = np.array([0, 1, 250, 700, 999])
    a = abar[ts].reshape(-1, 1, 1, 1)
    x_t64 = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps.double().numpy()
    d = make_diffusion(TargetModel(x0, eps, abar, objective), timesteps=T, objective=objective,
                       clip_denoised=False)
    eps_out, x0_out = d.predict(torch.tensor(x_t64, dtype=torch.float32), torch.tensor(ts))
    # float32 x_t carries 6e-8 relative rounding, amplified up to 1/sqrt(abar_999) ~ 157 in x0 and
    # sqrt(abar_0)/sqrt(1 - abar_0) ~ 100 in eps at the ends of the schedule
    assert_close64(x0_out, x0.double().numpy(), rtol=1e-4, atol=2e-4, msg="x0")
    assert_close64(eps_out, eps.double().numpy(), rtol=1e-4, atol=2e-4, msg="eps")


# ---- classifier-free guidance and label dropping ---------------------------------------------------------------

@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -0.5])
def test_classifier_free_guidance(w):
    model = tiny_unet(seed=1, num_classes=4)
    d = make_diffusion(model, timesteps=100, clip_denoised=False)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([5, 50, 99])
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        eps_c = model(x, t, y).double()
        eps_u = model(x, t, None).double()
        eps, x0 = d.predict(x, t, y, guidance_scale=w)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the labels matter, so the check below is not trivial
    expected = eps_u + w * (eps_c - eps_u)
    assert torch.allclose(eps.double(), expected, rtol=1e-4, atol=1e-5)
    abar = torch.tensor(ref_schedule(ref_linear_betas(100, 1e-4, 0.02))["alphas_cumprod"])[t].reshape(-1, 1, 1, 1)
    x0_ref = (x.double() - (1 - abar).sqrt() * expected) / abar.sqrt()
    assert torch.allclose(x0.double(), x0_ref, rtol=1e-4, atol=1e-4)


def test_distribution_of_t():
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x, t, y=None):
            seen["t"] = t.clone()
            return torch.zeros_like(x)

    # t ~ U{0..T-1}: with T = 10, each count is Binomial(n, 1/T), within 5 standard errors of n/T
    n, T = 20_000, 10
    torch.manual_seed(9)
    make_diffusion(Recorder(), timesteps=T).loss(torch.zeros(n, 1, 1, 1))
    assert seen["t"].dtype == torch.long
    counts = torch.bincount(seen["t"], minlength=T)
    assert len(counts) == T  # nothing at T or above
    assert torch.all((counts.double() - n / T).abs() <= 5 * math.sqrt(n * (1 / T) * (1 - 1 / T))), counts


# ---- sampling loops --------------------------------------------------------------------------------------------

def test_ddim_timesteps():
    d = make_diffusion(timesteps=1000)
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    for steps in (1, 2, 7, 50, 100, 999):
        ts = d.ddim_timesteps(steps)
        assert len(ts) == steps
        assert ts[0] == 999           # sampling starts from x_T ~ N(0, I), which is the last index
        assert all(a > b for a, b in zip(ts, ts[1:]))
        assert all(isinstance(v, int) for v in ts)
        if steps > 1:
            assert ts[-1] == 0
            gaps = np.diff(ts[::-1])
            assert gaps.max() - gaps.min() <= 1, steps  # evenly spaced up to rounding
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            d.ddim_timesteps(bad)


def test_ddim_eta1_all_steps_equals_ddpm_fixed_small():
    T = 50
    model = tiny_unet(seed=2)
    kw = dict(timesteps=T, beta_start=1e-3, beta_end=0.1, variance="fixed_small", clip_denoised=False)
    d = make_diffusion(model, **kw)
    shape = (2, 3, 16, 16)
    x_ddpm, tr_ddpm = d.p_sample_loop(shape, generator=torch.Generator().manual_seed(10), record=range(T))
    x_ddim, tr_ddim = d.ddim_sample(shape, steps=T, eta=1.0, generator=torch.Generator().manual_seed(10),
                                    record=range(T))
    assert tr_ddpm["t"] == tr_ddim["t"] == list(range(T - 1, -1, -1))
    # the model's predictions are not trivial (the zero-initialised output layer was re-initialised)
    assert max(x.abs().max().item() for x in tr_ddpm["x0"]) > 0
    with torch.no_grad():
        eps_mag = model(tr_ddpm["x_t"][0], torch.full((2,), T - 1)).abs().mean().item()
    assert eps_mag > 0.05
    assert torch.equal(tr_ddpm["x_t"][0], tr_ddim["x_t"][0])  # the same x_T
    for k in range(T):
        for key in ("x_t", "x0"):
            a, b = tr_ddpm[key][k], tr_ddim[key][k]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (key, tr_ddpm["t"][k], (a - b).abs().max())
    assert torch.allclose(x_ddpm, x_ddim, rtol=1e-4, atol=1e-4), (x_ddpm - x_ddim).abs().max()
    # and the noise matters: another seed or the other DDPM variance gives a clearly different sample
    x_other = d.ddim_sample(shape, steps=T, eta=1.0, generator=torch.Generator().manual_seed(11))
    assert (x_other - x_ddim).abs().max() > 0.1
    kw["variance"] = "fixed_large"
    x_large = make_diffusion(model, **kw).p_sample_loop(shape, generator=torch.Generator().manual_seed(10))
    assert (x_large - x_ddpm).abs().max() > 1e-3


def test_ddim_eta0_is_deterministic_given_x_T():
    model = tiny_unet(seed=3)
    d = make_diffusion(model, timesteps=50, beta_start=1e-3, beta_end=0.1, clip_denoised=False)
    shape = (2, 3, 16, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    a = d.ddim_sample(shape, steps=10, eta=0.0, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample(shape, steps=10, eta=0.0, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - x_T).abs().max() > 1e-2  # it did move
    # with eta > 0 the generator does matter (so the equality above is a property of eta=0)
    c = d.ddim_sample(shape, steps=10, eta=0.5, noise=x_T, generator=torch.Generator().manual_seed(1))
    e = d.ddim_sample(shape, steps=10, eta=0.5, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert (c - e).abs().max() > 1e-2


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [False, True])
def test_exact_model_recovers_x0_star(schedule, clip):
    """With the Bayes-optimal model for a one-image data set, DDIM (eta=0, any number of steps) lands exactly on
    that image from any x_T, and DDPM's last step (the posterior mean at t=0) does too."""
    T = 50
    betas = ref_linear_betas(T, 1e-3, 0.1) if schedule == "linear" else ref_cosine_betas(T)
    abar = ref_schedule(betas)["alphas_cumprod"]
    x0_star = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(13)) * 1.8 - 0.9)
    model = ExactEps(x0_star, abar)
    kw = dict(timesteps=T, beta_start=1e-3, beta_end=0.1) if schedule == "linear" else dict(timesteps=T)
    d = make_diffusion(model, beta_schedule=schedule, variance="fixed_small", clip_denoised=clip, **kw)
    shape = (3, 3, 8, 8)
    target = x0_star.expand(shape)
    for scale in (1.0, 4.0):
        x_T = scale * torch.randn(shape, generator=torch.Generator().manual_seed(14))
        # predicting x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps cancels two terms of size |x_t| / sqrt(abar):
        # float32 rounding (unit roundoff 2^-24, a few roundings) leaves this much; largest at index T-1,
        # where the cosine schedule has abar = 2e-6 (1/sqrt(abar) = 730), the linear one abar = 0.08
        x0_tol = 1e-5 + 4 * 2.0 ** -24 * x_T.abs().max().item() / math.sqrt(abar[-1])
        for steps in (1, 5, T):
            x, tr = d.ddim_sample(shape, steps=steps, eta=0.0, noise=x_T, record=range(T))
            # one step is the x0 prediction at T-1; after more steps the last prediction is at a small t
            assert (x - target).abs().max().item() < (x0_tol if steps == 1 else 1e-4), (steps, scale)
            assert tr["t"][0] == T - 1
            for t, x0 in zip(tr["t"], tr["x0"]):  # every intermediate x0 prediction is x0* as well
                assert (x0 - target).abs().max().item() < x0_tol, (steps, t)
        x = d.p_sample_loop(shape, generator=torch.Generator().manual_seed(15), noise=x_T)
        assert (x - target).abs().max().item() < 1e-4
