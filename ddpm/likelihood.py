"""The variational bound on the negative log-likelihood of images, in bits per dimension (DDPM sec. 3.3 and
improved DDPM, Nichol & Dhariwal 2021, sec. 2 and 3):

    -log p(x_0) <= L_vlb = L_T + sum_{t>=1} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                       (the prior term: no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     (two Gaussians: `normal_kl`)
    L_0     = -log p(x_0 | x_1)                                 (the discretised Gaussian decoder)

In the code's 0-based indices the terms are vlb_term at t = T-1 .. 1 (KL) and t = 0 (decoder), then the prior.
Pixels are 256 levels in [-1, 1], bins of width 2/255 around them; the edge bins run to -inf and +inf.
bits/dim = (sum of the terms over the dimensions) / (D ln 2); here every term is a mean over the D dimensions,
so bits/dim = (sum of the terms) / ln 2.
"""
import math
from dataclasses import dataclass

import torch

BIN = 1.0 / 255  # half the width of a pixel's bin in [-1, 1]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:
    (logvar2 - logvar1 + e^(logvar1 - logvar2) - 1 + (mean1 - mean2)^2 e^-logvar2) / 2,
    with e^r - 1 - r written expm1(r) - r so that nearly equal variances lose no digits."""
    r = logvar1 - logvar2
    return 0.5 * (torch.expm1(r) - r + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for x on the 256 levels in [-1, 1]: the mass of N(mean, e^(2 log_scale)) on x's bin
    [x - 1/255, x + 1/255], the lowest bin open to -inf and the highest to +inf (DDPM sec. 3.3, eq. 13).
    Gaussian tails through log_ndtr, and a difference of CDFs taken on the side where it does not cancel."""
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (x - mean + BIN), inv_std * (x - mean - BIN)
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    middle = torch.log(mass.clamp(min=1e-12))
    return torch.where(x < -1 + BIN, torch.special.log_ndtr(upper),
                       torch.where(x > 1 - BIN, torch.special.log_ndtr(-lower), middle))


def mean_flat(x):
    return x.flatten(1).mean(1)


def vlb_term(diffusion, x0, x_t, t, x0_hat, v=None):
    """(B,) L_t in nats per dimension at indices t: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the
    decoder's -log p(x_0 | x_1) at t = 0. p's mean is the posterior mean at the model's x0_hat, its log-variance
    GaussianDiffusion.model_log_variance (with the learned variance's output v)."""
    true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
    mean, _, _ = diffusion.q_posterior(x0_hat, x_t, t)
    log_var = diffusion.model_log_variance(t, x_t.ndim, v)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return torch.where(t == 0, nll, kl)


def prior_term(diffusion, x0):
    """(B,) L_T in nats per dimension: KL(q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I) || N(0, I))."""
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean = diffusion.sqrt_alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1))) * x0
    log_var = torch.log1p(-diffusion.alphas_cumprod[t].double()).reshape(-1, *([1] * (x0.ndim - 1)))
    return mean_flat(normal_kl(mean.double(), log_var, torch.zeros_like(log_var), torch.zeros_like(log_var)))


@dataclass
class Bound:
    """The bound of each image (float64, on the CPU): terms (B, T) in nats per dimension (column t: vlb_term at
    index t), prior (B,), and bits_per_dim (B,) = (sum of the terms + prior) / ln 2."""
    terms: torch.Tensor
    prior: torch.Tensor

    @property
    def bits_per_dim(self) -> torch.Tensor:
        return (self.terms.sum(1) + self.prior) / math.log(2)


@torch.inference_mode()
def image_bound(diffusion, model, x0, cond=None, generator=None) -> Bound:
    """The variational bound of each of the images x0 (B, C, H, W in [-1, 1], on the levels): every term with one
    draw of x_t ~ q(x_t | x_0) each (noise from `generator`), the predictions clipped as in sampling."""
    T, b = diffusion.num_timesteps, x0.shape[0]
    terms = torch.zeros(b, T, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        tt = torch.full((b,), t, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = diffusion.q_sample(x0, tt, noise)
        _, x0_hat, v = diffusion.predict_with_variance(model, x_t, tt, cond)
        terms[:, t] = vlb_term(diffusion, x0.double(), x_t.double(), tt, x0_hat.double(),
                               None if v is None else v.double()).cpu()
    return Bound(terms, prior_term(diffusion, x0).cpu())


def mean_and_ci95(values: torch.Tensor) -> tuple[float, float]:
    """The mean of per-image values and the half-width of its 95% confidence interval, 1.96 s / sqrt(n)."""
    values = values.double()
    half = 1.96 * values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), half
