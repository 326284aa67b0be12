"""Faults real machines have: a disk that fills during a save, a folder that cannot be written, two runs on
one folder, a killed run. Each ends in one line and a non-zero exit, and nothing the user had is lost."""
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
    CONFIG,
    ROOT,
    TINY,
    TinyExtractor,
    assert_one_line_error,
    fails_in_process,
    run_script,
    sample_fails,
)
from PIL import Image

import evaluate
import sample
import train
from ddpm.distributed import torchrun_env
from ddpm.run_log import loss_figure, smooth
from utils import UserError, read_json

TRAIN = [os.path.join(ROOT, "train.py"), "--config", CONFIG, "--name", "t", *TINY]


def file_size_limit(limit):
    """A preexec_fn that caps the size of any file the process writes (RLIMIT_FSIZE): writing past it fails
    with EFBIG, as a full disk fails with ENOSPC, without filling a real disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def leftovers(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp" in f]


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TRAIN[1:], "train.max_steps=5"])
    last = tmp_path / "checkpoints" / "t" / "last.pt"
    before = last.read_bytes()
    proc = run_script([*TRAIN, "train.max_steps=10"], tmp_path, preexec_fn=file_size_limit(len(before) // 2))
    assert_one_line_error(proc, os.path.join("checkpoints", "t", "last.pt"), "disk full")
    assert last.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_run_folder_that_cannot_be_written_fails_before_the_first_step(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t").write_text("a file where the run's folder should be")
    proc = run_script([*TRAIN, "train.max_steps=5"], tmp_path)
    assert_one_line_error(proc, os.path.join("results", "t"))
    assert not (tmp_path / "checkpoints" / "t" / "last.pt").exists()


def test_a_second_run_on_a_training_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, monkeypatch, capsys):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, *TRAIN, "train.max_steps=1000000", "train.save_every=1000000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "results" / "t" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.05)
        monkeypatch.chdir(tmp_path)
        err = fails_in_process(capsys, train.main, *TRAIN[1:], "train.max_steps=3")
        assert all(k in err for k in (os.path.join("checkpoints", "t"), "in use", str(first.pid))), err
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL, "the first run ended before the second one was tried"
    train.main([*TRAIN[1:], "train.max_steps=3"])


# ---- odd input: one line each --------------------------------------------------------------------------------

@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "RANK"),                                        # WORLD_SIZE without RANK
    ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=two"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0"}, "RANK=5"),
    ({"RANK": "1"}, "RANK=1"),                                            # RANK without WORLD_SIZE
])
def test_inconsistent_torchrun_variables(monkeypatch, env, needle):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=needle) as e:
        torchrun_env()
    assert "\n" not in str(e.value)


def test_torchrun_variables_of_a_real_launch(monkeypatch):
    for env, expected in (({}, (1, 0, 0)), ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, (1, 0, 0)),
                          ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (4, 3, 1))):
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert torchrun_env() == expected


def test_a_command_line_with_bad_torchrun_variables_is_one_line(tmp_path):
    proc = run_script([*TRAIN, "train.max_steps=1"], tmp_path, env_extra={"WORLD_SIZE": "2"})
    assert_one_line_error(proc, "WORLD_SIZE=2")


@pytest.mark.parametrize("argv, needle", [
    (["--name", "a/b"], "--name 'a/b' is a run name"),
    (["--name", ".."], "--name '..' is a run name"),
    (["--name", "../elsewhere"], "is a run name"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["--resume", "."], "is a folder"),
])
def test_bad_run_names_empty_runs_and_folders_as_checkpoints(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", CONFIG, *TINY, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_overrides_before_between_and_after_flags():
    args = train.parse_args(["train.lr=1e-3", "--name", "n", "train.seed=2", "--device", "cpu", "model.dropout=0"])
    assert args.name == "n" and args.overrides == ["train.lr=1e-3", "train.seed=2", "model.dropout=0"]


# ---- pictures that mislead -----------------------------------------------------------------------------------

def test_the_smoothed_loss_curve_tracks_the_data():
    """A falling, noisy curve logged every 25 of 2,000 steps (80 points, so smoothed): the raw points lie on both
    sides of the smoothed curve about equally often (the exponential average used before lay above all but 0.4%
    of them), and an exponential decay, a straight line on the log axis, is kept exactly."""
    steps = np.arange(25, 2001, 25)
    trend = 0.05 + 0.5 * np.exp(-steps / 400)
    above = []
    for seed in range(200):
        raw = trend * np.exp(np.random.default_rng(seed).normal(0, 0.1, len(steps)))
        above.append(np.mean(raw[2:] > smooth(raw)[2:]))
    # 200 x 78 points: a point is a fifth of its own window, and the curve is convex; the sampling error of the
    # mean fraction is below 0.01
    assert 0.4 < np.mean(above) < 0.6, np.mean(above)
    decay = 0.8 * np.exp(-np.arange(500) / 60)
    assert np.allclose(smooth(decay), decay, rtol=1e-12, atol=0)
    assert smooth([2.0]).tolist() == [2.0] and smooth([]).tolist() == []


def quickstart_like_history(noise=0.0):
    """14 logged points of a steep convex loss, as the quickstart logs them (every 50 of 700 steps): from 0.68 at
    step 50 down to 0.03 (0.03 + 1.5 exp(-step / 60)), times exp(noise N(0, 1)) per point."""
    steps = np.arange(50, 701, 50)
    loss = (0.03 + 1.5 * np.exp(-steps / 60)) * np.exp(noise * np.random.default_rng(0).normal(size=len(steps)))
    return {"step": steps.tolist(), "loss": loss.tolist()}


def test_a_short_steep_loss_curve_is_drawn_through_its_points_not_above_them():
    """With 14 points no plotted curve lies above the raw points: checked at every logged step, every line of the
    figure is at most the raw loss there (1e-12 relative). The centred 5-point average drawn before lay above it
    at steps 100 to 650 (a mean of a convex curve's values exceeds the value at the centre)."""
    for noise in (0.0, 0.1):
        history = quickstart_like_history(noise)
        ax = loss_figure(history, "q").axes[0]
        raw = dict(zip(history["step"], history["loss"]))
        assert ax.lines
        for line in ax.lines:
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                assert y <= raw[x] * (1 + 1e-12), (line.get_label(), x, y, raw[x])


def test_the_loss_axis_is_labelled_in_plain_decimals():
    """The quickstart's range (0.03 to 0.68, 1.4 decades): the labels drawn are plain decimals (0.05, 0.1, 0.2, 0.3,
    0.5), each the value of its tick, not mathtext such as 2x10^-1; a range within one decade labels every minor
    tick (0.2, 0.3, ...)."""
    for history, expected in ((quickstart_like_history(), {"0.05", "0.1", "0.2", "0.3", "0.5"}),
                              ({"step": [1, 2, 3], "loss": [0.62, 0.4, 0.21]}, {"0.3", "0.4", "0.5", "0.6"})):
        fig = loss_figure(history, "q")
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = ax.get_ylim()
        labels = {}
        for tick in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks():
            if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high:
                labels[tick.label1.get_text()] = tick.get_loc()
        assert expected <= set(labels), labels
        for text, value in labels.items():
            assert re.fullmatch(r"\d+(\.\d+)?", text) and math.isclose(float(text), value, rel_tol=1e-9), labels


# ---- interrupts ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    images = tmp_path_factory.mktemp("many") / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):  # enough that decoding them takes a while on any machine
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    return images


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_data_set_build_ends_in_one_line(tmp_path, many_images, signum):
    """Ctrl-C or SIGTERM while dataset.py decodes a folder: one 'interrupted:' line saying what to do, exit
    130 or 143, no traceback, and no half-written cache."""
    images = many_images
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dataset.py"), "--config", CONFIG,
                             "data.dataset=folder", f"data.root={images}", "data.image_size=32"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("decoding"):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "interrupted: the data set was not finished" in err, err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[-1]], err
    assert "cached" not in out and not list(images.glob(".ddpm-cache-*"))


