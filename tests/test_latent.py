"""Latent diffusion (ddpm/latent.py): a config made latent by latent.autoencoder, the U-Net at the latents' shape,
samples decoded to images; end to end on the CPU: train a few steps, resume exactly, sample; bad input."""
import pytest
import torch
from test_codecs import own_autoencoder_checkpoint

from config import load_config
from ddpm.codecs import Codec, load_autoencoder
from ddpm.latent import check_checkpoint_space, resolved_latent, to_images
from model import UNet
from utils import UserError

CPU = torch.device("cpu")
# the tiny U-Net on the 4 x 4 latents (3 channels) of 16x16 shapes through own_autoencoder_checkpoint's factor 4
TINY_LATENT = ["data.dataset=shapes", "data.image_size=16", "data.num_images=16", "model.base_channels=16",
               "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[2]",
               "model.dropout=0.0", "diffusion.timesteps=20", "sample.steps=3", "sample.n=4", "sample.batch_size=4"]


@pytest.fixture
def autoencoder_path(tmp_path):
    return own_autoencoder_checkpoint(tmp_path / "ae.pt")


def test_resolved_config_and_the_unet_at_the_latents_shape(autoencoder_path):
    cfg = load_config(None, [*TINY_LATENT, f"latent.autoencoder={autoencoder_path}"])
    ae = load_autoencoder(autoencoder_path, CPU)
    resolved = resolved_latent(cfg, ae, 0.7)
    assert (resolved.latent.channels, resolved.latent.factor, resolved.latent.scale_factor) == (3, 4, 0.7)
    assert cfg.diffusion.clip_denoised and not resolved.diffusion.clip_denoised  # x_0 is a latent
    model = UNet.from_config(resolved)
    assert (model.image_channels, model.image_size) == (3, 4)
    assert model(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)).shape == (2, 3, 4, 4)
    assert not any(k.startswith("codec") for k in model.state_dict())  # the codec is no part of the weights


def test_a_config_that_contradicts_the_autoencoder_is_one_line(autoencoder_path):
    ae = load_autoencoder(autoencoder_path, CPU)
    for override, needle in (("latent.channels=4", "latent.channels=4 does not match"),
                             ("data.channels=1", "data.channels=1 but the autoencoder"),
                             ("data.image_size=18", "must be a multiple of the autoencoder's downsampling factor 4")):
        cfg = load_config(None, [*TINY_LATENT, f"latent.autoencoder={autoencoder_path}", override])
        with pytest.raises(UserError, match=needle) as e:
            resolved_latent(cfg, ae, 1.0)
        assert "\n" not in str(e.value)


def test_checkpoint_and_config_must_both_be_latent_or_pixel(autoencoder_path):
    latent_cfg = load_config(None, [*TINY_LATENT, f"latent.autoencoder={autoencoder_path}"])
    pixel_cfg = load_config(None, TINY_LATENT)
    check_checkpoint_space({"config": {}}, pixel_cfg, "p.pt")
    check_checkpoint_space({"latent": {"path": autoencoder_path}}, latent_cfg, "l.pt")
    with pytest.raises(UserError, match="is a pixel-space model"):
        check_checkpoint_space({"config": {}}, latent_cfg, "p.pt")
    with pytest.raises(UserError, match="is a latent model"):
        check_checkpoint_space({"latent": {"path": autoencoder_path}}, pixel_cfg, "l.pt")


def test_samples_become_images_through_the_codec(autoencoder_path):
    ae = load_autoencoder(autoencoder_path, CPU)
    model = UNet.from_config(load_config(None, TINY_LATENT))
    x = torch.randn(2, 3, 16, 16) * 2
    assert torch.equal(to_images(model, x), x.clamp(-1, 1))  # pixel space: clamped
    model.codec = Codec(ae, 0.5)
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_images(model, z), ae.net.decode(z / 0.5).clamp(-1, 1))
