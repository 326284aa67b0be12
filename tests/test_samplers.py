"""ddpm/samplers.py: the timestep spacings, DPM-Solver++ against float64 references written from the paper
(Lu et al. 2022, arXiv:2211.01095) and against data with a known score, DDIM = DPM-Solver++ order 1, and
dynamic thresholding. diffusers' schedulers as a second implementation: tests/test_against_diffusers.py."""
import math

import numpy as np
import pytest
import torch
from diffusion_refs import GaussianEps, ref_linear_betas, ref_schedule
from helpers import make_diffusion, tiny_unet

from config import SampleConfig
from ddpm.generation import Sampling, generate
from ddpm.samplers import (
    SPACINGS,
    dpmpp_coefficients,
    dpmpp_orders,
    dpmpp_step_coefficients,
    sample_loop,
    sampler_timesteps,
    spaced_timesteps,
)
from diffusion import dynamic_threshold

ABAR = ref_schedule(ref_linear_betas(1000, 1e-4, 0.02))["alphas_cumprod"]  # DDPM's schedule, float64


def run(d, model, x_T, **settings):
    return sample_loop(d, d.denoiser(model), x_T, SampleConfig(**settings))


# ---- timesteps -------------------------------------------------------------------------------------------------

def test_linspace_and_trailing_are_the_diffusers_formulas():
    """Where rounding makes no repeats, the definitions of the issue (as diffusers' DPMSolverMultistepScheduler)."""
    T = 1000
    for n in (1, 2, 3, 7, 10, 20, 50, 100, 250, 500):
        linspace = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(int).tolist()
        trailing = (np.round(np.arange(T, 0, -T / n)) - 1).astype(int).tolist()[:n]
        assert spaced_timesteps(ABAR, n, "linspace") == linspace, n
        assert spaced_timesteps(ABAR, n, "trailing") == trailing, n
    # DDIM's default changed: 100 steps used to end at index 0 (alpha-bar 0.9999); now at 10, then the data
    assert spaced_timesteps(ABAR, 100, "linspace")[-3:] == [30, 20, 10]


def test_logsnr_is_uniform_in_lambda():
    """n+1 points uniform in lambda = log(alpha/sigma) from index T-1 to index 0, the last one dropped; each is
    the index whose lambda is nearest in the linear interpolation of lambda between neighbouring indices."""
    lam = [0.5 * math.log(a / (1 - a)) for a in ABAR]  # decreasing in t
    for n in (1, 5, 10, 20, 40):
        ts = spaced_timesteps(ABAR, n, "logsnr")
        for k, t in enumerate(ts):
            target = lam[-1] + k * (lam[0] - lam[-1]) / n
            j = next(i for i in range(len(lam) - 1) if lam[i + 1] <= target <= lam[i])  # lam[j+1] <= target <= lam[j]
            exact = j + (lam[j] - target) / (lam[j] - lam[j + 1])  # the fractional index with that lambda
            # lambda_0 - lambda_1 = 0.39 is more than a step of 40: the last two both round to 1, and the
            # last is moved to 0 to keep the indices distinct
            assert abs(t - exact) <= (1.5 if (n, k) == (40, 39) else 0.5 + 1e-9), (n, k, t, exact)
    steps = np.diff([lam[t] for t in spaced_timesteps(ABAR, 20, "logsnr")])
    assert steps.max() < 1.5 * steps.min()  # roughly equal steps in lambda, unlike linspace:
    steps = np.diff([lam[t] for t in spaced_timesteps(ABAR, 20, "linspace")])
    assert steps.max() > 2.5 * steps.min()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_is_strictly_decreasing_for_every_n(spacing):
    """Rounding repeats indices when n is close to T; every n in 1..T still gets n distinct indices from T-1
    down, and n = T visits every index (DDIM with eta = 1 over all T steps is then DDPM)."""
    for T, ns in ((50, range(1, 51)), (1000, (1, 2, 3, 333, 500, 667, 900, 999, 1000))):
        abar = ref_schedule(ref_linear_betas(T, 1e-4, 0.02 * 1000 / T))["alphas_cumprod"]
        for n in ns:
            ts = spaced_timesteps(abar, n, spacing)
            assert len(ts) == n and ts[0] == T - 1 and ts[-1] >= 0, (T, n)
            assert all(a > b for a, b in zip(ts, ts[1:])), (T, n, ts)
            assert all(type(t) is int for t in ts)
        assert spaced_timesteps(abar, T, spacing) == list(range(T - 1, -1, -1))


