"""distill.py and ddpm/distillation.py: the round's target against float64 DDIM, a student that learns the two-step map
of Gaussian data at the rate gradient descent promises, the loss of a tiny eps teacher's student, exact resume, the
checkpoints sample.py reads, bad input."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusion_refs import GaussianEps, assert_close64, ref_linear_betas, ref_schedule
from helpers import ROOT, fails_in_process, files_in, make_diffusion, run_sample, run_script, trained_tiny_checkpoint

import distill
import model
from config import SampleConfig
from dataset import build_dataset
from ddpm import distillation
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint
from ddpm.distillation import distillation_loss, round_grid, round_table, v_target, x0_target
from ddpm.samplers import spaced_timesteps

T, BETA_END = 200, 0.04  # linear betas: alpha_T = 0.14, so float32 DDIM stays accurate at the first step
MU, S = 0.3, 0.5         # the Gaussian data N(MU, S^2)


def schedule64():
    return ref_schedule(ref_linear_betas(T, 1e-4, BETA_END))["alphas_cumprod"]


def ref_eps64(x, abar, wiggle):
    """GaussianEps in float64 (numpy): sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2) + wiggle tanh(x)."""
    return np.sqrt(1 - abar) * (x - np.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar) + wiggle * np.tanh(x)


def ref_two_steps64(x, grid_t, abar64, wiggle):
    """float64: the teacher's DDIM steps (eta 0) over grid_t = (t, t', t''), each x' = sqrt(a') x0 + sqrt(1-a') eps."""
    for t, t_prev in zip(grid_t[:-1], grid_t[1:]):
        a, a_prev = abar64[t], (abar64[t_prev] if t_prev >= 0 else 1.0)
        eps = ref_eps64(x, a, wiggle)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def alpha_sigma64(abar64, t):
    return (1.0, 0.0) if t < 0 else (math.sqrt(abar64[t]), math.sqrt(1 - abar64[t]))


class Fixed(torch.nn.Module):
    """A 'network' that outputs given tensors, whatever its input."""

    num_classes = None

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, y=None):
        return self.out


def test_target_against_float64_two_ddim_steps():
    """x~ = (z_t'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha_t) of a nonlinear eps teacher's two DDIM
    steps, against float64; one DDIM step with x~ lands on the teacher's z_t''; v~ gives the same step."""
    abar64 = schedule64()
    teacher_diffusion = make_diffusion(timesteps=T, beta_end=BETA_END, clip_denoised=False)  # eps, linear
    teacher = GaussianEps(teacher_diffusion.alphas_cumprod64, mu=MU, s=S, wiggle=0.4)
    grid = round_grid(teacher_diffusion.alphas_cumprod64, 8, "linspace")
    assert grid[::2] == spaced_timesteps(abar64, 4, "linspace") + [-1] and len(grid) == 9
    table = round_table(teacher_diffusion.alphas_cumprod64, grid, "truncated_snr")
    g = torch.Generator().manual_seed(0)
    i = torch.arange(4).repeat_interleave(3)
    x_t = torch.randn((12, 1, 4, 4), generator=g) * 1.2
    target = x0_target(teacher_diffusion, teacher_diffusion.denoiser(teacher), x_t, table, i)

    z = x_t.double().numpy()
    ref_target, ref_next = np.empty_like(z), np.empty_like(z)
    for b, k in enumerate(i.tolist()):
        t, t_next = grid[2 * k], grid[2 * k + 2]
        ref_next[b] = ref_two_steps64(z[b], grid[2 * k:2 * k + 3], abar64, 0.4)
        (a, s), (a2, s2) = alpha_sigma64(abar64, t), alpha_sigma64(abar64, t_next)
        ref_target[b] = (ref_next[b] - s2 / s * z[b]) / (a2 - s2 / s * a)
        one_step = a2 * ref_target[b] + s2 * (z[b] - a * ref_target[b]) / s  # DDIM from t with x~, in float64
        np.testing.assert_allclose(one_step, ref_next[b], rtol=0, atol=1e-12)
    assert_close64(target, ref_target, rtol=1e-4, atol=2e-4, msg="x~")

    # the project's DDIM step from t to t'' lands on z_t'' with x~ (eps model) and with v~ (v model)
    t, t_next = table.t[i], table.t_next[i]
    eps_tilde = teacher_diffusion.predict_eps_from_x0(x_t, t, target)
    landed, _ = teacher_diffusion.ddim_step(lambda x, tt: (eps_tilde, target), x_t, t, t_next, 0.0, 0.0)
    assert_close64(landed, ref_next, rtol=1e-4, atol=2e-4, msg="one step with x~")
    v_diffusion = make_diffusion(timesteps=T, beta_end=BETA_END, clip_denoised=False, objective="v")
    student = v_diffusion.denoiser(Fixed(v_target(target, x_t, table, i)))
    landed_v, x0_v = v_diffusion.ddim_step(student, x_t, t, t_next, 0.0, 0.0)
    assert_close64(x0_v, ref_target, rtol=1e-4, atol=5e-4, msg="x_0 of v~")
    assert_close64(landed_v, ref_next, rtol=1e-4, atol=5e-4, msg="one step with v~")


