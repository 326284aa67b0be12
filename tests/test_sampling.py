"""GaussianDiffusion's sampling against float64 references: one DDPM step (Algorithm 2) and one DDIM step
(eq. 12), the objectives, classifier-free guidance, and whole sampling loops."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusion_refs import ExactEps, FakeEps, assert_close64, ref_cosine_betas, ref_linear_betas, ref_schedule
from helpers import make_diffusion, tiny_unet

from config import SampleConfig
from ddpm.samplers import sample_loop, sampler_timesteps


def run_sampler(d, model, x_T, sampler="ddim", steps=None, eta=0.0, seed=None, record=()):
    """sample_loop with these settings; seed=None: no per-step generator (eta = 0 draws nothing that matters)."""
    s = SampleConfig(sampler=sampler, steps=steps or d.num_timesteps, eta=eta)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return sample_loop(d, d.denoiser(model), x_T, s, g, record=record)


def ddpm_and_ddim_with_seed(d, model, shape, seed, **kw):
    """x_T and then the per-step noise from one generator, as sampling.generate draws them."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    return sample_loop(d, d.denoiser(model), x_T, SampleConfig(**kw), g, record=range(d.num_timesteps))

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
    d = make_diffusion(timesteps=T, variance=variance, clip_denoised=clip)
    g = torch.Generator().manual_seed(4)
    ts = np.array([0, 1, 2, 7, 500, 998, 999])
    x_t = torch.randn(len(ts), 2, 3, 3, generator=g) * 1.5
    z = torch.randn(len(ts), 2, 3, 3, generator=g)
    x_prev, x0_out = d.p_sample(d.denoiser(fake), x_t, torch.tensor(ts), z)

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
    d = make_diffusion(timesteps=T, clip_denoised=clip)
    pairs = np.array([(999, 979), (999, 0), (500, 480), (20, 0), (3, 1), (0, -1), (7, -1)])
    ts, tps = pairs[:, 0], pairs[:, 1]
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(len(ts), 3, 2, 2, generator=g)
    z = torch.randn(len(ts), 3, 2, 2, generator=g)
    x_prev, x0_out = d.ddim_step(d.denoiser(fake), x_t, torch.tensor(ts), torch.tensor(tps), z, eta)

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

    d = make_diffusion(timesteps=T, clip_denoised=False)
    ts = torch.arange(1, T)
    x_t = torch.zeros(T - 1, 1, 1, 1)
    z = torch.ones(T - 1, 1, 1, 1)
    # x_t = 0 and eps = 0: x0 = 0, so x_prev = sigma * 1
    out, _ = d.ddim_step(d.denoiser(Zero()), x_t, ts, ts - 1, z, 1.0)
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
        d = make_diffusion(timesteps=T, objective=objective)
        loss = d.loss(TargetModel(x0, noise, abar, what), x0, t=t, noise=noise)
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
    d = make_diffusion(timesteps=T, objective=objective, clip_denoised=False)
    eps_out, x0_out = d.predict(TargetModel(x0, eps, abar, objective), torch.tensor(x_t64, dtype=torch.float32),
                                torch.tensor(ts))
    # float32 x_t carries 6e-8 relative rounding, amplified up to 1/sqrt(abar_999) ~ 157 in x0 and
    # sqrt(abar_0)/sqrt(1 - abar_0) ~ 100 in eps at the ends of the schedule
    assert_close64(x0_out, x0.double().numpy(), rtol=1e-4, atol=2e-4, msg="x0")
    assert_close64(eps_out, eps.double().numpy(), rtol=1e-4, atol=2e-4, msg="eps")


# ---- classifier-free guidance and label dropping ---------------------------------------------------------------

@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -0.5])
def test_classifier_free_guidance(w):
    model = tiny_unet(seed=1, num_classes=4)
    d = make_diffusion(timesteps=100, clip_denoised=False)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([5, 50, 99])
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        eps_c = model(x, t, y).double()
        eps_u = model(x, t, None).double()
        eps, x0 = d.predict(model, x, t, y, guidance_scale=w)
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
    make_diffusion(timesteps=T).loss(Recorder(), torch.zeros(n, 1, 1, 1))
    assert seen["t"].dtype == torch.long
    counts = torch.bincount(seen["t"], minlength=T)
    assert len(counts) == T  # nothing at T or above
    assert torch.all((counts.double() - n / T).abs() <= 5 * math.sqrt(n * (1 / T) * (1 - 1 / T))), counts


