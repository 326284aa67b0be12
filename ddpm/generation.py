"""Making images with a trained model, batch by batch, with reproducible noise.

    images = generate(model, diffusion, 16, cfg.sample, generator, device)          # one batch in [-1, 1]

The sampler settings travel as one object, the config's `sample` section (config.SampleConfig): the
sampler, its steps, eta, order and timestep spacing, dynamic thresholding, the seed, the batch size, the
guidance scale and the precision.

Reproducibility: the images of a batch come from a generator seeded by (seed, first index, batch size),
with batches aligned on multiples of the batch size. So the same seed, checkpoint and device give the
same images.
"""
import dataclasses

import numpy as np
import torch

from ddpm.conditions import repeat_to
from ddpm.latent import to_images, trajectory_images
from ddpm.samplers import sample_loop
from utils import autocast_dtype, enable_tf32, first_call_or_fallback


def generate(model, diffusion, n, s, generator, device, cond=None, record=()):
    """One batch of n images in [-1, 1] (float32 on `device`) with the sampler settings `s`.

    cond: (n,) labels for a class-conditional model, (n, ...) encoded captions for a text model (text_encoders.py);
    None: the null condition. s.guidance_scale w != 1 turns on classifier-free guidance. x_T is the first draw from
    `generator`. `record`: timestep indices to keep; then returns (x, trajectory) as samplers.sample_loop does. A
    latent model (model.codec) samples latents and returns them decoded, its trajectory's x_t and x_0 too. The
    samplers run under `autocast` (here and in the edits of ddpm/edit_runs.py): bf16 on GPUs that support it with
    precision 'auto', fp32 on the CPU."""
    device = torch.device(device)
    shape = (n, model.image_channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=generator, device=device)
    denoise = diffusion.denoiser(model, cond, s.guidance_scale, s.dynamic_threshold)
    with autocast(s, device):
        out = sample_loop(diffusion, denoise, x_T, s, generator, record=record)
    if record:  # a latent model's shown steps are decoded too (ddpm/latent.py)
        return to_images(model, out[0]), trajectory_images(model, out[1])
    return to_images(model, out)


def autocast(s, device: torch.device):
    """The samplers' autocast for precision s.precision: bf16 on GPUs that support it with 'auto', none on the CPU."""
    dtype = autocast_dtype(s.precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batch_generator(seed: int, start: int, size: int, device) -> torch.Generator:
    """The generator for the batch of `size` images starting at index `start`.

    SeedSequence mixes the three numbers, so different batches get unrelated streams (with seed + start,
    a batch would share noise with the one after it), and a batch cut short by n does not share its noise
    with the full batch that a later, larger run draws from the same start."""
    state = np.random.SeedSequence([seed % 2 ** 64, start, size]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def sample_batches(model, diffusion, n, s, device, starts=None, labels=None):
    """Yield (start, images) for the batches of s.batch_size that begin at `starts` (default: all of the n
    images); labels, when given, are the n images' labels."""
    for start in range(0, n, s.batch_size) if starts is None else starts:
        size = min(s.batch_size, n - start)
        cond = None if labels is None else labels[start:start + size].to(device)
        yield start, generate(model, diffusion, size, s, batch_generator(s.seed, start, size, device), device, cond)


def sampler_record(s, timesteps: int) -> dict:
    """The sampler settings of `s` that shaped a set of images, for metrics.json (None where one does not apply)."""
    return {"sampler": s.sampler, "steps": timesteps if s.sampler == "ddpm" else s.steps,
            "eta": s.eta if s.sampler == "ddim" else None, "order": s.order if s.sampler == "dpmpp" else None,
            "spacing": None if s.sampler == "ddpm" else s.spacing, "dynamic_threshold": s.dynamic_threshold,
            "guidance_scale": s.guidance_scale}


def prepare_model(model, diffusion, cfg, device, n, labels, say=print):
    """The network to sample with. On CUDA: TF32, channels-last and, when train.compile is 'auto' or true,
    torch.compile, compiled now at the first batch's shape (n images, labels cycled); the eager network
    if compiling fails. `say` prints the messages (a no-op on the ranks other than 0)."""
    if device.type != "cuda":
        return model
    enable_tf32(device)
    model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile is False:
        return model
    cond = None if labels is None else repeat_to(labels, n).to(device)
    say("compiling the model (train.compile=false skips this)")
    compiled = torch.compile(model)
    one_step = dataclasses.replace(cfg.sample, sampler="ddim", steps=1, eta=0.0)

    def compile_now():  # one DDIM step at the first batch's shape, so that a failure shows here
        generate(compiled, diffusion, n, one_step, None, device, cond)
        return compiled
    return first_call_or_fallback(compile_now, lambda: model, say, "sampling without it")
