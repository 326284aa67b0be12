"""ddpm/latent_cache.py: the latents written once, reused, rebuilt when the autoencoder or the data change; the
scale factor against a direct computation; the mirrored images' latents; batches of latents."""
import os

import numpy as np
import pytest
import torch
from helpers import tiny_autoencoder_checkpoint
from PIL import Image

from config import load_config
from dataset import build_dataset
from ddpm.batches import Batches
from ddpm.codecs import load_autoencoder
from ddpm.latent_cache import latent_dataset

CPU = torch.device("cpu")


class Counting:
    """An autoencoder that counts the images it encodes."""

    def __init__(self, autoencoder):
        self.inner, self.encoded = autoencoder, 0
        self.hash, self.path = autoencoder.hash, autoencoder.path

    def moments(self, x):
        self.encoded += len(x)
        return self.inner.moments(x)


def shapes_config(root, *overrides):
    return load_config(None, ["data.dataset=shapes", "data.image_size=16", "data.num_images=12",
                              f"data.root={root}", "data.hflip=false", "latent.encode_batch_size=5", *overrides])


def test_written_once_reused_and_rebuilt_for_another_autoencoder_or_other_data(tmp_path, capsys):
    ae = Counting(load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "a.pt"), CPU))
    cfg = shapes_config(tmp_path / "data")
    first = latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    assert ae.encoded == 12 and len(os.listdir(tmp_path / "data")) == 1
    again = latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    assert ae.encoded == 12 and "reusing the latents" in capsys.readouterr().out
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    other = Counting(load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "b.pt", seed=1), CPU))
    latent_dataset(build_dataset(cfg.data), cfg, other, CPU)
    assert other.encoded == 12 and len(os.listdir(tmp_path / "data")) == 2  # both kept
    changed = shapes_config(tmp_path / "data", "data.seed=1")  # other images
    latent_dataset(build_dataset(changed.data), changed, ae, CPU)
    assert ae.encoded == 24 and len(os.listdir(tmp_path / "data")) == 2  # the stale cache of `ae` replaced


def test_a_changed_folder_is_encoded_again(tmp_path):
    folder = tmp_path / "images"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={folder}", "data.image_size=16", "data.hflip=false"])
    ae = Counting(load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "a.pt"), CPU))
    latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    assert ae.encoded == 3
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "3.png")
    latents = latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    assert ae.encoded == 7 and len(latents) == 4


def test_scale_factor_is_one_over_the_std_of_the_data_latents_and_mirrors_are_encoded(tmp_path):
    ae = load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "a.pt"), CPU)
    cfg = shapes_config(tmp_path / "data", "data.hflip=true")
    ds = build_dataset(cfg.data)
    latents = latent_dataset(ds, cfg, ae, CPU)
    # directly: every image and its mirror image through the encoder at once, the std in float64
    x = ds.images.double() / 127.5 - 1
    direct = torch.cat([ae.net.double().encode(x)[0], ae.net.encode(x.flip(3))[0]])
    ae.net.float()
    assert latents.scale_factor == pytest.approx(1 / direct.std().item(), rel=1e-5)
    torch.testing.assert_close(latents.images.double(), direct * latents.scale_factor, rtol=1e-4, atol=1e-5)
    assert torch.equal(latents.labels, torch.cat([ds.labels, ds.labels]))
    # the scaled latents have unit variance; a scale factor in the config wins
    assert latents.images.double().std().item() == pytest.approx(1, rel=1e-5)
    fixed = latent_dataset(ds, shapes_config(tmp_path / "data", "data.hflip=true", "latent.scale_factor=0.5"), ae, CPU)
    torch.testing.assert_close(fixed.images, latents.images / latents.scale_factor * 0.5)


@pytest.mark.parametrize("preload", [True, False])
def test_batches_of_latents(tmp_path, preload):
    ae = load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "a.pt"), CPU)
    cfg = shapes_config(tmp_path / "data")
    latents = latent_dataset(build_dataset(cfg.data), cfg, ae, CPU)
    batches = Batches(latents, 4, seed=0, device=CPU, hflip=False, preload=preload)
    x, y = next(batches)
    order = batches._order_of(0)[:4]
    assert torch.equal(x, latents.images[order]) and torch.equal(y, latents.labels[order])