def test_sampler_timesteps_and_bad_values():
    d = make_diffusion(timesteps=1000)
    assert sampler_timesteps(d, SampleConfig(sampler="ddpm", steps=3)) == list(range(999, -1, -1))
    s = SampleConfig(sampler="dpmpp", steps=10, spacing="trailing")
    assert sampler_timesteps(d, s) == spaced_timesteps(ABAR, 10, "trailing")
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="between 1 and T=1000"):
            sampler_timesteps(d, SampleConfig(steps=steps))
    with pytest.raises(ValueError, match="unknown timestep spacing 'karras'"):
        sampler_timesteps(d, SampleConfig(spacing="karras"))


# ---- DPM-Solver++: float64 references from the paper ----------------------------------------------------------

def test_orders_warm_up_and_lower_the_final_steps():
    assert dpmpp_orders(1, 3) == [1]
    assert dpmpp_orders(2, 2) == [1, 1]
    assert dpmpp_orders(3, 3) == [1, 2, 1]
    assert dpmpp_orders(5, 3) == [1, 2, 3, 2, 1]
    assert dpmpp_orders(14, 3) == [1, 2] + [3] * 10 + [2, 1]
    assert dpmpp_orders(15, 3) == [1, 2] + [3] * 12 + [1]  # from 15 steps only the last one is lowered
    assert dpmpp_orders(6, 2) == [1, 2, 2, 2, 2, 1]
    assert dpmpp_orders(6, 1) == [1] * 6


def ref_dpmpp_step(x, x0s, t, ss, order):
    """One step from ss[0] to t, x0s the data predictions at ss[0], ss[1], ... (float64 numpy), t = None for the
    data. Order 1: x_t = sigma_t/sigma_s x - alpha_t (e^-h - 1) x0_s (the paper's eq. for DPM-Solver++ 1);
    order 2: Algorithm 2, D = (1 + 1/(2r)) x0_s0 - 1/(2r) x0_s1 with r = h_prev/h; order 3: the same
    exponential integrator with D1 = h x0', D2 = h^2 x0''/2 of the quadratic through the three predictions in
    lambda (Newton's divided differences), weighted as dpm-solver's multistep third order."""
    def coeffs(i):
        if i is None:
            return 1.0, 0.0, math.inf
        a, s = math.sqrt(ABAR[i]), math.sqrt(1 - ABAR[i])
        return a, s, math.log(a / s)
    alpha_t, sigma_t, lam_t = coeffs(t)
    (_, sigma_s, lam_s), lams = coeffs(ss[0]), [coeffs(i)[2] for i in ss]
    h = lam_t - lam_s
    e = math.exp(-h)
    if order == 1:
        return sigma_t / sigma_s * x - alpha_t * (e - 1) * x0s[0]
    if order == 2:
        r = (lams[0] - lams[1]) / h
        D = (1 + 1 / (2 * r)) * x0s[0] - 1 / (2 * r) * x0s[1]
        return sigma_t / sigma_s * x - alpha_t * (e - 1) * D
    f01 = (x0s[0] - x0s[1]) / (lams[0] - lams[1])
    f12 = (x0s[1] - x0s[2]) / (lams[1] - lams[2])
    f012 = (f01 - f12) / (lams[0] - lams[2])
    D1, D2 = h * (f01 + (lams[0] - lams[1]) * f012), h * h * f012
    return (sigma_t / sigma_s * x - alpha_t * (e - 1) * x0s[0] + alpha_t * ((e - 1) / h + 1) * D1
            - alpha_t * ((e - 1 + h) / h ** 2 - 0.5) * D2)


def test_one_step_of_each_order_against_float64():
    """Steps 0, 1, 2 of order-3 DPM-Solver++ over these timesteps have orders 1, 2, 3, the last one goes to the
    data with order 1; each against the reference on arbitrary x and predictions."""
    timesteps = [999, 700, 400, 150, 40]
    coefs = dpmpp_coefficients(ABAR, timesteps, order=3)
    rng = np.random.default_rng(0)
    for i, order in ((0, 1), (1, 2), (2, 3), (3, 2), (4, 1)):
        x, x0s = rng.normal(size=5), [rng.normal(size=5) for _ in range(order)]
        t = timesteps[i + 1] if i + 1 < len(timesteps) else None
        expected = ref_dpmpp_step(x, x0s, t, timesteps[i::-1][:order], order)
        a, b = coefs[i]
        assert len(b) == order
        ours = a * x + sum(c * m for c, m in zip(b, x0s))
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12, err_msg=f"step {i}, order {order}")
    a, b = coefs[-1]
    assert a == 0.0 and b == [1.0]  # the last step lands on the data: x_0 is the last prediction


