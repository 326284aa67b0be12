"""train.py: outputs of a short run, exact resume after SIGKILL, atomic checkpoints, accumulation, AMP, bad input."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    CONFIG,
    ROOT,
    TINY,
    RunsCode,
    TinyExtractor,
    assert_one_line_error,
    fails_in_process,
    run_script,
    tiny_trainer,
)
from PIL import Image

import train
from config import load_config
from ddpm import training_step
from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.distributed import Process
from ddpm.training_step import ema_decay, lr_factor
from diffusion import GaussianDiffusion
from utils import UserError


def run_train(tmp_path, monkeypatch, *extra, name="t"):
    monkeypatch.chdir(tmp_path)
    train.main(["--config", CONFIG, "--name", name, *TINY, *extra])
    return tmp_path / "checkpoints" / name, tmp_path / "results" / name


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_short_run_writes_every_output(tmp_path, monkeypatch):
    ckpt_dir, out = run_train(tmp_path, monkeypatch, "train.max_steps=6", "train.sample_every=3")
    assert sorted(os.listdir(ckpt_dir)) == [".lock", "last.pt", "step_0000005.pt", "step_0000006.pt"]
    ckpt = load_checkpoint(str(ckpt_dir / "last.pt"))
    assert ckpt["step"] == 6 and ckpt["config"]["name"] == "t"
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    rows = read_csv(out / "plots" / "losses.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert Image.open(out / "plots" / "loss.png").size[0] > 100
    for step in (3, 6):
        grid = Image.open(out / "samples" / f"step_{step:07d}.png")
        # 4 samples of 8x8: a 2x2 grid, each enlarged 8x to a 64-pixel tile, 2px padding
        assert grid.size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))
    assert load_config(str(out / "config.yaml")).model.base_channels == 16


def test_a_log_file_gets_a_bounded_number_of_bytes_per_step(tmp_path, monkeypatch, capsys):
    """Into a file or a pipe (here pytest's capture: not a terminal), a run of 25 steps of at least 0.1 s each,
    where a progress bar would redraw at every step (tqdm redraws every 0.1 s, about 90 bytes each), writes plain
    progress lines on stderr instead: at most one every 10 s and one at the end, so at most 10 bytes a step here
    (lines of about 110 bytes, the run under 20 s)."""
    step = training_step.Trainer.train_step

    def slow_step(self):
        time.sleep(0.1)
        return step(self)
    monkeypatch.setattr(training_step.Trainer, "train_step", slow_step)
    started = time.monotonic()
    run_train(tmp_path, monkeypatch, "train.max_steps=25", "train.log_every=5", "train.save_every=100")
    elapsed, err = time.monotonic() - started, capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) <= 1 + elapsed // 10 and all(line.startswith("train: ") for line in lines), err
    assert lines[-1].startswith("train: 25/25 step (100%)") and "loss=" in lines[-1], err
    assert len(err.encode()) / 25 <= 10 or elapsed > 20, (elapsed, err)


def test_keep_last_prunes_old_step_checkpoints(tmp_path, monkeypatch):
    ckpt_dir, _ = run_train(tmp_path, monkeypatch, "train.max_steps=8", "train.save_every=2", "train.keep_last=2")
    assert sorted(os.listdir(ckpt_dir)) == [".lock", "last.pt", "step_0000006.pt", "step_0000008.pt"]
    # a kept step file is its own snapshot, not a view of last.pt
    assert load_checkpoint(str(ckpt_dir / "step_0000006.pt"))["step"] == 6


def weights(path):
    ckpt = load_checkpoint(str(path))
    return ckpt["model"], ckpt["ema"], ckpt["optimizer"]["state"]


def test_resume_after_sigkill_is_exact(tmp_path, monkeypatch, capsys):
    """A run killed with SIGKILL and resumed (by the same command, run in this process: one import of torch
    fewer) logs the same loss at every later step and ends with the same weights, EMA and optimiser state as a
    run that was never interrupted."""
    args = [os.path.join(ROOT, "train.py"), "--config", CONFIG, "--name", "r", *TINY, "data.image_size=16",
            "model.attention_resolutions=[8]", "train.max_steps=30", "train.save_every=4", "model.dropout=0.1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run alongside the killed one: one core each
    straight = subprocess.Popen([sys.executable, *args], cwd=whole, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=killed, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "r" / "step_0000008.pt").exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = load_checkpoint(str(killed / "checkpoints" / "r" / "last.pt"))["step"]
    assert 8 <= stopped_at < 30
    monkeypatch.chdir(killed)
    capsys.readouterr()
    train.main(args[1:])  # exits (code 2) on any error
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    assert f"resuming from checkpoints/r/last.pt at step {stopped_at}" in capsys.readouterr().out

    a = read_csv(whole / "results" / "r" / "plots" / "losses.csv")
    b = read_csv(killed / "results" / "r" / "plots" / "losses.csv")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
    for wa, wb in zip(weights(whole / "checkpoints" / "r" / "last.pt"),
                      weights(killed / "checkpoints" / "r" / "last.pt")):
        flat_a = wa if isinstance(next(iter(wa.values())), torch.Tensor) else \
            {f"{k}.{n}": v for k, s in wa.items() for n, v in s.items()}
        flat_b = wb if isinstance(next(iter(wb.values())), torch.Tensor) else \
            {f"{k}.{n}": v for k, s in wb.items() for n, v in s.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), k


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_the_same_command_resumes(tmp_path, monkeypatch, capsys, signum):
    args = [os.path.join(ROOT, "train.py"), "--config", CONFIG, "--name", "s", *TINY, "train.max_steps=1000000",
            "train.save_every=1000000"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = tmp_path / "results" / "s" / "config.yaml"
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # some steps in, and nothing saved yet (save_every is far away)
    assert not (tmp_path / "checkpoints" / "s" / "last.pt").exists()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    step = load_checkpoint(str(tmp_path / "checkpoints" / "s" / "last.pt"))["step"]
    assert step > 0 and f"stopped by signal at step {step}; saved checkpoints/s/last.pt" in out + err
    monkeypatch.chdir(tmp_path)  # the same command resumes; run here, as importing torch again costs seconds
    capsys.readouterr()
    train.main([*args[1:-2], f"train.max_steps={step + 2}"])
    assert f"resuming from checkpoints/s/last.pt at step {step}" in capsys.readouterr().out


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def broken_save(obj, f):
        real_save(obj, f)
        f.write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match=f"cannot write '{path}' \\(disk full\\)"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


KILLER = """
import sys, torch
sys.path.insert(0, {root!r})
from ddpm.checkpoint import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint({{"step": step, "w": torch.full((4_000_000,), float(step))}}, {path!r})
"""


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_last_pt(tmp_path):
    path = str(tmp_path / "last.pt")
    script = tmp_path / "writer.py"
    script.write_text(KILLER.format(root=ROOT, path=path))
    for delay in (0.03, 0.11, 0.29):
        proc = subprocess.Popen([sys.executable, str(script)])
        deadline = time.time() + 60
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # now in the middle of some later write
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(path)  # must never be a half-written file
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["step"])))


def test_gradient_accumulation_matches_one_big_step():
    one, two = tiny_trainer("train.grad_accum=1"), tiny_trainer("train.grad_accum=2")
    for _ in range(3):
        loss1, norm1 = one.train_step()
        loss2, norm2 = two.train_step()
        assert torch.allclose(loss1, loss2, rtol=1e-5) and torch.allclose(norm1, norm2, rtol=1e-4)
    for (k, p1), p2 in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), k
    assert not torch.equal(next(one.model.parameters()), next(tiny_trainer().model.parameters()))


def test_compile_failure_falls_back_to_eager_on_the_same_batch(monkeypatch):
    class Broken(torch.nn.Module):  # what torch.compile returns when its compiler breaks at the first call
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("simulated compiler failure\nwith a long second line")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken(module))
    messages = []
    compiled = tiny_trainer("train.compile=true", log=messages.append)
    plain = tiny_trainer()
    for step in range(3):
        loss, _ = compiled.train_step_with_compile_fallback() if step == 0 else compiled.train_step()
        assert torch.equal(loss, plain.train_step()[0])  # the failed attempt used up no batch and no step
    assert not compiled.compiled and len(messages) == 1
    assert "torch.compile failed (RuntimeError: simulated compiler failure)" in messages[0]
    assert "train.compile=false" in messages[0]
    for p1, p2 in zip(compiled.model.parameters(), plain.model.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(precision):
    try:
        with torch.autocast("cpu", dtype=torch.float16 if precision == "fp16" else torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError:
        pytest.skip(f"this PyTorch has no CPU autocast for {precision}")
    trainer = tiny_trainer(f"train.precision={precision}")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(3):
        loss, norm = trainer.train_step()
        assert torch.isfinite(loss) and torch.isfinite(norm)
    assert trainer.scaler.get_scale() == (2.0 ** 16 if precision == "fp16" else 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())


def test_non_finite_loss_skips_the_step(monkeypatch):
    trainer = tiny_trainer()
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real_loss = GaussianDiffusion.loss
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * float("nan"))
    loss, _ = trainer.train_step()
    assert not torch.isfinite(loss) and int(trainer.bad_streak) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    monkeypatch.setattr(GaussianDiffusion, "loss", real_loss)
    trainer.train_step()
    assert int(trainer.bad_streak) == 0 and int(trainer.bad_total) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_repeated_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt_dir, _ = run_train(tmp_path, monkeypatch, "train.max_steps=5")
    good = (ckpt_dir / "last.pt").read_bytes()
    real_loss = GaussianDiffusion.loss
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * float("inf"))
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, monkeypatch, "train.max_steps=20", "train.max_nonfinite=3")
    assert e.value.code == 2
    assert (ckpt_dir / "last.pt").read_bytes() == good


def test_resume_keeps_the_moments_but_takes_this_runs_optimiser_settings():
    old = tiny_trainer("train.warmup_steps=100")
    for _ in range(3):
        old.train_step()
    state = old.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # as saved by a run on a GPU
    new = tiny_trainer("train.warmup_steps=100", "train.lr=5e-4", "train.weight_decay=0.01")
    new.load_state_dict(state)
    group = new.opt.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4 * 4 / 100) and group["weight_decay"] == 0.01 and not group["fused"]
    first = next(iter(new.opt.state.values()))
    assert torch.equal(first["exp_avg"], next(iter(old.opt.state.values()))["exp_avg"])
    new.train_step()
    assert new.opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 5 / 100)


def test_resume_from_a_path_alone_uses_that_runs_name(tmp_path, monkeypatch):
    ckpt_dir, _ = run_train(tmp_path, monkeypatch, "train.max_steps=2", name="mine")
    moved = tmp_path / "elsewhere.pt"
    (ckpt_dir / "last.pt").rename(moved)
    train.main(["--resume", str(moved), "train.max_steps=3"])
    assert load_checkpoint(str(ckpt_dir / "last.pt"))["step"] == 3
    assert not (tmp_path / "checkpoints" / "cifar10").exists()
    with pytest.raises(SystemExit) as e:  # would overwrite run 'mine', whose last.pt is another checkpoint
        train.main(["--resume", str(tmp_path / "checkpoints" / "mine" / "step_0000002.pt"), "train.max_steps=4"])
    assert e.value.code == 2


def test_dropout_masks_depend_on_rank_and_step_only(monkeypatch):
    seeds, real_seed, real_randomness = [], torch.manual_seed, training_step.step_randomness
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s) or real_seed(s))
    # the whole batch whatever the rank, so that only the dropout seed sees the rank
    monkeypatch.setattr(training_step, "step_randomness", lambda *a: real_randomness(*a[:3], Process(), *a[4:]))
    trainer = tiny_trainer("model.dropout=0.1")
    seeds.clear()
    for rank, step in ((0, 0), (0, 1), (1, 0), (0, 0)):
        trainer.rank, trainer.step = rank, step
        trainer.train_step()
    assert seeds[0] == seeds[3] and len(set(seeds[:3])) == 3


def test_lr_schedule_and_ema_warmup():
    tc = load_config(CONFIG, ["train.warmup_steps=10", "train.max_steps=110", "train.lr_schedule=cosine"]).train
    assert lr_factor(0, tc) == pytest.approx(0.1) and lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(60, tc) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(110, tc) == pytest.approx(0.0, abs=1e-12)
    tc.lr_schedule = "constant"
    assert lr_factor(100, tc) == 1.0
    assert ema_decay(0, 0.9999) == pytest.approx(0.1) and ema_decay(10**7, 0.9999) == 0.9999


@pytest.mark.parametrize("decay", [0.9, 0.2])
def test_each_step_moves_the_ema_by_one_minus_decay_towards_the_new_weights(decay):
    """After step k (counted from 0) every EMA parameter is d ema_old + (1 - d) weights_new, with the decay warmed
    up as the README says: d = min(train.ema_decay, (1 + k)/(10 + k)); float64 against the float32 lerp (a few
    ulps). Steps 0-2 have d = 0.1, 0.18, 0.25 (warm-up) at 0.9, and 0.1, 0.18, 0.2 (the decay) at 0.2."""
    trainer = tiny_trainer(f"train.ema_decay={decay}")
    moved = 0.0
    for k in range(3):
        d = min(decay, (1 + k) / (10 + k))
        ema_old = [e.detach().double().clone() for e in trainer.ema.parameters()]
        assert trainer.step == k
        trainer.train_step()
        weights = [w.detach().double() for w in trainer.model.parameters()]
        for (name, ema), old, w in zip(trainer.ema.named_parameters(), ema_old, weights, strict=True):
            error = (ema.double() - (d * old + (1 - d) * w)).abs()
            assert (error <= 4 * 2.0 ** -24 * (old.abs() + w.abs())).all(), (k, name, error.max().item())
            moved = max(moved, (w - old).abs().max().item())
    # the weights moved away from the EMA by far more than the tolerance: a wrong d cannot pass
    assert moved > 1e-4


def test_no_option_is_a_torchrun_prefix():
    from torch.distributed.run import get_args_parser
    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    ours = ["--config", "--name", "--resume", "--device"]
    assert train.parse_args(["--config", "c", "--name", "n", "--resume", "never", "--device", "cpu"]).name == "n"
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o)]


@pytest.mark.parametrize("extra,needles", [
    (["model.nope=1"], ["model.nope", "base_channels"]),
    (["train.batch_size=big"], ["train.batch_size", "int"]),
    (["train.max_steps=-5"], ["train.max_steps"]),
    (["data.dataset=folder", "data.root=/nonexistent/images"], ["/nonexistent/images"]),
])
def test_bad_input_is_one_line(tmp_path, extra, needles):
    proc = run_script([os.path.join(ROOT, "train.py"), "--config", CONFIG, *TINY, *extra], tmp_path)
    assert_one_line_error(proc, *needles)


def test_checkpoint_from_another_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--config", CONFIG, "--name", "a", *TINY]
    train.main([*base, "train.max_steps=2"])
    err = fails_in_process(capsys, train.main, *base, "train.max_steps=4", "model.base_channels=32")
    assert all(k in err for k in ("model.base_channels", "16", "32")), err
    assert "last.pt" in fails_in_process(capsys, train.main, *base, "train.max_steps=4", "--resume", "never")


def test_unknown_checkpoint_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run_script([os.path.join(ROOT, "train.py"), "--config", CONFIG, *TINY, "--resume",
                       str(tmp_path / "junk.pt")], tmp_path)
    assert_one_line_error(proc, "junk.pt")



def test_a_checkpoint_whose_pickle_would_run_code_is_refused_as_such(tmp_path):
    """weights_only refuses a pickle that calls os.system before anything runs; the error says that loading it could
    run code (a damaged file is still called damaged)."""
    torch.save({"format": "ddpm-checkpoint-v1", "x": RunsCode(tmp_path / "ran")}, str(tmp_path / "evil.pt"))
    proc = run_script([os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "evil.pt")], tmp_path)
    line = assert_one_line_error(proc, "evil.pt", "system", "could run code")
    assert "damaged" not in line and not (tmp_path / "ran").exists()
    data = (tmp_path / "evil.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(str(tmp_path / "cut.pt"))


def test_fid_every_logs_fid_to_metrics_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--config", CONFIG, "--name", "t", *TINY, "train.max_steps=4", "train.fid_every=2",
                "train.fid_samples=8", "sample.batch_size=8"], extractor=TinyExtractor())
    out = tmp_path / "results" / "t"
    records = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["n"] == 8 for r in records)


def test_label_dropout_rate_matches_cond_drop_prob():
    """The fraction of labels replaced by the null label is cond_drop_prob (within 5 binomial std errors),
    drawn over the global batch: two ranks' slices put together equal the one-process draw."""
    n, p = 20_000, 0.3
    cfg = load_config(CONFIG, [*TINY, f"train.batch_size={n}", f"train.cond_drop_prob={p}"])
    gen = torch.Generator()
    _, _, drop = training_step.step_randomness(gen, cfg, 7, Process(), True)
    assert abs(drop.double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)
    halves = [training_step.step_randomness(gen, cfg, 7, Process(r, 2), True) for r in (0, 1)]
    for i in range(3):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]),
                           training_step.step_randomness(gen, cfg, 7, Process(), True)[i])
    _, _, none = training_step.step_randomness(gen, cfg, 7, Process(), False)
    assert none is None