# ---- sampling loops --------------------------------------------------------------------------------------------

def test_ddim_timesteps():
    d = make_diffusion(timesteps=1000)

    def ddim(steps):
        return sampler_timesteps(d, SampleConfig(sampler="ddim", steps=steps))
    assert ddim(1000) == list(range(999, -1, -1))
    assert sampler_timesteps(d, SampleConfig(sampler="ddpm", steps=3)) == list(range(999, -1, -1))
    for steps in (1, 2, 7, 50, 100, 999):
        ts = ddim(steps)
        assert len(ts) == steps
        assert ts[0] == 999           # sampling starts from x_T ~ N(0, I), which is the last index
        assert all(a > b for a, b in zip(ts, ts[1:]))
        assert all(isinstance(v, int) for v in ts)
        # evenly spaced from T-1 down to index 0 up to rounding, 0 itself left out: the last step goes from
        # ts[-1] to the data (tests/test_samplers.py has the spacings)
        gaps = np.diff((ts + [0])[::-1])
        assert gaps.max() - gaps.min() <= 1, steps
        assert steps == 999 or ts[-1] > 0
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim(bad)


def test_ddim_eta1_all_steps_equals_ddpm_fixed_small():
    T = 50
    model = tiny_unet(seed=2)
    kw = dict(timesteps=T, beta_start=1e-3, beta_end=0.1, variance="fixed_small", clip_denoised=False)
    d = make_diffusion(**kw)
    shape = (2, 3, 16, 16)
    x_ddpm, tr_ddpm = ddpm_and_ddim_with_seed(d, model, shape, 10, sampler="ddpm")
    x_ddim, tr_ddim = ddpm_and_ddim_with_seed(d, model, shape, 10, sampler="ddim", steps=T, eta=1.0)
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
    x_other, _ = ddpm_and_ddim_with_seed(d, model, shape, 11, sampler="ddim", steps=T, eta=1.0)
    assert (x_other - x_ddim).abs().max() > 0.1
    kw["variance"] = "fixed_large"
    x_large, _ = ddpm_and_ddim_with_seed(make_diffusion(**kw), model, shape, 10, sampler="ddpm")
    assert (x_large - x_ddpm).abs().max() > 1e-3


def test_ddim_eta0_is_deterministic_given_x_T():
    model = tiny_unet(seed=3)
    d = make_diffusion(timesteps=50, beta_start=1e-3, beta_end=0.1, clip_denoised=False)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    a = run_sampler(d, model, x_T, steps=10, seed=1)
    b = run_sampler(d, model, x_T, steps=10, seed=2)
    assert torch.equal(a, b)
    assert (a - x_T).abs().max() > 1e-2  # it did move
    # with eta > 0 the generator does matter (so the equality above is a property of eta=0)
    c = run_sampler(d, model, x_T, steps=10, eta=0.5, seed=1)
    e = run_sampler(d, model, x_T, steps=10, eta=0.5, seed=2)
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
    d = make_diffusion(beta_schedule=schedule, variance="fixed_small", clip_denoised=clip, **kw)
    shape = (3, 3, 8, 8)
    target = x0_star.expand(shape)
    for scale in (1.0, 4.0):
        x_T = scale * torch.randn(shape, generator=torch.Generator().manual_seed(14))
        # predicting x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps cancels two terms of size |x_t| / sqrt(abar):
        # float32 rounding (unit roundoff 2^-24, a few roundings) leaves this much; largest at index T-1,
        # where the cosine schedule has abar = 2e-6 (1/sqrt(abar) = 730), the linear one abar = 0.08
        x0_tol = 1e-5 + 4 * 2.0 ** -24 * x_T.abs().max().item() / math.sqrt(abar[-1])
        for steps in (1, 5, T):
            x, tr = run_sampler(d, model, x_T, steps=steps, record=range(T))
            # one step is the x0 prediction at T-1; after more steps the last prediction is at a small t
            assert (x - target).abs().max().item() < (x0_tol if steps == 1 else 1e-4), (steps, scale)
            assert tr["t"][0] == T - 1
            for t, x0 in zip(tr["t"], tr["x0"]):  # every intermediate x0 prediction is x0* as well
                assert (x0 - target).abs().max().item() < x0_tol, (steps, t)
        x = run_sampler(d, model, x_T, sampler="ddpm", seed=15)
        assert (x - target).abs().max().item() < 1e-4
