"""Distil a trained DDPM into a student that samples in K DDIM steps (progressive distillation, Salimans & Ho 2022).

    python distill.py --teacher checkpoints/quickstart/last.pt --steps 4 [--name NAME] [--device auto|cuda|cpu]
                      [section.field=value ...]          # e.g. distill.start_steps=64 distill.updates=2000
    torchrun --nproc_per_node=4 distill.py [same options]  # one process per GPU (DDP)

Round by round, from distill.start_steps DDIM steps of the teacher down to K: the student (a copy of its teacher)
learns to match two DDIM steps of the teacher in one (ddpm/distillation.py), then teaches the next round.
Outputs: checkpoints/<name>/last.pt (the newest student, resumable, + step_*.pt copies), one ordinary checkpoint per
round, checkpoints/<name>/student_<steps>steps.pt, and results/<name>/{config.yaml, samples/, plots/, logs/}. A
checkpoint records the steps it was distilled for: sample.py and evaluate.py sample it with DDIM and those steps.
An interrupted run (Ctrl-C, SIGTERM, kill -9) continues where it stopped when the same command is run again.
"""
import contextlib
import os
import time

from config import config_from_dict, to_dict
from ddpm.checkpoint import check_same_architecture, load_checkpoint, save_checkpoint
from ddpm.cli import ArgumentParser, StopSignal, cli
from ddpm.config_rules import check_batch_split, check_distill
from ddpm.distillation import DistillTrainer, round_checkpoint, round_grid, student_config
from ddpm.distributed import process_group
from ddpm.training_run import RunPaths, TrainingRun, is_run_name, load_data, open_runlog
from diffusion import GaussianDiffusion
from utils import FolderLock, UserError, check_writable, enable_tf32


def parse_args(argv=None):
    p = ArgumentParser(description="Distil a DDPM into a few-step student (progressive distillation).",
                       allow_abbrev=False)
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint, e.g. checkpoints/cifar10/last.pt")
    p.add_argument("--steps", type=int, help="K, the student's sampling steps at the end (distill.steps)")
    p.add_argument("--name", help="run name: outputs in checkpoints/NAME and results/NAME "
                                  "(default: <teacher's name>-distill<K>)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. distill.updates=2000")
    return p.parse_args(argv)


class DistillRun(TrainingRun):
    """TrainingRun over the rounds: at the end of each a sample grid with the round's steps, the round's checkpoint
    and last.pt; the progress bar names the round."""

    def __init__(self, trainer, paths: RunPaths, runlog, stop):
        super().__init__(trainer, paths, runlog, stop)
        self.clock = time.perf_counter()
        self.describe()

    def describe(self) -> None:
        if self.runlog:
            trainer = self.trainer
            r = min(trainer.step // trainer.updates, trainer.rounds - 1)
            steps = trainer.cfg.distill.start_steps >> r
            self.runlog.bar.set_description(f"round {r + 1}/{trainer.rounds} ({steps} -> {steps // 2} steps)")

    def round_ended(self) -> bool:
        return self.trainer.step % self.trainer.updates == 0

    def due(self, every: int) -> bool:
        return super().due(every) or self.round_ended()

    def tick(self) -> None:
        """Add the time since the last tick to the current round's."""
        now = time.perf_counter()
        self.trainer.seconds[self.trainer.model_round()] += now - self.clock
        self.clock = now

    def after_step(self, loss, grad_norm) -> None:
        self.cfg = self.trainer.cfg  # the round's student config: its steps for the grid, its record for the files
        if self.round_ended() and self.runlog:
            self.tick()
            trainer, r = self.trainer, self.trainer.model_round()
            path = os.path.join(self.ckpt_dir, f"student_{trainer.cfg.sample.steps}steps.pt")
            save_checkpoint(round_checkpoint(trainer), path)  # before last.pt: a kill between
            self.runlog.message(f"round {r + 1}/{trainer.rounds}: {trainer.cfg.sample.steps}-step student in "
                                f"{trainer.seconds[r]:.0f} s; {path}")   # the two redoes the round's end
        super().after_step(loss, grad_norm)
        self.describe()

    def save(self) -> None:
        self.tick()
        super().save()


def load_run(args):
    """(student config of round 0, the run's paths, teacher checkpoint, the run's last.pt or None), every check done
    before anything is written."""
    if args.name is not None and not is_run_name(args.name):
        raise UserError(f"--name '{args.name}' is a run name, not a path: no '/', '\\', or a name of dots")
    teacher = load_checkpoint(args.teacher)
    steps = [] if args.steps is None else [f"distill.steps={args.steps}"]
    cfg = config_from_dict(teacher["config"], args.overrides + steps)
    check_same_architecture(teacher, cfg, args.teacher)
    rounds = check_distill(cfg)
    abar = GaussianDiffusion(cfg.diffusion).alphas_cumprod64
    for r in range(rounds):
        round_grid(abar, cfg.distill.start_steps >> r, cfg.sample.spacing)
    name = args.name or f"{cfg.name}-distill{cfg.distill.steps}"
    ckpt_dir = os.path.join("checkpoints", name)
    last = os.path.join(ckpt_dir, "last.pt")
    resume = load_checkpoint(last) if os.path.exists(last) else None
    if resume is not None:
        check_same_run(resume, cfg, last, name)
    paths = RunPaths(name, ckpt_dir, os.path.join("results", name), last if resume is not None else None)
    return student_config(cfg, name, rounds, 0), paths, teacher, resume


def check_same_run(resume: dict, cfg, last: str, name: str) -> None:
    """The run's last.pt is a distillation's, started with these distill settings."""
    if "distill_state" not in resume:
        raise UserError(f"{last} is not a distillation run's checkpoint; give another --name")
    saved, now = resume["config"]["distill"], to_dict(cfg)["distill"]
    diffs = [f"distill.{k}: {saved.get(k)!r} then, {v!r} now" for k, v in now.items() if saved.get(k) != v]
    if diffs:
        raise UserError(f"run '{name}' was started with other settings ({'; '.join(diffs)}); give the same "
                        "ones to resume, or a new --name")


def run(args, process):
    cfg, paths, teacher, resume = load_run(args)
    check_batch_split(cfg.train, process.world)
    with contextlib.ExitStack() as stack:
        if process.rank == 0:
            stack.enter_context(FolderLock(paths.ckpt_dir, "distillation run"))
            for folder in (paths.ckpt_dir, paths.out_dir):
                check_writable(folder, folder=True)
        enable_tf32(process.device)
        cfg, dataset = load_data(cfg, process, teacher, args.teacher)  # a latent teacher's latents (its autoencoder)
        trainer = DistillTrainer(cfg, process, dataset, teacher, os.path.abspath(args.teacher))
        del teacher
        if resume is not None:
            trainer.load_state_dict(resume)
        history = resume.get("log") if resume else None
        del resume
        stack.callback(trainer.release)
        stop = stack.enter_context(StopSignal())
        runlog = (stack.enter_context(open_runlog(trainer.cfg, trainer, paths, history))
                  if process.rank == 0 else None)
        DistillRun(trainer, paths, runlog, stop).loop()


@cli
def main(argv=None):
    args = parse_args(argv)
    with process_group(args.device) as process:
        run(args, process)


if __name__ == "__main__":
    main()
