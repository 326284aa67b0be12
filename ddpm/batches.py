"""The training batches: an endless, exactly resumable stream of a data set's images, on the device.

    batches = Batches(ds, 128, seed=0, device=device, hflip=True, preload=preload_wanted(cfg.data, ds))
    x, y = next(batches)                      # on `device`; state_dict() / load_state_dict() resume exactly
"""
import hashlib

import torch
from torch.utils.data import DataLoader, Dataset

from ddpm.image_cache import load_uint8
from ddpm.images import to_float
from diffusion import per_image
from utils import UserError


def stream_seed(*parts) -> int:
    """A 64-bit generator seed from e.g. ('order', seed, epoch): distinct tuples give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _Uint8Items(Dataset):
    """What the DataLoader workers produce: uint8 images and labels (scaled and flipped on the device)."""

    def __init__(self, ds):
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

    def __init__(self, dataset, batch_size: int, *, seed: int, device, hflip: bool,
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
            x = torch.where(per_image(flip, x.ndim), x.flip(3), x)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return (to_float(x) if x.dtype == torch.uint8 else x), y  # latents (ddpm/latent_cache.py) are float already

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
