"""Training images: the data sets as uint8 arrays (the stream of batches over them: ddpm/batches.py).

    ds = build_dataset(cfg.data)              # ds[i] -> (x float32 C x H x W in [-1, 1], label or -1)
    ds = build_dataset(cfg.data, captions=True)   # ... label = caption id: ds.captions[label] (ddpm/captions.py)
    batches = Batches(ds, 128, seed=0, device=device, hflip=True, preload=preload_wanted(cfg.data, ds))

Sets: cifar10, mnist, fashion_mnist (torchvision, downloaded to data.root), folder (images under
data.root, one sub-folder per class if labelled) and shapes (synthetic, generated from data.seed).

    python dataset.py [--config configs/cifar10.yaml] [section.field=value ...]

prints what a config's data set holds and saves 64 of its images to results/data_preview.png.
"""
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from config import DataConfig, load_config
from ddpm.captions import caption_index, caption_summary, folder_captions, label_captions, shape_captions
from ddpm.cli import ArgumentParser, cli
from ddpm.image_cache import load_uint8
from ddpm.images import IMAGE_EXTENSIONS, decode_image, list_images, save_grid, to_float
from ddpm.shapes import SHAPES, make_shapes, shape_draws
from utils import UserError, first_line, on_interrupt

# torchvision sets: class name, title, and where the files go when they cannot be downloaded
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", "CIFAR-10", "put cifar-10-python.tar.gz in {root}/"),
    "mnist": ("MNIST", "MNIST", "put the four MNIST *-ubyte.gz files in {root}/MNIST/raw/"),
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST",
                      "put the four Fashion-MNIST *-ubyte.gz files in {root}/FashionMNIST/raw/"),
}


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
                return decode_image(self.files[j], self.cfg.image_size, self.cfg.channels), j
            except Exception as e:  # PIL fails in many ways (OSError, SyntaxError, DecompressionBombError...)
                warnings.warn(f"skipping unreadable image '{self.files[j]}' ({type(e).__name__}: {e})")
        raise UserError(f"none of the {n} images under '{self.cfg.root}' can be read; check the files")


def build_dataset(cfg: DataConfig, captions: bool = False, train: bool = True) -> ImageDataset:
    """The data set named by cfg.dataset, images cfg.channels x cfg.image_size x cfg.image_size; with
    `captions`, labelled by caption (see ImageDataset) instead of by class; train=False: a torchvision set's
    test split."""
    if cfg.dataset == "shapes":
        images, labels = make_shapes(cfg.num_images, cfg.image_size, cfg.channels, cfg.seed)
        ds = ImageDataset(cfg, labels, SHAPES, images=images)
    elif cfg.dataset == "folder":
        ds = _folder_dataset(cfg)
    else:
        ds = _torchvision_dataset(cfg, train)
    if captions:
        ds.captions, ds.labels = caption_index(_captions_of(ds))
        ds.classes = []
    return ds


def _captions_of(ds: ImageDataset) -> list[str]:
    """Each image's caption (ddpm/captions.py), while the labels are still the classes."""
    cfg = ds.cfg
    if cfg.dataset == "shapes":
        hues = shape_draws(cfg.num_images, cfg.image_size, cfg.channels, cfg.seed)["hue"]
        return shape_captions(ds.labels, hues, cfg.channels, SHAPES)
    if cfg.dataset == "folder":
        return folder_captions(ds.files, cfg.root)
    return label_captions(cfg.dataset, ds.classes, ds.labels)


def _torchvision_dataset(cfg: DataConfig, train: bool = True) -> ImageDataset:
    import torchvision  # takes seconds to import, and only these sets need it
    class_name, title, where = TORCHVISION_SETS[cfg.dataset]
    try:  # download=True only downloads what is missing, so it also works offline once the files are there
        ds = getattr(torchvision.datasets, class_name)(root=cfg.root, train=train, download=True)
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
