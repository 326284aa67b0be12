"""Editing images with a trained model: image to image (SDEdit), inpainting (RePaint), DDIM inversion and
spherical interpolation of x_T. Tensors in, tensors out: images in [-1, 1], B x C x H x W, on the model's device.

    denoise = diffusion.denoiser(model, cond, sample_cfg.guidance_scale, sample_cfg.dynamic_threshold)
    x = img2img(diffusion, denoise, x0, sample_cfg, strength=0.5, generator=g)
    x = repaint(diffusion, denoise, x0, Inpainting(keep, jump=10, resample=10), sample_cfg, g)
    x_T = ddim_invert(diffusion, denoise, x0, sample_cfg)
    x = decode(diffusion, denoise, x_T, sample_cfg)  # the image again, up to the inversion's error
    x = decode(diffusion, denoise, slerp_path(x_a, x_b, 8), sample_cfg)  # 8 images from x_a's to x_b's

`sample_cfg` is the config's sample section (config.SampleConfig), as for plain sampling: every edit runs on the
sampler's own timesteps (samplers.sampler_timesteps). a_t is alpha-bar_t of timestep index t (diffusion.py), a = 1
at the data. The command line that reads and writes the pictures is ddpm/edit_runs.py (`sample.py --init ...`).
"""
import dataclasses
import math

import torch

from ddpm.samplers import dpmpp_stepper, markov_stepper, sample_loop, sampler_timesteps
from diffusion import per_image, timestep_batch


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device)


def check_deterministic(sample_cfg) -> None:
    """Inversion, decoding and interpolation need the sampler to be an ODE solver: DDIM with eta 0 or DPM-Solver++."""
    if sample_cfg.sampler == "ddpm" or (sample_cfg.sampler == "ddim" and sample_cfg.eta != 0):
        raise ValueError(f"needs a deterministic sampler (ddim with eta 0, or dpmpp), got {sample_cfg.sampler} "
                         f"eta={sample_cfg.eta}")


# ---- image to image ------------------------------------------------------------------------------------------

def strength_steps(n: int, strength: float) -> int:
    """k = round(n S), halves rounded up: how many of the sampler's n steps image to image runs (diffusers'
    img2img pipelines take floor(n S)). The 1e-9 rounds up a half that is exact in decimal but falls just below it
    in binary (0.29 x 50 = 14.4999...)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return math.floor(n * strength + 0.5 + 1e-9)


def strength_start(diffusion, sample_cfg, strength: float) -> int | None:
    """The timestep index t0 where image to image starts: the last k = strength_steps(N, S) of the sampler's N
    timesteps are run again, so for DDPM (N = T) t0 = round(S T) - 1. None when k = 0: no step remains."""
    timesteps = sampler_timesteps(diffusion, sample_cfg)
    k = strength_steps(len(timesteps), strength)
    return timesteps[-k] if k else None


@torch.inference_mode()
def img2img(diffusion, denoise, x0, sample_cfg, strength: float, generator=None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise the image to t0 = strength_start(...) with q(x_t0 | x_0),
    x_t0 = sqrt(a_t0) x_0 + sqrt(1 - a_t0) eps, then run the sampler from t0 down to the data.

    eps is the first draw from `generator`, where plain sampling draws x_T. When every step runs (k = N, so
    strength 1) the start is x_T = eps itself, pure noise as in plain sampling, which the result then equals
    exactly: the input is ignored. When no step remains the result is x0 itself."""
    eps = _noise(x0, generator)
    t0 = strength_start(diffusion, sample_cfg, strength)
    if t0 is None:
        return x0
    from_noise = t0 == sampler_timesteps(diffusion, sample_cfg)[0]
    x = eps if from_noise else diffusion.q_sample(x0, timestep_batch(x0, t0), eps)
    return sample_loop(diffusion, denoise, x, sample_cfg, generator, start=t0).clamp(-1, 1)


# ---- inpainting ---------------------------------------------------------------------------------------------

def repaint_schedule(n: int, jump: int, resample: int) -> list[int]:
    """RePaint's sequence of positions over n sampler steps (Lugmayr et al. 2022, sec. 4.2, as the time
    schedule of their code): r = n-1 (the first timestep) down to -1 (the data); each time r reaches a
    multiple of `jump` below n - jump, it goes back up `jump` positions, resample - 1 times at each such r.
    So each stretch of `jump` steps is run `resample` times; jump 1 is Algorithm 1 (U = resample); resample 1
    is the straight run n-1, ..., 0, -1."""
    jumps_left = {r: resample - 1 for r in range(0, n - jump, jump)}
    r, schedule = n - 1, [n - 1]
    while r >= 0:
        r -= 1
        schedule.append(r)
        if jumps_left.get(r, 0) > 0:
            jumps_left[r] -= 1
            schedule += range(r + 1, r + jump + 1)
            r += jump
    return schedule


def forward_jump(diffusion, x_from: torch.Tensor, t_from: int, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_from) for timestep indices t > t_from: N(sqrt(a_t/a_from) x_from, (1 - a_t/a_from) I), the
    forward process's steps t_from+1..t in one draw (the coefficients in float64 from the schedule)."""
    ratio = float(diffusion.alphas_cumprod64[t] / diffusion.alphas_cumprod64[t_from])
    return math.sqrt(ratio) * x_from + math.sqrt(1 - ratio) * noise


