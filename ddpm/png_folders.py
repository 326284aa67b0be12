"""Folders of sampled PNGs (0000000.png, ...), filled resumably and split over torchrun's processes.

    sample_to_folder(Sampling(model, diffusion, cfg.sample, device), "results/x/fid50k", 50_000)

A folder that was interrupted and filled again ends with exactly the files of one uninterrupted run (with the
same batch size): image i depends only on (seed, i, batch size). Under torchrun the batches of a folder are
split over the processes, which changes the images by at most one level of 255 (on the CPU another thread count
per process can round a float the other way).
"""
import contextlib
import os
import re

from ddpm.conditions import repeat_to
from ddpm.distributed import wait_for_all
from ddpm.generation import Sampling, sample_batches
from ddpm.images import save_png, to_uint8
from ddpm.progress import progress
from utils import FolderLock, on_interrupt

FILE_NAME = re.compile(r"\d{7,}\.png")  # 0000000.png, 0000001.png, ... as written by sample_to_folder


def existing_images(folder: str) -> set[int]:
    return {int(name[:-4]) for name in os.listdir(folder) if FILE_NAME.fullmatch(name)}


def sample_to_folder(sampling: Sampling, folder: str, n: int, labels=None, rank: int = 0, world: int = 1) -> int:
    """Make `folder` hold images 0000000.png .. (n-1).png, generating only the ones not there yet.

    Images that exist are never overwritten. Image i comes from the batch that starts at the multiple of
    sampling.sample_cfg.batch_size below i, with its own generator (see batch_generator), so a resumed run writes
    the same files as an uninterrupted one. labels: None (the null label on a conditional model), or conditions
    cycled over the n images (class labels as a list or tensor, encoded prompts as a tensor). Under torchrun
    (`world` processes) each rank makes every world-th of the missing batches, rank 0 shows the progress of the
    whole folder, and all ranks wait for each other at the end. A second run on the folder is refused while this
    one lasts (FolderLock). Returns the number of images in the folder afterwards."""
    os.makedirs(folder, exist_ok=True)

    def note():
        return (f"{len(existing_images(folder) & set(range(n)))} of {n} images are in {folder}; run the same "
                "command to make the rest")
    lock = FolderLock(folder, "sampling run") if rank == 0 else contextlib.nullcontext()  # one run per folder
    with lock, on_interrupt(note):
        done = existing_images(folder)
        wait_for_all(world)  # every rank has listed the folder before any writes to it: they split the same batches
        missing = [i for i in range(n) if i not in done]
        batch_size = sampling.sample_cfg.batch_size
        starts = sorted({i - i % batch_size for i in missing})[rank::world]
        batches = sample_batches(sampling, n, starts, repeat_to(labels, n))
        write_missing(folder, n, batches, done, len(missing), rank)
    wait_for_all(world)
    return len(existing_images(folder))


def write_missing(folder, n, batches, done, n_missing, rank):
    """Save the images of `batches` that are not `done`; rank 0 shows the progress of every process."""
    with progress(n_missing, "sampling", "img", disable=rank != 0) as bar:
        for start, x in batches:
            for j, image in enumerate(to_uint8(x)):
                if start + j not in done:
                    save_png(image, os.path.join(folder, f"{start + j:07d}.png"))
            if rank == 0:  # the files of every process count
                bar.update(len(existing_images(folder) & set(range(n))) - (n - n_missing) - bar.n)
