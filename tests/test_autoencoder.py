"""Our KL-regularised autoencoder (ddpm/autoencoder.py) and its training step (ddpm/autoencoder_training.py): the
shapes of the latents, the KL term against its closed form in float64 and a Monte Carlo estimate, the loss and the
hinge loss against their definitions, and a tiny autoencoder that learns the shapes."""
import math

import pytest
import torch

from config import AutoencoderConfig, load_config
from dataset import build_dataset
from ddpm.autoencoder import (
    Autoencoder,
    PatchDiscriminator,
    autoencoder_loss,
    hinge_discriminator_loss,
    kl_to_standard_normal,
    psnr,
    reparameterise,
)
from ddpm.autoencoder_training import AutoencoderTrainer
from utils import UserError

TINY_AE = dict(ch=8, latent_channels=3, num_res_blocks=1)
# the tiny autoencoder run of the tests: 64 shapes of 16x16, factor 4 (4x4x4 latents), widths 8, 16, 32
TINY_AE_RUN = ["data.dataset=shapes", "data.image_size=16", "data.num_images=64", "data.hflip=false",
               "autoencoder.factor=4", "autoencoder.latent_channels=4", "autoencoder.ch=8",
               "autoencoder.batch_size=16", "autoencoder.lr=4e-3", "train.num_workers=0", "train.grad_clip=0"]


@pytest.mark.parametrize("factor, channels", [(4, 3), (8, 1)])
def test_latents_are_factor_times_smaller_and_decode_to_image_shape(factor, channels):
    ae = Autoencoder(AutoencoderConfig(factor=factor, **TINY_AE), channels)
    x = torch.rand(2, channels, 32, 32) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, 32 // factor, 32 // factor)
    assert ae.decode(mean).shape == x.shape


def test_kl_matches_the_closed_form_in_float64():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    ours = kl_to_standard_normal(mean.double(), logvar.double())
    # torch.distributions' KL of two Normals: log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    reference = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), reference.float())  # float32 too


def test_kl_matches_a_monte_carlo_estimate_with_reparameterised_draws():
    """KL = E_q[log q(z) - log p(z)], z = mean + sigma * noise; the tolerance is 5 standard errors."""
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(1, 2, 1, 1, generator=g, dtype=torch.float64), torch.randn(1, 2, 1, 1, generator=g,
                                                                                             dtype=torch.float64)
    n = 200_000
    noise = torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64)
    z = reparameterise(mean, logvar, noise)
    sigma = (0.5 * logvar).exp()
    log_q = (-0.5 * ((z - mean) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    log_p = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    samples = log_q - log_p
    estimate, stderr = samples.mean().item(), samples.std().item() / math.sqrt(n)
    assert abs(kl_to_standard_normal(mean, logvar).item() - estimate) < 5 * stderr
    torch.testing.assert_close(z.mean(0), mean[0], atol=5 * sigma.max().item() / math.sqrt(n), rtol=0)


def test_loss_is_reconstruction_plus_weighted_kl_and_the_adversarial_term():
    g = torch.Generator().manual_seed(2)
    x, x_hat = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    mean, logvar = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    kl = sum(0.5 * sum(m * m + math.exp(v) - 1 - v for m, v in zip(mean[i].flatten().tolist(),
                                                                   logvar[i].flatten().tolist())) for i in range(3)) / 3
    for kind, power in (("l1", 1), ("l2", 2)):
        cfg = AutoencoderConfig(recon_loss=kind, kl_weight=0.01, disc_weight=0.5)
        rec = sum(abs(a - b) ** power for a, b in zip(x.flatten().tolist(), x_hat.flatten().tolist())) / 3
        losses = autoencoder_loss(x, x_hat, mean, logvar, cfg)
        assert losses.reconstruction.item() == pytest.approx(rec, rel=1e-5)
        assert losses.kl.item() == pytest.approx(kl, rel=1e-5)
        assert losses.total.item() == pytest.approx(rec + 0.01 * kl, rel=1e-5)
        disc = PatchDiscriminator(3, ch=8)
        with_disc = autoencoder_loss(x, x_hat, mean, logvar, cfg, disc=disc)
        assert with_disc.total.item() == pytest.approx(rec + 0.01 * kl - 0.5 * disc(x_hat).mean().item(), rel=1e-5)


def test_hinge_loss_of_the_discriminator():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.25])
    # max(0, 1 - r): 0, 0.5, 2 -> mean 5/6; max(0, 1 + f): 0, 1, 1.25 -> mean 0.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 0.75))


def test_psnr_against_its_definition():
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))


def test_perceptual_loss_without_lpips_is_one_line(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if it were not installed
    cfg = load_config(None, [*TINY_AE_RUN, "autoencoder.perceptual_weight=1.0"])
    with pytest.raises(UserError, match="requirements-latent.txt"):
        AutoencoderTrainer(cfg, torch.device("cpu"), build_dataset(cfg.data))


def test_tiny_autoencoder_learns_the_shapes():
    """120 steps of batches of 16 (9 s on one core here): the reconstructions of its 64 training images reach
    a PSNR of 14 dB (14.65 seen), where the untrained one is below 10 dB and each image's mean colour gives 12.4 dB.
    Longer training goes much further (the README's latent quickstart figures)."""
    cfg = load_config(None, TINY_AE_RUN)
    dataset = build_dataset(cfg.data)
    trainer = AutoencoderTrainer(cfg, torch.device("cpu"), dataset)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert psnr(x, x.mean((2, 3), keepdim=True).expand_as(x)) == pytest.approx(12.4, abs=0.05)

    def reconstruction_psnr():
        with torch.no_grad():
            return psnr(x, trainer.model.decode(trainer.model.encode(x)[0]))
    assert reconstruction_psnr() < 10
    for _ in range(120):
        losses, _, _ = trainer.train_step()
    assert torch.isfinite(losses.total)
    assert reconstruction_psnr() > 14
