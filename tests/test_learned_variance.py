"""Learned variances (diffusion.variance=learned_range) and respaced DDPM (--sampler ddpm --steps N): the DDPM
step against diffusers' DDPMScheduler driven by the same network, the respaced betas against alpha-bar in
float64, the hybrid loss against a float64 computation, and checkpoints from before that sample as they did."""
import math
import os
from argparse import Namespace

import numpy as np
import pytest
import torch
from diffusion_refs import GaussianEps, ref_linear_betas, ref_schedule
from helpers import make_diffusion, tiny_config

from config import SampleConfig
from ddpm.checkpoint import load_for_use
from ddpm.cli import SAMPLER_FLAGS, sampler_overrides
from ddpm.generation import Sampling, generate
from ddpm.samplers import sample_loop, sampler_timesteps
from diffusion import respaced_betas
from evaluate import sampler_tag
from model import UNet

T = 1000
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class LearnedRangeStandIn(torch.nn.Module):
    """A smooth 2C-channel network: GaussianEps (with a wiggle) as the mean's output, and v = tanh(x_t + t/T - 1/2)
    as the variance's, which crosses the whole of (-1, 1)."""

    num_classes = None

    def __init__(self, abar64, objective="eps"):
        super().__init__()
        self.eps = GaussianEps(abar64, wiggle=0.1)
        self.abar = torch.tensor(np.asarray(abar64), dtype=torch.float64)
        self.objective = objective

    def forward(self, x, t, cond=None):
        eps = self.eps(x, t).double()
        a = self.abar[t].reshape(-1, 1, 1, 1)
        mean_out = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x.double(),
                    "x0": (x.double() - (1 - a).sqrt() * eps) / a.sqrt()}[self.objective]
        v = torch.tanh(x.double() + t.double().reshape(-1, 1, 1, 1) / len(self.abar) - 0.5)
        return torch.cat([mean_out, v], dim=1).float()


def diffusers_ddpm(steps, variance, objective, seed, model, x_T):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type=variance, clip_sample=True, timestep_spacing="linspace",
                          prediction_type={"eps": "epsilon", "v": "v_prediction"}[objective])
    # its schedule in float64: in float32, 1 - abar_t / abar_{t-1} loses 3 digits of the small betas (5e-4 relative)
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(seed), x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.reshape(1).expand(len(x))), t, x, generator=g).prev_sample.float()
    return x, sched.timesteps.tolist()


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps, objective", [(T, "eps"), (50, "eps"), (25, "v")])
def test_ddpm_matches_diffusers(variance, steps, objective):
    """Every step of DDPM, all T or respaced, with our variances and diffusers' of the same name; the same noise
    (one draw per step from one generator; diffusers draws none at the last step, which is last)."""
    pytest.importorskip("diffusers")
    d = make_diffusion(timesteps=T, variance=variance, objective=objective)
    model = LearnedRangeStandIn(d.alphas_cumprod64, objective)
    if variance != "learned_range":
        full = model
        model = lambda x, t, cond=None: full(x, t)[:, :3]  # noqa: E731
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sample_cfg = SampleConfig(sampler="ddpm", ddpm_steps=None if steps == T else steps)
    ours = sample_loop(d, d.denoiser(model), x_T, sample_cfg, torch.Generator().manual_seed(7))
    theirs, their_steps = diffusers_ddpm(steps, variance, objective, 7, model, x_T)
    assert sampler_timesteps(d, sample_cfg) == their_steps
    assert (theirs - x_T).abs().max() > 0.5
    assert (ours - theirs).abs().max().item() < 1e-5


