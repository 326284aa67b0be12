"""Sample from a trained DDPM: a grid, a folder of PNGs, and pictures of the diffusion process.

    python sample.py --ckpt checkpoints/cifar10/last.pt                  # results/cifar10/grid.png
    python sample.py --ckpt ... --n 50000 --save-dir results/cifar10/samples   # one PNG each, resumable
    python sample.py --ckpt ... --process process.png --gif denoise.gif --forward forward.png
    python sample.py --ckpt ... --class-label all --guidance-scale 3     # class-conditional checkpoints
    python sample.py --ckpt ... --prompt "a red triangle" --prompt "a blue circle" --guidance-scale 3   # text
    python sample.py --ckpt ... --sampler dpmpp --steps 20               # DPM-Solver++(2M), 20 network calls
    torchrun --nproc_per_node=4 sample.py --ckpt ... --n 50000 --save-dir DIR   # the folder's batches split over 4
    python sample.py --ckpt ... --init photo.png --strength 0.5          # editing: image to image, --mask, --invert,
    python sample.py --ckpt ... --interpolate 8 --seed 1 --seed2 2       # (ddpm/edit_runs.py, ddpm/edits.py)

Defaults come from the `sample` section of the checkpoint's config; a flag given on the command line
wins, and `sample.field=value` arguments override that section too (e.g. sample.precision=fp32, or
train.compile=false to skip torch.compile on the GPU). EMA weights are used unless --no-ema.

Reproducibility: the images of a batch come from a generator seeded by (seed, first index, batch size),
with batches aligned on multiples of --batch-size. So the same seed, checkpoint and device give the same
images, and a --save-dir run that was interrupted and run again ends with exactly the files of one
uninterrupted run (keep --batch-size the same when resuming), whatever the number of processes of either (within
one level of 255 where the processes' thread counts differ: that can round a float the other way).
"""
import dataclasses
import os
import time

import numpy as np
import torch

from dataset import build_dataset
from ddpm import distillation, edit_flags, edit_runs
from ddpm.checkpoint import LoadedCheckpoint, load_for_use
from ddpm.cli import (
    ArgumentParser,
    add_prompt_flags,
    add_sampler_flags,
    class_labels,
    cli,
    read_prompts,
    sampler_overrides,
)
from ddpm.conditions import Conditions, prompt_conditions, repeat_to
from ddpm.distributed import process_group, wait_for_all
from ddpm.generation import Sampling, batch_generator, generate, prepare_model, sample_batches
from ddpm.images import image_format, make_grid, save_grid, to_pil, to_uint8
from ddpm.latent import codec_of_checkpoint
from ddpm.png_folders import existing_images, sample_to_folder
from ddpm.samplers import sampler_timesteps
from diffusion import GaussianDiffusion
from utils import UserError, atomic_write, check_writable, read_text, replace_via

# ---- pictures of the process ----------------------------------------------------------------------------


def evenly_spaced(items: list, k: int) -> list:
    """k items spread evenly from the first to the last (all of them when there are at most k)."""
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int))]


def sample_recorded(sampling, m: int, labels, num_records: int):
    """Sample m images, recording num_records evenly spaced steps; returns (x_0, trajectory, record)."""
    sample_cfg = sampling.sample_cfg
    record = evenly_spaced(sampler_timesteps(sampling.diffusion, sample_cfg), num_records)
    x, trajectory = generate(sampling, m, batch_generator(sample_cfg.seed, 0, m, sampling.device),
                             repeat_to(labels, m), record=record)
    return x.float().cpu(), trajectory, record


def save_process(sampling, path: str, n: int, labels, columns: int = 10) -> int:
    """The denoising of up to 8 samples as one picture: per sample, a row of x_t at `columns` evenly spaced
    steps of the sampler (x_T first), then the final sample; under it a row with the model's prediction
    of x_0 at those same steps (and the final sample again). Returns the number of samples."""
    m = min(8, n)
    x, trajectory, record = sample_recorded(sampling, m, labels, columns)
    x_t = torch.stack(trajectory["x_t"] + [x], dim=1)  # m x columns+1 x C x H x W
    x0 = torch.stack(trajectory["x0"] + [x], dim=1)
    rows = torch.stack([x_t, x0], dim=1).flatten(0, 2)  # sample 0's x_t row, its x_0 row, sample 1's ...
    save_grid(rows, path, nrow=len(record) + 1)
    return m


def save_gif(sampling, path: str, n: int, labels, frames: int = 20) -> int:
    """An animated GIF of a grid of up to 16 samples being denoised: x_t at `frames` evenly spaced steps
    of the sampler, then the final samples, held for two seconds. Mostly noise, which GIF cannot compress:
    up to about 30 KB a frame for 16 images enlarged to 64 x 64 (make_grid), so 20 frames keep it under a
    megabyte. Returns the number of samples."""
    m = min(16, n)
    x, trajectory, _ = sample_recorded(sampling, m, labels, frames)
    grids = [make_grid(to_uint8(images)) for images in trajectory["x_t"] + [x]]
    images = [to_pil(g) for g in grids]
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


