"""ddpm/codecs.py: a diffusers AutoencoderKL folder behind our interface gives diffusers' own encodings and
decodings; content hashes; our own autoencoder's checkpoint; one-line errors."""
import os
import shutil
import sys

import pytest
import torch
from helpers import tiny_autoencoder_checkpoint, tiny_checkpoint

from config import AutoencoderConfig
from ddpm.autoencoder import Autoencoder
from ddpm.codecs import Codec, autoencoder_of_checkpoint, check_same, folder_hash, load_autoencoder
from utils import UserError

diffusers = pytest.importorskip("diffusers")


def tiny_vae_folder(folder, seed=0) -> str:
    """A random diffusers AutoencoderKL (factor 2, 4 latent channels, widths 8 and 16) saved as a Hub folder is."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(folder))
    return str(folder)


def test_diffusers_autoencoder_encodes_and_decodes_as_diffusers(tmp_path):
    folder = tiny_vae_folder(tmp_path / "vae")
    ae = load_autoencoder(folder, torch.device("cpu"))
    assert (ae.channels, ae.latent_channels, ae.factor) == (3, 4, 2)
    reference = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        mean, std = ae.moments(x)
        torch.testing.assert_close(mean, dist.mean, rtol=0, atol=0)
        torch.testing.assert_close(std, dist.std, rtol=0, atol=0)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ae.decode(z), reference.decode(z).sample, rtol=0, atol=0)
        codec = Codec(ae, 0.5)  # the scaled latents: 0.5 E[z | x], decoded after dividing by 0.5
        torch.testing.assert_close(codec.encode(x), 0.5 * dist.mean)
        torch.testing.assert_close(codec.decode(z), reference.decode(2 * z).sample)
    assert not any(p.requires_grad for p in ae.net.parameters())


def test_content_hash_of_a_folder_changes_with_any_file(tmp_path):
    folder = tiny_vae_folder(tmp_path / "vae")
    before = folder_hash(folder)
    assert folder_hash(tiny_vae_folder(tmp_path / "copy")) == before  # the same files elsewhere
    assert folder_hash(tiny_vae_folder(tmp_path / "other", seed=1)) != before
    with open(os.path.join(folder, "config.json"), "a") as f:
        f.write(" ")
    assert folder_hash(folder) != before
    record = load_autoencoder(str(tmp_path / "copy"), torch.device("cpu")).record()
    with pytest.raises(UserError, match="not the autoencoder this checkpoint was trained with"):
        check_same(record, load_autoencoder(str(tmp_path / "other"), torch.device("cpu")))
    # a moved folder with the same files is the same autoencoder
    shutil.move(str(tmp_path / "copy"), str(tmp_path / "moved"))
    assert autoencoder_of_checkpoint(record, str(tmp_path / "moved"), torch.device("cpu")).hash == record["hash"]


def test_own_autoencoder_from_its_checkpoint_and_from_a_record(tmp_path):
    path = tiny_autoencoder_checkpoint(tmp_path / "ae.pt")
    ae = load_autoencoder(path, torch.device("cpu"))
    assert (ae.channels, ae.latent_channels, ae.factor) == (3, 3, 4)
    torch.manual_seed(0)
    reference = Autoencoder(AutoencoderConfig(**{**vars(AutoencoderConfig()), "ch": 8, "latent_channels": 3}), 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = reference.encode(x)
    torch.testing.assert_close(ae.moments(x)[0], mean)
    torch.testing.assert_close(ae.moments(x)[1], (0.5 * logvar).exp())
    # from the record a diffusion checkpoint keeps, without the file; another seed is another hash
    os.remove(path)
    again = autoencoder_of_checkpoint(ae.record(), None, torch.device("cpu"))
    assert again.hash == ae.hash
    torch.testing.assert_close(again.decode(mean), reference.decode(mean))
    assert load_autoencoder(tiny_autoencoder_checkpoint(tmp_path / "b.pt", seed=1), "cpu").hash != ae.hash


def test_bad_autoencoders_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found; train one"):
        load_autoencoder(str(tmp_path / "missing.pt"), "cpu")
    with pytest.raises(UserError, match="is a diffusion checkpoint, not an autoencoder"):
        load_autoencoder(tiny_checkpoint(tmp_path / "d.pt"), "cpu")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="cannot read a diffusers AutoencoderKL"):
        load_autoencoder(str(tmp_path / "empty"), "cpu")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(UserError, match="requirements-latent.txt"):
        load_autoencoder(str(tmp_path / "empty"), "cpu")
