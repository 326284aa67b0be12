"""Making images with a trained model: batches with reproducible noise, and folders of PNGs.

    images = generate(model, diffusion, 16, cfg.sample, generator, device)          # one batch in [-1, 1]
    sample_to_folder(model, diffusion, "results/x/fid50k", 50_000, cfg.sample, device)  # resumable

The sampler settings travel as one object, the config's `sample` section (config.SampleConfig): the
sampler, its steps, eta, order and timestep spacing, dynamic thresholding, the seed, the batch size, the
guidance scale and the precision.

Reproducibility: the images of a batch come from a generator seeded by (seed, first index, batch size),
with batches aligned on multiples of the batch size. So the same seed, checkpoint and device give the
same images, and a folder that was interrupted and filled again ends with exactly the files of one
uninterrupted run (with the same batch size). Under torchrun the batches of a folder are split over the
processes, which changes nothing in the files either.
"""
import argparse
import contextlib
import dataclasses
import os
import re

import numpy as np
import torch

from distributed import wait_for_all
from samplers import SPACINGS, sample_loop
from utils import (
    FolderLock,
    UserError,
    autocast_dtype,
    enable_tf32,
    first_call_or_fallback,
    on_interrupt,
    to_pil,
    to_uint8,
    writing,
)

FILE_NAME = re.compile(r"\d{7,}\.png")  # 0000000.png, 0000001.png, ... as written by sample_to_folder


def generate(model, diffusion, n, s, generator, device, cond=None, record=()):
    """One batch of n images in [-1, 1] (float32 on `device`) with the sampler settings `s`.

    cond: (n,) labels for a class-conditional model, (n, ...) encoded captions for a text model (text.py); None:
    the null condition. s.guidance_scale w != 1 turns on classifier-free guidance. x_T is the first draw from
    `generator`. `record`: timestep indices to keep; then returns (x, trajectory) as samplers.sample_loop does.
    The samplers run under `autocast` (here and in the edits of edit_cli.py): bf16 on GPUs that support it with
    precision 'auto', fp32 on the CPU."""
    device = torch.device(device)
    shape = (n, model.image_channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=generator, device=device)
    denoise = diffusion.denoiser(model, cond, s.guidance_scale, s.dynamic_threshold)
    with autocast(s, device):
        out = sample_loop(diffusion, denoise, x_T, s, generator, record=record)
    # the samplers clip x_0 when diffusion.clip_denoised; without it the last step may overshoot a little
    return (out[0].clamp(-1, 1), out[1]) if record else out.clamp(-1, 1)


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


def cycle(labels, n: int):
    """Conditions repeated over n images: labels (a list, as a long tensor) or a tensor of them or of encoded
    captions (the first dimension cycled); None stays None."""
    if labels is None:
        return None
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, dtype=torch.long)
    return labels[torch.arange(n, device=labels.device) % len(labels)]


def sample_batches(model, diffusion, n, s, device, starts=None, labels=None):
    """Yield (start, images) for the batches of s.batch_size that begin at `starts` (default: all of the n
    images); labels, when given, are the n images' labels."""
    for start in range(0, n, s.batch_size) if starts is None else starts:
        size = min(s.batch_size, n - start)
        cond = None if labels is None else labels[start:start + size].to(device)
        yield start, generate(model, diffusion, size, s, batch_generator(s.seed, start, size, device), device, cond)


def existing_images(folder: str) -> set[int]:
    return {int(name[:-4]) for name in os.listdir(folder) if FILE_NAME.fullmatch(name)}


