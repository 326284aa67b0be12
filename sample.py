"""Sample from a trained DDPM: a grid, a folder of PNGs, and pictures of the diffusion process.

    python sample.py --ckpt checkpoints/cifar10/last.pt                  # results/cifar10/grid.png
    python sample.py --ckpt ... --n 50000 --save-dir results/cifar10/samples   # one PNG each, resumable
    python sample.py --ckpt ... --process process.png --gif denoise.gif --forward forward.png
    python sample.py --ckpt ... --class-label all --guidance-scale 3     # class-conditional checkpoints

Defaults come from the `sample` section of the checkpoint's config; a flag given on the command line
wins, and `sample.field=value` arguments override that section too (e.g. sample.precision=fp32, or
train.compile=false to skip torch.compile on the GPU). EMA weights are used unless --no-ema.

Reproducibility: the images of a batch come from a generator seeded by (seed, first index, batch size),
with batches aligned on multiples of --batch-size. So the same seed, checkpoint and device give the same
images, and a --save-dir run that was interrupted and run again ends with exactly the files of one
uninterrupted run (keep --batch-size the same when resuming).
"""
import dataclasses
import os
import re
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from checkpoint import diffusion_from_checkpoint, load_checkpoint
from diffusion import GaussianDiffusion
from utils import (
    ArgumentParser,
    UserError,
    atomic_write,
    autocast_dtype,
    cli,
    make_grid,
    resolve_device,
    save_grid,
    to_uint8,
)

FILE_NAME = re.compile(r"\d{7,}\.png")  # 0000000.png, 0000001.png, ... as written by sample_to_folder

# ---- sampling ----------------------------------------------------------------------------------------------


def generate(diffusion, n, *, sampler, steps, eta, generator, device, precision="auto", y=None,
             guidance_scale=1.0, record=()):
    """One batch of n images in [-1, 1] (float32 on `device`) from the DDPM or the DDIM sampler.

    y: (n,) labels for a class-conditional model (None: the null label); guidance_scale w != 1 turns on
    classifier-free guidance. `record`: timestep indices to keep; then returns (x, trajectory) with
    trajectory = {'t', 'x_t', 'x0'} as in GaussianDiffusion._loop. This is the one place the samplers run
    under autocast: bf16 on GPUs that support it with precision 'auto', plain fp32 on the CPU."""
    device = torch.device(device)
    model = diffusion.model
    shape = (n, model.image_channels, model.image_size, model.image_size)
    dtype = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if sampler == "ddpm":
            out = diffusion.p_sample_loop(shape, generator=generator, y=y, guidance_scale=guidance_scale,
                                          record=record)
        elif sampler == "ddim":
            out = diffusion.ddim_sample(shape, steps=steps, eta=eta, generator=generator, y=y,
                                        guidance_scale=guidance_scale, record=record)
        else:
            raise ValueError(f"unknown sampler '{sampler}'; use ddpm or ddim")
    # the samplers clip x_0 when diffusion.clip_denoised; without it the last step may overshoot a little
    return (out[0].clamp(-1, 1), out[1]) if record else out.clamp(-1, 1)


