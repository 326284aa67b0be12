"""ddpm/likelihood.py, ddpm/nll.py and evaluate.py --nll: the discretised Gaussian is a distribution over the
256 levels, the Gaussian KL against its closed form and Monte Carlo, the prior term by hand, and the bound of the
exact model of Gaussian data against that data's true NLL (float64 references written here)."""
import json
import math

import numpy as np
import pytest
import torch
from diffusion_refs import GaussianEps, ref_linear_betas, ref_schedule
from helpers import CONFIG, TINY, fails_in_process, make_diffusion, tiny_checkpoint

import evaluate
import train
from ddpm.likelihood import discretized_gaussian_log_likelihood, image_bound, normal_kl, prior_term

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1


@pytest.mark.parametrize("mean, log_scale", [(0.0, -5.0), (0.3, -2.0), (-0.99, -6.0), (1.4, -1.0), (0.2, 1.5),
                                             (-3.0, 0.0), (0.5, -9.0)])
def test_discretized_gaussian_sums_to_one_over_the_levels(mean, log_scale):
    x = LEVELS.reshape(1, -1)
    p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale)).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    # a middle bin is the normal mass of [x - 1/255, x + 1/255]
    k = 128
    sd = math.exp(log_scale)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    mass = phi((LEVELS[k].item() + 1 / 255 - mean) / sd) - phi((LEVELS[k].item() - 1 / 255 - mean) / sd)
    assert p[0, k].item() == pytest.approx(mass, rel=1e-6, abs=2e-12)  # masses are clamped to at least 1e-12


def test_normal_kl_against_the_closed_form_and_monte_carlo():
    cases = [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, 0.2, 0.9, 0.2000001), (-2.0, -4.0, 1.0, -3.0)]
    for m1, lv1, m2, lv2 in cases:
        v1, v2 = math.exp(lv1), math.exp(lv2)
        closed = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
        ours = normal_kl(*(torch.tensor(a, dtype=torch.float64) for a in (m1, lv1, m2, lv2))).item()
        assert ours == pytest.approx(closed, rel=1e-9, abs=1e-15)
        # E_{x ~ N1}[log N1(x) - log N2(x)] from 400k draws, within 5 standard errors
        x = m1 + math.sqrt(v1) * torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        log_ratio = (-0.5 * (lv1 + (x - m1) ** 2 / v1)) - (-0.5 * (lv2 + (x - m2) ** 2 / v2))
        se = log_ratio.std().item() / math.sqrt(len(x))
        assert abs(log_ratio.mean().item() - ours) <= 5 * se + 1e-12


def test_prior_term_by_hand():
    d = make_diffusion(timesteps=1000)
    a = ref_schedule(ref_linear_betas(1000, 1e-4, 0.02))["alphas_cumprod"][-1]
    x0 = torch.tensor([[[[-1.0, 0.5], [0.0, 1.0]]]])
    # KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = (-log(1 - a) + (1 - a) + a x^2 - 1) / 2, averaged over the 4 pixels
    hand = np.mean([(-math.log(1 - a) + (1 - a) + a * x * x - 1) / 2 for x in (-1.0, 0.5, 0.0, 1.0)])
    assert prior_term(d, x0).item() == pytest.approx(hand, rel=1e-5)
    assert 1e-6 < hand < 1e-4  # DDPM's schedule leaves almost nothing at T


class ExactGaussianModel(torch.nn.Module):
    """The true reverse process of x_0 ~ N(mu, std^2) as a learned-range network: eps = E[eps | x_t] (GaussianEps),
    and v such that Sigma_t is the true Var[x_{t-1} | x_t] = beta-tilde_t + coef1_t^2 Var[x_0 | x_t] (at t = 0 the
    decoder's Var[x_0 | x_1]), Var[x_0 | x_t] = std^2 sigma_t^2 / (abar_t std^2 + sigma_t^2); float64 from the
    ref."""

    num_classes = None

    def __init__(self, T, mu, std, beta_end):
        super().__init__()
        ref = ref_schedule(ref_linear_betas(T, 1e-4, beta_end))
        abar, betas = ref["alphas_cumprod"], ref["betas"]
        self.eps = GaussianEps(abar, mu, std)
        var_x0 = std * std * (1 - abar) / (abar * std * std + 1 - abar)
        var = ref["posterior_variance"] + ref["posterior_mean_coef1"] ** 2 * var_x0
        lo = np.log(np.append(ref["posterior_variance"][1], ref["posterior_variance"][1:]))
        self.v = torch.tensor(2 * (np.log(var) - lo) / (np.log(betas) - lo) - 1)

    def forward(self, x, t, cond=None):
        return torch.cat([self.eps(x, t), self.v[t].reshape(-1, 1, 1, 1).expand_as(x).float()], dim=1)


