"""Gaussian diffusion: the forward process, the training loss and the DDPM and DDIM steps.

Notation follows Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): beta_t, alpha_t = 1 - beta_t,
alpha-bar_t = prod_{s<=t} alpha_s (here `alphas_cumprod`). Indices are 0-based: index t in these
tensors is step t+1 of the paper, so t runs over 0..T-1 and x_0 (the data) sits "before" index 0.
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] reshaped to (B, 1, 1, ...) so it broadcasts against a batch of images."""
    return per_image(a.gather(0, t), ndim)


def timestep_batch(x: torch.Tensor, t: int) -> torch.Tensor:
    """Timestep index t for every image of the batch x: (B,) long, on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


class GaussianDiffusion(nn.Module):
    """The fixed forward process of a DiffusionConfig and what follows from it: q(x_t | x_0), the posterior,
    the loss and single sampling steps. It holds no network: every method that needs one takes it (as
    improved-diffusion's do), and the samplers take a `denoise(x_t, t) -> (eps, x_0)` made by `denoiser`."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.objective not in ("eps", "x0", "v") or cfg.variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown objective '{cfg.objective}' or variance '{cfg.variance}'")
        self.num_timesteps = cfg.timesteps
        self.objective, self.variance, self.clip_denoised = cfg.objective, cfg.variance, cfg.clip_denoised
        if cfg.beta_schedule == "linear":
            betas = linear_beta_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        elif cfg.beta_schedule == "cosine":
            betas = cosine_beta_schedule(cfg.timesteps)
        else:
            raise ValueError(f"unknown beta schedule '{cfg.beta_schedule}'")
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

    # ---- training ----------------------------------------------------------------------------------------

    def loss(self, model, x0, cond=None, t=None, noise=None):
        """L_simple (DDPM eq. 14): E_{t, x_0, eps} || target - model(x_t, t) ||^2 with t ~ U{0..T-1}.

        The target is eps, x_0, or v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022).
        cond: the model's condition (labels; the null label where dropped for classifier-free guidance).
        t and noise may be given (train.py draws them reproducibly); returns a float32 scalar."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        out = model(self.q_sample(x0, t, noise), t, cond)
        if self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x0
        else:
            target = (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                      - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
        return F.mse_loss(out.float(), target.float())

    # ---- sampling ----------------------------------------------------------------------------------------

    def predict(self, model, x_t, t, cond=None, guidance_scale=1.0, threshold=False):
        """The model's (eps, x_0) at x_t. With a condition and guidance_scale w != 1, classifier-free guidance:
        eps = eps_uncond + w (eps_cond - eps_uncond), both from one batched forward pass of 2B.
        x_0 is then dynamically thresholded (`threshold`, see dynamic_threshold) or clipped to [-1, 1]
        (`clip_denoised`), and eps recomputed from it, so that every sampler's update sees one consistent pair."""
        if cond is not None and guidance_scale != 1.0:
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
            out = model(x_in, t_in, torch.cat([cond, model.null_condition(cond)])).float()
            eps_cond, eps_uncond = self._to_eps(x_in, t_in, out).chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            eps = self._to_eps(x_t, t, model(x_t, t, cond).float())
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if threshold or self.clip_denoised:  # thresholding leaves |x_0| <= 1, so clipping after it does nothing
            x0 = dynamic_threshold(x0) if threshold else x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return eps, x0

    def denoiser(self, model, cond=None, guidance_scale=1.0, threshold=False):
        """denoise(x_t, t) -> (eps, x_0): `predict` with the network, its condition and the thresholding bound,
        for the samplers."""
        return functools.partial(self.predict, model, cond=cond, guidance_scale=guidance_scale, threshold=threshold)

    def _to_eps(self, x_t, t, out):
        if self.objective == "eps":
            return out
        if self.objective == "x0":
            return self.predict_eps_from_x0(x_t, t, out)
        # v-objective: eps = sqrt(alpha-bar) v + sqrt(1 - alpha-bar) x_t
        return (extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * out
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)

    def p_sample(self, denoise, x_t, t, z):
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2): the posterior mean at the predicted x_0,
        plus sigma_t z, with sigma_t^2 = beta-tilde_t ('fixed_small') or beta_t ('fixed_large'); no noise at t=0."""
        _, x0 = denoise(x_t, t)
        mean, _, log_var = self.q_posterior(x0, x_t, t)
        if self.variance == "fixed_large":
            log_var = extract(self.fixed_large_log_variance, t, x_t.ndim)
        nonzero = per_image((t > 0).float(), x_t.ndim)
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
