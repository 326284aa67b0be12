"""Our own image autoencoder with a KL-regularised latent, the first stage of latent diffusion (Rombach et al.
2022, Sec. 3.1 and Appendix G: "KL-reg." autoencoders), and its training losses.

    ae = Autoencoder(cfg.autoencoder, channels=3)
    mean, logvar = ae.encode(x)              # x (B, C, H, W) in [-1, 1] -> two (B, c, H/f, W/f)
    z = reparameterise(mean, logvar, noise)  # z = mean + sigma * noise, a draw of q(z | x)
    x_hat = ae.decode(z)                     # (B, C, H, W)

The encoder and decoder are LDM's: residual blocks at each resolution, a halving (stride-2 convolution) between
levels, self-attention in the middle, and a last convolution to the mean and log-variance of a diagonal Gaussian.
The loss is LDM's: a per-image reconstruction error plus kl_weight times KL(q(z | x) || N(0, I)); optionally
LPIPS (perceptual) and, after a warm-up, a patch discriminator's hinge loss (Isola et al. 2017; Esser et al. 2021).
Two simplifications against LDM's code: the adversarial weight is fixed (LDM adapts it to the ratio of the two
losses' gradient norms), and the reconstruction's log-variance is not learned (LDM's starts at 0 and moves little).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, group_norm

KIND = "autoencoder"  # the "kind" of a train_autoencoder.py checkpoint, which tells it from a diffusion checkpoint
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the encoder's log-variance to this, so exp() stays finite


def level_widths(cfg) -> list[int]:
    """The channels of each resolution level: ch, 2 ch, 4 ch, 4 ch ... (log2(factor) halvings, as LDM's (1,2,4,4))."""
    return [cfg.ch * min(2 ** i, 4) for i in range(int(math.log2(cfg.factor)) + 1)]


class ResBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, plus a (1x1) skip: model.py's block without the timestep."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, NORM_EPS), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, NORM_EPS), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _middle(ch: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), Attention(ch, 1, NORM_EPS), ResBlock(ch, ch))


class Encoder(nn.Module):
    """x (B, C, H, W) -> the mean and log-variance of q(z | x), each (B, c, H/f, W/f)."""

    def __init__(self, cfg, channels: int):
        super().__init__()
        widths = level_widths(cfg)
        layers, ch = [nn.Conv2d(channels, widths[0], 3, padding=1)], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            if level != len(widths) - 1:
                layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(ch, ch, 3, stride=2)]  # LDM's asymmetric padding
        layers += [_middle(ch), group_norm(ch, NORM_EPS), nn.SiLU(),
                   nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)]  # the mean and the log-variance
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """z (B, c, H/f, W/f) -> x_hat (B, C, H, W)."""

    def __init__(self, cfg, channels: int):
        super().__init__()
        widths = level_widths(cfg)[::-1]
        ch = widths[0]
        layers = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), _middle(ch)]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, width))
                ch = width
            if level != len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [group_norm(ch, NORM_EPS), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Autoencoder(nn.Module):
    """The KL-regularised autoencoder of an AutoencoderConfig, for images of `channels` channels."""

    def __init__(self, cfg, channels: int):
        super().__init__()
        self.factor, self.latent_channels, self.channels = cfg.factor, cfg.latent_channels, channels
        self.encoder, self.decoder = Encoder(cfg, channels), Decoder(cfg, channels)

    def encode(self, x):
        """(mean, logvar) of q(z | x) for images x in [-1, 1]."""
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def reparameterise(mean, logvar, noise):
    """A draw of q(z | x) = N(mean, sigma^2): z = mean + exp(logvar / 2) * noise, differentiable in both."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, sigma^2) || N(0, I)) of each image, summed over its latent's elements (B,):
    1/2 sum(mean^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def reconstruction_error(x, x_hat, kind: str):
    """Per image (B,): the sum over its pixels of |x - x_hat| (l1) or (x - x_hat)^2 (l2), as LDM sums its NLL."""
    diff = x_hat - x
    return (diff.abs() if kind == "l1" else diff.pow(2)).flatten(1).sum(1)


@dataclass
class Losses:
    """The autoencoder's loss and its parts, each a mean over the batch of per-image values (scalars)."""
    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    perceptual: torch.Tensor | None = None
    adversarial: torch.Tensor | None = None


def autoencoder_loss(x, x_hat, mean, logvar, cfg, perceptual=None, disc=None) -> Losses:
    """LDM's first-stage loss: E[rec(x, x_hat)] + kl_weight E[KL(q(z|x) || N(0, I))], plus perceptual_weight times
    the LPIPS distance summed over pixels (`perceptual`: a network of x, x_hat -> (B, 1, H, W) or (B, 1, 1, 1)), plus
    disc_weight times the generator's hinge loss -E[D(x_hat)] when `disc` (the discriminator) is given."""
    rec, kl = reconstruction_error(x, x_hat, cfg.recon_loss).mean(), kl_to_standard_normal(mean, logvar).mean()
    total = rec + cfg.kl_weight * kl
    losses = Losses(total, rec, kl)
    if perceptual is not None:
        pixels = x.shape[-1] * x.shape[-2]  # LPIPS is a per-pixel mean: summed like the reconstruction
        losses.perceptual = perceptual(x, x_hat).flatten(1).mean(1).mean() * pixels
        total = total + cfg.perceptual_weight * losses.perceptual
    if disc is not None:
        losses.adversarial = -disc(x_hat).mean()
        total = total + cfg.disc_weight * losses.adversarial
    losses.total = total
    return losses


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): a logit of 'real' for each overlapping patch, (B, 1, h, w).
    GroupNorm instead of BatchNorm, so that a logit does not depend on the other images of the batch."""

    def __init__(self, channels: int, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), group_norm(2 * ch, NORM_EPS), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def hinge_discriminator_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat))])."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def psnr(x, x_hat) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (a peak-to-peak range of 2): 10 log10(2^2 / MSE)."""
    mse = (x_hat.float().clamp(-1, 1) - x.float()).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-20))