def test_the_variance_half_matters():
    d = make_diffusion(timesteps=T, variance="learned_range")
    model = LearnedRangeStandIn(d.alphas_cumprod64)
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sample_cfg = SampleConfig(sampler="ddpm", ddpm_steps=20)
    ours = sample_loop(d, d.denoiser(model), x_T, sample_cfg, torch.Generator().manual_seed(7))
    pinned = sample_loop(d, d.denoiser(lambda x, t, c=None: torch.cat([model(x, t)[:, :3], -torch.ones_like(x)], 1)),
                         x_T, sample_cfg, torch.Generator().manual_seed(7))
    small = make_diffusion(timesteps=T, variance="fixed_small")
    fixed = sample_loop(small, small.denoiser(lambda x, t, c=None: model(x, t)[:, :3]), x_T, sample_cfg,
                        torch.Generator().manual_seed(7))
    assert (ours - pinned).abs().max() > 1e-2
    assert (pinned - fixed).abs().max() < 1e-5  # v = -1 is beta-tilde: fixed_small


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_ddim_and_dpmpp_use_the_mean_only(sampler):
    learned, fixed = make_diffusion(timesteps=T, variance="learned_range"), make_diffusion(timesteps=T)
    model = LearnedRangeStandIn(learned.alphas_cumprod64)
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sample_cfg = SampleConfig(sampler=sampler, steps=10)
    a = sample_loop(learned, learned.denoiser(model), x_T, sample_cfg)
    b = sample_loop(fixed, fixed.denoiser(lambda x, t, c=None: model(x, t)[:, :3]), x_T, sample_cfg)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [2, 7, 50, 333, 999])
def test_respaced_betas_keep_alpha_bar(n):
    betas = ref_linear_betas(T, 1e-4, 0.02)
    abar = ref_schedule(betas)["alphas_cumprod"]
    d = make_diffusion(timesteps=T)
    kept = sampler_timesteps(d, SampleConfig(sampler="ddpm", ddpm_steps=n))
    assert kept == [round(k) for k in np.linspace(0, T - 1, n)][::-1] and len(set(kept)) == n
    new = respaced_betas(abar, kept)
    prod, i = 1.0, 0
    for k in sorted(kept):  # the chain's alpha-bar after each kept step is that step's own
        prod *= 1.0 - new[i]
        assert prod == pytest.approx(abar[k], rel=1e-12)
        i += 1
    chain = d.respaced(kept)
    np.testing.assert_allclose(chain.alphas_cumprod64, abar[sorted(kept)], rtol=1e-12)
    assert chain.num_timesteps == n and d.respaced(list(range(T))) is d


def test_learned_range_model_has_twice_the_output_channels():
    cfg = tiny_config("diffusion.variance=learned_range")
    model = UNet.from_config(cfg)
    assert model.conv_out.out_channels == 6 and model.image_channels == 3
    assert UNet.from_config(tiny_config()).conv_out.out_channels == 3
    sampling = Sampling(model.eval(), make_diffusion(timesteps=20, variance="learned_range"),
                        SampleConfig(sampler="ddpm", ddpm_steps=5), "cpu")
    x = generate(sampling, 2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_hybrid_loss_against_float64(objective):
    """L_hybrid = mse + vlb_weight T L_t, with L_t computed here in float64 from the closed forms (KL of two
    Gaussians; at t = 0 the discretised decoder with scipy-free erf), and the mean's gradient stopped in L_t."""
    d = make_diffusion(timesteps=T, variance="learned_range", objective=objective, vlb_weight=0.01)
    model = LearnedRangeStandIn(d.alphas_cumprod64, objective)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (3, 3, 4, 4), generator=g) / 127.5 - 1).float()
    t, noise = torch.tensor([0, 1, 600]), torch.randn(3, 3, 4, 4, generator=g)
    terms = d.loss_terms(model, x0, t=t, noise=noise)
    ref = ref_schedule(ref_linear_betas(T, 1e-4, 0.02))
    b = np.array(ref_linear_betas(T, 1e-4, 0.02))
    out = model(d.q_sample(x0, t, noise), t).double()
    for i, k in enumerate(t.tolist()):
        a = ref["alphas_cumprod"][k]
        x_t = math.sqrt(a) * x0[i].double() + math.sqrt(1 - a) * noise[i].double()
        m = out[i, :3]
        x0_hat = {"eps": (x_t - math.sqrt(1 - a) * m) / math.sqrt(a), "x0": m,
                  "v": math.sqrt(a) * x_t - math.sqrt(1 - a) * m}[objective]
        lo = math.log(ref["posterior_variance"][max(k, 1)])
        log_var = (out[i, 3:] + 1) / 2 * math.log(b[k]) + (1 - (out[i, 3:] + 1) / 2) * lo
        mean = ref["posterior_mean_coef1"][k] * x0_hat + ref["posterior_mean_coef2"][k] * x_t
        if k == 0:
            cdf = lambda z: 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))  # noqa: E731
            sd = torch.exp(0.5 * log_var)
            hi = torch.where(x0[i] > 0.999, torch.ones_like(sd), cdf((x0[i] + 1 / 255 - mean) / sd))
            lo_ = torch.where(x0[i] < -0.999, torch.zeros_like(sd), cdf((x0[i] - 1 / 255 - mean) / sd))
            expected = -torch.log(hi - lo_).mean()
        else:
            true_mean = ref["posterior_mean_coef1"][k] * x0[i].double() + ref["posterior_mean_coef2"][k] * x_t
            tv = ref["posterior_variance"][k]
            expected = (0.5 * (log_var - math.log(tv) + tv / log_var.exp() - 1
                               + (true_mean - mean) ** 2 / log_var.exp())).mean()
        assert terms.vlb[i].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7), k
    a = torch.tensor(ref["alphas_cumprod"])[t].reshape(-1, 1, 1, 1)
    target = {"eps": noise.double(), "x0": x0.double(), "v": a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()}
    np.testing.assert_allclose(terms.mse.detach().numpy(),
                               (out[:, :3] - target[objective]).pow(2).flatten(1).mean(1).numpy(), rtol=1e-5)
    hybrid = d.loss(model, x0, t=t, noise=noise)
    assert hybrid.item() == pytest.approx((terms.mse + 0.01 * T * terms.vlb).mean().item(), rel=1e-6)