def save_png(image: torch.Tensor, path: str) -> None:
    """Save one uint8 C x H x W image. It is written under a temporary name and renamed, so a killed run
    never leaves a truncated PNG that the next run would count as done. (No fsync, unlike
    utils.atomic_write: that would cost more than the sampling for tens of thousands of small files.)"""
    tmp = path + ".tmp"
    with writing(path):
        try:
            to_pil(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def sample_to_folder(model, diffusion, folder, n, s, device, class_labels=None, rank=0, world=1) -> int:
    """Make `folder` hold images 0000000.png .. (n-1).png, generating only the ones not there yet.

    Images that exist are never overwritten. Image i comes from the batch that starts at the multiple of
    s.batch_size below i, with its own generator (see batch_generator), so a resumed run writes the same
    files as an uninterrupted one. class_labels: None (the null label on a conditional model), or labels
    cycled over the n images (a 1-D tensor of length n, or a list). Under torchrun (`world` processes) each
    rank makes every world-th of the missing batches, rank 0 shows the progress of the whole folder, and
    all ranks wait for each other at the end. A second run on the folder is refused while this one lasts
    (FolderLock). Returns the number of images in the folder afterwards."""
    os.makedirs(folder, exist_ok=True)

    def note():
        return (f"{len(existing_images(folder) & set(range(n)))} of {n} images are in {folder}; run the same "
                "command to make the rest")
    lock = FolderLock(folder, "sampling run") if rank == 0 else contextlib.nullcontext()  # one run per folder
    with lock, on_interrupt(note):
        done = existing_images(folder)
        wait_for_all(world)  # every rank has listed the folder before any writes to it: they split the same batches
        missing = [i for i in range(n) if i not in done]
        starts = sorted({i - i % s.batch_size for i in missing})[rank::world]
        batches = sample_batches(model, diffusion, n, s, device, starts, cycle(class_labels, n))
        write_missing(folder, n, batches, done, len(missing), rank)
    wait_for_all(world)
    return len(existing_images(folder))


def write_missing(folder, n, batches, done, n_missing, rank):
    """Save the images of `batches` that are not `done`; rank 0 shows the progress of every process."""
    from tqdm import tqdm
    with tqdm(total=n_missing, unit="img", desc="sampling", disable=rank != 0) as bar:
        for start, x in batches:
            for j, image in enumerate(to_uint8(x)):
                if start + j not in done:
                    save_png(image, os.path.join(folder, f"{start + j:07d}.png"))
            if rank == 0:  # the files of every process count
                bar.update(len(existing_images(folder) & set(range(n))) - (n - n_missing) - bar.n)


# ---- what the command lines share -----------------------------------------------------------------------

SAMPLER_FLAGS = ("sampler", "steps", "eta", "order", "spacing", "dynamic_threshold", "seed", "batch_size",
                 "guidance_scale")


def add_sampler_flags(p) -> None:
    """The sampling flags of sample.py and evaluate.py; each is shorthand for a sample.<field> override
    and defaults to the checkpoint's value."""
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], help="sample.sampler (dpmpp: DPM-Solver++)")
    p.add_argument("--steps", type=int, help="network calls of DDIM and DPM-Solver++, 1..T (sample.steps); "
                                             "DDPM always takes all T")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 like DDPM (sample.eta)")
    p.add_argument("--order", type=int, help="DPM-Solver++ order 1, 2 or 3 (sample.order)")
    p.add_argument("--spacing", choices=SPACINGS, help="DDIM and DPM-Solver++ timesteps (sample.spacing)")
    p.add_argument("--dynamic-threshold", action=argparse.BooleanOptionalAction,
                   help="Imagen's dynamic thresholding of the predicted x_0 (sample.dynamic_threshold)")
    p.add_argument("--seed", type=int, help="sample.seed")
    p.add_argument("--batch-size", type=int, help="images per sampler run (sample.batch_size)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance weight w, 1 = plain conditional (sample.guidance_scale)")


def sampler_overrides(args) -> list[str]:
    """The sampling flags given on the command line, as sample.<field>=value overrides."""
    return [f"sample.{k}={getattr(args, k)}" for k in SAMPLER_FLAGS if getattr(args, k) is not None]


def sampler_record(s, timesteps: int) -> dict:
    """The sampler settings of `s` that shaped a set of images, for metrics.json (None where one does not apply)."""
    return {"sampler": s.sampler, "steps": timesteps if s.sampler == "ddpm" else s.steps,
            "eta": s.eta if s.sampler == "ddim" else None, "order": s.order if s.sampler == "dpmpp" else None,
            "spacing": None if s.sampler == "ddpm" else s.spacing, "dynamic_threshold": s.dynamic_threshold,
            "guidance_scale": s.guidance_scale}


def class_labels(spec, num_classes, n):
    """(labels, n, nrow) for --class-label. labels are cycled over the images (None: unconditional);
    'all' makes n a multiple of the number of classes, so that each grid row (nrow images) is one class."""
    if num_classes is None:
        if spec is not None:
            raise UserError("--class-label needs a class-conditional checkpoint; this one was trained without "
                            "labels (model.num_classes is null)")
        return None, n, None
    if spec == "all":
        per_class = max(1, n // num_classes)
        return torch.arange(num_classes).repeat_interleave(per_class), per_class * num_classes, per_class
    if spec is None:
        return list(range(num_classes)), n, None
    try:
        labels = [int(k) for k in spec.split(",")]
    except ValueError:
        raise UserError(f"--class-label must be 'all', a class index or a comma list of them, got '{spec}'") from None
    for k in labels:
        if not 0 <= k < num_classes:
            raise UserError(f"--class-label {k} is out of range; this checkpoint has {num_classes} classes "
                            f"(0..{num_classes - 1})")
    return labels, n, None


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
    cond = None if labels is None else cycle(labels, n).to(device)
    say("compiling the model (train.compile=false skips this)")
    compiled = torch.compile(model)
    one_step = dataclasses.replace(cfg.sample, sampler="ddim", steps=1, eta=0.0)

    def compile_now():  # one DDIM step at the first batch's shape, so that a failure shows here
        generate(compiled, diffusion, n, one_step, None, device, cond)
        return compiled
    return first_call_or_fallback(compile_now, lambda: model, say, "sampling without it")