def test_loss_weightings():
    """truncated SNR: max(SNR, 1) ||x~ - x^||^2; SNR + 1 with v-prediction: exactly the MSE of v (1/sigma^2 = SNR+1)."""
    abar64 = schedule64()
    grid = round_grid(abar64, 8, "linspace")
    g = torch.Generator().manual_seed(1)
    i = torch.arange(4)
    x_t, out, x0_tilde = (torch.randn((4, 1, 3, 3), generator=g, dtype=torch.float64) for _ in range(3))
    tables = {w: round_table(abar64, grid, w) for w in ("truncated_snr", "snr_plus_one")}
    table = tables["snr_plus_one"]
    v_mse = (out - v_target(x0_tilde, x_t, table, i)).square().flatten(1).mean(1).mean()
    assert distillation_loss("v", out, x0_tilde, x_t, table, i).item() == pytest.approx(v_mse.item(), rel=1e-5)
    snr = np.array([abar64[t] / (1 - abar64[t]) for t in grid[0:-1:2]])
    per_image = (out.double() - x0_tilde).square().flatten(1).mean(1).numpy()
    expected = np.mean(np.maximum(snr, 1) * per_image)
    got = distillation_loss("x0", out, x0_tilde, x_t, tables["truncated_snr"], i).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert snr.min() < 1 < snr.max()  # both branches of the max are used


def exact_v_map64(grid, k, abar64):
    """(theta*, den, sigma_t) in float64 for student step k of the exact Gaussian teacher: the two DDIM steps give
    x~ = c z + d, so the v-student (a_i, b_i) with v = a_i z + b_i = (alpha z - x~)/sigma = ((alpha - c) z - d)/sigma
    is exact at theta* = ((alpha - c)/sigma, -d/sigma); den = alpha_t'' - (sigma_t''/sigma_t) alpha_t."""
    (a, s), (a2, s2) = alpha_sigma64(abar64, grid[2 * k]), alpha_sigma64(abar64, grid[2 * k + 2])
    den = a2 - s2 / s * a
    d, c_plus_d = ((ref_two_steps64(np.float64(z), grid[2 * k:2 * k + 3], abar64, 0.0) - s2 / s * z) / den
                   for z in (0.0, 1.0))
    return np.array([(a - (c_plus_d - d)) / s, -d / s]), den, s


def test_linear_student_learns_the_two_step_map_of_gaussian_data():
    """On N(mu, s^2) data the exact eps teacher's two DDIM steps are an affine map of z_t, so a v-student
    v = a_i z + b_i per position i can learn it exactly. Full-batch gradient descent with step 1/lambda_max of the
    loss's Hessian contracts the parameter error by rho = 1 - lambda_min/lambda_max per update; after n updates the
    student's one DDIM step is off the teacher's two by at most |den| sigma rho^n |theta_0 - theta*| sqrt(z^2 + 1)."""
    abar64 = schedule64()
    teacher_diffusion = make_diffusion(timesteps=T, beta_end=BETA_END, clip_denoised=False)
    student_diffusion = make_diffusion(timesteps=T, beta_end=BETA_END, clip_denoised=False, objective="v")
    teacher = teacher_diffusion.denoiser(GaussianEps(teacher_diffusion.alphas_cumprod64, mu=MU, s=S))
    grid = round_grid(teacher_diffusion.alphas_cumprod64, 4, "linspace")
    table = round_table(teacher_diffusion.alphas_cumprod64, grid, "truncated_snr")
    g = torch.Generator().manual_seed(2)
    m = 512
    for k in range(2):  # the two student steps
        i = torch.full((m,), k)
        x0 = MU + S * torch.randn((m, 1, 2, 2), generator=g)
        x_t = student_diffusion.q_sample(x0, table.t[i], torch.randn(x0.shape, generator=g))
        target = x0_target(teacher_diffusion, teacher, x_t, table, i)
        theta_star, den, s = exact_v_map64(grid, k, abar64)
        z = x_t.double().flatten()
        hessian = 2 * table.weight[k].item() * s ** 2 * np.array([[z.square().mean(), z.mean()], [z.mean(), 1.0]])
        lam = np.linalg.eigvalsh(hessian)
        rho = 1 - lam[0] / lam[1]
        params = torch.zeros(2, requires_grad=True)
        optimizer = torch.optim.SGD([params], lr=1 / lam[1])
        z_max = x_t.abs().max().item()
        for n in range(1, 41):
            loss = distillation_loss("v", params[0] * x_t + params[1], target, x_t, table, i)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if n in (3, 10, 40):
                student = student_diffusion.denoiser(Fixed((params[0] * x_t + params[1]).detach()))
                landed, _ = student_diffusion.ddim_step(student, x_t, table.t[i], table.t_next[i], 0.0, 0.0)
                reference = ref_two_steps64(x_t.double().numpy(), grid[2 * k:2 * k + 3], abar64, 0.0)
                bound = abs(den) * s * rho ** n * np.linalg.norm(theta_star) * math.sqrt(z_max ** 2 + 1)
                err = np.abs(landed.double().numpy() - reference).max()
                assert err <= bound + 1e-4, (k, n, err, bound)
        assert err < 1e-3, (k, err, rho)