def batch_generator(seed: int, start: int, size: int, device) -> torch.Generator:
    """The generator for the batch of `size` images starting at index `start`.

    SeedSequence mixes the three numbers, so different batches get unrelated streams (with seed + start,
    a batch would share noise with the one after it), and a batch cut short by n does not share its noise
    with the full batch that a later, larger run draws from the same start."""
    state = np.random.SeedSequence([seed % 2 ** 64, start, size]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def cycle(labels, n: int):
    """Labels (a list or a 1-D tensor) repeated over n images, as a long tensor; None stays None."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long)
    return labels[torch.arange(n) % len(labels)]


def sample_batches(diffusion, n, starts, *, batch_size, seed, device, labels=None, **kwargs):
    """Yield (start, images) for the batches that begin at `starts` (multiples of batch_size below n)."""
    for start in starts:
        size = min(batch_size, n - start)
        y = None if labels is None else labels[start:start + size].to(device)
        yield start, generate(diffusion, size, generator=batch_generator(seed, start, size, device),
                              device=device, y=y, **kwargs)


def existing_images(folder: str) -> set[int]:
    return {int(name[:-4]) for name in os.listdir(folder) if FILE_NAME.fullmatch(name)}


def save_png(image: torch.Tensor, path: str) -> None:
    """Save one uint8 C x H x W image. It is written under a temporary name and renamed, so a killed run
    never leaves a truncated PNG that the next run would count as done. (No fsync, unlike
    utils.atomic_write: that would cost more than the sampling for tens of thousands of small files.)"""
    array = image.permute(1, 2, 0).numpy()
    tmp = path + ".tmp"
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_to_folder(diffusion, folder, n, *, batch_size, sampler, steps, eta, seed, device, precision="auto",
                     class_labels=None, guidance_scale=1.0) -> int:
    """Make `folder` hold images 0000000.png .. (n-1).png, generating only the ones not there yet.

    Images that exist are never overwritten. Image i comes from the batch that starts at the multiple of
    batch_size below i, with its own generator (see batch_generator), so a resumed run writes the same
    files as an uninterrupted one. class_labels: None (the null label on a conditional model), or labels
    cycled over the n images (a 1-D tensor of length n, or a list). Returns the number of images in the
    folder afterwards."""
    from tqdm import tqdm
    os.makedirs(folder, exist_ok=True)
    done = existing_images(folder)
    missing = [i for i in range(n) if i not in done]
    starts = sorted({i - i % batch_size for i in missing})
    batches = sample_batches(diffusion, n, starts, batch_size=batch_size, seed=seed, device=device,
                             labels=cycle(class_labels, n), sampler=sampler, steps=steps, eta=eta,
                             precision=precision, guidance_scale=guidance_scale)
    with tqdm(total=len(missing), unit="img", desc="sampling") as bar:
        for start, x in batches:
            for j, image in enumerate(to_uint8(x)):
                if start + j not in done:
                    save_png(image, os.path.join(folder, f"{start + j:07d}.png"))
                    bar.update(1)
    return len(existing_images(folder))


# ---- pictures of the process ----------------------------------------------------------------------------


def sampler_timesteps(diffusion, sampler: str, steps: int) -> list[int]:
    """The timestep indices the sampler visits, from T-1 down."""
    if sampler == "ddpm":
        return list(range(diffusion.num_timesteps - 1, -1, -1))
    return diffusion.ddim_timesteps(steps)


def evenly_spaced(items: list, k: int) -> list:
    """k items spread evenly from the first to the last (all of them when there are at most k)."""
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int))]


def denoise(diffusion, m, labels, num_records, *, sampler, steps, seed, device, **kwargs):
    """Sample m images, recording num_records evenly spaced steps; returns (x_0, trajectory, record)."""
    record = evenly_spaced(sampler_timesteps(diffusion, sampler, steps), num_records)
    x, trajectory = generate(diffusion, m, sampler=sampler, steps=steps, y=cycle(labels, m), device=device,
                             generator=batch_generator(seed, 0, m, device), record=record, **kwargs)
    return x.float().cpu(), trajectory, record


def save_process(diffusion, path, n, labels, columns=10, **kwargs) -> int:
    """The denoising of up to 8 samples as one picture: per sample, a row of x_t at `columns` evenly spaced
    steps of the sampler (x_T first), then the final sample; under it a row with the model's prediction
    of x_0 at those same steps (and the final sample again). Returns the number of samples."""
    m = min(8, n)
    x, trajectory, record = denoise(diffusion, m, labels, columns, **kwargs)
    x_t = torch.stack(trajectory["x_t"] + [x], dim=1)  # m x columns+1 x C x H x W
    x0 = torch.stack(trajectory["x0"] + [x], dim=1)
    rows = torch.stack([x_t, x0], dim=1).flatten(0, 2)  # sample 0's x_t row, its x_0 row, sample 1's ...
    save_grid(rows, path, nrow=len(record) + 1)
    return m


def save_gif(diffusion, path, n, labels, frames=20, **kwargs) -> int:
    """An animated GIF of a grid of up to 16 samples being denoised: x_t at `frames` evenly spaced steps
    of the sampler, then the final samples, held for two seconds. Mostly noise, which GIF cannot compress:
    about 20 KB a frame for 16 images of 32 x 32, so 20 frames keep it README-sized. Returns the number of
    samples."""
    m = min(16, n)
    x, trajectory, _ = denoise(diffusion, m, labels, frames, **kwargs)
    grids = [make_grid(to_uint8(images)) for images in trajectory["x_t"] + [x]]
    images = [Image.fromarray(g[:, :, 0] if g.shape[2] == 1 else g) for g in grids]
    durations = [80] * (len(images) - 1) + [2000]
    atomic_write(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                duration=durations, loop=0))
    return m


def forward_timesteps(T: int) -> list[int]:
    """0, then T/20 doubling (0, 50, 100, 200, 400, 800 for T = 1000), then T-1."""
    ts, t = [0], max(1, T // 20)
    while t < T - 1:
        ts.append(t)
        t *= 2
    return sorted(set(ts + [T - 1]))


def save_forward(cfg, model, path, schedules, n, seed) -> None:
    """The forward process q(x_t | x_0) on up to 8 real images: a row per image and beta schedule (rows
    grouped per schedule), a column per timestep of forward_timesteps. Every column of a row uses the
    same noise, so the row shows one image drowning along one path."""
    from dataset import build_dataset
    dataset = build_dataset(cfg.data)
    picks = np.linspace(0, len(dataset) - 1, min(n, 8, len(dataset))).round().astype(int)
    x0 = torch.stack([dataset[int(i)][0] for i in picks])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ts = forward_timesteps(cfg.diffusion.timesteps)
    rows = []
    for schedule in schedules:
        # the closed form needs only the schedule; a CPU copy of it for each schedule asked for
        schedule_cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, beta_schedule=schedule))
        diffusion = GaussianDiffusion.from_config(schedule_cfg, model)
        rows.append(torch.stack([diffusion.q_sample(x0, torch.full((len(x0),), t), noise) for t in ts], dim=1))
    save_grid(torch.cat(rows).flatten(0, 1), path, nrow=len(ts))


# ---- command line ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(description="Sample images from a trained DDPM checkpoint.", allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint, e.g. checkpoints/cifar10/last.pt")
    # default None = the checkpoint's sample.<field>; each flag is shorthand for that override
    p.add_argument("--n", type=int, help="number of images (sample.n)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="sample.sampler")
    p.add_argument("--steps", type=int, help="DDIM steps, 1..T (sample.steps); DDPM always takes all T")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 like DDPM (sample.eta)")
    p.add_argument("--seed", type=int, help="sample.seed")
    p.add_argument("--batch-size", type=int, help="images per sampler run (sample.batch_size)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance weight w, 1 = plain conditional (sample.guidance_scale)")
    p.add_argument("--class-label", help="class-conditional only: K, K1,K2,... (cycled), or 'all' "
                                         "(one grid row per class); default: cycle over all classes")
    p.add_argument("--out", help="grid PNG (default results/<name>/grid.png when no other output is asked for)")
    p.add_argument("--save-dir", help="folder with one PNG per image; --n is the total, existing ones are kept")
    p.add_argument("--process", help="PNG of the denoising steps of a few samples, with the predicted x_0")
    p.add_argument("--gif", help="animated GIF of a small grid being denoised")
    p.add_argument("--forward", help="PNG of the forward process q(x_t | x_0) on real images of the data set")
    p.add_argument("--schedules", help="for --forward: beta schedules to show, e.g. linear,cosine "
                                       "(default: the checkpoint's)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. sample.precision=fp32")
    return p.parse_intermixed_args(argv)


def flag_overrides(args) -> list[str]:
    names = ("n", "sampler", "steps", "eta", "seed", "batch_size", "guidance_scale")
    return [f"sample.{k}={getattr(args, k)}" for k in names if getattr(args, k) is not None]


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


def check_writable(path: str, folder: bool = False) -> None:
    """Fail now rather than after sampling when `path` (a file, or a folder) cannot be written."""
    parent = path if folder else os.path.dirname(os.path.abspath(path))
    if not folder and os.path.isdir(path):
        raise UserError(f"cannot write '{path}': it is a folder; give a file name")
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write '{path}' ({e.strerror or e})") from None


def prepare_for_sampling(diffusion, cfg, device, n, labels) -> None:
    """On CUDA: TF32, channels-last and, when train.compile is 'auto' or true, torch.compile of the U-Net,
    compiled now at the first batch's shape (n images, labels cycled); eager if compiling fails."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    diffusion.model.to(memory_format=torch.channels_last)
    if cfg.train.compile is False:
        return
    y = None if labels is None else cycle(labels, n).to(device)
    print("compiling the model (train.compile=false skips this)")
    eager = diffusion.model
    diffusion.model = torch.compile(eager)
    try:  # compile now, with one DDIM step at the first batch's shape, so a failure is caught here
        generate(diffusion, n, sampler="ddim", steps=1, eta=0.0, generator=None, device=device,
                 precision=cfg.sample.precision, y=y, guidance_scale=cfg.sample.guidance_scale)
    except Exception as e:
        print(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]}); "
              "sampling without it")
        diffusion.model = eager