def ref_dpmpp(model, x_T, timesteps, order):
    """A whole DPM-Solver++ run in float64: the model (a GaussianEps, evaluated in float64), x_0 from its eps,
    the order schedule of the issue (warm-up min(order, i+1), first order last, at most second order before
    it under 15 steps)."""
    n, x, x0s = len(timesteps), x_T.double(), []
    for i, t in enumerate(timesteps):
        a = ABAR[t]
        eps = torch.as_tensor(model.ref(x, t))
        x0s.insert(0, (x - math.sqrt(1 - a) * eps) / math.sqrt(a))
        k = min(order, i + 1)
        k = 1 if i == n - 1 else min(k, 2) if i == n - 2 and n < 15 else k
        x = ref_dpmpp_step(x, x0s, timesteps[i + 1] if i + 1 < n else None, timesteps[i::-1][:k], k)
    return x


class Gaussian64(GaussianEps):
    """GaussianEps with a float64 output for the reference loop."""

    def ref(self, x, t):
        a = float(ABAR[t])
        al, si = math.sqrt(a), math.sqrt(1 - a)
        return si * (x - al * self.mu) / (a * self.s ** 2 + si ** 2) + self.wiggle * torch.tanh(x)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [8, 16])
def test_whole_trajectory_against_float64(order, steps):
    d = make_diffusion(timesteps=1000, clip_denoised=False)
    model = Gaussian64(ABAR, wiggle=0.1)
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ts = spaced_timesteps(ABAR, steps, "logsnr")
    ours = run(d, model, x_T, sampler="dpmpp", steps=steps, order=order, spacing="logsnr")
    expected = ref_dpmpp(model, x_T, ts, order)
    assert expected.abs().max() > 0.5 and (expected - x_T).abs().max() > 0.5  # it went somewhere
    # float32 tensors: x_0 = x_t / alpha - ... amplifies rounding by up to 1/alpha_{T-1} = 157 at the first step,
    # damped by alpha of the next timestep; 2e-6 is ~20 ulp at the samples' scale
    assert (ours.double() - expected).abs().max().item() < 2e-6


def test_started_part_way_ddim_is_the_rest_of_a_whole_run():
    """What image to image builds on: DDIM (eta 0) started at one of its timesteps from the x_t a whole run had
    there ends where that run ends; a start that is not one of its timesteps is refused."""
    d = make_diffusion(timesteps=20)
    model = tiny_unet(seed=5)
    s = SampleConfig(sampler="ddim", steps=5)
    timesteps = sampler_timesteps(d, s)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    x, trajectory = sample_loop(d, d.denoiser(model), x_T, s, record=timesteps)
    assert torch.equal(sample_loop(d, d.denoiser(model), trajectory["x_t"][2], s, start=timesteps[2]), x)
    with pytest.raises(ValueError, match="not one of the sampler's timesteps"):
        sample_loop(d, d.denoiser(model), x_T, s, start=timesteps[1] - 1)


@pytest.mark.parametrize("order", [2, 3])
def test_started_part_way_dpmpp_warms_up_from_there(order):
    """DPM-Solver++ from the 5th of its 12 timesteps is the float64 reference run over the last 8 alone: its
    orders warm up again from the start (1, 2, 3, ...), as they do from T."""
    d = make_diffusion(timesteps=1000, clip_denoised=False)
    model = Gaussian64(ABAR, wiggle=0.1)
    ts = spaced_timesteps(ABAR, 12, "logsnr")
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.5
    s = SampleConfig(sampler="dpmpp", steps=12, order=order, spacing="logsnr")
    ours = sample_loop(d, d.denoiser(model), x, s, start=ts[4])
    assert (ours.double() - ref_dpmpp(model, x, ts[4:], order)).abs().max().item() < 2e-6


