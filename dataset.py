"""Training images: the data sets as uint8 arrays, and an endless, exactly resumable stream of batches.

    ds = build_dataset(cfg.data)              # ds[i] -> (x float32 C x H x W in [-1, 1], label or -1)
    ds = build_dataset(cfg.data, captions=True)   # ... label = caption id: ds.captions[label] (captions.py)
    batches = Batches(ds, 128, seed=0, device=device, hflip=True, preload=preload_wanted(cfg.data, ds))
    x, y = next(batches)                      # on `device`; state_dict() / load_state_dict() resume exactly

Sets: cifar10, mnist, fashion_mnist (torchvision, downloaded to data.root), folder (images under
data.root, one sub-folder per class if labelled) and shapes (synthetic, generated from data.seed).

    python dataset.py [--config configs/cifar10.yaml] [section.field=value ...]

prints what a config's data set holds and saves 64 of its images to results/data_preview.png.
"""
import contextlib
import glob
import hashlib
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from captions import caption_index, caption_summary, folder_captions, label_captions, shape_captions
from config import DataConfig, load_config
from utils import ArgumentParser, UserError, atomic_write, cli, first_line, on_interrupt, save_grid, thread_map

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHAPES = ["circle", "square", "triangle"]
# torchvision sets: class name, title, and where the files go when they cannot be downloaded
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", "CIFAR-10", "put cifar-10-python.tar.gz in {root}/"),
    "mnist": ("MNIST", "MNIST", "put the four MNIST *-ubyte.gz files in {root}/MNIST/raw/"),
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST",
                      "put the four Fashion-MNIST *-ubyte.gz files in {root}/FashionMNIST/raw/"),
}


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] to float32 in [-1, 1], the range the model sees."""
    return x.float() / 127.5 - 1


class ImageDataset(Dataset):
    """Images with integer labels (-1 when unlabelled); ds[i] = (float32 C x H x W in [-1, 1], label).
    In a captioned set (build_dataset(..., captions=True)) the label of an image is the index of its caption
    in `captions`, the distinct captions with the empty one first.

    The images are either a uint8 N x C x H x W tensor in memory (`images`) or, for a folder not yet
    loaded with load_uint8, image files (`files`) decoded on demand."""

    def __init__(self, cfg: DataConfig, labels: torch.Tensor, classes, images=None, files=None):
        self.cfg, self.labels, self.classes = cfg, labels, list(classes)
        self.images, self.files, self.captions = images, files, None
        self.shape = (cfg.channels, cfg.image_size, cfg.image_size)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self._read(i)
        return to_float(x), y

    def get_uint8(self, i) -> torch.Tensor:
        """Image i as uint8 C x H x W (not flipped)."""
        return self._read(i)[0]

    def _read(self, i):
        """Image i and its label."""
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        x, j = self._decode_readable(i)
        return x, int(self.labels[j])

    def _decode_readable(self, i):
        """(image file i decoded, i). An unreadable file is skipped, with a warning, for the next readable one j
        (and j is returned, so its label goes with it): one bad JPEG never ends a run, and the preload and
        DataLoader paths agree."""
        n = len(self.files)
        for j in (k % n for k in range(i, i + n)):
            try:
                return _decode(self.files[j], self.cfg.image_size, self.cfg.channels), j
            except Exception as e:  # PIL fails in many ways (OSError, SyntaxError, DecompressionBombError...)
                warnings.warn(f"skipping unreadable image '{self.files[j]}' ({type(e).__name__}: {e})")
        raise UserError(f"none of the {n} images under '{self.cfg.root}' can be read; check the files")


def open_image(path: str, channels: int, size: int | None = None) -> Image.Image:
    """An image file as a PIL image of mode RGB (channels 3) or L (channels 1), with the values a viewer shows:
    upright by its EXIF orientation; 16- and 32-bit integer images scaled from 0..65535 (Pillow's own
    conversion would clip them at 255); float images from [0, 1]; transparent pixels (RGBA, LA, palette
    transparency) composited over white; CMYK and palettes converted to RGB. With `size`, a JPEG is decoded
    at a reduced scale that still covers size x size (much faster for photos)."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        if size:
            img.draft(mode, (size, size))
        img = ImageOps.exif_transpose(img)  # photos are often stored rotated plus an EXIF tag
        if img.mode.startswith("I") or img.mode == "F":
            img = Image.fromarray(_high_depth_to_uint8(np.asarray(img)))
        if img.mode == "P" or "A" in img.mode or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        return img.convert(mode)


