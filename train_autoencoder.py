"""Train our own autoencoder (ddpm/autoencoder.py), the first stage of latent diffusion.

    python train_autoencoder.py --config configs/latent-quickstart.yaml [--name NAME] [--device auto|cuda|cpu]
                                [section.field=value ...]

It trains on the config's data set with its `autoencoder` section (and the run settings of `train`: seed,
log_every, save_every, sample_every, keep_last, num_workers, grad_clip). Outputs: checkpoints/<name>/last.pt
(+ the newest step_*.pt), results/<name>/{config.yaml, reconstructions/, plots/, logs/ (TensorBoard)}; the
default name is the config's name + "-autoencoder". An interrupted run continues where it stopped when the same
command is run again. A diffusion run uses the result with latent.autoencoder=checkpoints/<name>/last.pt.
"""
import contextlib
import dataclasses
import os
import time

import torch

from config import dump, load_config
from dataset import build_dataset
from ddpm.autoencoder import KIND, psnr
from ddpm.autoencoder_training import AutoencoderTrainer
from ddpm.checkpoint import load_checkpoint, save_run_checkpoint
from ddpm.cli import ArgumentParser, StopSignal, cli
from ddpm.images import make_grid, save_image, to_uint8
from ddpm.run_log import RunLog
from utils import FolderLock, UserError, atomic_write, check_writable, resolve_device

ARCHITECTURE = ("factor", "latent_channels", "ch", "num_res_blocks")  # the fields that shape the weights


def parse_args(argv=None):
    p = ArgumentParser(description="Train an autoencoder for latent diffusion.", allow_abbrev=False)
    p.add_argument("--config", help="YAML config (default: configs/cifar10.yaml)")
    p.add_argument("--name", help="run name: outputs in checkpoints/NAME and results/NAME "
                                  "(default: the config's name + '-autoencoder')")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. autoencoder.steps=2000")
    return p.parse_args(argv)


class AutoencoderRun:
    """An AutoencoderTrainer and what happens around its steps: logs, reconstruction grids, checkpoints."""

    def __init__(self, trainer, ckpt_dir, out_dir, runlog, stop):
        self.trainer, self.cfg, self.ckpt_dir, self.out_dir = trainer, trainer.cfg, ckpt_dir, out_dir
        self.runlog, self.stop_signal, self.saved_step = runlog, stop, trainer.step
        self.sums, self.logged, self.last_log = {}, 0, time.perf_counter()
        dataset = trainer.batches.dataset
        n = min(trainer.cfg.train.sample_n, 16, len(dataset))
        n = n - n % 8 if n > 8 else n  # whole rows of 8
        self.shown = torch.stack([dataset[i][0] for i in range(n)])  # the same images in every grid

    def loop(self):
        trainer, tc, steps = self.trainer, self.cfg.train, self.cfg.autoencoder.steps
        while trainer.step < steps:
            losses, grad_norm, disc_loss = trainer.train_step()
            self.add({"loss": losses.total, "reconstruction": losses.reconstruction, "kl": losses.kl,
                      "perceptual": losses.perceptual, "adversarial": losses.adversarial, "discriminator": disc_loss})
            if self.due(tc.log_every):
                self.log(grad_norm)
            self.runlog.advance(trainer.step)
            if self.due(tc.sample_every):
                self.reconstructions()
            signum = self.stop_signal.signum
            if (self.due(tc.save_every) or signum) and trainer.step != self.saved_step:
                self.save()
            if signum:
                self.runlog.message(f"stopped by signal at step {trainer.step}; saved {self.ckpt_dir}/last.pt; "
                                    "run the same command to resume")
                raise SystemExit(128 + signum)
        self.runlog.write_files()
        print(f"done: {steps} steps; checkpoint {self.ckpt_dir}/last.pt, outputs in {self.out_dir}/")

    def due(self, every: int) -> bool:
        return self.trainer.step % every == 0 or self.trainer.step == self.cfg.autoencoder.steps

    def add(self, values: dict) -> None:
        for k, v in values.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.logged += 1

    def log(self, grad_norm) -> None:
        """The means since the last log: the loss to the CSV and plot, every part to TensorBoard."""
        means = {k: (v / self.logged).item() for k, v in self.sums.items()}
        now = time.perf_counter()
        img_per_s = self.logged * self.cfg.autoencoder.batch_size / (now - self.last_log)
        step = self.trainer.step
        self.runlog.scalars(step, means["loss"], self.cfg.autoencoder.lr, grad_norm.item(), img_per_s)
        for k, v in means.items():
            if k != "loss":
                self.runlog.scalar(f"autoencoder/{k}", v, step)
        self.sums, self.logged, self.last_log = {}, 0, now

    @torch.no_grad()
    def reconstructions(self) -> None:
        """A grid of the same data images, each row of them over a row of their reconstructions from the latent
        mean, and their PSNR."""
        model, x = self.trainer.model, self.shown.to(self.trainer.device)
        x_hat = model.decode(model.encode(x)[0]).clamp(-1, 1)
        k = min(8, len(x))
        rows = [row for i in range(0, len(x), k) for row in (x[i:i + k], x_hat[i:i + k])]
        grid = make_grid(to_uint8(torch.cat(rows)), k)
        step = self.trainer.step
        save_image(grid, os.path.join(self.out_dir, "reconstructions", f"step_{step:07d}.png"))
        self.runlog.image("reconstructions", grid, step)
        self.runlog.scalar("autoencoder/psnr", psnr(x, x_hat), step)

    def save(self) -> None:
        self.saved_step = self.trainer.step
        save_run_checkpoint({**self.trainer.state_dict(), "log": self.runlog.history}, self.ckpt_dir,
                            self.trainer.step, self.cfg.train.keep_last)
        self.runlog.write_files()