def save_forward(cfg, path, schedules, n, seed) -> None:
    """The forward process q(x_t | x_0) on up to 8 real images: a row per image and beta schedule (rows
    grouped per schedule), a column per timestep of forward_timesteps. Every column of a row uses the
    same noise, so the row shows one image drowning along one path."""
    dataset = build_dataset(cfg.data)
    picks = np.linspace(0, len(dataset) - 1, min(n, 8, len(dataset))).round().astype(int)
    x0 = torch.stack([dataset[int(i)][0] for i in picks])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ts = forward_timesteps(cfg.diffusion.timesteps)
    rows = []
    for schedule in schedules:
        diffusion = GaussianDiffusion(dataclasses.replace(cfg.diffusion, beta_schedule=schedule))
        rows.append(torch.stack([diffusion.q_sample(x0, torch.full((len(x0),), t), noise) for t in ts], dim=1))
    save_grid(torch.cat(rows).flatten(0, 1), path, nrow=len(ts))


# ---- command line ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(description="Sample images from a trained DDPM checkpoint.", allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint, e.g. checkpoints/cifar10/last.pt")
    # torchrun's own parser reads --n as an abbreviation of its options: under torchrun write --num-images
    p.add_argument("--n", "--num-images", dest="n", type=int, help="number of images (sample.n)")
    add_sampler_flags(p)
    p.add_argument("--class-label", help="class-conditional only: K, K1,K2,... (cycled), or 'all' "
                                         "(one grid row per class); default: cycle over all classes")
    add_prompt_flags(p)
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
    edit_flags.add_flags(p)
    return p.parse_intermixed_args(argv)


def load_model(args, device) -> LoadedCheckpoint:
    """--ckpt with the command line's settings."""
    flags = sampler_overrides(args) + ([f"sample.n={args.n}"] if args.n is not None else [])
    loaded = load_for_use(args.ckpt, device, use_ema=not args.no_ema, overrides=args.overrides + flags)
    loaded.model.codec = codec_of_checkpoint(loaded)  # a latent model's samples decoded (ddpm/latent.py)
    if warning := distillation.sampler_warning(loaded.distilled, loaded.cfg.sample):  # a student, other steps
        print(warning)
    return loaded


def load(args, process) -> tuple[LoadedCheckpoint, Conditions]:
    """--ckpt with the command line's settings, and the conditions of its images: their number, cfg.sample.n, is made
    a multiple of the classes with --class-label all, of the prompts with prompts; with a negative prompt the model
    guides away from it."""
    loaded = load_model(args, process.device)
    cfg = loaded.cfg
    prompts = read_prompts(args, cfg.model, cfg.sample.guidance_scale)
    if prompts:
        loaded.model, conditions = prompt_rows(args, loaded, prompts, process.say)
        what = f"each of the {len(prompts)} prompts"
    else:
        conditions = class_labels(args.class_label, cfg.model.num_classes, cfg.sample.n)
        what = f"each of the {cfg.model.num_classes} classes (--class-label all)"
        if cfg.model.text_encoder:
            process.say("no --prompt: samples of the empty caption (unconditional)")
    if conditions.n != cfg.sample.n:
        process.say(f"{conditions.nrow} images for {what}, {conditions.n} in all")
        cfg.sample = dataclasses.replace(cfg.sample, n=conditions.n)
    return loaded, conditions


# ---- prompts of text-conditional models -------------------------------------------------------------------------


