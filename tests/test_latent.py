"""Latent diffusion (ddpm/latent.py): a config made latent by latent.autoencoder, the U-Net at the latents' shape,
samples decoded to images; end to end on the CPU: train a few steps, resume exactly, sample; bad input."""
import os
import types

import pytest
import torch
from helpers import (
    ROOT,
    TINY_MODEL,
    TinyExtractor,
    as_overrides,
    fails_in_process,
    files_in,
    tiny_autoencoder_checkpoint,
)
from PIL import Image

import convert
import evaluate
import sample
import train
from config import load_config
from ddpm.checkpoint import load_checkpoint
from ddpm.codecs import Codec, load_autoencoder
from ddpm.latent import check_checkpoint_space, resolved_latent, to_images, trajectory_images
from model import UNet
from utils import UserError

CPU = torch.device("cpu")
# the tiny U-Net on the 4 x 4 latents (3 channels) of 16x16 shapes through tiny_autoencoder_checkpoint's factor 4
TINY_LATENT = ["data.dataset=shapes", "data.image_size=16", "data.num_images=16",
               *as_overrides("model", {**TINY_MODEL, "attention_resolutions": (2,)}), "diffusion.timesteps=20",
               "sample.steps=3", "sample.n=4", "sample.batch_size=4"]


@pytest.fixture
def autoencoder_path(tmp_path):
    return tiny_autoencoder_checkpoint(tmp_path / "ae.pt")


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
    trajectory = {"t": [9, 4], "x_t": [x, -x], "x0": [x, x / 2]}
    assert trajectory_images(model, trajectory) is trajectory
    model.codec = Codec(ae, 0.5)
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_images(model, z), ae.net.decode(z / 0.5).clamp(-1, 1))
    # a trajectory's steps decoded (not clamped: x_t is noisy), its timesteps kept
    latents = {"t": [9, 4], "x_t": [z, -z], "x0": [z / 2, z]}
    decoded = trajectory_images(model, latents)
    assert decoded["t"] == [9, 4]
    for k in ("x_t", "x0"):
        for got, latent in zip(decoded[k], latents[k]):
            torch.testing.assert_close(got, ae.net.decode(latent / 0.5))


# train.py on the latents: batches of 8, 2 steps between checkpoints, a grid of 4 decoded images at the end
TRAIN = [*TINY_LATENT, "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.num_workers=0",
         "train.log_every=1", "train.save_every=2", "train.sample_every=4", "train.sample_n=4",
         "train.deterministic=true", "train.compile=false", "train.ema_decay=0.9", "data.hflip=true"]


def image_size_of(path):
    with Image.open(path) as img:
        return img.size


def test_train_resume_exactly_and_sample_a_latent_model(tmp_path, monkeypatch, capsys, autoencoder_path):
    monkeypatch.chdir(tmp_path)
    run = [*TRAIN, f"latent.autoencoder={autoencoder_path}"]
    train.main(["--name", "whole", *run, "train.max_steps=4"])
    train.main(["--name", "parts", *run, "train.max_steps=2"])
    assert "reusing the latents" in capsys.readouterr().out  # encoded once, by the first run
    train.main(["--name", "parts", *run, "train.max_steps=4"])
    whole, parts = load_checkpoint("checkpoints/whole/last.pt"), load_checkpoint("checkpoints/parts/last.pt")
    for key in ("model", "ema"):
        for k, v in whole[key].items():
            assert torch.equal(v, parts[key][k]), (key, k)
    assert whole["log"]["loss"] == parts["log"]["loss"]
    ae = load_autoencoder(autoencoder_path, CPU)
    assert whole["latent"]["hash"] == ae.hash and whole["latent"]["kind"] == "ours"
    latent = whole["config"]["latent"]
    assert (latent["channels"], latent["factor"]) == (3, 4) and latent["scale_factor"] > 0
    assert whole["model"]["conv_in.weight"].shape[1] == 3  # the U-Net takes the latents' channels
    with Image.open("results/whole/samples/step_0000004.png") as grid:  # decoded: RGB (the latents are 3 x 4 x 4)
        assert grid.mode == "RGB"

    os.remove(autoencoder_path)  # our autoencoder's weights are in the checkpoint
    sample.main(["--ckpt", "checkpoints/whole/last.pt", "--out", "grid.png", "--process", "process.png",
                 "--gif", "denoise.gif", "--save-dir", "pngs", "--n", "4"])
    assert [image_size_of(os.path.join("pngs", f)) for f in files_in("pngs")] == [(16, 16)] * 4  # decoded
    with Image.open("denoise.gif") as gif:
        assert gif.n_frames > 2 and gif.size == image_size_of("grid.png")


def test_bad_latent_input_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, autoencoder_path):
    monkeypatch.chdir(tmp_path)
    run = [*TRAIN, f"latent.autoencoder={autoencoder_path}"]
    train.main(["--name", "r", *run, "train.max_steps=2"])
    before = open("checkpoints/r/last.pt", "rb").read()
    other = tiny_autoencoder_checkpoint(tmp_path / "other.pt", seed=1)
    err = fails_in_process(capsys, train.main, "--name", "r", *TRAIN, f"latent.autoencoder={other}",
                           "train.max_steps=4")
    assert "is not the autoencoder this checkpoint was trained with" in err
    err = fails_in_process(capsys, train.main, "--name", "new", *TRAIN, "latent.autoencoder=missing.pt")
    assert "latent.autoencoder 'missing.pt' not found" in err
    err = fails_in_process(capsys, train.main, "--name", "new", *run, "latent.channels=8")
    assert "latent.channels=8 does not match" in err
    err = fails_in_process(capsys, train.main, "--name", "r", *TRAIN, "latent.autoencoder=null", "train.max_steps=4")
    assert "is a latent model" in err
    Image.new("RGB", (16, 16)).save("x.png")
    err = fails_in_process(capsys, sample.main, "--ckpt", "checkpoints/r/last.pt", "--init", "x.png")
    assert "editing a latent model" in err
    err = fails_in_process(capsys, convert.main, "to-diffusers", "checkpoints/r/last.pt", "--out", "d")
    assert "is a latent model" in err and not os.path.exists("d")
    assert open("checkpoints/r/last.pt", "rb").read() == before


def test_evaluate_scores_the_decoded_samples_of_a_latent_model(tmp_path, monkeypatch, autoencoder_path):
    monkeypatch.chdir(tmp_path)
    train.main(["--name", "e", *TRAIN, f"latent.autoencoder={autoencoder_path}", "train.max_steps=1"])
    extractor = TinyExtractor()
    record = evaluate.main(["--ckpt", "checkpoints/e/last.pt", "--n", "8", "--batch-size", "4", "--device", "cpu",
                            "--samples-dir", "samples", "--ref-cache", "refs", "--out", "metrics.json"],
                           extractor=extractor)
    assert record["n"] == 8 and record["image_size"] == 16 and extractor.seen >= 8
    assert all(image_size_of(os.path.join("samples", f)) == (16, 16) for f in files_in("samples"))


@pytest.mark.parametrize("name, factor", [("latent-quickstart", 4), ("latent-folder", 8)])
def test_shipped_latent_configs_resolve_against_their_autoencoders_shape(name, factor):
    """The U-Net of each shipped latent config is valid at its latents' size (attention sizes, heads, levels)."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    autoencoder = types.SimpleNamespace(latent_channels=4, factor=factor, channels=3, path=cfg.latent.autoencoder)
    resolved = resolved_latent(cfg, autoencoder, 1.0)
    assert UNet.from_config(resolved).image_size == cfg.data.image_size // factor
    assert not resolved.diffusion.clip_denoised
