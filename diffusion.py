"""Gaussian diffusion: the forward process, the training loss and the DDPM and DDIM steps.

Notation follows Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): beta_t, alpha_t = 1 - beta_t,
alpha-bar_t = prod_{s<=t} alpha_s (here `alphas_cumprod`). Indices are 0-based: index t in these
tensors is step t+1 of the paper, so t runs over 0..T-1 and x_0 (the data) sits "before" index 0.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.likelihood import vlb_term


def linear_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM's schedule: betas evenly spaced from beta_start to beta_end (float64)."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2).

    beta_t = 1 - alpha-bar(t)/alpha-bar(t-1), clipped to at most 0.999 to avoid a singularity at t = T.
    (Some write-ups give a 'cosine' formula for beta_t itself; this is the published alpha-bar one.)"""
    def f(t):
        return np.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    t = np.arange(timesteps + 1, dtype=np.float64)
    alphas_cumprod = f(t) / f(0)
    return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per image: s = max(1, the `percentile`
    quantile of |x_0|), x_0 = clamp(x_0, -s, s) / s. Pixels that saturate are pulled in instead of clipped.

    The quantile interpolates linearly between order statistics (numpy's default); it is taken from a sort
    because torch.quantile refuses inputs of more than 2^24 elements, which a batch of large images exceeds."""
    flat = x0.abs().flatten(1).sort(dim=1).values
    pos = percentile * (flat.shape[1] - 1)
    lo, frac = int(pos), pos - int(pos)
    q = flat[:, lo] if frac == 0 else torch.lerp(flat[:, lo], flat[:, lo + 1], frac)
    s = per_image(q.clamp(min=1), x0.ndim)  # (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def per_image(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """One value per image, v (B,), reshaped to (B, 1, 1, ...) of `ndim` dimensions so that it broadcasts against
    a batch of images (B, C, H, W)."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def respaced_betas(alphas_cumprod64: np.ndarray, timesteps) -> np.ndarray:
    """The betas of the chain that keeps only `timesteps` (improved DDPM, sec. 4): with t_1 < ... < t_N the kept
    indices, beta_i = 1 - alpha-bar_{t_i} / alpha-bar_{t_{i-1}} (alpha-bar before t_1 is 1), so the kept steps
    have the alpha-bar they had. float64."""
    abar = np.asarray(alphas_cumprod64, dtype=np.float64)[np.sort(np.asarray(timesteps))]
    return 1.0 - abar / np.append(1.0, abar[:-1])


@dataclass
class LossTerms:
    """The per-example terms of the training loss, each (B,) float32.

    mse: L_simple's || target - output ||^2, averaged over the dimensions of an image;
    vlb: with learned variances, L_t of the variational bound in nats per dimension (the KL of the posterior
         and the reverse step, at t = 0 the decoder's NLL), through the variance only (the mean's gradient is
         stopped, improved DDPM sec. 3.1); None with fixed variances."""
    mse: torch.Tensor
    vlb: torch.Tensor | None


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] reshaped to (B, 1, 1, ...) so it broadcasts against a batch of images."""
    return per_image(a.gather(0, t), ndim)


def timestep_batch(x: torch.Tensor, t: int) -> torch.Tensor:
    """Timestep index t for every image of the batch x: (B,) long, on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def schedule_betas(cfg) -> np.ndarray:
    """The betas of a DiffusionConfig's schedule (float64)."""
    if cfg.beta_schedule == "linear":
        return linear_beta_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.beta_schedule == "cosine":
        return cosine_beta_schedule(cfg.timesteps)
    raise ValueError(f"unknown beta schedule '{cfg.beta_schedule}'")