# ---- the command -------------------------------------------------------------------------------------------------

FAST = ["distill.start_steps=8", "distill.batch_size=8", "distill.lr=1e-3", "train.log_every=1",
        "train.sample_n=4", "train.num_workers=0", "train.deterministic=true", "train.compile=false"]


UPDATES = 24


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny network trained with eps-prediction (cosine, T = 100) for 60 steps."""
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    return trained_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", steps=60)


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """One round, 8 -> 4 steps, of UPDATES updates: the run folder."""
    folder = tmp_path_factory.mktemp("distilled")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        distill.main(["--teacher", teacher, "--steps", "4", "--name", "d", *FAST, f"distill.updates={UPDATES}",
                      "train.save_every=1000"])
    finally:
        os.chdir(cwd)
    return folder


def read_losses(folder, name):
    with open(folder / "results" / name / "plots" / "losses.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_loss_falls_for_the_student_of_an_eps_teacher(distilled, teacher):
    """The eps teacher's weights start a v-student, which at first is another function: on one fixed batch of
    every student position, the distillation loss of the trained student is well below that of its start."""
    losses = [loss for _, loss in read_losses(distilled, "d")]
    assert len(losses) == UPDATES and all(math.isfinite(v) for v in losses)
    teacher_ckpt, student_ckpt = load_checkpoint(teacher), load_checkpoint(str(distilled / "checkpoints/d/last.pt"))
    cfg, teacher_net, teacher_diffusion = model_from_checkpoint(teacher_ckpt, "cpu")
    _, start_net, _ = model_from_checkpoint(teacher_ckpt, "cpu")  # the same weights, read as v
    _, student_net, student_diffusion = model_from_checkpoint(student_ckpt, "cpu")
    dataset = build_dataset(cfg.data)
    x0 = torch.stack([dataset[k][0] for k in range(32)]).repeat(2, 1, 1, 1)
    abar = teacher_diffusion.alphas_cumprod64
    table = round_table(abar, round_grid(abar, 8, "linspace"), "truncated_snr")
    i = torch.arange(64) % 4
    x_t = student_diffusion.q_sample(x0, table.t[i], torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    target = x0_target(teacher_diffusion, teacher_diffusion.denoiser(teacher_net), x_t, table, i)
    with torch.no_grad():
        before, after = (distillation_loss("v", net(x_t, table.t[i]), target, x_t, table, i).item()
                         for net in (start_net, student_net))
    assert after < 0.5 * before, (before, after)


def test_outputs_are_ordinary_checkpoints(distilled):
    folder = distilled / "checkpoints" / "d"
    assert files_in(folder) == ["last.pt", f"step_{UPDATES:07d}.pt", "student_4steps.pt"]
    assert files_in(distilled / "results" / "d" / "samples") == [f"step_{UPDATES:07d}.png"]
    for name in ("last.pt", "student_4steps.pt"):
        ckpt = load_checkpoint(str(folder / name))
        cfg, _, diffusion = model_from_checkpoint(ckpt, "cpu")
        assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta, diffusion.objective) == ("ddim", 4, 0.0, "v")
        assert ckpt["distilled"]["steps"] == 4 and ckpt["distilled"]["round_done"]
    assert "optimizer" not in load_checkpoint(str(folder / "student_4steps.pt"))
    assert load_checkpoint(str(folder / "last.pt"))["distill_state"]["objective"] == "eps"  # its teacher's


def count_calls(monkeypatch):
    calls = []
    forward = model.UNet.forward
    monkeypatch.setattr(model.UNet, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    return calls


def test_sample_uses_the_distilled_steps_and_warns_on_others(distilled, tmp_path, monkeypatch, capsys):
    ckpt = str(distilled / "checkpoints" / "d" / "last.pt")
    calls = count_calls(monkeypatch)
    run_sample("--ckpt", ckpt, "--n", 2, "--out", tmp_path / "a.png")
    assert len(calls) == 4 and "warning" not in capsys.readouterr().out
    calls.clear()
    run_sample("--ckpt", ckpt, "--n", 2, "--out", tmp_path / "b.png", "--steps", 2)
    assert len(calls) == 2 and "distilled for DDIM with 4 steps" in capsys.readouterr().out
    assert distillation.sampler_warning(None, SampleConfig(steps=7)) is None  # an ordinary checkpoint: no record


def test_resume_after_an_interrupt_mid_round_is_exact(teacher, tmp_path, monkeypatch):
    """Two rounds (8 -> 4 -> 2) of 4 updates, saved every 3: a run stopped by an exception in step 8 (round 2; the
    last save was after step 6, in round 2) and run again ends with the same losses, student, teacher and Adam state
    as one uninterrupted run."""
    args = ["--teacher", teacher, "--steps", "2", *FAST, "distill.updates=4", "train.save_every=3",
            "model.dropout=0.1"]
    monkeypatch.chdir(tmp_path)
    distill.main([*args, "--name", "whole"])
    real_step = distillation.DistillTrainer.train_step

    def step_until_8(self):
        if self.step == 7:
            raise KeyboardInterrupt  # as a kill: nothing saved after step 6
        return real_step(self)
    monkeypatch.setattr(distillation.DistillTrainer, "train_step", step_until_8)
    with pytest.raises(SystemExit) as e:
        distill.main([*args, "--name", "cut"])
    assert e.value.code == 130
    assert load_checkpoint("checkpoints/cut/last.pt")["step"] == 6
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    distill.main([*args, "--name", "cut"])
    assert read_losses(tmp_path, "whole") == read_losses(tmp_path, "cut")
    a, b = (load_checkpoint(f"checkpoints/{n}/last.pt") for n in ("whole", "cut"))
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(a["distill_state"]["teacher"][k], b["distill_state"]["teacher"][k]) for k in a["model"])
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    for steps in (4, 2):
        x, y = (load_checkpoint(f"checkpoints/{n}/student_{steps}steps.pt") for n in ("whole", "cut"))
        assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "3"], "distill.steps=3 (--steps) is not reached by halving distill.start_steps=8"),
    (["--steps", "0"], "distill.steps must be in [1, inf)"),
    (["--steps", "8"], "distill.steps=8 (--steps) is not reached"),
    (["--steps", "2", "distill.start_steps=128"], "distill.start_steps=128 must be at most"),
    (["--steps", "2", "distill.lr=0"], "distill.lr must be in (0, inf)"),
    (["--steps", "2", "distill.start_steps=16", "sample.spacing=logsnr"], "sample.spacing=logsnr"),
    (["--steps", "2", "--name", "a/b"], "--name 'a/b' is a run name"),
    (["--steps", "2", "model.base_channels=32"], "is from another architecture"),
])
def test_bad_input_is_one_line_and_writes_nothing(teacher, tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    err = fails_in_process(capsys, distill.main, "--teacher", teacher, "distill.start_steps=8", *extra)
    assert needle in err, err
    assert os.listdir(tmp_path) == []


def test_missing_teacher_and_changed_settings(distilled, teacher, monkeypatch, capsys):
    monkeypatch.chdir(distilled)
    assert "not found" in fails_in_process(capsys, distill.main, "--teacher", "nope.pt", "--steps", "2")
    err = fails_in_process(capsys, distill.main, "--teacher", teacher, "--steps", "4", "--name", "d", *FAST,
                           "distill.updates=50")
    assert f"distill.updates: {UPDATES} then, 50 now" in err


def test_bench_runs_end_to_end(teacher, tmp_path):
    """bench/distill_bench.py on the tiny teacher: one round of 2 updates, the distances and the round's time."""
    out = tmp_path / "distill-bench"
    proc = run_script([os.path.join(ROOT, "bench", "distill_bench.py"), "--teacher", teacher, "--start-steps", "4",
                       "--steps", "2", "--updates", "2", "--batch-size", "4", "--n", "2", "--out", str(out),
                       "--dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "distill-bench.json").read_text())["rows"]
    assert row["K"] == 2 and len(row["seconds"]) == 1
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("student", "teacher_ddim_1K", "teacher_dpmpp_2K"))
    assert "| 2 |" in (tmp_path / "distill-bench.md").read_text()
