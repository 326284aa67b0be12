"""Running an edit of sample.py over its inputs: reading the input images and the mask as the training data are
read, and writing the grid, the PNG folder, x_T and the settings. The computation is edits.py's, the flags and their
checks edit_flags.py's; sample.py calls edit_flags' `requested` and `check_flags`, then `run`.

    python sample.py --ckpt CKPT --init photo.png --strength 0.5                # image to image (SDEdit)
    python sample.py --ckpt CKPT --init photo.png --mask hole.png                # inpainting (RePaint)
    python sample.py --ckpt CKPT --init photo.png --invert                       # x_T and the reconstruction
    python sample.py --ckpt CKPT --interpolate 8 --seed 1 --seed2 2             # between two seeds' x_T
    python sample.py --ckpt CKPT --interpolate 8 --init a.png --init2 b.png     # between two images
    python sample.py --ckpt CKPT --init photos/ --strength 0.6 --save-dir out/  # a folder: one PNG each, resumable

"""
import dataclasses
import json
import os
import time

import numpy as np
import torch

from ddpm import edits
from ddpm.conditions import repeat_to
from ddpm.generation import Sampling, autocast, batch_generator, prepare_model, sampler_record
from ddpm.images import IMAGE_EXTENSIONS, decode_image, list_images, open_image, save_grid, save_png, to_float, to_uint8
from ddpm.samplers import sampler_timesteps
from utils import UserError, atomic_write, check_writable, on_interrupt, read_json, write_json

TITLES = {"img2img": "image to image", "inpaint": "inpainting", "invert": "inversion", "interpolate": "interpolation"}


def input_files(path: str) -> tuple[list[str], list[str]]:
    """(the input images, the names of their outputs): a file and its name, or every image in a folder, sorted,
    named by its path in the folder; the output of 'sub/a.jpg' is 'sub/a.png'."""
    if not os.path.isdir(path):
        return [path], [os.path.splitext(os.path.basename(path))[0] + ".png"]
    files = list_images(path)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{path}'")
    names = [os.path.splitext(os.path.relpath(f, path))[0] + ".png" for f in files]
    for name in {n for n in names if names.count(n) > 1}:
        clash = [f for f, n in zip(files, names) if n == name]
        raise UserError(f"'{clash[0]}' and '{clash[1]}' would both be written as {name}; rename one")
    return files, names


def read_images(paths: list[str], channels: int, size: int) -> torch.Tensor:
    """The images in [-1, 1] as the training data are read (images.decode_image: resized and centre-cropped to
    size x size, converted to `channels`)."""
    images = []
    for path in paths:
        try:
            images.append(decode_image(path, size, channels))
        except Exception as e:  # PIL fails in many ways (OSError, SyntaxError, DecompressionBombError...)
            raise UserError(f"cannot read the image '{path}' ({type(e).__name__}: {e})") from None
    return to_float(torch.stack(images))


