"""A training run around its Trainer (TrainingRun: log, grid, FID, bits/dim, save, stop every few steps) and setting
one up: its paths (RunPaths), its data, its Trainer at a checkpoint's state, its RunLog. Used by train.py, and by
distill.py, whose run (DistillRun) is a TrainingRun over the rounds of progressive distillation.
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist

from config import dump, resolved
from dataset import build_dataset, num_classes
from ddpm.captions import caption_summary
from ddpm.checkpoint import check_same_architecture, save_run_checkpoint
from ddpm.conditions import grid_captions
from ddpm.config_rules import schedule_warning
from ddpm.distributed import wait_for_all
from ddpm.generation import Sampling, generate, sampler_record
from ddpm.images import make_grid, save_image, to_uint8
from ddpm.latent import check_checkpoint_space, latent_training_data
from ddpm.metrics import append_record, fid_of
from ddpm.nll import dataset_nll, held_out_data
from ddpm.run_log import RunLog
from ddpm.training_step import Trainer
from utils import UserError, atomic_write, enable_tf32


@dataclasses.dataclass
class RunPaths:
    """Where a run reads and writes: its name, checkpoints/<name>, results/<name>, and the checkpoint it resumes
    from (None for a new run)."""
    name: str
    ckpt_dir: str
    out_dir: str
    resume: str | None


class TrainingRun:
    """A Trainer and what happens around its steps. Only rank 0 has a RunLog and writes files."""

    def __init__(self, trainer, paths: RunPaths, runlog, stop, extractor=None):
        self.trainer, self.cfg, self.world = trainer, trainer.cfg, trainer.world
        self.ckpt_dir, self.out_dir, self.runlog, self.stop_signal = paths.ckpt_dir, paths.out_dir, runlog, stop
        self.extractor, self.held_out = extractor, None
        self.saved_step, self.warned = trainer.step, 0
        self.loss_sum, self.logged_steps, self.last_log = 0, 0, time.perf_counter()

    def loop(self):
        tc, trainer = self.cfg.train, self.trainer
        first = trainer.step
        while trainer.step < tc.max_steps:
            loss, grad_norm = (trainer.train_step_with_compile_fallback() if trainer.step == first
                               else trainer.train_step())
            self.after_step(loss, grad_norm)
        if self.runlog:
            self.runlog.write_files()
            print(f"done: {tc.max_steps} steps; checkpoint {self.ckpt_dir}/last.pt, outputs in {self.out_dir}/")
        wait_for_all(self.world)

    def after_step(self, loss, grad_norm) -> None:
        """Log, draw, score and save when due; stop on a signal."""
        tc, trainer = self.cfg.train, self.trainer
        self.loss_sum, self.logged_steps = self.loss_sum + loss, self.logged_steps + 1
        agreed_signal = self.log(grad_norm) if self.due(tc.log_every) else 0
        if self.runlog:
            self.runlog.advance(trainer.step)
            if self.due(tc.sample_every):
                self.sample_grid()
            if tc.fid_every and trainer.step % tc.fid_every == 0:
                self.log_fid()
            if tc.nll_every and trainer.step % tc.nll_every == 0:
                self.log_nll()
        # one process stops at once; several stop only on the signal they agreed on at a log step
        signum = self.stop_signal.signum if self.world == 1 else agreed_signal
        if (self.due(tc.save_every) or signum) and trainer.step != self.saved_step:
            self.save()
        if signum:
            self.stop(signum)

    def due(self, every: int) -> bool:
        return self.trainer.step % every == 0 or self.trainer.step == self.cfg.train.max_steps

    def log(self, grad_norm) -> int:
        """Log the mean loss since the last log step (the one host sync); stop on too many non-finite
        steps. Returns the signal the ranks agree on (any rank's)."""
        trainer, device = self.trainer, self.trainer.device
        means = torch.stack([self.loss_sum / self.logged_steps, grad_norm.float()])
        worst = torch.stack([trainer.bad_streak.float(), trainer.bad_total.float(),
                             torch.tensor(float(self.stop_signal.signum), device=device)])
        if self.world > 1:  # mean loss over ranks; the worst rank's counters; any rank's signal stops them all
            dist.all_reduce(means)
            means /= self.world
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        (loss, gnorm), (streak, bad, signum) = means.tolist(), worst.tolist()
        now = time.perf_counter()
        if self.runlog:
            img_per_s = self.logged_steps * self.cfg.train.batch_size / (now - self.last_log)
            self.runlog.scalars(trainer.step, loss, trainer.sched.get_last_lr()[0], gnorm, img_per_s)
            if bad > self.warned:
                self.runlog.message(f"warning: skipped {int(bad)} step(s) with a non-finite loss so far")
                self.warned = bad
        if streak >= self.cfg.train.max_nonfinite:
            raise UserError(f"the loss was non-finite for {int(streak)} steps in a row (up to step {trainer.step}); "
                            f"the last good checkpoint is {self.ckpt_dir}/last.pt (step {self.saved_step}); "
                            "lower train.lr, use train.precision=bf16 or fp32, or check the data")
        self.loss_sum, self.logged_steps, self.last_log = 0, 0, now
        return int(signum)

    def sample_grid(self) -> None:
        """A grid from the EMA model with fixed noise (same seed every time), so grids are comparable."""
        cfg, trainer = self.cfg, self.trainer
        gen = torch.Generator(trainer.device).manual_seed(cfg.train.seed)
        labels, nrow = None, None
        if cfg.model.num_classes is not None:
            labels = torch.arange(cfg.train.sample_n, device=trainer.device) % cfg.model.num_classes
        elif trainer.captions is not None:  # a row per caption
            labels, nrow = self.grid_conditions()
        sampling = Sampling(trainer.ema, trainer.diffusion, cfg.sample, trainer.device)
        x = generate(sampling, cfg.train.sample_n, gen, labels)
        grid = make_grid(to_uint8(x), nrow)
        save_image(grid, os.path.join(self.out_dir, "samples", f"step_{trainer.step:07d}.png"))
        self.runlog.image("samples", grid, trainer.step)

    def grid_conditions(self):
        """(the conditions of the sample grid's images, its row length) for a text model: a fixed set of the data's
        captions, one per row, listed in results/<name>/samples/captions.txt."""
        dataset, n = self.trainer.batches.dataset, self.cfg.train.sample_n
        rows = grid_captions(dataset.captions, min(8, n))
        nrow = math.ceil(n / len(rows))
        rows = rows[:math.ceil(n / nrow)]
        ids = torch.tensor([dataset.captions.index(c) for c in rows], device=self.trainer.device)
        atomic_write(os.path.join(self.out_dir, "samples", "captions.txt"),
                     lambda f: f.write("".join(f"{c}\n" for c in rows).encode()))
        return self.trainer.condition(ids.repeat_interleave(nrow)[:n]), nrow

    def log_fid(self) -> None:
        """FID of train.fid_samples EMA samples, to TensorBoard and results/<name>/metrics.json."""
        cfg, step, n = self.cfg, self.trainer.step, self.cfg.train.fid_samples
        sampling = Sampling(self.trainer.ema, self.trainer.diffusion, cfg.sample, self.trainer.device)
        fid = fid_of(sampling, cfg.data, n, self.extractor)
        self.runlog.scalar("eval/fid", fid, step)
        self.runlog.message(f"step {step}: FID {fid:.2f} ({n} samples)")
        append_record(os.path.join(self.out_dir, "metrics.json"),
                      {"step": step, "fid": fid, "n": n, **sampler_record(cfg.sample, cfg.diffusion.timesteps),
                       "source": "train.fid_every"})

    def log_nll(self) -> None:
        """The EMA model's bound in bits/dim on train.nll_images held-out images (ddpm/nll.py), to TensorBoard and
        results/<name>/metrics.json."""
        cfg, step, n = self.cfg, self.trainer.step, self.cfg.train.nll_images
        if self.held_out is None:
            self.held_out = held_out_data(cfg.data, n)
        images, name = self.held_out
        n = min(n, len(images))
        sample_cfg = dataclasses.replace(cfg.sample, seed=cfg.train.seed)
        result = dataset_nll(Sampling(self.trainer.ema, self.trainer.diffusion, sample_cfg, self.trainer.device),
                             images, n)
        self.runlog.scalar("eval/bits_per_dim", result["bits_per_dim"], step)
        self.runlog.message(f"step {step}: {result['bits_per_dim']:.4f} +- {result['bits_per_dim_ci95']:.4f} "
                            f"bits/dim ({n} images of {name})")
        append_record(os.path.join(self.out_dir, "metrics.json"),
                      {"step": step, "metric": "nll", "images": name, **result, "source": "train.nll_every"})

    def save(self) -> None:
        """Rank 0: last.pt, a step_XXXXXXX.pt of it, the newest train.keep_last of those kept; the plots."""
        self.saved_step = self.trainer.step
        if self.runlog:
            save_run_checkpoint({**self.trainer.state_dict(), "log": self.runlog.history}, self.ckpt_dir,
                                self.trainer.step, self.cfg.train.keep_last)
            self.runlog.write_files()

    def stop(self, signum: int):
        if self.runlog:
            self.runlog.message(f"stopped by signal at step {self.trainer.step}; saved {self.ckpt_dir}/last.pt; "
                                "run the same command to resume")
        wait_for_all(self.world)
        raise SystemExit(128 + signum)


# ---- setting a run up -----------------------------------------------------------------------------------------

def is_run_name(name: str) -> bool:
    return bool(name) and not set(name) & {"/", "\\", "\0"} and name.strip(".") != ""


def load_data(cfg, process, ckpt=None, path=None):
    """(cfg, the data set); rank 0 downloads or decodes and caches it first, alone, then the others read it. A latent
    config's data set is the latents of the images (ddpm/latent.py), and its cfg is resolved against the autoencoder."""
    check_checkpoint_space(ckpt, cfg, path)
    if process.rank != 0:
        wait_for_all(process.world)
    dataset = build_dataset(cfg.data, captions=cfg.model.text_encoder is not None)
    if cfg.latent.autoencoder is not None:
        cfg, dataset = latent_training_data(cfg, dataset, process.device, ckpt)
    if process.rank == 0:
        wait_for_all(process.world)
    if dataset.captions is not None:
        process.say(caption_summary(dataset))  # on every rank: a set without captions stops them all
    return cfg, dataset


def start_trainer(cfg, paths: RunPaths, ckpt, process):
    """(config with its run-time values resolved, Trainer at the checkpoint's state, the checkpoint's log)."""
    enable_tf32(process.device)
    cfg, dataset = load_data(cfg, process, ckpt, paths.resume)
    auto = cfg.model.num_classes == "auto"
    cfg = resolved(cfg, name=paths.name, num_classes=num_classes(dataset) if auto else cfg.model.num_classes)
    if ckpt is not None:
        check_same_architecture(ckpt, cfg, paths.resume)
    if warning := schedule_warning(cfg.diffusion):
        process.say(warning)
    trainer = Trainer(cfg, process, dataset, text_state=ckpt.get("text") if ckpt else None)
    if ckpt is None:
        return cfg, trainer, None
    trainer.load_state_dict(ckpt)
    return cfg, trainer, ckpt.get("log")


@contextlib.contextmanager
def open_runlog(cfg, trainer, paths: RunPaths, history):
    """Rank 0's RunLog, after printing the config and writing it to results/<name>/config.yaml."""
    out_dir, path = paths.out_dir, paths.resume
    runlog = RunLog(out_dir, trainer.step, cfg.train.max_steps, history)
    try:
        trainer.log = runlog.message
        print(dump(cfg), end="")
        print(f"UNet: {trainer.model.num_params() / 1e6:.2f}M parameters")
        atomic_write(os.path.join(out_dir, "config.yaml"), lambda f: f.write(dump(cfg).encode()))
        print(f"resuming from {path} at step {trainer.step}" if path else f"starting run '{cfg.name}'")
        yield runlog
    finally:
        runlog.close()
