"""Shared bits of the tests: a tiny training setup that runs in a second on the CPU, and a subprocess runner."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart.yaml")

# 8x8 shapes, a 16-channel two-level U-Net, T=50: a step takes a few milliseconds
TINY = ["data.dataset=shapes", "data.image_size=8", "data.num_images=64", "model.base_channels=16",
        "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[4]",
        "model.dropout=0.0", "diffusion.timesteps=50", "train.batch_size=8", "train.lr=1e-3",
        "train.warmup_steps=2", "train.num_workers=0", "train.log_every=1", "train.save_every=5",
        "train.sample_every=1000", "train.sample_n=4", "sample.steps=3", "train.deterministic=true",
        "train.compile=false", "train.ema_decay=0.9"]


def run_script(args, cwd, env_extra=None, timeout=300, **kwargs):
    """Run `python <args>` in cwd with the repo importable; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_one_line_error(proc, *needles):
    """Exit code 2, exactly one 'error:' line on stderr, no traceback, and the line names each needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