@cli
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    cfg, diffusion = diffusion_from_checkpoint(ckpt, device, use_ema=not args.no_ema,
                                               overrides=args.overrides + flag_overrides(args))
    del ckpt  # the weights now live in the model
    s = cfg.sample
    num_classes = cfg.model.num_classes
    labels, n, nrow = class_labels(args.class_label, num_classes, s.n)
    if n != s.n:
        print(f"--class-label all: {nrow} images for each of the {num_classes} classes, {n} in all")
    # the small pictures show as many classes as they can
    picture_labels = list(range(num_classes)) if args.class_label == "all" else labels
    schedules = (args.schedules or cfg.diffusion.beta_schedule).split(",")
    if not set(schedules) <= {"linear", "cosine"}:
        raise UserError(f"--schedules takes linear and/or cosine, comma-separated, got '{args.schedules}'")

    out = args.out
    if out is None and not (args.save_dir or args.process or args.gif or args.forward):
        out = os.path.join("results", cfg.name, "grid.png")
    for path in (out, args.process, args.gif, args.forward):
        if path:
            check_writable(path)
    if args.save_dir:
        check_writable(args.save_dir, folder=True)

    prepare_for_sampling(diffusion, cfg, device, min(s.batch_size, n), labels)

    common = dict(sampler=s.sampler, steps=s.steps, eta=s.eta, seed=s.seed, device=device,
                  precision=s.precision, guidance_scale=s.guidance_scale)
    sampled, start_time = 0, time.perf_counter()
    if out:
        batches = sample_batches(diffusion, n, range(0, n, s.batch_size), batch_size=s.batch_size,
                                 labels=cycle(labels, n), **common)
        save_grid(torch.cat([x for _, x in batches]), out, nrow=nrow)
        sampled += n
        print(f"grid: {out}")
    if args.save_dir:
        before = len(existing_images(args.save_dir))
        total = sample_to_folder(diffusion, args.save_dir, n, batch_size=s.batch_size, class_labels=labels,
                                 **common)
        sampled += total - before
        print(f"images: {args.save_dir} ({total} images, {total - before} new)")
    if args.process:
        sampled += save_process(diffusion, args.process, n, picture_labels, **common)
        print(f"process: {args.process}")
    if args.gif:
        sampled += save_gif(diffusion, args.gif, n, picture_labels, **common)
        print(f"gif: {args.gif}")
    elapsed = time.perf_counter() - start_time
    if args.forward:
        save_forward(cfg, diffusion.model, args.forward, schedules, n, s.seed)
        print(f"forward: {args.forward}")
    if sampled:
        print(f"sampled {sampled} images in {elapsed:.1f} s ({sampled / elapsed:.3g} images/s)")


if __name__ == "__main__":
    main()
