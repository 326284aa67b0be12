"""sample.py on tiny random checkpoints (16x16 images, T=20): the pictures it writes, the resumable
folder, seeds, class labels, and one-line errors for bad input."""
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, files_in, run_sample, run_script, sample_fails
from PIL import Image, ImageSequence

import sample
from config import SampleConfig
from ddpm import generation, images, png_folders
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint

SIZE, PAD, T = 16, 2, 20  # helpers.TINY_CKPT: 16x16 images, T = 20, 5 DDIM steps, sample.n = 4
TILE = 64  # pictures enlarge a 16x16 image 4x, to tiles of at least 64 pixels (README); the PNG folders do not


def grid_size(n, nrow):
    """(width, height) of a picture of n SIZE x SIZE images enlarged to TILE x TILE, nrow per row, PAD pixels around
    each."""
    return nrow * (TILE + PAD) + PAD, math.ceil(n / nrow) * (TILE + PAD) + PAD


def read(path):
    with open(path, "rb") as f:
        return f.read()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int64)


# ---- grids, seeds, samplers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 9])
def test_grid_is_about_square(ckpt, tmp_path, n):
    run_sample("--ckpt", ckpt, "--n", n, "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == grid_size(n, math.ceil(math.sqrt(n)))


def test_default_output_is_the_grid_under_results(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_sample("--ckpt", ckpt)
    out = capsys.readouterr().out
    assert Image.open(tmp_path / "results" / "tiny" / "grid.png").size == grid_size(4, 2)  # sample.n=4
    assert os.path.join("results", "tiny", "grid.png") in out and "images/s" in out


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_same_seed_same_images_other_seed_other_images(ckpt, tmp_path, sampler):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_sample("--ckpt", ckpt, "--sampler", sampler, "--n", 3, "--seed", seed, "--out", tmp_path / f"{name}.png")
    assert read(tmp_path / "a.png") == read(tmp_path / "b.png")
    assert read(tmp_path / "a.png") != read(tmp_path / "c.png")


def test_options_change_the_images(ckpt, tmp_path):
    """Flags override the checkpoint's sample section, positional overrides act like flags, and the
    sampler, eta and the EMA choice all matter."""
    def grid(name, *argv):
        run_sample("--ckpt", ckpt, "--n", 3, "--out", tmp_path / name, *argv)
        return read(tmp_path / name)
    base = grid("base.png", "--seed", 3)
    assert grid("override.png", "sample.seed=3") == base
    assert grid("flag_wins.png", "sample.seed=5", "--seed", 3) == base
    others = [grid("ddpm.png", "--seed", 3, "--sampler", "ddpm"), grid("eta.png", "--seed", 3, "--eta", 1.0),
              grid("raw.png", "--seed", 3, "--no-ema"), grid("trailing.png", "--seed", 3, "--spacing", "trailing"),
              grid("thresh.png", "--seed", 3, "--dynamic-threshold")]
    dpm = [grid("dpm2.png", "--seed", 3, "--sampler", "dpmpp"), grid("dpm3.png", "--seed", 3, "--sampler", "dpmpp",
                                                                   "--order", 3, "--spacing", "logsnr")]
    grid("dpm1.png", "--seed", 3, "--sampler", "dpmpp", "--order", 1)  # DPM-Solver++ 1 is DDIM, up to rounding
    pixels = [np.asarray(Image.open(tmp_path / name), dtype=int) for name in ("base.png", "dpm1.png")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    assert len({base, *others, *dpm}) == 8
    assert grid("no_thresh.png", "sample.dynamic_threshold=true", "--seed", 3, "--no-dynamic-threshold") == base


def test_generate(ckpt):
    _, model, diffusion = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    gen = torch.Generator().manual_seed(0)
    s = SampleConfig(sampler="ddim", steps=4)
    x, trajectory = generation.generate(generation.Sampling(model, diffusion, s, "cpu"), 2, gen, record=(T - 1, 5, 0))
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.abs().max() <= 1
    # 4 DDIM steps of T = 20 visit 19, 14, 10, 5, then step to the data (index 0 is never evaluated)
    assert trajectory["t"] == [T - 1, 5] and trajectory["x0"][0].shape == x.shape


def test_the_grid_shows_the_folder_s_images_enlarged_by_nearest_neighbour(ckpt, tmp_path):
    """Tile i of the grid is PNG i of a --save-dir folder of the same seed (which stays at 16x16), each pixel a
    4x4 block."""
    run_sample("--ckpt", ckpt, "--n", 3, "--out", tmp_path / "g.png", "--save-dir", tmp_path / "s")
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape[:2] == grid_size(3, 2)[::-1]
    for i in range(3):
        png = np.asarray(Image.open(tmp_path / "s" / f"{i:07d}.png"))
        assert png.shape == (SIZE, SIZE, 3)
        top, left = PAD + (i // 2) * (TILE + PAD), PAD + (i % 2) * (TILE + PAD)
        tile = grid[top:top + TILE, left:left + TILE]
        assert np.array_equal(tile, png.repeat(4, axis=0).repeat(4, axis=1)), i
    assert (grid[:PAD] == 255).all() and (grid[:, TILE + PAD:TILE + 2 * PAD] == 255).all()  # white padding


# ---- the folder of PNGs --------------------------------------------------------------------------------------


def names(folder):
    return files_in(folder)


def test_save_dir_writes_n_files_and_adds_only_missing_ones(ckpt, tmp_path):
    folder = tmp_path / "samples"
    run_sample("--ckpt", ckpt, "--n", 5, "--batch-size", 2, "--save-dir", folder)
    assert names(folder) == [f"{i:07d}.png" for i in range(5)]
    before = {f: (read(folder / f), os.stat(folder / f).st_mtime_ns) for f in names(folder)}
    run_sample("--ckpt", ckpt, "--n", 8, "--batch-size", 2, "--save-dir", folder)
    assert names(folder) == [f"{i:07d}.png" for i in range(8)]
    assert all((read(folder / f), os.stat(folder / f).st_mtime_ns) == old for f, old in before.items())
    assert Image.open(folder / "0000007.png").size == (SIZE, SIZE)


def test_resumed_folder_equals_one_made_in_one_go(ckpt, tmp_path, monkeypatch):
    argv = ["--ckpt", ckpt, "--n", 7, "--batch-size", 3, "--sampler", "ddpm"]
    run_sample(*argv, "--save-dir", tmp_path / "once")
    save_png = images.save_png
    def save_four_then_stop(image, path):
        if len(names(tmp_path / "resumed")) == 4:  # killed in the middle of the second batch
            raise KeyboardInterrupt
        save_png(image, path)
    monkeypatch.setattr(png_folders, "save_png", save_four_then_stop)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line and exit code 130
        run_sample(*argv, "--save-dir", tmp_path / "resumed")
    assert e.value.code == 130
    monkeypatch.undo()
    os.remove(tmp_path / "resumed" / "0000001.png")  # and a gap: image 1 lost
    assert names(tmp_path / "resumed") == [f"{i:07d}.png" for i in (0, 2, 3)]
    run_sample(*argv, "--save-dir", tmp_path / "resumed")
    assert names(tmp_path / "once") == names(tmp_path / "resumed") == [f"{i:07d}.png" for i in range(7)]
    for f in names(tmp_path / "once"):
        assert read(tmp_path / "once" / f) == read(tmp_path / "resumed" / f), f


def test_sample_to_folder_returns_the_count(cond_ckpt, tmp_path):
    _, model, diffusion = model_from_checkpoint(load_checkpoint(cond_ckpt), "cpu")
    s = SampleConfig(batch_size=2, sampler="ddim", steps=2, guidance_scale=2.0)
    sampling = generation.Sampling(model, diffusion, s, "cpu")
    assert png_folders.sample_to_folder(sampling, str(tmp_path), 3, labels=[2, 0]) == 3
    assert png_folders.sample_to_folder(sampling, str(tmp_path), 2, labels=torch.tensor([1, 1])) == 3


# ---- pictures of the process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, frames", [("ddim", 5 + 1), ("ddpm", T + 1)])
def test_gif_frames(ckpt, tmp_path, sampler, frames):
    """A frame per recorded step (all of them when there are at most 20), then the final samples."""
    run_sample("--ckpt", ckpt, "--n", 20, "--sampler", sampler, "--gif", tmp_path / "d.gif")
    gif = Image.open(tmp_path / "d.gif")
    assert sum(1 for _ in ImageSequence.Iterator(gif)) == frames
    assert gif.size == grid_size(16, 4)  # at most 16 images
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "results").exists()


def test_process_picture(ckpt, tmp_path):
    """A row of x_t and a row of predicted x_0 per sample; a column per recorded step plus the result."""
    run_sample("--ckpt", ckpt, "--n", 3, "--process", tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == grid_size(2 * 3 * (5 + 1), 5 + 1)  # DDIM, 5 steps
    run_sample("--ckpt", ckpt, "--n", 30, "--sampler", "ddpm", "--process", tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == grid_size(2 * 8 * (10 + 1), 10 + 1)


def test_forward_picture(ckpt, tmp_path):
    pytest.importorskip("dataset")
    columns = len([0, 1, 2, 4, 8, 16, T - 1])
    run_sample("--ckpt", ckpt, "--n", 3, "--forward", tmp_path / "f.png")
    assert Image.open(tmp_path / "f.png").size == grid_size(3 * columns, columns)
    run_sample("--ckpt", ckpt, "--n", 3, "--forward", tmp_path / "f2.png", "--schedules", "linear,cosine")
    assert Image.open(tmp_path / "f2.png").size == grid_size(2 * 3 * columns, columns)


def test_forward_timesteps():
    assert sample.forward_timesteps(1000) == [0, 50, 100, 200, 400, 800, 999]
    assert sample.forward_timesteps(20) == [0, 1, 2, 4, 8, 16, 19]
    assert sample.forward_timesteps(1) == [0]


# ---- class-conditional checkpoints ---------------------------------------------------------------------------


def spy_labels(monkeypatch):
    """Record the labels of every generate() call."""
    seen, generate = [], generation.generate
    def spy(*args, **kwargs):
        cond = inspect.signature(generate).bind(*args, **kwargs).arguments.get("cond")
        seen.append(None if cond is None else cond.tolist())
        return generate(*args, **kwargs)
    monkeypatch.setattr(generation, "generate", spy)
    return seen


def test_class_label_all_gives_a_row_per_class(cond_ckpt, tmp_path, monkeypatch, capsys):
    seen = spy_labels(monkeypatch)
    run_sample("--ckpt", cond_ckpt, "--class-label", "all", "--n", 7, "--batch-size", 16, "--out", tmp_path / "g.png")
    assert seen == [[0, 0, 1, 1, 2, 2]]  # 7 // 3 = 2 per class
    assert Image.open(tmp_path / "g.png").size == grid_size(6, 2)
    assert "2 images for each of the 3 classes" in capsys.readouterr().out


def test_labels_cycle(cond_ckpt, tmp_path, monkeypatch):
    seen = spy_labels(monkeypatch)
    run_sample("--ckpt", cond_ckpt, "--n", 5, "--batch-size", 16, "--out", tmp_path / "a.png")
    run_sample("--ckpt", cond_ckpt, "--n", 5, "--batch-size", 16, "--out", tmp_path / "b.png", "--class-label", "2,0")
    assert seen == [[0, 1, 2, 0, 1], [2, 0, 2, 0, 2]]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_with_every_output(cond_ckpt, tmp_path, sampler):
    argv = ["--ckpt", cond_ckpt, "--sampler", sampler, "--n", 4, "--class-label", 1]
    run_sample(*argv, "--out", tmp_path / "plain.png")
    run_sample(*argv, "--guidance-scale", 3, "--out", tmp_path / "guided.png", "--save-dir", tmp_path / "s",
               "--process", tmp_path / "p.png", "--gif", tmp_path / "g.gif")
    assert read(tmp_path / "plain.png") != read(tmp_path / "guided.png")
    assert len(names(tmp_path / "s")) == 4 and (tmp_path / "p.png").exists() and (tmp_path / "g.gif").exists()


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--steps", 21], "sample.steps"),
    (["--steps", 0], "sample.steps"),
    (["--sampler", "dpmpp", "--order", 4], "sample.order"),
    (["--sampler", "dpmpp", "--eta", 0.5], "sample.eta"),
    (["--spacing", "karras"], "--spacing"),
    (["sample.spacing=karras"], "sample.spacing"),
    (["--eta", -0.5], "sample.eta"),
    (["--n", 0], "sample.n"),
    (["--batch-size", 0], "sample.batch_size"),
    (["--steps", "many"], "--steps"),
    (["sample.colour=red"], "sample.colour"),
    (["--class-label", 0], "class-conditional"),
    (["--guidance-scale", 2], "class-conditional"),
    (["--forward", "f.png", "--schedules", "linear,square"], "--schedules"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_options(ckpt, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in sample_fails(capsys, "--ckpt", ckpt, "--out", tmp_path / "g.png", *argv)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("label", ["3", "-1", "0,7", "cat"])
def test_bad_class_labels(cond_ckpt, capsys, label):
    assert "--class-label" in sample_fails(capsys, "--ckpt", cond_ckpt, "--class-label", label)


def test_bad_checkpoints(tmp_path, capsys):
    assert "not found" in sample_fails(capsys, "--ckpt", tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read" in sample_fails(capsys, "--ckpt", tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert "not a checkpoint of this toolkit" in sample_fails(capsys, "--ckpt", tmp_path / "other.pt")


def test_outputs_that_cannot_be_written(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    for flag in ("--out", "--process", "--gif", "--forward"):
        assert "cannot write" in sample_fails(capsys, "--ckpt", ckpt, flag, tmp_path / "file" / "x.png")
    assert "cannot write" in sample_fails(capsys, "--ckpt", ckpt, "--save-dir", tmp_path / "file")
    assert "cannot write" in sample_fails(capsys, "--ckpt", ckpt, "--save-dir", tmp_path / "file" / "samples")
    assert "is a folder" in sample_fails(capsys, "--ckpt", ckpt, "--out", tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_folder(ckpt, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "cannot write" in sample_fails(capsys, "--ckpt", ckpt, "--out", locked / "grid.png")
        assert "cannot write" in sample_fails(capsys, "--ckpt", ckpt, "--save-dir", locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("argv", [["--ckpt", "no/such/last.pt"], ["--ckpt", "x.pt", "--eta", "lots"]])
def test_command_line_errors_are_one_line(tmp_path, argv):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---- several processes ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                    reason="needs torch.distributed with gloo")
def test_two_processes_write_the_folder_of_one(ckpt, tmp_path):
    """torchrun with 2 CPU processes (gloo) splits the batches of --save-dir: the folder holds the images of a
    1-process run, also where it finishes a folder begun by 1 process (a partial batch, image 4 of the batch 4-5);
    rank 0 alone makes the grid and prints. Equal within one level of 255: each process has its own share of the
    CPU threads, and another thread count can round a float differently (seen: one pixel of 2 of 8 PNGs)."""
    # --num-images: torchrun's parser would take --n for an abbreviation of its own options
    argv = ["--ckpt", ckpt, "--num-images", 7, "--batch-size", 2, "--sampler", "dpmpp", "--steps", 3, "--device", "cpu"]
    run_sample(*argv, "--save-dir", tmp_path / "one", "--out", tmp_path / "one.png")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "0000004.png").write_bytes(read(tmp_path / "one" / "0000004.png"))
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       os.path.join(ROOT, "sample.py"), *map(str, argv), "--save-dir", str(tmp_path / "two"),
                       "--out", str(tmp_path / "two.png")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert names(tmp_path / "two") == names(tmp_path / "one") == [f"{i:07d}.png" for i in range(7)]
    for f in names(tmp_path / "one"):
        assert np.abs(pixels(tmp_path / "one" / f) - pixels(tmp_path / "two" / f)).max() <= 1, f
    assert np.abs(pixels(tmp_path / "one.png") - pixels(tmp_path / "two.png")).max() <= 1
    out = proc.stdout
    assert out.count("images: ") == 1 and "(7 images, 6 new)" in out and out.count("grid: ") == 1, out
    assert out.count("images/s") == 1


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_each_rank_makes_every_world_th_missing_batch(ckpt, tmp_path):
    """Rank 1 of 2 makes the missing batches 1, 3, ... of the folder and nothing else (a 1-process group
    stands in for the other rank at the barriers)."""
    import torch.distributed as dist
    _, model, diffusion = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    s = SampleConfig(sampler="ddim", steps=2, batch_size=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        folder = tmp_path / "s"
        folder.mkdir()
        (folder / "0000001.png").write_bytes(b"")  # batch 0 is missing image 0 only, batch 1 (images 2, 3) all
        png_folders.sample_to_folder(generation.Sampling(model, diffusion, s, "cpu"), str(folder), 9, rank=1, world=2)
    finally:
        dist.destroy_process_group()
    # missing batches start at 0, 2, 4, 6, 8: rank 1 makes those at 2 and 6
    assert names(folder) == [f"{i:07d}.png" for i in (1, 2, 3, 6, 7)]
