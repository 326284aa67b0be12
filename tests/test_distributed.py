"""train.py under torchrun: 2 CPU processes (gloo) against 1, portable checkpoints, only rank 0 writes."""
import concurrent.futures
import os
import shutil
import sys

import pytest
import torch
from helpers import CONFIG, ROOT, TINY, run_script

import train
from ddpm.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def torchrun(nproc, args, cwd, env_extra=None, launcher=()):
    """The README's command line, torchrun --standalone --nproc_per_node=N [launcher options] train.py ..., with
    this Python's torch."""
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
                       os.path.join(ROOT, "train.py"), *args], cwd, env_extra)


# one level (no down- or upsampling; attention in the middle block): the smallest U-Net, which torch.compile
# compiles fastest, and DDP needs no more
ARGS = ["--config", CONFIG, "--name", "d", "--device", "cpu", *TINY, "model.channel_mults=[1]",
        "train.deterministic=false"]


def state(cwd, name="d"):
    return load_checkpoint(str(cwd / "checkpoints" / name / "last.pt"))


def assert_close(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    old = os.getcwd()
    os.chdir(one)
    try:  # in this process (one thread, as the workers), sparing an import of torch
        train.main([*ARGS, "train.max_steps=8"])  # also keeps step 5
    finally:
        os.chdir(old)
    p2 = torchrun(2, [*ARGS, "train.max_steps=5"], two)
    assert p2.returncode == 0, p2.stderr[-3000:]
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    return one, two, (p2, files)


def step_5_of_one_process(one):
    return load_checkpoint(str(one / "checkpoints" / "d" / "step_0000005.pt"))


def test_two_processes_match_one(runs):
    """Same global batch, examples, timesteps and noise: 2 processes end with the weights of 1 process."""
    one, two, _ = runs
    a, b = step_5_of_one_process(one), state(two)
    assert a["step"] == b["step"] == 5
    assert_close(a["model"], b["model"])
    assert_close(a["ema"], b["ema"])
    assert a["data"] == b["data"]
    moved = state(one)["model"]
    assert any(not torch.allclose(moved[k], b["model"][k]) for k in moved)  # 8 steps differ from 5


def test_two_process_checkpoint_resumes_on_one(runs, tmp_path):
    """Continue the 2-process run on 1 process up to step 8: same as 8 steps on 1 process throughout."""
    one, shared, _ = runs
    two = tmp_path / "two"
    shutil.copytree(shared, two)  # the fixture's folder stays at step 5 for the other tests
    proc = run_script([os.path.join(ROOT, "train.py"), *ARGS, "train.max_steps=8"], two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoints/d/last.pt at step 5" in proc.stdout
    assert_close(state(one)["model"], state(two)["model"])
    assert_close(state(one)["ema"], state(two)["ema"])


def test_only_rank_zero_writes(runs):
    _, _, (p2, files) = runs
    assert len([f for f in files if "events.out.tfevents" in f]) == 1  # one TensorBoard writer
    assert p2.stdout.count("starting run 'd'") == 1 and p2.stdout.count("done:") == 1
    assert p2.stderr.count("UNet:") + p2.stdout.count("UNet:") == 1
    assert not [f for f in files if ".tmp" in f]
    assert {"checkpoints/d/last.pt", "checkpoints/d/step_0000005.pt", "results/d/config.yaml",
            "results/d/plots/losses.csv", "results/d/plots/loss.png", "results/d/samples/step_0000005.png"} \
        <= set(files)


def test_checkpoint_of_one_process_resumes_on_two_in_bf16_and_warns_about_restarts(runs, tmp_path):
    """A 1-process checkpoint goes on under torchrun, here with bf16 autocast (finite losses) and --max-restarts
    without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which rank 0 alone warns about: three checks, one launch."""
    one, _, _ = runs
    shutil.copytree(one / "checkpoints", tmp_path / "checkpoints")
    proc = torchrun(2, [*ARGS, "train.max_steps=10", "train.precision=bf16"], tmp_path,
                    {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}, launcher=["--max-restarts=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = state(tmp_path)
    assert ckpt["step"] == 10 and ckpt["config"]["train"]["precision"] == "bf16"
    assert all(0 < loss < 10 for loss in ckpt["log"]["loss"]), ckpt["log"]["loss"]
    assert proc.stdout.count("set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") == 1  # once, from rank 0


# torch.compile with the aot_eager backend: Dynamo's capture of the DDP model (its graph breaks at the gradient
# buckets, no_sync on the accumulation micro-batches) and AOTAutograd's backward, without Inductor's C++ kernels,
# whose 31 compiler runs took 110 s of CPU time per process on a 2-core CI machine (Inductor runs in test_cuda.py)
AOT_EAGER = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}


def test_compile_and_accumulation_under_ddp_match_one_eager_process(runs, tmp_path):
    """torch.compile of the DDP model and 2 micro-batches per process: still the weights of 1 plain process."""
    one, _, _ = runs
    proc = torchrun(2, [*ARGS, "train.max_steps=5", "train.compile=true", "train.grad_accum=2"], tmp_path, AOT_EAGER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile failed" not in proc.stdout + proc.stderr
    assert_close(step_5_of_one_process(one)["model"], state(tmp_path)["model"])


def worker_pids(root_pid: int, rank: int) -> list[int]:
    """Processes under root_pid whose environment says RANK=rank (the workers torchrun started)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass

    def under_root(pid):
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    found = []
    for pid in parents:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and under_root(pid):
            found.append(pid)
    return found


def start_and_kill_rank_1(tmp_path, restarts: int, max_steps: int):
    """Start a 2-process run, SIGKILL rank 1 once the first checkpoint exists; returns (returncode, output)."""
    import signal
    import subprocess
    import time
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                f"--max-restarts={restarts}", os.path.join(ROOT, "train.py")]
    args = [*ARGS, f"train.max_steps={max_steps}", "train.save_every=5", "train.log_every=5"]
    # as the README says for --max-restarts: otherwise the restarted workers may read stale addresses
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen([*launcher, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "checkpoints" / "d" / "last.pt"
    deadline = time.monotonic() + 180  # far above the 17-24 s a whole killed run took on a busy 2-core machine
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = worker_pids(proc.pid, 1)
    assert last.exists() and victims, "the run never wrote its first checkpoint"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=300)  # the job must end, not hang (a restart took < 60 s on 2 busy cores)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after one process was killed")
    return proc.returncode, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_a_killed_process_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    code, out = start_and_kill_rank_1(tmp_path, restarts=0, max_steps=100_000)
    assert code != 0, out[-2000:]
    ckpt = state(tmp_path)
    assert 5 <= ckpt["step"] < 100_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    code, out = start_and_kill_rank_1(tmp_path, restarts=1, max_steps=60)  # still 55 steps to kill it in
    assert code == 0, out[-3000:]
    assert "resuming from checkpoints/d/last.pt" in out
    assert state(tmp_path)["step"] == 60


def test_sigterm_to_torchrun_saves_once_and_resumes_exactly(tmp_path):
    """torchrun passes SIGTERM on to every worker; the ranks agree on it at the next log step and rank 0 saves.
    Resumed, the run ends where an uninterrupted one does, dropout included: its masks come from (seed, rank, step)."""
    import signal
    import subprocess
    import time
    args = [*ARGS, "model.dropout=0.1"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped.mkdir(), straight.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *args, "train.max_steps=1000000", "train.save_every=1000000"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=stopped, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started, deadline = stopped / "results" / "d" / "config.yaml", time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    step = state(stopped)["step"]
    assert step > 0 and out.count(f"stopped by signal at step {step}") == 1, out[-3000:]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the resumed run and the uninterrupted one side by side
        resumed, whole = pool.map(lambda cwd: torchrun(2, [*args, f"train.max_steps={step + 2}"], cwd),
                                  (stopped, straight))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoints/d/last.pt at step {step}" in resumed.stdout
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = state(straight), state(stopped)
    assert a["step"] == b["step"] == step + 2
    assert_close(a["model"], b["model"], atol=0)
    assert_close(a["ema"], b["ema"], atol=0)
