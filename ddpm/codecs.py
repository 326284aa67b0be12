"""The two kinds of autoencoder of latent diffusion behind one interface, the scaled latents the U-Net denoises
(Codec), and what a diffusion checkpoint records of its autoencoder.

    ae = load_autoencoder(path, device)   # a train_autoencoder.py checkpoint, or a diffusers AutoencoderKL folder
    mean, std = ae.moments(x)             # q(z | x) of images x (B, C, H, W) in [-1, 1]: two (B, c, H/f, W/f)
    x = ae.decode(z)
    codec = Codec(ae, scale_factor)       # codec.encode(x) = scale_factor * mean; codec.decode(z) = D(z / scale_factor)

Both are frozen (eval mode, no gradients). A diffusion checkpoint keeps ae.record(): the kind, the path and a
content hash (of a diffusers folder's files, of our weights), and for ours the weights themselves, so that a
latent checkpoint samples without the autoencoder's file and refuses to run with another autoencoder.
"""
import hashlib
import os

import torch

from config import AutoencoderConfig
from ddpm.autoencoder import KIND, Autoencoder
from ddpm.checkpoint import load_checkpoint, load_weights
from utils import UserError, first_line

INSTALL = "pip install -r requirements-latent.txt"


def folder_hash(folder: str) -> str:
    """sha256 of a folder's files (their relative names and bytes, hidden ones skipped): changes with any file."""
    h = hashlib.sha256()
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(root, name)
            h.update(f"{os.path.relpath(path, folder)}\0{os.path.getsize(path)}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def weights_hash(state_dict: dict, config: dict) -> str:
    """sha256 of an architecture (a dict of plain values) and the bytes of its weights, in key order."""
    h = hashlib.sha256(repr(sorted(config.items())).encode())
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class OwnAutoencoder:
    """Our Autoencoder (ddpm/autoencoder.py) from its config section and weights."""

    kind = "ours"

    def __init__(self, config: dict, channels: int, weights: dict, path: str, device):
        self.config, self.path = dict(config), path
        self.net = Autoencoder(AutoencoderConfig(**self.config), channels)
        load_weights(self.net, weights, f"the autoencoder weights of '{path}'")
        self.net, self.device = self.net.to(device).eval().requires_grad_(False), torch.device(device)
        self.channels, self.factor, self.latent_channels = channels, self.net.factor, self.net.latent_channels
        self.hash = weights_hash(weights, {**self.config, "channels": channels})

    @torch.no_grad()
    def moments(self, x):
        mean, logvar = self.net.encode(x)
        return mean, torch.exp(0.5 * logvar)

    @torch.no_grad()
    def decode(self, z):
        return self.net.decode(z)

    def record(self) -> dict:
        return {"kind": self.kind, "path": self.path, "hash": self.hash, "config": self.config,
                "channels": self.channels, "weights": {k: v.cpu() for k, v in self.net.state_dict().items()}}


class DiffusersAutoencoder:
    """A diffusers AutoencoderKL read from a local folder (e.g. Stable Diffusion's VAE), frozen."""

    kind = "diffusers"

    def __init__(self, folder: str, device):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise UserError(f"latent.autoencoder '{folder}' is a diffusers AutoencoderKL folder, which needs "
                            f"diffusers and safetensors: {INSTALL}") from None
        try:
            vae = AutoencoderKL.from_pretrained(folder)
        except Exception as e:
            raise UserError(f"cannot read a diffusers AutoencoderKL from '{folder}' ({first_line(e)}); give the "
                            "folder with its config.json and weights (e.g. stabilityai/sd-vae-ft-mse)") from None
        self.net, self.path, self.hash = vae.to(device).eval().requires_grad_(False), folder, folder_hash(folder)
        self.device = torch.device(device)
        self.channels, self.latent_channels = vae.config.in_channels, vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, x):
        dist = self.net.encode(x).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def decode(self, z):
        return self.net.decode(z).sample

    def record(self) -> dict:
        return {"kind": self.kind, "path": self.path, "hash": self.hash}


def load_autoencoder(path: str, device):
    """The autoencoder at `path`: a folder is a diffusers AutoencoderKL, a file our train_autoencoder.py checkpoint."""
    if os.path.isdir(path):
        return DiffusersAutoencoder(path, device)
    if not os.path.isfile(path):
        raise UserError(f"latent.autoencoder '{path}' not found; train one (python train_autoencoder.py) or give a "
                        "diffusers AutoencoderKL folder")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != KIND:
        raise UserError(f"latent.autoencoder '{path}' is a diffusion checkpoint, not an autoencoder; give a "
                        "train_autoencoder.py checkpoint or a diffusers AutoencoderKL folder")
    return OwnAutoencoder(ckpt["config"]["autoencoder"], ckpt["config"]["data"]["channels"], ckpt["autoencoder"],
                          path, device)


def autoencoder_of_checkpoint(record: dict, path: str | None, device):
    """The autoencoder a latent diffusion checkpoint was trained with (its record): ours from the weights inside,
    a diffusers folder from `path` (the config's latent.autoencoder: it may have moved) with the recorded hash."""
    if record["kind"] == OwnAutoencoder.kind:
        return OwnAutoencoder(record["config"], record["channels"], record["weights"], record["path"], device)
    ae = DiffusersAutoencoder(path or record["path"], device)
    check_same(record, ae)
    return ae


def check_same(record: dict, ae) -> None:
    """Refuse an autoencoder other than the one a checkpoint records (another kind, or other content)."""
    if record["kind"] != ae.kind or record["hash"] != ae.hash:
        raise UserError(f"latent.autoencoder '{ae.path}' ({ae.kind}, content hash {ae.hash}) is not the autoencoder "
                        f"this checkpoint was trained with ('{record['path']}', {record['kind']}, content hash "
                        f"{record['hash']}); give that one, or start a new run with --name")


class Codec:
    """Images <-> the latents the U-Net denoises, scaled to unit variance as LDM does (its scale_factor):
    encode(x) = scale_factor * E[z | x] (the mean of q(z | x)), decode(z) = D(z / scale_factor)."""

    def __init__(self, autoencoder, scale_factor: float):
        self.autoencoder, self.scale_factor = autoencoder, scale_factor

    def encode(self, x):
        return self.scale_factor * self.autoencoder.moments(x)[0]

    def decode(self, z):
        """Images (on the autoencoder's device) of latents z (on any device)."""
        return self.autoencoder.decode(z.float().to(self.autoencoder.device) / self.scale_factor)