def test_the_bound_term_trains_the_variance_only():
    cfg = tiny_config("diffusion.variance=learned_range", "diffusion.vlb_weight=1.0")
    torch.manual_seed(0)
    model = UNet.from_config(cfg)
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    d = make_diffusion(timesteps=20, variance="learned_range", vlb_weight=1.0)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([3, 12]), torch.randn(2, 3, 16, 16)
    d.loss_terms(model, x0, t=t, noise=noise).vlb.sum().backward()
    grad = model.conv_out.weight.grad
    assert grad[:3].abs().max() == 0 and grad[3:].abs().max() > 0  # the mean's gradient is stopped


def test_an_old_checkpoint_samples_with_ddpm_as_it_did():
    """tests/data/legacy_tiny_ddpm_expected.pt was written by the code of commit d3e43c5, before learned variances
    and respacing (tests/data/make_legacy_ddpm_samples.py): DDPM over all T and the training loss."""
    expected = torch.load(os.path.join(LEGACY, "legacy_tiny_ddpm_expected.pt"), weights_only=True)
    path = os.path.join(LEGACY, "legacy_tiny.pt")
    assert "vlb_weight" not in torch.load(path, weights_only=True)["config"]["diffusion"]
    for variance in ("fixed_large", "fixed_small"):
        loaded = load_for_use(path, "cpu", overrides=[f"diffusion.variance={variance}"])
        sample_cfg = SampleConfig(**{**vars(loaded.cfg.sample), "sampler": "ddpm", "precision": "fp32"})
        sampling = Sampling(loaded.model, loaded.diffusion, sample_cfg, "cpu")
        x = generate(sampling, 2, torch.Generator().manual_seed(3))
        assert (x - expected[f"ddpm_{variance}"]).abs().max() < 2e-6, variance
    with torch.no_grad():
        loss = loaded.diffusion.loss(loaded.model, expected["x0"], t=expected["t"], noise=expected["noise"])
    assert (loss - expected["loss"]).abs() < 1e-6


def test_steps_flag_respaces_ddpm_only_when_ddpm_samples():
    def overrides(**given):
        return sampler_overrides(Namespace(**{**dict.fromkeys(SAMPLER_FLAGS), **given}))
    assert overrides(sampler="ddpm", steps=50) == ["sample.sampler=ddpm", "sample.steps=50", "sample.ddpm_steps=50"]
    assert overrides(sampler="ddim", steps=1) == ["sample.sampler=ddim", "sample.steps=1"]
    assert overrides(sampler="ddpm") == ["sample.sampler=ddpm"]  # all T, as before
    assert sampler_tag(SampleConfig(sampler="ddpm", ddpm_steps=50)) == "ddpm50"
    assert sampler_tag(SampleConfig(sampler="ddpm")) == "ddpm"
