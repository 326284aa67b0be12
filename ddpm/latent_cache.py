"""A data set encoded once into an autoencoder's latents, cached next to the data and reused: what a latent
diffusion run (latent.autoencoder) trains on.

    latents = latent_dataset(dataset, cfg, autoencoder, device)  # a data set of scaled latents, for Batches
    latents.scale_factor                                         # 1 / std of the data's latents, or the config's
    latents.codec                                                # ddpm/codecs.Codec: the latents <-> images

The cache holds the mean of q(z | x) of every image (LDM trains on draws of q; its encoder's std is tiny after
training, and the mean keeps the cache half the size), unscaled, with the image each came from. With data.hflip
it also holds the latents of the mirrored images: a latent flipped is not the latent of the flipped image. The
file is keyed by the autoencoder's content hash and the data's signature (image_cache.folder_signature for a
folder), so another autoencoder or changed data encode again; it is written atomically, once.
"""
import contextlib
import glob
import hashlib
import os

import torch
from torch.utils.data import Dataset

from ddpm.codecs import Codec
from ddpm.image_cache import folder_signature
from ddpm.images import to_float
from utils import UserError, atomic_write, thread_map


class LatentDataset(Dataset):
    """Scaled latents (float32 N x c x h x w, in memory) with the labels of their images; ds[i] = (latent, label).
    `images` and `_read` are what ddpm/batches.Batches reads (preloaded or through a DataLoader)."""

    def __init__(self, images, latents, labels, codec: Codec):
        """images: the data set (dataset.ImageDataset) the latents are of; codec: their autoencoder and scale."""
        self.cfg, self.classes, self.captions = images.cfg, images.classes, images.captions
        self.images, self.labels, self.codec, self.scale_factor = latents, labels, codec, codec.scale_factor
        self.files, self.shape = None, tuple(latents.shape[1:])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self._read(i)

    def _read(self, i):
        return self.images[i], int(self.labels[i])


def data_signature(ds, cfg) -> str:
    """What the images are: the folder's files, the shapes' seed and count, or the torchvision set and its size;
    with the size, channels and flips they are read with."""
    if ds.files is not None:
        what = f"folder {folder_signature(ds.files, cfg.root)}"
    elif cfg.dataset == "shapes":
        what = f"shapes {cfg.num_images} {cfg.seed}"
    else:
        what = f"{cfg.dataset} {len(ds)}"
    return f"{what} {cfg.image_size} {cfg.channels} hflip={cfg.hflip}"


def cache_path(ds, cfg, autoencoder_hash: str, data: str | None = None) -> str:
    """The cache file in data.root of these images (data: '*' for a glob of all) and this autoencoder."""
    data = data or hashlib.sha256(data_signature(ds, cfg.data).encode()).hexdigest()[:16]
    return os.path.join(cfg.data.root, f".ddpm-latents-{cfg.data.image_size}-{data}-{autoencoder_hash}.pt")


def latent_dataset(ds, cfg, autoencoder, device) -> LatentDataset:
    """The latents of data set `ds` (from the cache, or encoded now and cached), scaled by cfg.latent.scale_factor,
    or where that is null by 1 / their standard deviation."""
    path = cache_path(ds, cfg, autoencoder.hash)
    cached = _read_cache(path, autoencoder.hash)
    if cached is None:
        print(f"encoding the {len(ds)} images{' and their mirror images' if cfg.data.hflip else ''} with "
              f"{autoencoder.path} (once: the latents are cached for later runs)")
        cached = encode_all(ds, autoencoder, cfg.data.hflip, cfg.latent.encode_batch_size, device)
        _write_cache(path, {**cached, "autoencoder": autoencoder.hash},
                     glob.escape(cache_path(ds, cfg, autoencoder.hash, "*")).replace("[*]", "*"))
    else:
        print(f"reusing the latents of the {len(ds)} images cached in {path}")
    scale = cfg.latent.scale_factor or 1 / cached["std"]
    return LatentDataset(ds, cached["latents"] * scale, ds.labels[cached["sources"]], Codec(autoencoder, scale))


def encode_all(ds, autoencoder, hflip: bool, batch_size: int, device) -> dict:
    """{"latents": the mean of q(z | x) of every image (then of every mirrored one with hflip), float32 on the CPU;
    "sources": the image each came from; "std": the standard deviation of all their elements, in float64}."""
    latents, mirrored, sources = [], [], []
    for uint8, source in _image_batches(ds, batch_size):  # each image decoded once
        x = to_float(uint8.to(device))  # (B, C, H, W)
        latents.append(autoencoder.moments(x)[0].float().cpu())
        if hflip:
            mirrored.append(autoencoder.moments(x.flip(3))[0].float().cpu())
        sources.append(source)
    latents, sources = torch.cat(latents + mirrored), torch.cat(sources * (2 if hflip else 1))
    return {"latents": latents, "sources": sources, "std": latent_std(latents)}


def latent_std(latents: torch.Tensor, chunk: int = 4096) -> float:
    """The standard deviation of all elements, from float64 sums over chunks (the whole array in float64 could be
    gigabytes): sqrt((sum z^2 - (sum z)^2 / n) / (n - 1))."""
    total = squares = 0.0
    for i in range(0, len(latents), chunk):
        z = latents[i:i + chunk].double()
        total, squares = total + z.sum().item(), squares + z.pow(2).sum().item()
    n = latents.numel()
    return ((squares - total * total / n) / (n - 1)) ** 0.5


def _image_batches(ds, batch_size: int):
    """(uint8 B x C x H x W, the index of each image) in order: from memory, or decoding a folder's files
    (an unreadable one replaced by the next readable, whose index is given)."""
    n = len(ds)
    if ds.images is not None:
        for i in range(0, n, batch_size):
            yield ds.images[i:i + batch_size], torch.arange(i, min(n, i + batch_size))
        return
    decoded = thread_map(ds._decode_readable, range(n))
    for i in range(0, n, batch_size):
        batch = [next(decoded) for _ in range(min(batch_size, n - i))]
        yield torch.stack([x for x, _ in batch]), torch.tensor([j for _, j in batch])


def _read_cache(path: str, autoencoder_hash: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:  # a damaged cache is encoded again
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["autoencoder"] == autoencoder_hash:
            return cached
    except Exception:
        pass
    return None


def _write_cache(path: str, cached: dict, stale: str) -> None:
    """Write atomically; remove the other caches that match the glob `stale` (older data, same autoencoder)."""
    try:
        atomic_write(path, lambda f: torch.save(cached, f))
    except UserError as e:  # a read-only data folder: encode again next time
        print(f"not caching the latents: {e}")
        return
    print(f"cached the latents in {path}")
    for old in glob.glob(stale):
        if old != path:
            with contextlib.suppress(OSError):
                os.remove(old)
