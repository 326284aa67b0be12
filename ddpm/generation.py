"""Making images with a trained model, batch by batch, with reproducible noise.

    sampling = Sampling(model, diffusion, cfg.sample, device)
    images = generate(sampling, 16, generator)          # one batch in [-1, 1]

What to sample with travels as one object, `Sampling`: the network, the diffusion, the device and the sampler
settings, which are the config's `sample` section (config.SampleConfig): the sampler, its steps, eta, order and
timestep spacing, dynamic thresholding, the seed, the batch size, the guidance scale and the precision.

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


@dataclasses.dataclass
class Sampling:
    """What images are sampled with: the network (in eval mode, on `device`), the diffusion (on `device` too) and
    the sampler settings `sample_cfg` (the config's sample section)."""
    model: torch.nn.Module
    diffusion: torch.nn.Module
    sample_cfg: object
    device: torch.device

    def __post_init__(self):
        self.device = torch.device(self.device)

    @classmethod
    def of(cls, loaded) -> "Sampling":
        """The sampling of a LoadedCheckpoint (ddpm/checkpoint.py), with its config's sampler settings."""
        return cls(loaded.model, loaded.diffusion, loaded.cfg.sample, loaded.device)

    def denoiser(self, cond=None):
        """denoise(x_t, t) -> (eps, x_0) for the condition `cond`, guided and thresholded as sample_cfg says."""
        return self.diffusion.denoiser(self.model, cond, self.sample_cfg.guidance_scale,
                                       self.sample_cfg.dynamic_threshold)


def generate(sampling: Sampling, n: int, generator, cond=None, record=()):
    """One batch of n images in [-1, 1] (float32 on sampling.device) with the sampler settings sampling.sample_cfg.

    cond: (n,) labels for a class-conditional model, (n, ...) encoded captions for a text model (text_encoders.py);
    None: the null condition. A guidance scale w != 1 turns on classifier-free guidance. x_T is the first draw from
    `generator`. `record`: timestep indices to keep; then returns (x, trajectory) as samplers.sample_loop does. A
    latent model (model.codec) samples latents and returns them decoded, its trajectory's x_t and x_0 too. The
    samplers run under `autocast` (here and in the edits of ddpm/edit_runs.py): bf16 on GPUs that support it with
    precision 'auto', fp32 on the CPU."""
    model, sample_cfg = sampling.model, sampling.sample_cfg
    shape = (n, model.image_channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=generator, device=sampling.device)
    with autocast(sample_cfg, sampling.device):
        out = sample_loop(sampling.diffusion, sampling.denoiser(cond), x_T, sample_cfg, generator, record=record)
    if record:  # a latent model's shown steps are decoded too (ddpm/latent.py)
        return to_images(model, out[0]), trajectory_images(model, out[1])
    return to_images(model, out)


def autocast(sample_cfg, device: torch.device):
    """The samplers' autocast for precision sample_cfg.precision: bf16 on GPUs that support it with 'auto', none on
    the CPU."""
    dtype = autocast_dtype(sample_cfg.precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batch_generator(seed: int, start: int, size: int, device) -> torch.Generator:
    """The generator for the batch of `size` images starting at index `start`.

    SeedSequence mixes the three numbers, so different batches get unrelated streams (with seed + start,
    a batch would share noise with the one after it), and a batch cut short by n does not share its noise
    with the full batch that a later, larger run draws from the same start."""
    state = np.random.SeedSequence([seed % 2 ** 64, start, size]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def sample_batches(sampling: Sampling, n: int, starts=None, labels=None):
    """Yield (start, images) for the batches of sample_cfg.batch_size that begin at `starts` (default: all of the
    n images); labels, when given, are the n images' labels."""
    seed, batch_size, device = sampling.sample_cfg.seed, sampling.sample_cfg.batch_size, sampling.device
    for start in range(0, n, batch_size) if starts is None else starts:
        size = min(batch_size, n - start)
        cond = None if labels is None else labels[start:start + size].to(device)
        yield start, generate(sampling, size, batch_generator(seed, start, size, device), cond)


def sampler_record(sample_cfg, timesteps: int) -> dict:
    """The sampler settings of `sample_cfg` that shaped a set of images, for metrics.json (None where one does not
    apply)."""
    sampler = sample_cfg.sampler
    return {"sampler": sampler,
            "steps": (sample_cfg.ddpm_steps or timesteps) if sampler == "ddpm" else sample_cfg.steps,
            "eta": sample_cfg.eta if sampler == "ddim" else None,
            "order": sample_cfg.order if sampler == "dpmpp" else None,
            "spacing": None if sampler == "ddpm" else sample_cfg.spacing,
            "dynamic_threshold": sample_cfg.dynamic_threshold, "guidance_scale": sample_cfg.guidance_scale}


def prepare_model(sampling: Sampling, compile_setting, n: int, labels, say=print) -> Sampling:
    """`sampling` with the network to sample with. On CUDA: TF32, channels-last and, when `compile_setting`
    (train.compile) is 'auto' or true, torch.compile, compiled now at the first batch's shape (n images, labels
    cycled); the eager network if compiling fails. `say` prints the messages (Process.say: on rank 0 only)."""
    device = sampling.device
    if device.type != "cuda":
        return sampling
    enable_tf32(device)
    eager = sampling.model.to(memory_format=torch.channels_last)
    if compile_setting is False:
        return dataclasses.replace(sampling, model=eager)
    cond = None if labels is None else repeat_to(labels, n).to(device)
    say("compiling the model (train.compile=false skips this)")
    one_step = dataclasses.replace(sampling.sample_cfg, sampler="ddim", steps=1, eta=0.0)
    compiled = dataclasses.replace(sampling, model=torch.compile(eager))

    def compile_now():  # one DDIM step at the first batch's shape, so that a failure shows here
        generate(dataclasses.replace(compiled, sample_cfg=one_step), n, None, cond)
        return compiled
    return first_call_or_fallback(compile_now, lambda: dataclasses.replace(sampling, model=eager), say,
                                  "sampling without it")