def read_mask(path: str, size: int) -> torch.Tensor:
    """The mask as bool 1 x 1 x size x size, True where the image is kept (black): resized and centre-cropped
    as the images are, with nearest neighbour, then binarised at half grey (white = regenerate)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.fit(open_image(path, 1), (size, size), Image.Resampling.NEAREST)
    except Exception as e:
        raise UserError(f"cannot read the mask '{path}' ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(img) < 128)[None, None]


def check_inputs(args, edit: str, model) -> None:
    """Read every input once (the images of --init, --init2 and the mask), so that an empty folder or an unreadable
    file is a one-line error before anything is written (--save-dir's settings.json first). The images are read
    again batch by batch when edited: decoding is a small cost next to a sampler's network calls."""
    if edit == "interpolate":
        paths = [] if args.seed2 is not None else [args.init, args.init2]
    else:
        paths = input_files(args.init)[0]
    for path in paths:
        read_images([path], model.image_channels, model.image_size)
    if edit == "inpaint":
        read_mask(args.mask, model.image_size)


def settings_of(args, edit: str, cfg, diffusion) -> dict:
    """What shaped the results, for the printout and the JSON file beside them."""
    sample_cfg = cfg.sample
    out = {"edit": edit, "ckpt": args.ckpt, "ema": not args.no_ema,
           **sampler_record(sample_cfg, cfg.diffusion.timesteps), "seed": sample_cfg.seed,
           "batch_size": sample_cfg.batch_size, "precision": sample_cfg.precision, "class_label": args.class_label,
           "init": args.init}
    if cfg.model.text_encoder:
        out.update(prompt=args.prompt, prompts=args.prompts, negative_prompt=args.negative_prompt)
    if edit == "img2img":
        n = len(sampler_timesteps(diffusion, sample_cfg))
        out.update(strength=args.strength, steps_run=edits.strength_steps(n, args.strength),
                   start_timestep=edits.strength_start(diffusion, sample_cfg, args.strength))
    elif edit == "inpaint":
        out.update(mask=args.mask, jump=args.jump, resample=args.resample)
    elif edit == "interpolate":
        out.update(interpolate=args.interpolate, seed2=args.seed2, init2=args.init2)
    return out


def claim_folder(folder: str, settings: dict) -> None:
    """A --save-dir holds the results of one set of settings and inputs (FOLDER/settings.json, the inputs by
    absolute path): a rerun with the same ones adds the missing files, other ones are refused once it holds
    results, since a file named after another input of the same name would be taken as done."""
    check_writable(folder, folder=True)
    path = os.path.join(folder, "settings.json")
    mine = {**settings, "init": settings["init"] and os.path.abspath(settings["init"])}
    has_results = any(name.endswith(".png") for _, _, names in os.walk(folder) for name in names)
    if has_results and not os.path.isfile(path):
        raise UserError(f"'{folder}' holds PNGs but no settings.json, so they are not this kind of edit's; "
                        "choose another --save-dir")
    if has_results:
        theirs = read_json(path, "settings file", advice="; choose another --save-dir")
        for key in list(mine) + [k for k in theirs if k not in mine]:
            if mine.get(key) != theirs.get(key):
                raise UserError(f"'{folder}' holds edits made with other settings ({key}: {theirs.get(key)!r} "
                                f"there, {mine.get(key)!r} now); choose another --save-dir")
    write_json(path, mine)


def save_tensor(x: torch.Tensor, path: str) -> None:
    atomic_write(path, lambda f: torch.save(x.detach().float().cpu().clone(), f))


def batch_conditions(labels, start: int, size: int, device):
    """The conditions of the images start..start+size-1 of an edit: the labels cycled over all of them (None: the
    null condition)."""
    return None if labels is None else repeat_to(labels, start + size)[start:].to(device)


@dataclasses.dataclass
class Edit:
    """The edit asked for: its kind (one of TITLES), image to image's strength, and for inpainting the mask and
    RePaint's settings (None for the other edits)."""
    kind: str
    strength: float
    inpainting: edits.Inpainting | None = None


def edit_batch(edit: Edit, sampling, denoise, x0, generator) -> dict:
    """{'result': the edited images, and for inversion 'x_T'}, for one batch of inputs x0."""
    diffusion, sample_cfg = sampling.diffusion, sampling.sample_cfg
    if edit.kind == "img2img":
        return {"result": edits.img2img(diffusion, denoise, x0, sample_cfg, edit.strength, generator)}
    if edit.kind == "inpaint":
        return {"result": edits.repaint(diffusion, denoise, x0, edit.inpainting, sample_cfg, generator)}
    x_T = edits.ddim_invert(diffusion, denoise, x0, sample_cfg)
    return {"result": edits.decode(diffusion, denoise, x_T, sample_cfg), "x_T": x_T}


def grid_row(x0, keep, out) -> torch.Tensor:
    """The grid's images for a batch, row by row: the input, the mask (white = regenerated), x_T / 3 for
    inversion, the result."""
    columns = [x0]
    if keep is not None:
        columns.append(torch.where(keep, -1.0, 1.0).expand_as(x0))
    if "x_T" in out:
        columns.append((out["x_T"] / 3).clamp(-1, 1))
    columns.append(out["result"])
    return torch.stack([c.float().cpu() for c in columns], dim=1).flatten(0, 1)


def edit_inputs(args, kind: str, sampling, labels, grid: bool):
    """Edit the inputs (--init) in batches of sample.batch_size, each with batch_generator's noise as plain
    sampling's batches have, so a resumed folder holds the files of one made in one go. Only the batches with a
    missing output in --save-dir run, or all of them for the grid. Returns (grid images, columns, x_T, new
    results)."""
    files, names = input_files(args.init)
    model, device, sample_cfg = sampling.model, sampling.device, sampling.sample_cfg
    keep = read_mask(args.mask, model.image_size).to(device) if kind == "inpaint" else None
    inpainting = edits.Inpainting(keep, args.jump, args.resample) if keep is not None else None
    edit = Edit(kind, args.strength, inpainting)
    folder, b = args.save_dir, sample_cfg.batch_size
    todo = {i for i, name in enumerate(names) if folder and missing(folder, name, edit)}
    starts = range(0, len(files), b) if grid else sorted({i - i % b for i in todo})
    rows, x_Ts, done = [], [], []
    with on_interrupt(lambda: f"{len(done)} of the {len(todo)} missing edits were written to '{folder}'; the same "
                              "command does the rest" if folder else "nothing was written; run the command again"):
        for start in starts:
            paths = files[start:start + b]
            x0 = read_images(paths, model.image_channels, model.image_size).to(device)
            denoise = sampling.denoiser(batch_conditions(labels, start, len(paths), device))
            generator = batch_generator(sample_cfg.seed, start, len(paths), device)
            with autocast(sample_cfg, device):
                out = edit_batch(edit, sampling, denoise, x0, generator)
            for j in sorted({start + j for j in range(len(paths))} & todo):
                write_result(out, j - start, os.path.join(folder, names[j]))
                done.append(j)
            if grid:
                rows.append(grid_row(x0, keep, out))
                x_Ts.append(out["x_T"].float().cpu() if "x_T" in out else None)
    columns = 2 + (keep is not None) + (kind == "invert")
    count = len(done) if folder else len(files)
    if not grid:
        return None, columns, None, count
    return torch.cat(rows), columns, (torch.cat(x_Ts) if kind == "invert" else None), count


def missing(folder: str, name: str, edit: str) -> bool:
    stem = os.path.join(folder, os.path.splitext(name)[0])
    return not os.path.isfile(stem + ".png") or (edit == "invert" and not os.path.isfile(stem + ".xT.pt"))


def write_result(out: dict, j: int, path: str) -> None:
    """Result j of a batch as a PNG at the model's size (and its x_T as NAME.xT.pt after an inversion)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if "x_T" in out:
        save_tensor(out["x_T"][j], os.path.splitext(path)[0] + ".xT.pt")
    save_png(to_uint8(out["result"][j:j + 1])[0], path)


def interpolation(args, sampling, labels):
    """The row of --interpolate N: x_T of the two seeds (as plain sampling draws them for one image, from
    batch_generator(seed, 0, 1)) or of the two inverted images, slerped and decoded. Returns (grid images,
    columns, None, new results); --save-dir gets 0000000.png, ... for the N images."""
    model, diffusion, sample_cfg, device = sampling.model, sampling.diffusion, sampling.sample_cfg, sampling.device
    shape = (1, model.image_channels, model.image_size, model.image_size)
    if args.seed2 is not None:
        inputs = []
        ends = [torch.randn(shape, generator=batch_generator(seed, 0, 1, device), device=device)
                for seed in (sample_cfg.seed, args.seed2)]
    else:
        inputs = list(read_images([args.init, args.init2], model.image_channels, model.image_size).to(device))
        with autocast(sample_cfg, device):
            x_T = edits.ddim_invert(diffusion, sampling.denoiser(batch_conditions(labels, 0, 2, device)),
                                    torch.stack(inputs), sample_cfg)
        ends, inputs = [x_T[:1], x_T[1:]], [x[None] for x in inputs]
    path = edits.slerp_path(*ends, args.interpolate)
    results = []
    for start in range(0, len(path), sample_cfg.batch_size):
        chunk = path[start:start + sample_cfg.batch_size]
        with autocast(sample_cfg, device):
            denoise = sampling.denoiser(batch_conditions(labels, 0, len(chunk), device))
            results.append(edits.decode(diffusion, denoise, chunk, sample_cfg))
    results = torch.cat(results)
    new = [i for i in range(len(results)) if args.save_dir and not os.path.isfile(numbered(args.save_dir, i))]
    for i in new:
        save_png(to_uint8(results[i:i + 1])[0], numbered(args.save_dir, i))
    row = torch.cat(inputs[:1] + [results] + inputs[1:]).float().cpu()
    return row, len(row), None, len(new) if args.save_dir else len(results)


def numbered(folder: str, i: int) -> str:
    return os.path.join(folder, f"{i:07d}.png")


def run(args, edit: str, loaded, labels) -> None:
    """The edit `edit` (edit_flags.check_flags') of a LoadedCheckpoint (ddpm/checkpoint.py), with `labels` cycled over
    the inputs (None: unconditional): the results, the grid, the settings."""
    cfg = loaded.cfg
    settings = settings_of(args, edit, cfg, loaded.diffusion)
    out = args.out or (None if args.save_dir else os.path.join("results", cfg.name, f"{edit}.png"))
    if out:
        check_writable(out)
    check_inputs(args, edit, loaded.model)
    if args.save_dir:
        claim_folder(args.save_dir, settings)
    print(f"{TITLES[edit]}: {json.dumps(settings)}")
    sampling = prepare_model(Sampling.of(loaded), cfg.train.compile, cfg.sample.batch_size, labels)
    started = time.perf_counter()
    if edit == "interpolate":
        images, columns, x_T, count = interpolation(args, sampling, labels)
    else:
        images, columns, x_T, count = edit_inputs(args, edit, sampling, labels, out is not None)
    if args.save_dir:
        print(f"images: {args.save_dir} ({count} new)")
    if out:
        save_grid(images, out, nrow=columns)
        write_json(os.path.splitext(out)[0] + ".json", settings)
        print(f"grid: {out} (settings in {os.path.splitext(out)[0]}.json)")
        if x_T is not None:
            save_tensor(x_T, os.path.splitext(out)[0] + ".xT.pt")
            print(f"x_T: {os.path.splitext(out)[0]}.xT.pt")
    print(f"edited in {time.perf_counter() - started:.1f} s")