def check_resumable(ckpt: dict, cfg, path: str) -> None:
    """A checkpoint of this command with the weights' shape of cfg, before loading anything."""
    if ckpt.get("kind") != KIND:
        raise UserError(f"'{path}' is not an autoencoder checkpoint (train_autoencoder.py); give another --name")
    saved = ckpt["config"]
    diffs = [f"autoencoder.{k}: checkpoint {saved['autoencoder'][k]!r}, config {getattr(cfg.autoencoder, k)!r}"
             for k in ARCHITECTURE if saved["autoencoder"][k] != getattr(cfg.autoencoder, k)]
    if saved["data"]["channels"] != cfg.data.channels:
        diffs.append(f"data.channels: checkpoint {saved['data']['channels']}, config {cfg.data.channels}")
    if diffs:
        raise UserError(f"checkpoint '{path}' is from another autoencoder ({'; '.join(diffs)}); use its config or "
                        "give another --name")


@cli
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    name = args.name or f"{cfg.name}-autoencoder"
    if set(name) & {"/", "\\", "\0"} or not name.strip("."):
        raise UserError(f"--name '{name}' is a run name, not a path: outputs go to checkpoints/NAME and results/NAME")
    device = resolve_device(args.device)
    ckpt_dir, out_dir = os.path.join("checkpoints", name), os.path.join("results", name)
    last = os.path.join(ckpt_dir, "last.pt")
    ckpt = load_checkpoint(last) if os.path.exists(last) else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, last)
    elif cfg.autoencoder.steps == 0:
        raise UserError("autoencoder.steps=0 on a new run trains nothing; give autoencoder.steps of at least 1")
    with contextlib.ExitStack() as stack:
        stack.enter_context(FolderLock(ckpt_dir, "autoencoder training run"))
        for folder in (ckpt_dir, out_dir):
            check_writable(folder, folder=True)
        cfg = dataclasses.replace(cfg, name=name)
        trainer = AutoencoderTrainer(cfg, device, build_dataset(cfg.data))
        if ckpt is not None:
            trainer.load_state_dict(ckpt)
        history = ckpt.get("log") if ckpt else None
        del ckpt
        stop = stack.enter_context(StopSignal())
        runlog = stack.enter_context(contextlib.closing(
            RunLog(out_dir, trainer.step, cfg.autoencoder.steps, history, loss_label="loss (reconstruction + KL)")))
        print(dump(cfg), end="")
        print(f"autoencoder: {trainer.model.num_params() / 1e6:.2f}M parameters, latents of "
              f"{cfg.autoencoder.latent_channels} x {cfg.data.image_size // cfg.autoencoder.factor}^2")
        atomic_write(os.path.join(out_dir, "config.yaml"), lambda f: f.write(dump(cfg).encode()))
        print(f"resuming from {last} at step {trainer.step}" if trainer.step else f"starting run '{name}'")
        AutoencoderRun(trainer, ckpt_dir, out_dir, runlog, stop).loop()


if __name__ == "__main__":
    main()
