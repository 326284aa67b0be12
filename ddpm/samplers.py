"""Samplers: from x_T down to the data with a trained network: DDPM (all T steps), DDIM and DPM-Solver++.

    denoise = diffusion.denoiser(model, cond, guidance_scale)
    x0 = sample_loop(diffusion, denoise, x_T, cfg.sample, generator)

`cfg.sample` (config.SampleConfig) says which sampler, how many steps and where they go. Every sampler starts
from the x_T it is given; DDPM and DDIM draw their per-step noise z from `generator` in the same order, so for
one seed the samplers can be compared image by image.

DDIM and DPM-Solver++ share the timesteps (`spaced_timesteps`): N model evaluations at indices strictly
decreasing from T-1, and a last step from the smallest of them to the data (alpha = 1, sigma = 0).
DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) is in its multistep data-prediction form, in the paper's
notation: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), lambda_t = log(alpha_t / sigma_t)
(half the log-SNR), and h = lambda_t - lambda_s for a step from s to t. Its order 1 is DDIM with eta = 0.
"""
import numpy as np
import torch

from diffusion import timestep_batch

SPACINGS = ("linspace", "trailing", "logsnr")


# ---- timesteps -----------------------------------------------------------------------------------------------

def log_snr_half(alphas_cumprod64: np.ndarray) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = log(alpha-bar_t / (1 - alpha-bar_t)) / 2, decreasing in t."""
    return 0.5 * (np.log(alphas_cumprod64) - np.log1p(-alphas_cumprod64))


def spaced_timesteps(alphas_cumprod64: np.ndarray, n: int, spacing: str) -> list[int]:
    """n timestep indices, strictly decreasing from T-1; the step after the last one goes to the data.

    linspace: round(linspace(0, T-1, n+1)) from the top, without its last point (index 0);
    trailing: round(T - k T/n) - 1 for k = 0..n-1 (these two as diffusers' DPMSolverMultistepScheduler);
    logsnr:   uniform in lambda_t: n+1 points from lambda_{T-1} to lambda_0 without the last, each mapped to
              the (rounded, linearly interpolated) index that has that lambda, so the model is evaluated at
              integer timesteps and the solver uses their own alpha, sigma.
    n = T visits every index."""
    T = len(alphas_cumprod64)
    if not 1 <= n <= T:
        raise ValueError(f"the number of steps must be between 1 and T={T}, got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    elif spacing == "logsnr":
        lam = log_snr_half(alphas_cumprod64)
        targets = np.linspace(lam[-1], lam[0], n + 1)[:-1]
        ts = np.interp(targets, lam[::-1], np.arange(T - 1, -1, -1)).round()
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; use one of {', '.join(SPACINGS)}")
    return _strictly_decreasing(ts, T)


def _strictly_decreasing(ts, T: int) -> list[int]:
    """Rounding repeats indices when n is close to T. Keep each index within [n-1-i, previous - 1]: that
    leaves a list without repeats as it is and turns n = T into every index from T-1 down to 0."""
    n, out = len(ts), [T - 1]
    for i in range(1, n):
        out.append(int(min(max(ts[i], n - 1 - i), out[-1] - 1)))
    return out


def sampler_timesteps(diffusion, sample_cfg) -> list[int]:
    """The timestep indices the sampler `sample_cfg` visits, from T-1 down: for DDPM every one, or the
    `sample_cfg.ddpm_steps` of improved DDPM's respacing (round(linspace(0, T-1, N)), both ends kept); for DDIM
    and DPM-Solver++ the `sample_cfg.steps` of spacing `sample_cfg.spacing`."""
    T = diffusion.num_timesteps
    if sample_cfg.sampler == "ddpm":
        n = sample_cfg.ddpm_steps or T
        return [int(k) for k in np.linspace(0, T - 1, n).round()[::-1]]
    return spaced_timesteps(diffusion.alphas_cumprod64, sample_cfg.steps, sample_cfg.spacing)


# ---- DPM-Solver++ --------------------------------------------------------------------------------------------

def dpmpp_orders(n: int, order: int) -> list[int]:
    """The order of each of n steps: warm-up with lower orders while the history is short, first order for the
    last step (to sigma = 0, where h is infinite), and at most second order for the one before it when n < 15
    (as diffusers' lower_order_final=True with final_sigmas_type='zero'; the paper recommends lower-order
    final steps for few steps)."""
    orders = [min(order, i + 1) for i in range(n)]
    orders[-1] = 1
    if 2 <= n < 15:
        orders[-2] = min(orders[-2], 2)
    return orders


def dpmpp_step_coefficients(alpha, sigma, lam, order: int) -> tuple[float, list[float]]:
    """(a, [b0, b1, ...]) of one step from s0 to t, x_t = a x_s0 + b0 x0_s0 + b1 x0_s1 + b2 x0_s2, with x0_s the
    data prediction made at s; alpha, sigma, lam: float64 [t, s0, s1, s2] (s2 < s1 < s0 < t in lambda).
    h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2, r0 = h_0/h, r1 = h_1/h.

    order 1 (DPM-Solver++ 1, = DDIM): x_t = (sigma_t/sigma_s0) x_s0 - alpha_t (e^-h - 1) x0_s0
    order 2 (2M, the paper's Algorithm 2):  the same with D = (1 + 1/(2 r0)) x0_s0 - 1/(2 r0) x0_s1 for x0_s0
    order 3 (3M, as dpm-solver's and diffusers' multistep third order): with D1_0 = (x0_s0 - x0_s1)/r0,
      D1_1 = (x0_s1 - x0_s2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1):
      x_t = (sigma_t/sigma_s0) x_s0 - alpha_t phi1 x0_s0 + alpha_t phi2 D1 - alpha_t phi3 D2,
      phi1 = e^-h - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2."""
    h = lam[0] - lam[1]
    phi1 = np.expm1(-h)  # -1 at the data, where h = inf
    a = sigma[0] / sigma[1]
    if order == 1:
        return float(a), [float(-alpha[0] * phi1)]
    r0 = (lam[1] - lam[2]) / h
    if order == 2:
        return float(a), [float(-alpha[0] * phi1 * (1 + 0.5 / r0)), float(alpha[0] * phi1 * 0.5 / r0)]
    r1 = (lam[2] - lam[3]) / h
    d1_0, d1_1 = np.array([1, -1, 0]) / r0, np.array([0, 1, -1]) / r1  # as combinations of (x0_s0, x0_s1, x0_s2)
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    b = -alpha[0] * phi1 * np.array([1, 0, 0]) + alpha[0] * phi2 * d1 - alpha[0] * phi3 * d2
    return float(a), [float(c) for c in b]


def dpmpp_coefficients(alphas_cumprod64, timesteps: list[int], order: int) -> list[tuple[float, list[float]]]:
    """The coefficients of every step of DPM-Solver++ over `timesteps` (then the data), in float64 from the
    schedule: step i goes from timesteps[i] to timesteps[i+1] and uses the data predictions at timesteps[i],
    timesteps[i-1], ... (see dpmpp_step_coefficients)."""
    abar = np.append(np.asarray(alphas_cumprod64, dtype=np.float64)[timesteps], 1.0)  # the data: sigma = 0
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the data
    coefs = []
    for i, k in enumerate(dpmpp_orders(len(timesteps), order)):
        at = [i + 1] + [i - j for j in range(k)]  # t, s0, s1, ..., newest first
        coefs.append(dpmpp_step_coefficients(alpha[at], sigma[at], lam[at], k))
    return coefs


# ---- the loop ------------------------------------------------------------------------------------------------

def markov_stepper(diffusion, denoise, timesteps, sample_cfg, generator):
    """step(x, i) -> (x at the next timestep, x_0 predicted at timesteps[i]) for DDPM and DDIM; each step draws
    its noise z from `generator` (the next index of the last step is -1, the data). DDPM over fewer than all
    timesteps steps along the respaced chain (GaussianDiffusion.respaced), whose index of timesteps[i] is
    len(timesteps) - 1 - i: the timesteps of a DDPM sampler always end at 0."""
    following = timesteps[1:] + [-1]
    chain = diffusion.respaced(timesteps) if sample_cfg.sampler == "ddpm" else None

    def step(x, i):
        t = timestep_batch(x, timesteps[i])
        z = torch.randn(x.shape, generator=generator, device=x.device)
        if sample_cfg.sampler == "ddpm":
            index = t if chain is diffusion else timestep_batch(x, len(timesteps) - 1 - i)
            return chain.p_sample(denoise, x, t, z, index)
        return diffusion.ddim_step(denoise, x, t, timestep_batch(x, following[i]), z, sample_cfg.eta)
    return step


def dpmpp_stepper(diffusion, denoise, timesteps, order: int):
    """step(x, i) for DPM-Solver++: one network call, then the step as a combination of x and the newest
    data predictions, with coefficients computed in float64 and applied to the float32 tensors."""
    coefs = dpmpp_coefficients(diffusion.alphas_cumprod64, timesteps, order)
    history = []  # x_0 predicted at timesteps[i], timesteps[i-1], ...

    def step(x, i):
        _, x0 = denoise(x, timestep_batch(x, timesteps[i]))
        history.insert(0, x0)
        del history[order:]
        a, b = coefs[i]
        return a * x + sum(c * m for c, m in zip(b, history)), x0
    return step


@torch.inference_mode()
def sample_loop(diffusion, denoise, x, sample_cfg, generator=None, record=(), start=None):
    """Run the sampler `sample_cfg` from x (= x_T) down to x_0. Returns x_0, or (x_0, trajectory) when `record` names
    timestep indices: trajectory = {'t': [...], 'x_t': [...], 'x0': [...]} (float32, on the CPU).

    start: begin part-way, at that timestep index, one of the sampler's own timesteps (x is then x_start):
    the sampler runs over its timesteps at or below it, as if they were all it had (DPM-Solver++ warms up
    from there as it does from T). None: from the top, T-1."""
    timesteps = sampler_timesteps(diffusion, sample_cfg)
    if start is not None:
        if start not in timesteps:
            raise ValueError(f"start={start} is not one of the sampler's timesteps")
        timesteps = timesteps[timesteps.index(start):]
    if sample_cfg.sampler == "dpmpp":
        step = dpmpp_stepper(diffusion, denoise, timesteps, sample_cfg.order)
    else:
        step = markov_stepper(diffusion, denoise, timesteps, sample_cfg, generator)
    trajectory = {"t": [], "x_t": [], "x0": []}
    record = set(record)
    for i, t in enumerate(timesteps):
        x_in = x
        x, x0 = step(x, i)
        if t in record:
            trajectory["t"].append(t)
            trajectory["x_t"].append(x_in.float().cpu())
            trajectory["x0"].append(x0.float().cpu())
    return (x, trajectory) if record else x
