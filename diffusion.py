"""Gaussian diffusion: the forward process, the training loss and the DDPM and DDIM samplers.

Notation follows Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): beta_t, alpha_t = 1 - beta_t,
alpha-bar_t = prod_{s<=t} alpha_s (here `alphas_cumprod`). Indices are 0-based: index t in these
tensors is step t+1 of the paper, so t runs over 0..T-1 and x_0 (the data) sits "before" index 0.
"""
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


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] reshaped to (B, 1, 1, ...) so it broadcasts against a batch of images."""
    return a.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    def __init__(self, model, timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 objective="eps", variance="fixed_large", clip_denoised=True):
        super().__init__()
        if objective not in ("eps", "x0", "v") or variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown objective '{objective}' or variance '{variance}'")
        self.model, self.num_timesteps = model, timesteps
        self.objective, self.variance, self.clip_denoised = objective, variance, clip_denoised

        if beta_schedule == "linear":
            betas = linear_beta_schedule(timesteps, beta_start, beta_end)
        elif beta_schedule == "cosine":
            betas = cosine_beta_schedule(timesteps)
        else:
            raise ValueError(f"unknown beta schedule '{beta_schedule}'")
        alphas_cumprod = np.cumprod(1.0 - betas)
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

    @classmethod
    def from_config(cls, cfg, model):
        d = cfg.diffusion
        return cls(model, timesteps=d.timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
                   beta_end=d.beta_end, objective=d.objective, variance=d.variance,
                   clip_denoised=d.clip_denoised)

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

    def loss(self, x0, y=None, t=None, noise=None):
        """L_simple (DDPM eq. 14): E_{t, x_0, eps} || target - model(x_t, t) ||^2 with t ~ U{0..T-1}.

        The target is eps, x_0, or v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022).
        y: labels (the null label num_classes where dropped for classifier-free guidance). t and noise may
        be given (train.py draws them reproducibly); returns a float32 scalar."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        out = self.model(self.q_sample(x0, t, noise), t, y)
        if self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x0
        else:
            target = (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                      - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
        return F.mse_loss(out.float(), target.float())

    # ---- sampling ----------------------------------------------------------------------------------------

    def predict(self, x_t, t, y=None, guidance_scale=1.0):
        """The model's (eps, x_0) at x_t. With labels and guidance_scale w != 1, classifier-free guidance:
        eps = eps_uncond + w (eps_cond - eps_uncond), both from one batched forward pass of 2B."""
        if y is not None and guidance_scale != 1.0:
            null = torch.full_like(y, self.model.num_classes)
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
            out = self.model(x_in, t_in, torch.cat([y, null])).float()
            eps_cond, eps_uncond = self._to_eps(x_in, t_in, out).chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            eps = self._to_eps(x_t, t, self.model(x_t, t, y).float())
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if self.clip_denoised:
            # recompute eps from the clipped x_0 so that the DDIM update stays consistent with it
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return eps, x0

    def _to_eps(self, x_t, t, out):
        if self.objective == "eps":
            return out
        if self.objective == "x0":
            return self.predict_eps_from_x0(x_t, t, out)
        # v-objective: eps = sqrt(alpha-bar) v + sqrt(1 - alpha-bar) x_t
        return (extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * out
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)

    def p_sample(self, x_t, t, z, y=None, guidance_scale=1.0):
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2): the posterior mean at the predicted x_0,
        plus sigma_t z, with sigma_t^2 = beta-tilde_t ('fixed_small') or beta_t ('fixed_large'); no noise at t=0."""
        eps, x0 = self.predict(x_t, t, y, guidance_scale)
        mean, _, log_var = self.q_posterior(x0, x_t, t)
        if self.variance == "fixed_large":
            log_var = extract(self.fixed_large_log_variance, t, x_t.ndim)
        nonzero = (t > 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * (0.5 * log_var).exp() * z, x0

    def ddim_step(self, x_t, t, t_prev, z, eta, y=None, guidance_scale=1.0):
        """One DDIM step (Song et al. 2021, eq. 12) from index t to t_prev (-1 means the data, alpha-bar = 1):
        x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)   (eq. 16)."""
        eps, x0 = self.predict(x_t, t, y, guidance_scale)
        a_t = extract(self.alphas_cumprod, t, x_t.ndim)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.ndim)  # alphas_cumprod_prev[0] = 1: the data
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * z
        return x_prev, x0

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced indices from T-1 down to 0 (all of them when steps == T)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be between 1 and T={self.num_timesteps}, got {steps}")
        if steps == 1:  # one step goes from x_T (index T-1) straight to the data, not from index 0
            return [self.num_timesteps - 1]
        return np.linspace(0, self.num_timesteps - 1, steps).round().astype(int)[::-1].tolist()

    @torch.inference_mode()
    def p_sample_loop(self, shape, generator=None, noise=None, y=None, guidance_scale=1.0,
                      record=()):
        """DDPM ancestral sampling over all T steps, from x_T = noise (or N(0, I)) down to x_0."""
        return self._loop(shape, list(range(self.num_timesteps - 1, -1, -1)), generator, noise, record,
                          lambda x, t, t_prev, z: self.p_sample(x, t, z, y, guidance_scale))

    @torch.inference_mode()
    def ddim_sample(self, shape, steps=50, eta=0.0, generator=None, noise=None, y=None, guidance_scale=1.0,
                    record=()):
        """DDIM sampling over `steps` evenly spaced timesteps; eta=0 is deterministic given x_T, eta=1 has
        DDPM's posterior variance (fixed_small)."""
        return self._loop(shape, self.ddim_timesteps(steps), generator, noise, record,
                          lambda x, t, t_prev, z: self.ddim_step(x, t, t_prev, z, eta, y, guidance_scale))

    def _loop(self, shape, timesteps, generator, noise, record, step):
        """Run `step` over the timesteps. Both samplers draw x_T and then one z per step from `generator`
        in the same order, so they consume the same noise. Returns x_0, or (x_0, trajectory) when
        `record` names timestep indices: trajectory = {'t': [...], 'x_t': [...], 'x0': [...]} on the CPU."""
        device = self.betas.device
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        trajectory = {"t": [], "x_t": [], "x0": []}
        record = set(record)
        steps = list(zip(timesteps, timesteps[1:] + [-1]))
        for t_idx, t_prev_idx in steps:
            t = torch.full((shape[0],), t_idx, device=device, dtype=torch.long)
            t_prev = torch.full((shape[0],), t_prev_idx, device=device, dtype=torch.long)
            z = torch.randn(shape, generator=generator, device=device)
            x_in = x
            x, x0 = step(x, t, t_prev, z)
            if t_idx in record:
                trajectory["t"].append(t_idx)
                trajectory["x_t"].append(x_in.float().cpu())
                trajectory["x0"].append(x0.float().cpu())
        return (x, trajectory) if record else x