@dataclasses.dataclass(frozen=True)
class Inpainting:
    """What RePaint keeps and how it resamples: the mask `keep` (bool, broadcastable to the images, True where the
    input is kept), the length of its jumps back in sampler steps, and how many times each stretch of `jump` steps is
    run (see repaint_schedule)."""
    keep: torch.Tensor
    jump: int = 10
    resample: int = 10


@torch.inference_mode()
def repaint(diffusion, denoise, x0, inpainting: Inpainting, sample_cfg, generator=None) -> torch.Tensor:
    """Inpainting by RePaint (Lugmayr et al. 2022, Algorithm 1 with the jumps of sec. 4.2) on the sampler's
    timesteps t_0 > ... > t_{N-1}: regenerate x0 where `inpainting.keep` is False.

    From x_T, the first draw from `generator`, each step from t sets the known part to a fresh draw of
    q(x_t | x_0) = N(sqrt(a_t) x0, (1 - a_t) I), then takes the sampler's step (DDPM, DDIM or DPM-Solver++)
    to the next timestep on the whole image; where `repaint_schedule` goes back up from t_{i+1} to t_i it
    draws x_{t_i} ~ q(x_{t_i} | x_{t_{i+1}}) (forward_jump) and runs the step again. The result is x0 exactly
    where keep is True. DPM-Solver++'s multistep history does not survive a jump back: resample 1 only."""
    timesteps = sampler_timesteps(diffusion, sample_cfg)
    n = len(timesteps)
    if sample_cfg.sampler == "dpmpp":
        if inpainting.resample != 1:
            raise ValueError("DPM-Solver++ inpaints with resample=1 only (its history does not survive a jump back)")
        step = dpmpp_stepper(diffusion, denoise, timesteps, sample_cfg.order)
    else:
        step = markov_stepper(diffusion, denoise, timesteps, sample_cfg, generator)
    x = _noise(x0, generator)
    keep, schedule = inpainting.keep, repaint_schedule(n, inpainting.jump, inpainting.resample)
    for r, r_next in zip(schedule, schedule[1:]):
        i = n - 1 - r  # r's position in `timesteps`
        noise = _noise(x0, generator)
        if r_next < r:
            known = diffusion.q_sample(x0, timestep_batch(x0, timesteps[i]), noise)
            x, _ = step(torch.where(keep, known, x), i)
        else:
            x = forward_jump(diffusion, x, timesteps[i], timesteps[i - 1], noise)
    return torch.where(keep, x0, x.clamp(-1, 1))


# ---- inversion and interpolation ------------------------------------------------------------------------------

@torch.inference_mode()
def ddim_invert(diffusion, denoise, x0, sample_cfg) -> torch.Tensor:
    """DDIM inversion: x_T from the image by the deterministic DDIM ODE (eta 0) run upwards, over the
    sampler's timesteps t_1 < ... < t_N (its own, read from the bottom). Each step is DDIM's update from the
    current point,
        x_{t_{i+1}} = sqrt(a_{t_{i+1}}) x0_hat + sqrt(1 - a_{t_{i+1}}) eps_hat,  (eps_hat, x0_hat) at (x_{t_i}, t_i),
    and the first, from the data (sigma 0, where the network is not defined), uses x0_hat = the image and the
    eps_hat predicted at (image, t_1). `decode` on the same timesteps gives the image back, up to how much
    eps_hat changes over a step, which shrinks with more steps (tests/test_editing.py measures it)."""
    ascending = sampler_timesteps(diffusion, sample_cfg)[::-1]
    x = x0
    for i, t in enumerate(ascending):
        eps, x0_hat = denoise(x, timestep_batch(x, ascending[max(i - 1, 0)]))
        a = float(diffusion.alphas_cumprod64[t])
        x = math.sqrt(a) * (x if i == 0 else x0_hat) + math.sqrt(1 - a) * eps
    return x


@torch.inference_mode()
def decode(diffusion, denoise, x_T, sample_cfg) -> torch.Tensor:
    """x_T down to the data with the deterministic sampler `sample_cfg` (DDIM eta 0 or DPM-Solver++)."""
    check_deterministic(sample_cfg)
    return sample_loop(diffusion, denoise, x_T, sample_cfg).clamp(-1, 1)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985), per image: with theta the angle between a and b
    (flattened), slerp = sin((1 - w) theta)/sin(theta) a + sin(w theta)/sin(theta) b, coefficients in float64.
    w = 0 and 1 give a and b exactly; for |a| = |b| the path stays on their sphere, where Gaussian x_T are (the
    straight line between two x_T passes near the origin, where they are not). Parallel a, b: the straight line."""
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp(min=1e-300)
    theta = cos.clamp(-1, 1).acos()
    straight = theta < 1e-4
    sin = torch.where(straight, 1.0, theta.sin())
    ca = torch.where(straight, 1.0 - w, ((1.0 - w) * theta).sin() / sin)
    cb = torch.where(straight, w, (w * theta).sin() / sin)
    return per_image(ca.to(a.dtype), a.ndim) * a + per_image(cb.to(a.dtype), a.ndim) * b


def slerp_path(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """n points slerp(a, b, w), w = 0, 1/(n-1), ..., 1, for single images a and b (1 x C x H x W): n x C x H x W."""
    if n < 2:
        raise ValueError(f"an interpolation needs at least 2 points, got {n}")
    return torch.cat([slerp(a, b, i / (n - 1)) for i in range(n)])