@pytest.mark.parametrize("spacing", SPACINGS)
def test_order_1_is_ddim_with_eta_0(spacing):
    """DPM-Solver++ 1 and DDIM eq. 12 (eta = 0) are the same update written in two ways; on the same timesteps,
    with clipping and a real (tiny) network, they agree up to float32 rounding, step by step."""
    d = make_diffusion(timesteps=1000, clip_denoised=True)
    model = tiny_unet(seed=4)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    record = range(1000)
    ddim, tr_ddim = sample_loop(d, d.denoiser(model), x_T, SampleConfig(sampler="ddim", steps=6, spacing=spacing),
                                torch.Generator().manual_seed(3), record=record)
    dpm, tr_dpm = sample_loop(d, d.denoiser(model), x_T,
                              SampleConfig(sampler="dpmpp", steps=6, order=1, spacing=spacing), record=record)
    assert tr_ddim["t"] == tr_dpm["t"] == spaced_timesteps(ABAR, 6, spacing)
    # DDIM's float32 buffers and our float64 coefficients round differently; x_0 = (x_t - sigma eps) / alpha
    # amplifies that by 1/alpha (10 after the first step here) and the network passes it on: 4e-5 is
    # about 40 ulp at the scale of x_t (up to 4); order 2 differs by 1e-3 or more
    for a, b in zip(tr_ddim["x_t"] + tr_ddim["x0"] + [ddim], tr_dpm["x_t"] + tr_dpm["x0"] + [dpm]):
        assert (a - b).abs().max().item() < 4e-5
    assert (dpm - x_T).abs().max() > 0.1
    # and order 2 is a different method
    assert (run(d, model, x_T, sampler="dpmpp", steps=6, order=2, spacing=spacing) - dpm).abs().max() > 1e-3


# ---- data with a known score -----------------------------------------------------------------------------------

def errors(sampler, steps, spacing="linspace", **kw):
    """RMS error against the exact probability-flow ODE solution, x_0 ~ N(0.3, 0.5^2) (about a CIFAR-10 pixel's
    spread in [-1, 1]), 256 values of x_T, DDPM's linear schedule with T = 1000."""
    d = make_diffusion(timesteps=1000, clip_denoised=False)
    model = GaussianEps(ABAR)
    x_T = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = model.exact_x0(x_T)
    return [((run(d, model, x_T, sampler=sampler, steps=n, spacing=spacing, **kw).double() - exact) ** 2)
            .mean().sqrt().item() for n in steps]


def slope(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


def test_known_score_error_falls_at_the_order_of_the_solver():
    """The error against the exact ODE solution at 5, 10, 20, 40 network calls; the least-squares slope on
    log-log is the order asymptotically. These step counts are not asymptotic: the big first steps at high
    noise dominate at 5, and the last step, first order from t ~ T/N to the data, adds an error proportional
    to sigma^2 there, which for the linear schedule falls like N^-2 in this range. DDIM's error keeps its
    sign and its local slopes stay within 0.85..1 (fit 0.91): we ask 0.8..1.2. 2M's local slopes rise from
    1.3 (5 -> 10) to 3.6 (20 -> 40, its error changes sign near 60 steps; fit 2.3): we ask 1.7..3.0, which no
    first-order method (slope <= 1.2 here) can pass."""
    steps = [5, 10, 20, 40]
    ddim, dpm2 = errors("ddim", steps), errors("dpmpp", steps, order=2)
    assert 0.8 < slope(steps, ddim) < 1.2, ddim
    assert 1.7 < slope(steps, dpm2) < 3.0, dpm2
    assert dpm2[1] < 0.85 * ddim[1] and dpm2[3] < 0.1 * ddim[3]  # 2M at 10 beats DDIM at 10, and by far at 40
    # uniform in lambda the few-step regime is where DPM-Solver++ gains most: 10 steps of 2M, 10x DDIM's
    ddim_l, dpm2_l = errors("ddim", [10], "logsnr"), errors("dpmpp", [10], "logsnr", order=2)
    assert dpm2_l[0] < 0.2 * ddim_l[0]


def test_local_order_of_each_step():
    """One step on the exact ODE trajectory of the Gaussian data (x and the previous predictions exact), with
    equal steps h in lambda: the error of order 1 falls like h^2, of 2M like h^3. 3M as dpm-solver and diffusers
    write it (phi3 weighs D2 = h^2 x0''/2 with half of the Taylor integral's weight) also falls like h^3, five
    times smaller than 2M: it is globally second order. Our order 3 follows them so the two agree; the exact
    weight would give h^4 (checked by hand when this test was written)."""
    mu, s, z = 0.3, 0.5, 1.3

    def at(lam):  # alpha, sigma, x on the trajectory, and the optimal data prediction there
        alpha, sigma = math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))
        spread = math.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)
        return alpha, sigma, alpha * mu + spread * z, mu + alpha * s ** 2 * z / spread

    hs, errs = [0.1, 0.05, 0.025, 0.0125], {1: [], 2: [], 3: []}
    for order in errs:
        for h in hs:
            lams = [-1 + h, -1, -1 - h, -1 - 2 * h]  # t, s0, s1, s2
            alpha, sigma, xs, x0s = map(np.array, zip(*[at(lam) for lam in lams]))
            a, b = dpmpp_step_coefficients(alpha, sigma, np.array(lams), order)
            errs[order].append(abs(a * xs[1] + sum(c * m for c, m in zip(b, x0s[1:])) - xs[0]))
    assert 1.9 < slope(1 / np.array(hs), errs[1]) < 2.1
    assert 2.9 < slope(1 / np.array(hs), errs[2]) < 3.1
    assert 2.9 < slope(1 / np.array(hs), errs[3]) < 3.3
    assert all(e3 < e2 / 3 for e2, e3 in zip(errs[2], errs[3]))