@pytest.mark.parametrize("option", ["train.timestep_sampler=loss_aware", "diffusion.variance=learned_range",
                                    "train.snr_gamma=5"])
def test_resume_is_exact_with_the_improved_ddpm_options(tmp_path, monkeypatch, option):
    """A run stopped at step 12 and resumed logs the same losses and ends with the same weights, optimiser state
    and timestep sampler as a run of 16 steps at once. loss_aware: by step 12 the sampler has left its uniform
    warm-up (each of the T = 10 timesteps has 10 losses), so the resumed run draws from the saved history."""
    batch = 16 if option.endswith("loss_aware") else 8
    extra = [option, f"train.batch_size={batch}", "train.save_every=100", "diffusion.timesteps=10"]
    (tmp_path / "whole").mkdir(), (tmp_path / "split").mkdir()
    ckpt_dir, out = run_train(tmp_path / "whole", monkeypatch, *extra, "train.max_steps=16")
    run_train(tmp_path / "split", monkeypatch, *extra, "train.max_steps=12")
    stopped = load_checkpoint(str(tmp_path / "split" / "checkpoints" / "t" / "last.pt"))
    if option.endswith("loss_aware"):
        assert stopped["timestep_sampler"]["counts"].tolist() == [10] * 10
    split_dir, split_out = run_train(tmp_path / "split", monkeypatch, *extra, "train.max_steps=16")
    a, b = read_csv(out / "plots" / "losses.csv"), read_csv(split_out / "plots" / "losses.csv")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b] and len(a) == 16
    whole, split = load_checkpoint(str(ckpt_dir / "last.pt")), load_checkpoint(str(split_dir / "last.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(whole[key][k], split[key][k]) for k in whole[key]), key
    for k, v in whole["timestep_sampler"].items():
        assert torch.equal(v, split["timestep_sampler"][k]), k
