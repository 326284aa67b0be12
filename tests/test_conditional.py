"""Class-conditional training with classifier-free guidance, end to end on a two-class image folder."""
import os

import numpy as np
import pytest
import torch
from helpers import CONFIG, ROOT, TINY, assert_one_line_error, run_script
from PIL import Image

import train
from config import SampleConfig
from ddpm import generation
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint

SIZE = 8


def write_two_classes(root, n=64, seed=0):
    """Class 'bottom': bright lower half; class 'top': bright upper half (grayscale, with noise)."""
    rng = np.random.default_rng(seed)
    for name, bright_top in (("bottom", False), ("top", True)):
        os.makedirs(root / name)
        for i in range(n):
            img = rng.integers(0, 60, (SIZE, SIZE))
            half = slice(0, SIZE // 2) if bright_top else slice(SIZE // 2, SIZE)
            img[half] = rng.integers(190, 256, (SIZE // 2, SIZE))
            Image.fromarray(img.astype(np.uint8), "L").save(root / name / f"{i}.png")


def top_is_brighter(x):
    """The fixed rule that judges a sample: is its upper half brighter than its lower half?"""
    return x[:, :, :SIZE // 2].mean((1, 2, 3)) > x[:, :, SIZE // 2:].mean((1, 2, 3))


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    write_two_classes(tmp / "images")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        train.main(["--config", CONFIG, "--name", "c", *TINY, "data.dataset=folder", f"data.root={tmp / 'images'}",
                    "data.channels=1", "data.hflip=false", "model.num_classes=auto", "train.max_steps=300",
                    # with T=50 the linear betas leave x_T far from noise; the cosine schedule reaches it
                    "diffusion.beta_schedule=cosine",
                    "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=20", "train.log_every=50",
                    "train.save_every=300", "train.ema_decay=0.95", "train.cond_drop_prob=0.2"])
    finally:
        os.chdir(old)
    return tmp


def samples_of(ckpt_path, label, guidance, n=64):
    cfg, model, diffusion = model_from_checkpoint(load_checkpoint(str(ckpt_path)), torch.device("cpu"))
    y = None if label is None else torch.full((n,), label, dtype=torch.long)
    s = SampleConfig(sampler="ddim", steps=20, guidance_scale=guidance)
    return generation.generate(generation.Sampling(model, diffusion, s, "cpu"), n, torch.Generator().manual_seed(1), y)


def test_num_classes_auto_comes_from_the_sub_folders(conditional_run):
    ckpt = load_checkpoint(str(conditional_run / "checkpoints" / "c" / "last.pt"))
    assert ckpt["config"]["model"]["num_classes"] == 2
    assert ckpt["ema"]["label_emb.weight"].shape[0] == 3  # two classes and the null label


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_samples_show_the_requested_class(conditional_run, guidance):
    """Classes are sorted folder names: 0 = 'bottom', 1 = 'top'. With chance at 50%, each class must be
    produced at least 85% of the time (64 samples: chance would reach that with probability < 1e-8)."""
    path = conditional_run / "checkpoints" / "c" / "last.pt"
    top = top_is_brighter(samples_of(path, 1, guidance)).float().mean().item()
    bottom = (~top_is_brighter(samples_of(path, 0, guidance))).float().mean().item()
    assert top >= 0.85 and bottom >= 0.85, (top, bottom)


def test_guidance_zero_is_the_unconditional_model(conditional_run):
    """w = 0: eps = eps_uncond, so the samples equal those drawn with the null label on the same noise."""
    path = conditional_run / "checkpoints" / "c" / "last.pt"
    assert torch.allclose(samples_of(path, 1, 0.0), samples_of(path, None, 1.0), atol=1e-5)


def test_class_label_cli(conditional_run):
    path = str(conditional_run / "checkpoints" / "c" / "last.pt")
    proc = run_script([os.path.join(ROOT, "sample.py"), "--ckpt", path, "--class-label", "all", "--n", "8",
                       "--steps", "5", "--out", "grid.png"], conditional_run)
    assert proc.returncode == 0, proc.stderr
    tile = 64  # the images enlarged 64 / SIZE times in the grid (tiles of at least 64 pixels)
    assert Image.open(conditional_run / "grid.png").size == (2 + 4 * (tile + 2), 2 + 2 * (tile + 2))
    bad = run_script([os.path.join(ROOT, "sample.py"), "--ckpt", path, "--class-label", "2", "--steps", "5"],
                     conditional_run)
    assert_one_line_error(bad, "2", "classes")
