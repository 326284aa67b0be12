"""train_autoencoder.py: outputs, an exact resume, one-line errors."""
import os

import torch
from helpers import fails_in_process, files_in, tiny_checkpoint

import train_autoencoder
from ddpm.checkpoint import load_checkpoint

# 8x8 shapes, factor 4, 3 steps of batches of 4: a fraction of a second a step
RUN = ["data.dataset=shapes", "data.image_size=8", "data.num_images=16", "data.hflip=true",
       "autoencoder.factor=4", "autoencoder.latent_channels=2", "autoencoder.ch=8", "autoencoder.batch_size=4",
       "autoencoder.disc_weight=0.1", "autoencoder.disc_start=1", "train.num_workers=0", "train.log_every=1",
       "train.save_every=2", "train.sample_every=2", "train.sample_n=4", "train.keep_last=1"]


def test_outputs_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_autoencoder.main(["--name", "whole", *RUN, "autoencoder.steps=3"])
    assert files_in("checkpoints/whole") == ["last.pt", "step_0000003.pt"]
    assert files_in("results/whole/reconstructions") == ["step_0000002.png", "step_0000003.png"]
    assert {"losses.csv", "loss.png"} <= set(files_in("results/whole/plots"))
    # stopped after 2 steps (a saved checkpoint), then the same command with the full length
    train_autoencoder.main(["--name", "parts", *RUN, "autoencoder.steps=2"])
    train_autoencoder.main(["--name", "parts", *RUN, "autoencoder.steps=3"])
    whole, parts = load_checkpoint("checkpoints/whole/last.pt"), load_checkpoint("checkpoints/parts/last.pt")
    assert whole["step"] == parts["step"] == 3 and whole["data"] == parts["data"]
    for key in ("autoencoder", "disc"):  # the discriminator starts at step 1: both optimisers resumed
        for k, v in whole[key].items():
            assert torch.equal(v, parts[key][k]), (key, k)
    for k in ("step", "loss", "lr", "grad_norm"):  # the logged history too (all but the speed)
        assert whole["log"][k] == parts["log"][k], k


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "run name, not a path" in fails_in_process(capsys, train_autoencoder.main, "--name", "a/b", *RUN)
    os.makedirs("checkpoints/diffusion")
    tiny_checkpoint("checkpoints/diffusion/last.pt")
    err = fails_in_process(capsys, train_autoencoder.main, "--name", "diffusion", *RUN, "autoencoder.steps=1")
    assert "not an autoencoder checkpoint" in err
    train_autoencoder.main(["--name", "ae", *RUN, "autoencoder.steps=1"])
    err = fails_in_process(capsys, train_autoencoder.main, "--name", "ae", *RUN, "autoencoder.ch=16",
                           "autoencoder.steps=2")
    assert "autoencoder.ch: checkpoint 8, config 16" in err
    assert "autoencoder.steps=0" in fails_in_process(capsys, train_autoencoder.main, "--name", "new", *RUN,
                                                     "autoencoder.steps=0")
