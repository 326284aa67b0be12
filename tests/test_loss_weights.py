"""Min-SNR-gamma weights (train.snr_gamma) and the loss-aware timestep sampler (train.timestep_sampler), against
float64 formulas written here and Monte Carlo estimates with tolerances from the sample size."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusion_refs import ref_cosine_betas, ref_linear_betas, ref_schedule
from helpers import CONFIG, TINY, tiny_trainer

from config import load_config
from ddpm.config_rules import ConfigError
from ddpm.loss_weights import LossAwareSampler, min_snr_weights


def ref_min_snr(betas, gamma, objective):
    """Hang et al. 2023 with plain Python floats: SNR_t = abar_t / (1 - abar_t); eps: min(SNR, g)/SNR,
    x0: min(SNR, g), v: min(SNR, g)/(SNR + 1)."""
    out, abar = [], 1.0
    for b in betas:
        abar *= 1.0 - b
        snr = abar / (1.0 - abar)
        w = min(snr, gamma)
        out.append({"eps": w / snr, "x0": w, "v": w / (snr + 1.0)}[objective])
    return out


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_snr_weights_against_the_formulas(objective, gamma, schedule):
    betas = ref_linear_betas(1000, 1e-4, 0.02) if schedule == "linear" else ref_cosine_betas(1000)
    abar = ref_schedule(betas)["alphas_cumprod"]
    ours = min_snr_weights(abar, gamma, objective)
    np.testing.assert_allclose(ours, ref_min_snr(betas, gamma, objective), rtol=1e-12, atol=0)
    # the weighting makes the loss min(SNR, g) ||x0 - x0_hat||^2 whatever the parametrisation
    snr = abar / (1 - abar)
    in_x0_units = ours * {"eps": snr, "x0": np.ones_like(snr), "v": snr + 1}[objective]
    np.testing.assert_allclose(in_x0_units, np.minimum(snr, gamma), rtol=1e-10)


def batch(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 3, 10, 25, 40, 49])
    return x, t, torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_training_loss_is_the_min_snr_weighted_mean(objective):
    trainer = tiny_trainer(f"diffusion.objective={objective}", "train.snr_gamma=5")
    torch.nn.init.normal_(trainer.model.conv_out.weight, std=0.05)
    x, t, noise = batch(trainer)
    loss = trainer.loss(x, None, t, noise)
    # independently: x_t, the target and the squared error per example, in float64
    betas = ref_linear_betas(50, 1e-4, 0.02)
    abar = torch.tensor(ref_schedule(betas)["alphas_cumprod"])[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()
    out = trainer.model(x_t.float(), t).double()
    target = {"eps": noise.double(), "x0": x.double(),
              "v": abar.sqrt() * noise.double() - (1 - abar).sqrt() * x.double()}[objective]
    w = torch.tensor(ref_min_snr(betas, 5.0, objective))[t]
    expected = (w * (out - target).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unweighted = (out - target).pow(2).mean().item()
    assert abs(loss.item() - unweighted) > 1e-3 * unweighted  # the weights do something here


def test_no_snr_gamma_leaves_the_loss_unchanged():
    trainer = tiny_trainer()
    torch.nn.init.normal_(trainer.model.conv_out.weight, std=0.05)
    x, t, noise = batch(trainer)
    loss = trainer.loss(x, None, t, noise)
    assert trainer.step_losses == []  # no per-example losses are kept for the uniform sampler
    x_t = trainer.diffusion.q_sample(x, t, noise)
    assert torch.equal(loss, F.mse_loss(trainer.model(x_t, t), noise))  # DDPM eq. 14, as it was computed before
    abar = torch.tensor(ref_schedule(ref_linear_betas(50, 1e-4, 0.02))["alphas_cumprod"])[t].reshape(-1, 1, 1, 1)
    x_t64 = abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()
    ref = (trainer.model(x_t64.float(), t).double() - noise.double()).pow(2).mean().item()
    assert loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.snr_gamma=0"], "train.snr_gamma"), (["train.snr_gamma=-5"], "train.snr_gamma"),
    (["diffusion.vlb_weight=-1"], "diffusion.vlb_weight"), (["train.timestep_sampler=importance"],
                                                            "train.timestep_sampler"),
    (["diffusion.variance=learned"], "diffusion.variance"),
    (["sample.sampler=ddpm", "sample.ddpm_steps=1"], "sample.ddpm_steps"),
    (["sample.sampler=ddpm", "sample.ddpm_steps=60"], "sample.ddpm_steps"),
    (["latent.autoencoder=ae.pt", "train.nll_every=5"], "train.nll_every")])
def test_bad_values_are_one_line_errors(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [*TINY, *overrides])
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---- the loss-aware sampler ---------------------------------------------------------------------------------

def warmed_up_sampler(T=20, seed=0):
    """A sampler whose history holds losses of very different sizes per t (as L_t of the bound has)."""
    sampler = LossAwareSampler(T)
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 1, T, dtype=torch.float64)
    for _ in range(12):
        t = torch.randperm(T, generator=g)
        sampler.update(t, scale[t] * (1 + 0.1 * torch.rand(T, generator=g, dtype=torch.float64)))
    return sampler, scale


def test_loss_aware_probabilities_follow_the_second_moment():
    sampler = LossAwareSampler(5)
    assert torch.allclose(sampler.probs(), torch.full((5,), 0.2, dtype=torch.float64))  # uniform until warm
    for k in range(12):  # t = 0..4 get losses 1, 2, 3, 4, 5 and then 12 values each, the first 2 dropped
        sampler.update(torch.arange(5), torch.arange(1, 6, dtype=torch.float64) * (1 + (k >= 2)))
    assert sampler.counts.tolist() == [10] * 5
    rms = np.array([2.0, 4, 6, 8, 10])  # the last 10 of each t are all doubled
    expected = 0.999 * rms / rms.sum() + 0.001 / 5
    np.testing.assert_allclose(sampler.probs().numpy(), expected, rtol=1e-12)
    sampler.update(torch.tensor([0]), torch.tensor([float("nan")]))  # a skipped step leaves it as it was
    np.testing.assert_allclose(sampler.probs().numpy(), expected, rtol=1e-12)


def test_importance_weights_make_the_estimate_unbiased():
    """E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t: the Monte Carlo mean of the weighted losses of 200k draws
    is within 5 standard errors of the uniform mean, and its variance is below that of uniform draws."""
    T, n = 20, 200_000
    sampler, scale = warmed_up_sampler(T)
    p = sampler.probs()
    assert p.max() / p.min() > 100  # far from uniform
    loss = scale  # a deterministic L_t
    t = sampler.sample(n, torch.Generator().manual_seed(1), "cpu")
    est = (loss[t] * sampler.weights(t).double())
    truth = loss.mean().item()
    se = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - truth) < 5 * se
    uniform = loss[torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(2))]
    assert est.var() < 0.5 * uniform.var()
    # and the draws follow p: each frequency within 5 binomial standard errors
    freq = torch.bincount(t, minlength=T).double() / n
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12)