class GaussianDiffusion(nn.Module):
    """The fixed forward process of a DiffusionConfig and what follows from it: q(x_t | x_0), the posterior,
    the loss and single sampling steps. It holds no network: every method that needs one takes it (as
    improved-diffusion's do), and the samplers take a `denoise(x_t, t) -> (eps, x_0)` made by `denoiser`.

    variance 'learned_range' (improved DDPM, Nichol & Dhariwal 2021): the network outputs 2C channels, the mean's
    parametrisation (eps, x_0 or v) and v in [-1, 1] with log Sigma_t = frac log beta_t + (1 - frac) log beta-tilde_t,
    frac = (v + 1)/2 (see `model_log_variance`). `betas` (float64) replaces the config's schedule: a respaced chain."""

    def __init__(self, cfg, betas: np.ndarray | None = None):
        super().__init__()
        if cfg.objective not in ("eps", "x0", "v") or cfg.variance not in VARIANCES:
            raise ValueError(f"unknown objective '{cfg.objective}' or variance '{cfg.variance}'")
        self.objective, self.variance, self.clip_denoised = cfg.objective, cfg.variance, cfg.clip_denoised
        self.learned_variance, self.vlb_weight, self.config = cfg.variance == "learned_range", cfg.vlb_weight, cfg
        betas = schedule_betas(cfg) if betas is None else np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod64 = alphas_cumprod  # float64 on the host: the samplers' step coefficients use it
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I)   (DDPM eq. 6-7)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        schedule = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            # beta-tilde_0 = 0, so the log starts from beta-tilde_1 (as in the paper's code)
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            # sigma_t^2 = beta_t ('fixed_large'); its first entry is beta-tilde_1 so x_0 gets the right scale
            "fixed_large_log_variance": np.log(np.append(posterior_variance[1], betas[1:])),
            "log_betas": np.log(betas),  # the upper end of learned_range's interpolation
        }
        for name, value in schedule.items():  # computed in float64, stored as float32 buffers
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    # ---- forward process -------------------------------------------------------------------------------

    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x_0): x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps   (DDPM eq. 4)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0)   (DDPM eq. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.ndim),
                extract(self.posterior_log_variance_clipped, t, x_t.ndim))

    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def respaced(self, timesteps) -> "GaussianDiffusion":
        """The chain that visits only `timesteps` (improved DDPM's respacing, `respaced_betas`); its index i is the
        i-th smallest of them. Itself when they are every index from 0 up, so a full chain is computed as always."""
        if sorted(timesteps) == list(range(len(timesteps))):
            return self
        return GaussianDiffusion(self.config, respaced_betas(self.alphas_cumprod64, timesteps)).to(self.betas.device)

    # ---- training ----------------------------------------------------------------------------------------

    def loss(self, model, x0, cond=None, t=None, noise=None):
        """L_simple (DDPM eq. 14): E_{t, x_0, eps} || target - model(x_t, t) ||^2 with t ~ U{0..T-1}; with learned
        variances L_hybrid = L_simple + vlb_weight * T * L_t (improved DDPM eq. 16: T L_t estimates L_vlb).

        The target is eps, x_0, or v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022).
        cond: the model's condition (labels; the null label where dropped for classifier-free guidance).
        t and noise may be given (train.py draws them reproducibly); returns a float32 scalar."""
        if self.learned_variance:
            return self.hybrid(self.loss_terms(model, x0, cond, t, noise)).mean()
        out, target, _, _ = self._training_pass(model, x0, cond, t, noise)
        return F.mse_loss(out.float(), target.float())

    def hybrid(self, terms: LossTerms) -> torch.Tensor:
        """(B,) per-example L_simple + vlb_weight * T * L_t (L_simple alone with fixed variances)."""
        return terms.mse if terms.vlb is None else terms.mse + self.vlb_weight * self.num_timesteps * terms.vlb

    def loss_terms(self, model, x0, cond=None, t=None, noise=None) -> LossTerms:
        """The per-example terms of `loss` (see LossTerms), for weighting them (train.py)."""
        out, target, x_t, t = self._training_pass(model, x0, cond, t, noise)
        out, target = out.float(), target.float()
        if not self.learned_variance:
            return LossTerms((out - target).pow(2).flatten(1).mean(1), None)
        mean_out, v = out.chunk(2, dim=1)
        x0_hat = self.predict_x0_from_eps(x_t, t, self._to_eps(x_t, t, mean_out.detach()))
        vlb = vlb_term(self, x0.float(), x_t.float(), t, x0_hat, v)
        return LossTerms((mean_out - target).pow(2).flatten(1).mean(1), vlb)

    def _training_pass(self, model, x0, cond, t, noise):
        """(network output, its target, x_t, t) of one training batch."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, cond)
        if self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x0
        else:
            target = (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                      - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
        return out, target, x_t, t

    # ---- sampling ----------------------------------------------------------------------------------------

    def predict(self, model, x_t, t, cond=None, guidance_scale=1.0, threshold=False):
        """The model's (eps, x_0) at x_t. With a condition and guidance_scale w != 1, classifier-free guidance:
        eps = eps_uncond + w (eps_cond - eps_uncond), both from one batched forward pass of 2B.
        x_0 is then dynamically thresholded (`threshold`, see dynamic_threshold) or clipped to [-1, 1]
        (`clip_denoised`), and eps recomputed from it, so that every sampler's update sees one consistent pair."""
        eps, x0, _ = self.predict_with_variance(model, x_t, t, cond, guidance_scale, threshold)
        return eps, x0

    def predict_with_variance(self, model, x_t, t, cond=None, guidance_scale=1.0, threshold=False):
        """`predict`'s (eps, x_0), and v, the learned variance's output (of the conditional pass, as in GLIDE;
        None with fixed variances)."""
        eps, v = self._eps_and_v(model, x_t, t, cond, guidance_scale)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if threshold or self.clip_denoised:  # thresholding leaves |x_0| <= 1, so clipping after it does nothing
            x0 = dynamic_threshold(x0) if threshold else x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return eps, x0, v

    def _eps_and_v(self, model, x_t, t, cond, guidance_scale):
        """eps (guided) and the variance output v (None with fixed variances) of the network at x_t."""
        if cond is not None and guidance_scale != 1.0:
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
            mean_out, v = self._split(model(x_in, t_in, torch.cat([cond, model.null_condition(cond)])).float())
            eps_cond, eps_uncond = self._to_eps(x_in, t_in, mean_out).chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond), None if v is None else v.chunk(2)[0]
        mean_out, v = self._split(model(x_t, t, cond).float())
        return self._to_eps(x_t, t, mean_out), v

    def _split(self, out):
        """(the mean's output, the variance's v or None): a learned-range network's 2C channels in two halves."""
        return out.chunk(2, dim=1) if self.learned_variance else (out, None)

    def denoiser(self, model, cond=None, guidance_scale=1.0, threshold=False):
        """denoise(x_t, t) -> (eps, x_0): `predict` with the network, its condition and the thresholding bound,
        for the samplers (denoise(x_t, t, with_variance=True) adds v: `predict_with_variance`)."""
        def denoise(x_t, t, with_variance=False):
            eps, x0, v = self.predict_with_variance(model, x_t, t, cond, guidance_scale, threshold)
            return (eps, x0, v) if with_variance else (eps, x0)
        return denoise

    def _to_eps(self, x_t, t, out):
        if self.objective == "eps":
            return out
        if self.objective == "x0":
            return self.predict_eps_from_x0(x_t, t, out)
        # v-objective: eps = sqrt(alpha-bar) v + sqrt(1 - alpha-bar) x_t
        return (extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * out
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)

    def model_log_variance(self, t, ndim: int, v=None):
        """log Sigma_t of the reverse step at index t: log beta-tilde_t ('fixed_small', clipped at t = 0), log beta_t
        ('fixed_large', beta-tilde_1 at t = 0), or with learned variances (improved DDPM eq. 15, improved-diffusion's
        clipping) frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1)/2."""
        if self.variance == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, ndim)
        if self.variance == "fixed_large":
            return extract(self.fixed_large_log_variance, t, ndim)
        frac = (v + 1) / 2
        return (frac * extract(self.log_betas, t, ndim)
                + (1 - frac) * extract(self.posterior_log_variance_clipped, t, ndim))

    def p_sample(self, denoise, x_t, t, z, index=None):
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2): the posterior mean at the predicted x_0,
        plus sigma_t z (see model_log_variance); no noise at the chain's first index.
        t: the network's timestep; index: this chain's (a respaced chain's, see `respaced`; default t)."""
        index = t if index is None else index
        if self.learned_variance:
            _, x0, v = denoise(x_t, t, with_variance=True)
        else:
            (_, x0), v = denoise(x_t, t), None
        mean, _, _ = self.q_posterior(x0, x_t, index)
        log_var = self.model_log_variance(index, x_t.ndim, v)
        nonzero = per_image((index > 0).float(), x_t.ndim)
        return mean + nonzero * (0.5 * log_var).exp() * z, x0

    def ddim_step(self, denoise, x_t, t, t_prev, z, eta):
        """One DDIM step (Song et al. 2021, eq. 12) from index t to t_prev (-1 means the data, alpha-bar = 1):
        x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)   (eq. 16)."""
        eps, x0 = denoise(x_t, t)
        a_t = extract(self.alphas_cumprod, t, x_t.ndim)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.ndim)  # alphas_cumprod_prev[0] = 1: the data
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * z
        return x_prev, x0