# ---- thresholding, guidance, clipping ---------------------------------------------------------------------------

def test_dynamic_threshold_against_float64():
    """Imagen: s = max(1, the 0.995 quantile of |x_0| per image), x_0 = clamp(x_0, -s, s) / s; numpy's
    quantile (linear interpolation) as the reference."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(5, 3, 9, 7, generator=g) * torch.tensor([0.2, 1.0, 2.0, 4.0, 30.0]).reshape(-1, 1, 1, 1)
    x64 = x0.double().numpy().reshape(5, -1)
    s = np.maximum(1.0, np.quantile(np.abs(x64), 0.995, axis=1))[:, None]
    expected = (np.clip(x64, -s, s) / s).reshape(x0.shape)
    out = dynamic_threshold(x0)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out[0], x0[0])  # an image within [-1, 1] is left alone
    assert out.abs().max() <= 1 and (out[4].abs() == 1).float().mean() < 0.01  # a few saturate, not half


def test_predict_thresholds_x0_and_keeps_eps_consistent():
    d = make_diffusion(timesteps=1000, clip_denoised=True)
    model = tiny_unet(seed=6)
    x_t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 3
    t = torch.tensor([999, 500, 20])
    _, raw = make_diffusion(timesteps=1000, clip_denoised=False).predict(model, x_t, t)
    assert raw.abs().max() > 2  # so clipping and thresholding both act
    for threshold, expected in ((False, raw.clamp(-1, 1)), (True, dynamic_threshold(raw))):
        eps, x0 = d.predict(model, x_t, t, threshold=threshold)
        assert torch.allclose(x0, expected, atol=1e-6)
        a = torch.tensor(ABAR, dtype=torch.float32)[t].reshape(-1, 1, 1, 1)
        assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_t, atol=1e-4)  # x_t = alpha x_0 + sigma eps
    assert not torch.allclose(dynamic_threshold(raw), raw.clamp(-1, 1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_guidance_and_thresholding_reach_every_sampler(sampler):
    """The denoiser binds guidance and thresholding for every sampler: each setting changes the samples."""
    d = make_diffusion(timesteps=50, beta_end=0.2)
    model = tiny_unet(seed=8, num_classes=3)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2
    y = torch.tensor([0, 2])

    def sample(w, threshold):
        s = SampleConfig(sampler=sampler, steps=5, guidance_scale=w, dynamic_threshold=threshold)
        return sample_loop(d, d.denoiser(model, y, w, threshold), x_T, s, torch.Generator().manual_seed(1))
    plain = sample(1.0, False)
    assert (sample(4.0, False) - plain).abs().max() > 1e-3
    assert (sample(1.0, True) - plain).abs().max() > 1e-3


def test_every_sampler_starts_from_the_same_x_T():
    """generation.generate draws x_T first from the generator, whatever the sampler and its steps."""
    d = make_diffusion(timesteps=20)
    model = tiny_unet(seed=10)
    first = []
    for s in (SampleConfig(sampler="ddpm"), SampleConfig(sampler="ddim", steps=3),
              SampleConfig(sampler="dpmpp", steps=4, order=3, spacing="logsnr")):
        _, trajectory = generate(Sampling(model, d, s, "cpu"), 2, torch.Generator().manual_seed(11), record=[19])
        first.append(trajectory["x_t"][0])
    assert all(torch.equal(first[0], x) for x in first[1:])