def _high_depth_to_uint8(a: np.ndarray) -> np.ndarray:
    """16/32-bit integer pixels (0..65535) or float pixels (0..1) as uint8, rounded."""
    if np.issubdtype(a.dtype, np.floating):
        return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    return np.round(np.clip(a.astype(np.float64), 0, 65535) / 257).astype(np.uint8)


def _decode(path: str, size: int, channels: int) -> torch.Tensor:
    """An image file as uint8 C x size x size: shorter side resized to size (bicubic, antialiased), centre crop."""
    img = ImageOps.fit(open_image(path, channels, size), (size, size), Image.Resampling.BICUBIC)  # resize, centre crop
    return torch.from_numpy(np.asarray(img).reshape(size, size, channels).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- building the sets

def build_dataset(cfg: DataConfig, captions: bool = False) -> ImageDataset:
    """The data set named by cfg.dataset, images cfg.channels x cfg.image_size x cfg.image_size; with
    `captions`, labelled by caption (see ImageDataset) instead of by class."""
    if cfg.dataset == "shapes":
        images, labels = make_shapes(cfg.num_images, cfg.image_size, cfg.channels, cfg.seed)
        ds = ImageDataset(cfg, labels, SHAPES, images=images)
    elif cfg.dataset == "folder":
        ds = _folder_dataset(cfg)
    else:
        ds = _torchvision_dataset(cfg)
    if captions:
        ds.captions, ds.labels = caption_index(_captions_of(ds))
        ds.classes = []
    return ds


def _captions_of(ds: ImageDataset) -> list[str]:
    """Each image's caption (captions.py), while the labels are still the classes."""
    cfg = ds.cfg
    if cfg.dataset == "shapes":
        hues = _shape_draws(cfg.num_images, cfg.image_size, cfg.channels, cfg.seed)["hue"]
        return shape_captions(ds.labels, hues, cfg.channels, SHAPES)
    if cfg.dataset == "folder":
        return folder_captions(ds.files, cfg.root)
    return label_captions(cfg.dataset, ds.classes, ds.labels)


def _torchvision_dataset(cfg: DataConfig) -> ImageDataset:
    import torchvision  # takes seconds to import, and only these sets need it
    class_name, title, where = TORCHVISION_SETS[cfg.dataset]
    try:  # download=True only downloads what is missing, so it also works offline once the files are there
        ds = getattr(torchvision.datasets, class_name)(root=cfg.root, train=True, download=True)
    except Exception as e:
        reason = first_line(e, 120).rstrip(":")
        raise UserError(f"{title} not found in {cfg.root}/ and could not be downloaded ({reason}; no network?): "
                        f"{where.format(root=cfg.root)} or use data.dataset=folder") from None
    images = torch.as_tensor(ds.data)  # cifar10: numpy N x 32 x 32 x 3; (fashion_)mnist: tensor N x 28 x 28
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
    images = _resize(_to_channels(images, cfg.channels), cfg.image_size)
    return ImageDataset(cfg, torch.as_tensor(ds.targets, dtype=torch.int64), ds.classes, images=images)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 N x C x H x W to `channels` channels: grayscale by ITU-R 601 luma (as PIL), RGB by repeating."""
    if images.shape[1] == channels:
        return images.contiguous()
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Square uint8 images to size x size (bicubic, antialiased), in chunks to bound the float memory."""
    if images.shape[-1] == size:
        return images
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bicubic", antialias=True)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def list_images(root: str) -> list[str]:
    """The image files under root, sorted, each real file once. Symbolic links are followed (class folders
    often are links), but a folder is entered only once (a link to a parent would loop forever) and a file
    reached by two paths counts once, under the first path in sorted order. Hidden files and folders
    (.ipynb_checkpoints, .git, macOS ._x.jpg) are skipped."""
    seen_dirs, found = set(), []
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, n) for n in names if not n.startswith(".")
                  and n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    seen_files, files = set(), []
    for path in sorted(found):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) not in seen_files:
            seen_files.add((st.st_dev, st.st_ino))
            files.append(path)
    return files


def _folder_dataset(cfg: DataConfig) -> ImageDataset:
    """Every image under cfg.root; labelled by first-level sub-folder when all images sit in 2+ of them."""
    if not os.path.isdir(cfg.root):
        raise UserError(f"data folder '{cfg.root}' does not exist; set data.root=... to a folder of images")
    files = list_images(cfg.root)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{cfg.root}'; "
                        "put images there or set data.root=...")
    parts = [os.path.relpath(f, cfg.root).split(os.sep) for f in files]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    if len(classes) < 2 or any(len(p) == 1 for p in parts):
        classes, labels = [], [-1] * len(files)
    else:
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p[0]] for p in parts]
    return ImageDataset(cfg, torch.tensor(labels, dtype=torch.int64), classes, files=files)