@pytest.mark.parametrize("side", ["samples", "reference"])
def test_evaluate_with_fewer_than_two_images_is_one_line(tmp_path, capsys, side):
    one, many = tmp_path / "one", tmp_path / "many"
    for folder, n in ((one, 1), (many, 4)):
        folder.mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i:07d}.png")
    samples, ref = (one, many) if side == "samples" else (many, one)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples-dir", str(samples), "--ref-dir", str(ref), "--device", "cpu", "--out",
                       str(tmp_path / "m.json"), "--ref-cache", str(tmp_path / "refs")], extractor=TinyExtractor())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "at least 2" in err and str(one) in err, err


# ---- sample.py and evaluate.py: outputs, folders in use, interrupts, overrides -------------------------------

def test_an_output_is_written_in_the_format_its_name_says_or_refused(ckpt, tmp_path, capsys):
    sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "grid.jpg"), "--device", "cpu"])
    with Image.open(tmp_path / "grid.jpg") as img:
        assert img.format == "JPEG"
    for flag, name in (("--out", "grid.xyz"), ("--process", "p.gif"), ("--gif", "d.png"), ("--out", "grid")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, "--n", "2", flag, str(tmp_path / name), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and name in err, err
        assert not (tmp_path / name).exists()


def test_a_second_sampler_on_a_folder_being_filled_is_refused(ckpt, tmp_path, capsys):
    argv = [os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--sampler", "ddpm", "--batch-size", "1",
            "--device", "cpu", "--save-dir", str(tmp_path / "s")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, *argv, "--n", "100000"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "s" / "0000000.png").exists() and time.time() < deadline:
            time.sleep(0.05)
        err = sample_fails(capsys, *argv[1:], "--n", "2")
        assert all(k in err for k in (str(tmp_path / "s"), "in use", str(first.pid))), err
        first.send_signal(signal.SIGINT)  # Ctrl-C: what is there, and how to go on, in one line
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in err, err[-2000:]
    done = len([f for f in os.listdir(tmp_path / "s") if f.endswith(".png")])
    sample.main([*argv[1:], "--n", str(done + 1)])  # no stale lock; one image more
    assert f"({done + 1} images, 1 new)" in capsys.readouterr().out


def test_sampling_into_a_folder_says_what_an_interrupt_left(ckpt, tmp_path):
    argv = [os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--sampler", "ddpm", "--batch-size", "1",
            "--device", "cpu", "--save-dir", str(tmp_path / "s"), "--n", "100000"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "s" / "0000001.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "of 100000 images are in" in last and "same command" in last


def test_evaluate_takes_overrides_anywhere(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = evaluate.main(["sample.seed=3", "--ckpt", ckpt, "--n", "2", "--steps", "2", "sample.eta=0.5",
                            "--device", "cpu"], extractor=TinyExtractor())
    assert record["seed"] == 3 and record["eta"] == 0.5


@pytest.mark.parametrize("flag, path", [("--out", "grid.png"), ("--gif", "d.gif"), ("--save-dir", "s")])
def test_a_full_disk_while_sampling_is_one_line_and_leaves_no_temporary_file(ckpt, tmp_path, flag, path):
    proc = run_script([os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--n", "4", "--device", "cpu", flag,
                       str(tmp_path / path)], tmp_path, preexec_fn=file_size_limit(100))
    assert_one_line_error(proc, str(tmp_path / path), "disk full")
    assert leftovers(tmp_path) == [] and not (tmp_path / path).is_file()


@pytest.mark.parametrize("content, needle", [
    (b'{"a": 1', "metrics file '{p}' is not JSON (Expecting"),
    (b'{"a": 1}', "metrics file '{p}' is not a JSON list; move it away"),
    (b"[\xff]", "metrics file '{p}' is not UTF-8 text"),
])
def test_a_bad_json_file_is_one_line(tmp_path, content, needle):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_json(str(path), "metrics file", list, "; move it away")
    assert needle.format(p=path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    path.write_text('[{"fid": 3.2}]')
    assert read_json(str(path), "metrics file", list) == [{"fid": 3.2}]
