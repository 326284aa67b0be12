"""Faults real machines have: a disk that fills during a save, a folder that cannot be written, two runs on
one folder, a killed run. Each ends in one line and a non-zero exit, and nothing the user had is lost."""
import os
import resource
import signal
import subprocess
import sys
import time

from helpers import CONFIG, ROOT, TINY, assert_one_line_error, run_script

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


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    assert run_script([*TRAIN, "train.max_steps=5"], tmp_path).returncode == 0
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


def test_a_second_run_on_a_training_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, *TRAIN, "train.max_steps=1000000", "train.save_every=1000000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "results" / "t" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = run_script([*TRAIN, "train.max_steps=3"], tmp_path)
        assert_one_line_error(second, os.path.join("checkpoints", "t"), "in use", str(first.pid))
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL, "the first run ended before the second one was tried"
    again = run_script([*TRAIN, "train.max_steps=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
