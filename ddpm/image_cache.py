"""Decoding a folder of images once: the uint8 array, cached next to the images and keyed by the folder's
files.
"""
import contextlib
import glob
import hashlib
import os

import numpy as np
import torch

from utils import UserError, atomic_write, thread_map


def load_uint8(ds, cfg):
    """All images decoded once: (uint8 N x C x H x W, int64 labels N), on the CPU.

    A folder is decoded on the first run and cached next to its images, keyed by the file names, sizes and
    modification times (a changed folder is decoded again); the data set keeps the array afterwards. The cache
    holds the images and the file each came from (an unreadable one is replaced), not the labels, which are
    the classes or the captions of that file."""
    if ds.images is None:
        ds.images, ds.labels = _load_folder(ds, cfg)
    return ds.images, ds.labels


def folder_signature(files: list, root: str) -> str:
    """A hash of the relative names, sizes and modification times of the files: changes when the folder does."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _load_folder(ds, cfg):
    prefix = f".ddpm-cache-{cfg.image_size}-{cfg.channels}-"
    path = os.path.join(cfg.root, f"{prefix}{folder_signature(ds.files, cfg.root)}.npz")
    if os.path.isfile(path):
        try:  # a cache of an older version (without sources) or a damaged one is simply decoded again
            with np.load(path) as z:
                images, sources = torch.from_numpy(z["images"]), torch.from_numpy(z["sources"])
            if images.shape == (len(ds), *ds.shape) and sources.shape == (len(ds),):
                print(f"reusing the {len(ds)} decoded images cached in {path}")
                return images, ds.labels[sources]
        except Exception:
            pass
    print(f"decoding {len(ds)} images under {cfg.root} (once: the result is cached for later runs)")
    images = torch.empty(len(ds), *ds.shape, dtype=torch.uint8)
    sources = torch.empty(len(ds), dtype=torch.int64)
    for i, (x, j) in enumerate(thread_map(ds._decode_readable, range(len(ds)))):
        images[i], sources[i] = x, j
    labels = ds.labels[sources]
    try:
        atomic_write(path, lambda f: np.savez(f, images=images.numpy(), sources=sources.numpy()))
    except UserError as e:  # a read-only data folder: decode again next time
        print(f"not caching the decoded images: {e}")
        return images, labels
    print(f"cached the decoded images in {path}")
    for old in glob.glob(os.path.join(glob.escape(cfg.root), prefix + "*.npz")):  # caches of older versions
        if old != path:
            with contextlib.suppress(OSError):
                os.remove(old)
    return images, labels