def prompt_rows(args, loaded, prompts, say) -> tuple[torch.nn.Module, Conditions]:
    """(model, conditions) for P prompts: a grid row of max(1, n // P) images for each, n rounded to a multiple of
    P. The model guides away from --negative-prompt when it is given."""
    model, conds = prompt_conditions(loaded, prompts, args.negative_prompt, say)
    per = max(1, loaded.cfg.sample.n // len(prompts))
    return model, Conditions(conds.repeat_interleave(per, dim=0), per * len(prompts), per,
                             [p for p in prompts for _ in range(per)])


def check_prompt_files(folder: str, image_prompts, write: bool) -> None:
    """The prompt of each image i of a --save-dir folder in i.txt beside it, written (`write`) before the images
    are, so that every image has its own. A folder whose images were made with other prompts, or without, is
    refused rather than filled up with these."""
    os.makedirs(folder, exist_ok=True)
    done = existing_images(folder)
    if image_prompts is None:
        if any(os.path.isfile(os.path.join(folder, f"{i:07d}.txt")) for i in done):
            raise UserError(f"--save-dir '{folder}' holds images of prompts (see its .txt files); give the same "
                            "--prompt/--prompts, or another folder")
        return
    for i, prompt in enumerate(image_prompts):
        path = os.path.join(folder, f"{i:07d}.txt")
        if os.path.isfile(path):
            if (old := read_text(path, "prompt file").strip()) != prompt:
                raise UserError(f"--save-dir '{folder}' was made with other prompts ({path}: '{old}', now "
                                f"'{prompt}'); give another folder")
        elif i in done:
            raise UserError(f"--save-dir '{folder}' holds images made without prompts ({i:07d}.png has no .txt); "
                            "give another folder")
        elif write:
            save_prompt(prompt, path)


def save_prompt(prompt: str, path: str) -> None:
    """The prompt as a line of UTF-8 text, written under a temporary name and renamed (as save_png writes)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(prompt + "\n")
    replace_via(path, path + ".tmp", write)


def check_outputs(args, cfg):
    """(grid path or None, beta schedules for --forward), after checking that every output can be written."""
    schedules = (args.schedules or cfg.diffusion.beta_schedule).split(",")
    if not set(schedules) <= {"linear", "cosine"}:
        raise UserError(f"--schedules takes linear and/or cosine, comma-separated, got '{args.schedules}'")
    out = args.out
    if out is None and not (args.save_dir or args.process or args.gif or args.forward):
        out = os.path.join("results", cfg.name, "grid.png")
    for path in (out, args.process, args.forward):
        if path:
            check_writable(path)
            image_format(path)
    if args.gif:
        check_writable(args.gif)
        image_format(args.gif, {".gif": "GIF"})
    if args.save_dir:
        check_writable(args.save_dir, folder=True)
    return out, schedules


def pictures(args, out, sampling, conditions) -> int:
    """The grid, the process picture and the GIF that were asked for; returns the number of images sampled."""
    n, sampled = conditions.n, 0
    picture_labels = conditions.per_row()  # one of each class or prompt when a row has one
    if out:
        batches = sample_batches(sampling, n, labels=repeat_to(conditions.labels, n))
        save_grid(torch.cat([x for _, x in batches]), out, nrow=conditions.nrow)
        sampled += n
        print(f"grid: {out}")
    if args.process:
        sampled += save_process(sampling, args.process, n, picture_labels)
        print(f"process: {args.process}")
    if args.gif:
        sampled += save_gif(sampling, args.gif, n, picture_labels)
        print(f"gif: {args.gif}")
    return sampled


def run(args, process):
    """Everything main does, on one of the `world` processes: they share the --save-dir folder; rank 0 alone
    makes the pictures and prints."""
    if edit_flags.requested(args):
        edit(args, process)
        return
    loaded, conditions = load(args, process)
    cfg, n, rank = loaded.cfg, conditions.n, process.rank
    out, schedules = check_outputs(args, cfg)
    if args.save_dir and cfg.model.text_encoder:
        check_prompt_files(args.save_dir, conditions.prompts, write=rank == 0)
    sampling = prepare_model(Sampling.of(loaded), cfg.train.compile, min(cfg.sample.batch_size, n), conditions.labels,
                             process.say)
    sampled, start_time = 0, time.perf_counter()
    if args.save_dir:
        before = len(existing_images(args.save_dir))
        total = sample_to_folder(sampling, args.save_dir, n, conditions.labels, rank, process.world)
        sampled += total - before
        process.say(f"images: {args.save_dir} ({total} images, {total - before} new)")
    if rank == 0:
        sampled += pictures(args, out, sampling, conditions)
    elapsed = time.perf_counter() - start_time
    if args.forward and rank == 0:
        save_forward(cfg, args.forward, schedules, n, cfg.sample.seed)
        print(f"forward: {args.forward}")
    if sampled:
        process.say(f"sampled {sampled} images in {elapsed:.1f} s ({sampled / elapsed:.3g} images/s)")


def edit(args, process):
    """--init, --interpolate and the other editing flags (ddpm/edit_runs.py): image to image, inpainting, inversion,
    interpolation."""
    which = edit_flags.check_flags(args, process.world)
    loaded = load_model(args, process.device)
    if loaded.latent is not None:
        raise UserError("editing a latent model (latent.autoencoder) is not supported yet: its inputs would have to "
                        "be encoded; sample it without the editing flags")
    cfg = loaded.cfg
    # one condition per prompt or class, cycled over the inputs; None: the unconditional model
    labels = None
    if prompts := read_prompts(args, cfg.model, cfg.sample.guidance_scale):
        loaded.model, labels = prompt_conditions(loaded, prompts, args.negative_prompt)
    elif args.class_label is not None:
        labels = class_labels(args.class_label, cfg.model.num_classes, 1).labels
    edit_flags.check_sampler(args, which, cfg.sample, len(sampler_timesteps(loaded.diffusion, cfg.sample)))
    edit_runs.run(args, which, loaded, labels)


@cli
def main(argv=None):
    args = parse_args(argv)
    with process_group(args.device) as process:
        run(args, process)
        wait_for_all(process.world)  # the other ranks wait for rank 0's pictures before the group is taken down


if __name__ == "__main__":
    main()