def make_shapes(n: int, size: int, channels: int, seed: int):
    """n images of one bright shape on a dark background; labels index SHAPES. Deterministic in seed.

    Each shape spans 60-90% of the image in width and height (covering roughly 20-60% of it). Edges are
    anti-aliased analytically: a pixel's coverage is 0.5 minus its signed distance (in pixels) to the
    outline, clipped to [0, 1], which looks like supersampling at a fraction of the cost."""
    draws = _shape_draws(n, size, channels, seed)
    kind, r, cx, cy, fg, bg = (draws[k] for k in ("kind", "r", "cx", "cy", "fg", "bg"))
    p = np.arange(size) + 0.5  # pixel centres
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    step = max(1, 2 ** 22 // size ** 2)  # images per chunk: a few million pixels keep the arrays small
    for i in range(0, n, step):
        s = slice(i, i + step)
        dx = np.abs(p[None, None, :] - cx[s, None, None])  # |x| suffices: all shapes are mirror-symmetric
        dy = p[None, :, None] - cy[s, None, None]  # y grows downwards
        rr = r[s, None, None]
        distance = np.stack([
            np.hypot(dx, dy) - rr,  # circle of radius r
            np.maximum(dx, np.abs(dy)) - 0.85 * rr,  # axis-aligned square of side 1.7 r
            np.maximum(dy - rr, (2 * dx - dy - rr) / np.sqrt(5)),  # apex (0, -r), base corners (+-r, r)
        ])
        d = np.take_along_axis(distance, kind[None, s, None, None], axis=0)[0]
        cover = np.clip(0.5 - d, 0, 1)[:, None]
        images[s] = np.round(255 * (bg[s, :, None, None] + cover * (fg - bg)[s, :, None, None]))
    return torch.from_numpy(images), torch.from_numpy(kind)


def _shape_draws(n: int, size: int, channels: int, seed: int) -> dict:
    """The random choices behind make_shapes's images: kind, half extent r and centre (cx, cy) in pixels, and
    the foreground and background colours (RGB: from HSV, with the foreground's hue in [0, 1) kept as `hue`)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, len(SHAPES), n)
    r = rng.uniform(0.3, 0.45, n) * size  # half the extent, in pixels
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)  # the whole shape inside the image
    hue = None
    if channels == 3:
        hue = rng.uniform(0, 1, n)
        fg = _hsv_to_rgb(hue, rng.uniform(0.7, 1, n), rng.uniform(0.85, 1, n))
        bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.05, 0.3, n))
    else:
        fg, bg = rng.uniform(0.7, 1, (n, 1)), rng.uniform(0, 0.3, (n, 1))
    return {"kind": kind, "r": r, "cx": cx, "cy": cy, "hue": hue, "fg": fg, "bg": bg}


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV to RGB (all in [0, 1]): n values each -> n x 3."""
    k = (np.array([5, 3, 1]) + 6 * h[:, None]) % 6
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


# ----------------------------------------------------------------------------- decoding once

def load_uint8(ds: ImageDataset, cfg: DataConfig):
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


def _load_folder(ds: ImageDataset, cfg: DataConfig):
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


def preload_wanted(cfg: DataConfig, dataset: ImageDataset) -> bool:
    """data.preload, with 'auto' = preload when the uint8 array is smaller than data.preload_max_gib."""
    if cfg.preload != "auto":
        return cfg.preload
    return len(dataset) * math.prod(dataset.shape) < cfg.preload_max_gib * 2 ** 30


def num_classes(dataset: ImageDataset) -> int:
    """The number of classes, for model.num_classes=auto."""
    if not dataset.classes:
        raise UserError(f"data set '{dataset.cfg.dataset}' has no labels; set model.num_classes=null, or for "
                        "a folder put the images in one sub-folder per class")
    return len(dataset.classes)


# ----------------------------------------------------------------------------- the batch stream

def stream_seed(*parts) -> int:
    """A 64-bit generator seed from e.g. ('order', seed, epoch): distinct tuples give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _Uint8Items(Dataset):
    """What the DataLoader workers produce: uint8 images and labels (scaled and flipped on the device)."""

    def __init__(self, ds: ImageDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds._read(i)


class Batches:
    """An endless stream of training batches (x float32 in [-1, 1], y int64; on `device`), exactly resumable.

    Epoch e visits the images in a torch.randperm order seeded from (seed, e); global batch k of it is
    order[k*B:(k+1)*B] (the incomplete last batch is dropped) and rank r of W processes takes the r-th slice
    of B/W images, so the ranks together see exactly the one-process batch. Flips are drawn per epoch over
    whole global batches, so they depend neither on W nor on where a run resumed. With preload the uint8
    array sits on `device` and a batch is pure device indexing; otherwise a DataLoader decodes it."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int, device, hflip: bool,
                 preload: bool, num_workers: int = 0, rank: int = 0, world_size: int = 1):
        if len(dataset) < batch_size:
            raise UserError(f"the data set has {len(dataset)} images, fewer than train.batch_size={batch_size}; "
                            "lower train.batch_size or use more images")
        self.dataset, self.batch_size, self.seed, self.hflip = dataset, batch_size, seed, hflip
        self.device, self.num_workers = torch.device(device), num_workers
        self.local_batch = batch_size // world_size
        self.offset = rank * self.local_batch  # where this rank's slice starts in a global batch
        self.batches_per_epoch = len(dataset) // batch_size
        self.epoch, self.batch = 0, 0  # the position: batches consumed so far in this epoch
        self.images = self.labels = None
        if preload:
            images, labels = load_uint8(dataset, dataset.cfg)
            self.images, self.labels = images.to(self.device), labels.to(self.device)
        self._loader = None  # DataLoader iterator (preload=False), started at the current position
        self._tables_epoch = None  # the epoch whose order and flips are on the device

    def __iter__(self):
        return self

    def __next__(self):
        if self._tables_epoch != self.epoch:
            self._make_tables()
        lo = self.batch * self.batch_size + self.offset
        if self.images is not None:
            idx = self._order[lo:lo + self.local_batch]
            x, y = self.images[idx], self.labels[idx]
        else:
            if self._loader is None:
                self._loader = self._start_loader()
            x, y = next(self._loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.hflip:
            flip = self._flips[self.batch, self.offset:self.offset + self.local_batch]
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return to_float(x), y

    def _order_of(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed("order", self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=g)

    def _make_tables(self):
        """This epoch's order (preload) and flips on the device, so a step does no host work."""
        if self.images is not None:
            self._order = self._order_of(self.epoch).to(self.device)
        if self.hflip:
            g = torch.Generator().manual_seed(stream_seed("flip", self.seed, self.epoch))
            self._flips = (torch.rand(self.batches_per_epoch, self.batch_size, generator=g) < 0.5).to(self.device)
        self._tables_epoch = self.epoch

    def _start_loader(self):
        workers = self.num_workers > 0
        loader = DataLoader(_Uint8Items(self.dataset), batch_sampler=self._index_lists(self.epoch, self.batch),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=workers, prefetch_factor=4 if workers else None)
        return iter(loader)

    def _index_lists(self, epoch: int, batch: int):
        """This rank's index lists from (epoch, batch) on, forever. The DataLoader runs ahead of the caller,
        which is why the position is counted in __next__ and never here."""
        while True:
            order = self._order_of(epoch)
            for k in range(batch, self.batches_per_epoch):
                lo = k * self.batch_size + self.offset
                yield order[lo:lo + self.local_batch].tolist()
            epoch, batch = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        # divmod keeps the position valid if the data set now has fewer batches per epoch than when saved
        extra, self.batch = divmod(int(state["batch"]), self.batches_per_epoch)
        self.epoch = int(state["epoch"]) + extra
        self._loader = None  # a running loader has already prefetched from the old position


# ----------------------------------------------------------------------------- python dataset.py

@cli
def main(argv=None):
    parser = ArgumentParser(description="Build a config's data set, describe it and save a preview "
                                                 "grid of its images (downloading the set where needed).")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/cifar10.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.dataset=shapes")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with on_interrupt(lambda: "the data set was not finished (a download or the decoding cache is written only "
                              "whole); run the same command again"):
        ds = build_dataset(cfg.data)
        if preload_wanted(cfg.data, ds):  # decode (and cache) now, as training will
            load_uint8(ds, cfg.data)
    classes = ", ".join(ds.classes[:10]) + (", ..." if len(ds.classes) > 10 else "")
    print(f"{cfg.data.dataset}: {len(ds)} images of {'x'.join(map(str, ds.shape))}, "
          f"{f'{len(ds.classes)} classes: {classes}' if ds.classes else 'no labels'}")
    if cfg.model.text_encoder:  # what a text model would train on
        print(caption_summary(build_dataset(cfg.data, captions=True)))
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]
    path = os.path.join("results", "data_preview.png")
    save_grid(torch.stack([ds[int(i)][0] for i in pick]), path)
    print(f"saved {len(pick)} images to {path}")


if __name__ == "__main__":
    main()
