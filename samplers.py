"""Samplers: from x_T down to the data with a trained network, DDPM (all T steps) or DDIM (a few).

    denoise = diffusion.denoiser(model, cond, guidance_scale)
    x0 = sample_loop(diffusion, denoise, x_T, cfg.sample, generator)

`cfg.sample` (config.SampleConfig) says which sampler and how many steps. Every sampler starts from the
x_T it is given and draws its per-step noise z from `generator` in the same order, so for one seed the
samplers can be compared image by image.
"""
import numpy as np
import torch


def sampler_timesteps(diffusion, s) -> list[int]:
    """The timestep indices the sampler `s` visits, from T-1 down: every one for DDPM; for DDIM `s.steps`
    evenly spaced ones ending at 0 (all of them when steps == T, just T-1 when steps == 1)."""
    T = diffusion.num_timesteps
    if s.sampler == "ddpm":
        return list(range(T - 1, -1, -1))
    if not 1 <= s.steps <= T:
        raise ValueError(f"DDIM steps must be between 1 and T={T}, got {s.steps}")
    if s.steps == 1:  # one step goes from x_T (index T-1) straight to the data, not from index 0
        return [T - 1]
    return np.linspace(0, T - 1, s.steps).round().astype(int)[::-1].tolist()


@torch.inference_mode()
def sample_loop(diffusion, denoise, x, s, generator=None, record=()):
    """Run sampler `s` from x (= x_T) down to x_0. Returns x_0, or (x_0, trajectory) when `record` names
    timestep indices: trajectory = {'t': [...], 'x_t': [...], 'x0': [...]} (float32, on the CPU)."""
    timesteps = sampler_timesteps(diffusion, s)
    if s.sampler == "ddpm":
        def step(x, t, t_prev, z):
            return diffusion.p_sample(denoise, x, t, z)
    else:
        def step(x, t, t_prev, z):
            return diffusion.ddim_step(denoise, x, t, t_prev, z, s.eta)
    trajectory = {"t": [], "x_t": [], "x0": []}
    record = set(record)
    for t_idx, t_prev_idx in zip(timesteps, timesteps[1:] + [-1]):
        t = torch.full((x.shape[0],), t_idx, device=x.device, dtype=torch.long)
        t_prev = torch.full((x.shape[0],), t_prev_idx, device=x.device, dtype=torch.long)
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x_in = x
        x, x0 = step(x, t, t_prev, z)
        if t_idx in record:
            trajectory["t"].append(t_idx)
            trajectory["x_t"].append(x_in.float().cpu())
            trajectory["x0"].append(x0.float().cpu())
    return (x, trajectory) if record else x