def quantised_gaussian(n, mu, std, seed):
    """n images (3 x 4 x 4) of N(mu, std^2) pixels put on the nearest of the 256 levels, and each image's true NLL in
    bits/dim: -log2 of the normal mass of its pixels' bins (the edge bins open), averaged over the pixels."""
    g = torch.Generator().manual_seed(seed)
    x = ((mu + std * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) + 1) * 127.5).round().clamp(0, 255)
    x = x / 127.5 - 1
    phi = lambda z: 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))  # noqa: E731
    upper = torch.where(x > 0.999, torch.ones_like(x), phi((x + 1 / 255 - mu) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), phi((x - 1 / 255 - mu) / std))
    return x.float(), -torch.log2(upper - lower).flatten(1).mean(1)


def test_bound_of_the_exact_model_of_gaussian_data_is_just_above_its_nll():
    """For each image, E_q[bound] >= -log p_model(x) and p_model = p_data here (the exact model), so over 256 images
    the mean bound minus the true NLL is >= 0, and < 0.01 bits/dim: the gap is KL(q(x_1 | x_0) || p(x_1 | x_0's
    bin)), 6e-4 nats for a bin of width 2/255 against the 1e-2 wide q(x_1 | x_0), plus the prior (1e-5); both up to
    5 standard errors of the per-image differences. (Data with mass beyond [-1, 1] would add much more: the edge
    bins are wide, so x_1 given the bin is far from x_1 given the level; N(0.1, 0.25^2) puts 2e-4 of it there.)"""
    T, mu, std, end = 400, 0.1, 0.25, 0.05  # T = 400 to keep it short; the betas still take x_T to noise
    d = make_diffusion(timesteps=T, variance="learned_range", clip_denoised=False, beta_end=end)
    x0, true_bits = quantised_gaussian(256, mu, std, seed=0)
    bound = image_bound(d, ExactGaussianModel(T, mu, std, end), x0, generator=torch.Generator().manual_seed(1))
    diff = bound.bits_per_dim - true_bits
    se = diff.std().item() / math.sqrt(len(diff))
    assert -5 * se <= diff.mean().item() < 0.01 + 5 * se, (diff.mean().item(), se)
    assert 0.5 < true_bits.mean() < 8  # an NLL of a few bits per pixel: the test is not trivial
    # a fixed variance with the same mean is a bound too, and a looser one (DDPM's 3.75 vs improved DDPM's 2.94)
    fixed = make_diffusion(timesteps=T, variance="fixed_small", clip_denoised=False, beta_end=end)
    loose = image_bound(fixed, ExactGaussianModel(T, mu, std, end).eps, x0,
                        generator=torch.Generator().manual_seed(1))
    assert loose.bits_per_dim.mean() > bound.bits_per_dim.mean() + 0.01


# ---- evaluate.py --nll and train.nll_every -----------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_evaluate_nll_writes_a_record(tmp_path, monkeypatch, variance):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "c.pt", f"diffusion.variance={variance}")
    out = tmp_path / "m.json"
    record = evaluate.main(["--nll", "--ckpt", ckpt, "--n", "6", "--batch-size", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == [record] and record["metric"] == "nll" and record["n"] == 6
    assert record["variance"] == variance and record["timesteps"] == 20 and record["images"] == "shapes-train"
    assert math.isfinite(record["bits_per_dim"]) and record["bits_per_dim"] > 0 and record["bits_per_dim_ci95"] > 0
    again = evaluate.main(["--nll", "--ckpt", ckpt, "--n", "6", "--batch-size", "3", "--out", str(out)])
    # another batching, the same per-image noise streams only where the batches agree: a close figure
    assert abs(again["bits_per_dim"] - record["bits_per_dim"]) < 3 * record["bits_per_dim_ci95"]


def test_evaluate_nll_bad_input_is_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    (tmp_path / "empty").mkdir()
    assert "--ckpt" in fails_in_process(capsys, evaluate.main, "--nll", "--samples-dir", tmp_path)
    assert "no images" in fails_in_process(capsys, evaluate.main, "--nll", "--ckpt", ckpt, "--ref-dir",
                                           tmp_path / "empty", "--out", tmp_path / "m.json")
    assert "--n 100" in fails_in_process(capsys, evaluate.main, "--nll", "--ckpt", ckpt, "--n", "100",
                                         "--out", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_nll_every_logs_bits_per_dim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--config", CONFIG, "--name", "t", *TINY, "train.max_steps=4", "train.nll_every=2",
                "train.nll_images=4", "diffusion.variance=learned_range"])
    records = json.loads((tmp_path / "results" / "t" / "metrics.json").read_text())
    assert [r["step"] for r in records] == [2, 4] and all(r["images"] == "shapes seed 1" for r in records)
    assert all(math.isfinite(r["bits_per_dim"]) and r["n"] == 4 for r in records)
