"""GaussianDiffusion's schedules, forward process q(x_t | x_0) (closed form and Monte Carlo) and posterior
q(x_{t-1} | x_t, x_0) (Bayes' rule on Gaussians, also by numerical integration), against float64 references."""
import math

import numpy as np
import pytest
import torch
from diffusion_refs import BUFFERS, assert_close64, ref_cosine_betas, ref_linear_betas, ref_schedule
from helpers import make_diffusion

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
