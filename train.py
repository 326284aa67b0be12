"""Train a DDPM.

    python train.py [--config configs/cifar10.yaml] [--name NAME] [--resume auto|never|PATH]
                    [--device auto|cuda|cpu] [section.field=value ...]
    torchrun --nproc_per_node=4 train.py [same options]        # one process per GPU (DDP)

Outputs: checkpoints/<name>/last.pt (+ the newest step_*.pt), results/<name>/{config.yaml, samples/,
plots/, logs/ (TensorBoard)}. An interrupted run (Ctrl-C, SIGTERM, kill -9, a crash) continues where it
stopped when the same command is run again.

Reproducibility: the timesteps, noise and label dropout of step k are drawn from a generator seeded by
(seed, k) over the whole global batch, then sliced per process and micro-batch. So a resumed run, a run
with gradient accumulation and a run on several processes see exactly the same numbers as one plain run.
"""
import contextlib
import copy
import gc
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import check_same_architecture, load_checkpoint, load_weights, save_checkpoint
from config import config_from_dict, dump, load_config, to_dict
from dataset import Batches, build_dataset, num_classes, preload_wanted, stream_seed
from diffusion import GaussianDiffusion
from distributed import setup_distributed, wait_for_all
from model import UNet
from utils import (
    ArgumentParser,
    UserError,
    atomic_write,
    autocast_dtype,
    cli,
    make_grid,
    save_image,
    to_uint8,
)


def parse_args(argv=None):
    # allow_abbrev=False, and no option is a prefix of one of torchrun's (it would swallow it)
    p = ArgumentParser(description="Train a denoising diffusion model.", allow_abbrev=False)
    p.add_argument("--config", help="YAML config (default: configs/cifar10.yaml)")
    p.add_argument("--name", help="run name: outputs in checkpoints/NAME and results/NAME (default: config name)")
    p.add_argument("--resume", default="auto", help="auto (continue from last.pt if any), never, or a path")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.batch_size=64")
    return p.parse_args(argv)


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)))
    return 1.0


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay warms up as (1 + k)/(10 + k) so early EMA weights are not stuck at the random init."""
    return min(decay, (1 + step) / (10 + step))


def step_randomness(gen, cfg, step, shape, rank, world, device, has_labels):
    """t, noise and the label-drop mask of step `step`, drawn over the global batch, this rank's slice."""
    gen.manual_seed(stream_seed("step", cfg.train.seed, step))
    b = cfg.train.batch_size
    t = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=gen, device=device)
    noise = torch.randn((b, *shape), generator=gen, device=device)
    drop = torch.rand(b, generator=gen, device=device) < cfg.train.cond_drop_prob if has_labels else None
    sl = slice(rank * b // world, (rank + 1) * b // world)
    return t[sl], noise[sl], drop[sl] if has_labels else None


def rng_state(device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain lists: checkpoints hold no numpy
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_path(args, ckpt_dir: str) -> str | None:
    """The run's last.pt for --resume auto when it exists; None to start afresh (--resume never)."""
    last = os.path.join(ckpt_dir, "last.pt")
    if args.resume == "auto":
        return last if os.path.exists(last) else None
    if os.path.exists(last):
        raise UserError(f"{last} exists and --resume never would overwrite it; use another --name, "
                        "or delete that folder to start over")
    return None


class Trainer:
    """The model, its EMA, the optimiser and the data stream, and one optimisation step."""

    def __init__(self, cfg, device, rank, world, dataset, log):
        self.cfg, self.device, self.rank, self.world, self.log = cfg, device, rank, world, log
        t = cfg.train
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(t.seed)
        self.model = UNet.from_config(cfg).to(device)
        if rank == 0:
            print(f"UNet: {self.model.num_params() / 1e6:.2f}M parameters")
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else None
        self.eager = self.ddp or self.model
        want_compile = device.type == "cuda" if t.compile == "auto" else t.compile
        self.net = torch.compile(self.eager) if want_compile else self.eager
        self.compiled = want_compile

        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                           fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.amp_dtype = autocast_dtype(t.precision, device)
        # Always a scaler: its on-device found_inf check skips a non-finite step without a host sync.
        # Only fp16 needs real loss scaling; otherwise the scale is pinned to 1 after each update.
        self.fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if self.fp16 else 1.0)
        self.gen = torch.Generator(device)
        self.batches = Batches(dataset, t.batch_size, seed=t.seed, device=device, hflip=cfg.data.hflip,
                               preload=preload_wanted(cfg.data, dataset), num_workers=t.num_workers,
                               rank=rank, world_size=world)
        self.has_labels = cfg.model.num_classes is not None
        self.step = 0
        self.bad_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite losses
        self.bad_total = torch.zeros((), device=device, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"step": self.step, "config": to_dict(self.cfg), "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.device), "data": self.batches.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        load_weights(self.model, ckpt["model"], "the checkpoint's model weights")
        load_weights(self.ema, ckpt["ema"], "the checkpoint's EMA weights")
        if "optimizer" not in ckpt:  # weights only (convert.py): fine-tune from step 0, new optimiser and data order
            return
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self._apply_run_settings()
        self.scaler.load_state_dict(ckpt["scaler"])
        self.batches.load_state_dict(ckpt["data"])
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"], self.device)

    def _apply_run_settings(self):
        """Only the optimiser's moments and step counts come from a checkpoint: lr, weight decay and the fused
        kernel are this run's (a CPU checkpoint resumed on a GPU, or a new train.lr)."""
        t = self.cfg.train
        for group in self.opt.param_groups:
            group.update(initial_lr=t.lr, weight_decay=t.weight_decay, fused=self.device.type == "cuda")
        self.sched.base_lrs = [t.lr] * len(self.opt.param_groups)
        for group in self.opt.param_groups:
            group["lr"] = t.lr * lr_factor(self.sched.last_epoch, self.cfg)

    def train_step(self):
        """One optimiser step over the global batch; returns (loss, grad_norm) as device tensors."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        x, y = next(self.batches)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        t, noise, drop = step_randomness(self.gen, cfg, self.step, x.shape[1:], self.rank, self.world,
                                         self.device, self.has_labels)
        # dropout masks from (seed, rank, step): exact on resume on every rank, and different across ranks
        torch.manual_seed(stream_seed("dropout", cfg.train.seed, self.rank, self.step))
        y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y) if self.has_labels else None
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            part = slice(i * x.shape[0] // accum, (i + 1) * x.shape[0] // accum)
            # all-reduce the gradients once, on the last micro-batch
            sync = self.ddp.no_sync() if self.ddp and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss = self.diffusion.loss(self.net, x[part], None if y is None else y[part], t=t[part],
                                               noise=noise[part]) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.opt)
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update(None if self.fp16 else 1.0)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        with torch.no_grad():
            decay = ema_decay(self.step, cfg.train.ema_decay)
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        finite = torch.isfinite(total)
        self.bad_streak = torch.where(finite, 0, self.bad_streak + 1)
        self.bad_total += (~finite).long()
        self.step += 1
        return total, grad_norm

    def release(self):
        """Drop the DDP wrapper and free it now: it holds the process group, and one freed only when the
        interpreter shuts down can abort the process ('terminate called without an active exception')."""
        if self.ddp is not None:
            self.ddp = None
            self.eager = self.net = self.model
            gc.collect()

    def first_step(self):
        """The first step, falling back to eager mode with one message if torch.compile fails."""
        if not self.compiled:
            return self.train_step()
        state = self.batches.state_dict()
        try:
            return self.train_step()
        except Exception as e:  # compilers fail in many ways; none of them should end the run
            self.log(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     "training in eager mode (set train.compile=false to skip compiling)")
            self.net, self.compiled = self.eager, False
            self.opt.zero_grad(set_to_none=True)
            self.batches.load_state_dict(state)
            return self.train_step()


def build_run(args):
    """Config, run folders and the checkpoint to resume from (or None)."""
    cfg = load_config(args.config, args.overrides)
    given = args.resume not in ("auto", "never")
    ckpt = load_checkpoint(args.resume) if given else None
    own_config = args.config is None  # resuming without --config: the run's own config, and so its name
    name = args.name or (ckpt["config"].get("name") if ckpt and own_config else None) or cfg.name
    ckpt_dir, out_dir = os.path.join("checkpoints", name), os.path.join("results", name)
    last = os.path.join(ckpt_dir, "last.pt")
    if given and os.path.exists(last) and not os.path.samefile(last, args.resume):
        raise UserError(f"--resume {args.resume} would write into run '{name}', whose {last} is another "
                        "checkpoint; give a new --name")
    path = args.resume if given else resume_path(args, ckpt_dir)
    if ckpt is None and path:
        ckpt = load_checkpoint(path)
    if ckpt is not None and own_config:
        cfg = config_from_dict(ckpt["config"], args.overrides)
    cfg.name = name
    return cfg, ckpt_dir, out_dir, path, ckpt


def save(trainer, runlog, ckpt_dir) -> None:
    """last.pt atomically, a hard link of it as step_XXXXXXX.pt, older step files pruned, plots refreshed."""
    last = os.path.join(ckpt_dir, "last.pt")
    save_checkpoint({**trainer.state_dict(), "log": runlog.history}, last)
    step_file = os.path.join(ckpt_dir, f"step_{trainer.step:07d}.pt")
    tmp = step_file + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(last, tmp)  # last.pt is later replaced by a new file, so the link keeps this version
    except OSError:
        import shutil
        shutil.copyfile(last, tmp)
    os.replace(tmp, step_file)
    steps = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("step_") and f.endswith(".pt"))
    for old in steps[:max(0, len(steps) - trainer.cfg.train.keep_last)]:
        os.remove(os.path.join(ckpt_dir, old))
    runlog.write_files()


def sample_grid(trainer, runlog, out_dir) -> None:
    """A grid from the EMA model with fixed noise (same seed every time), so grids are comparable."""
    from sampling import generate
    cfg = trainer.cfg
    gen = torch.Generator(trainer.device).manual_seed(cfg.train.seed)
    y = None
    if trainer.has_labels:
        y = torch.arange(cfg.train.sample_n, device=trainer.device) % cfg.model.num_classes
    x = generate(trainer.ema, trainer.diffusion, cfg.train.sample_n, cfg.sample, gen, trainer.device, y)
    grid = make_grid(to_uint8(x))
    save_image(grid, os.path.join(out_dir, "samples", f"step_{trainer.step:07d}.png"))
    runlog.image("samples", grid, trainer.step)


def log_fid(trainer, runlog, out_dir, extractor) -> None:
    """FID of train.fid_samples EMA samples, to TensorBoard and results/<name>/metrics.json."""
    from evaluate import append_record, fid_of
    cfg, step = trainer.cfg, trainer.step
    fid = fid_of(trainer.ema, trainer.diffusion, cfg, cfg.train.fid_samples, trainer.device, extractor=extractor)
    runlog.scalar("eval/fid", fid, step)
    runlog.message(f"step {step}: FID {fid:.2f} ({cfg.train.fid_samples} samples)")
    append_record(os.path.join(out_dir, "metrics.json"),
                  {"step": step, "fid": fid, "n": cfg.train.fid_samples, "sampler": cfg.sample.sampler,
                   "steps": cfg.sample.steps, "eta": cfg.sample.eta, "source": "train.fid_every"})


@cli
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        run(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args, rank, world, device):
    from runlog import RunLog
    cfg, ckpt_dir, out_dir, path, ckpt = build_run(args)
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size={t.batch_size} must be divisible by processes x train.grad_accum "
                        f"= {world} x {t.grad_accum}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank != 0:
        wait_for_all(world)  # rank 0 downloads or decodes and caches the data first, alone
    dataset = build_dataset(cfg.data)
    if rank == 0:
        wait_for_all(world)
    if cfg.model.num_classes == "auto":
        cfg.model.num_classes = num_classes(dataset)
    if ckpt is not None:
        check_same_architecture(ckpt, cfg, path)
    quiet = rank != 0
    fid = None
    if t.fid_every and not quiet:  # load the Inception now: a missing weights file fails before training
        from evaluate import load_extractor
        fid = load_extractor(None, device)
    trainer = Trainer(cfg, device, rank, world, dataset, print)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    runlog = None
    try:
        if not quiet:
            runlog = RunLog(out_dir, trainer.step, t.max_steps, ckpt.get("log") if ckpt else None)
            trainer.log = runlog.message
            print(dump(cfg), end="")
            os.makedirs(ckpt_dir, exist_ok=True)
            atomic_write(os.path.join(out_dir, "config.yaml"), lambda f: f.write(dump(cfg).encode()))
            print(f"resuming from {path} at step {trainer.step}" if ckpt else f"starting run '{cfg.name}'")
        del ckpt
        train_loop(trainer, runlog, stop, cfg, ckpt_dir, out_dir, rank, world, device, fid)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if runlog is not None:
            runlog.close()
        trainer.release()


def train_loop(trainer, runlog, stop, cfg, ckpt_dir, out_dir, rank, world, device, fid_extractor):
    t, quiet = cfg.train, rank != 0

    loss_sum, n_logged, last_log, start = torch.zeros((), device=device), 0, time.perf_counter(), trainer.step
    saved_step, warned, agreed_signal = trainer.step, 0, 0
    while trainer.step < t.max_steps:
        loss, grad_norm = trainer.first_step() if trainer.step == start else trainer.train_step()
        loss_sum += loss
        n_logged += 1
        step = trainer.step
        at_log = step % t.log_every == 0 or step == t.max_steps
        if at_log:
            means = torch.stack([loss_sum / n_logged, grad_norm.float()])
            worst = torch.stack([trainer.bad_streak.float(), trainer.bad_total.float(),
                                 torch.tensor(float(stop["signal"] or 0), device=device)])
            if world > 1:  # mean loss over ranks; the worst rank's counters; any rank's signal stops them all
                dist.all_reduce(means)
                means /= world
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            (loss_avg, gnorm), (streak, bad, sig) = means.tolist(), worst.tolist()
            agreed_signal = int(sig)
            now = time.perf_counter()
            if not quiet:
                runlog.scalars(step, loss_avg, trainer.sched.get_last_lr()[0], gnorm,
                               n_logged * t.batch_size / (now - last_log))
                if bad > warned:
                    runlog.message(f"warning: skipped {int(bad)} step(s) with a non-finite loss so far")
                    warned = bad
            if streak >= t.max_nonfinite:
                raise UserError(f"the loss was non-finite for {int(streak)} steps in a row (up to step {step}); "
                                f"the last good checkpoint is {ckpt_dir}/last.pt (step {saved_step}); lower train.lr, "
                                "use train.precision=bf16 or fp32, or check the data")
            loss_sum, n_logged, last_log = torch.zeros((), device=device), 0, now
        if not quiet:
            runlog.advance(step)
            if step % t.sample_every == 0 or step == t.max_steps:
                sample_grid(trainer, runlog, out_dir)
            if t.fid_every and step % t.fid_every == 0:
                log_fid(trainer, runlog, out_dir, fid_extractor)
        # one process stops at once; several stop only on the signal they agreed on at this log step
        signum = stop["signal"] if world == 1 else (agreed_signal if at_log else 0)
        interrupted = bool(signum)
        if (step % t.save_every == 0 or step == t.max_steps or interrupted) and step != saved_step:
            if not quiet:
                save(trainer, runlog, ckpt_dir)
            saved_step = step
        if interrupted:
            if not quiet:
                runlog.message(f"stopped by signal at step {step}; saved {ckpt_dir}/last.pt; "
                               "run the same command to resume")
            wait_for_all(world)
            raise SystemExit(128 + signum)
    if not quiet:
        runlog.write_files()
        print(f"done: {t.max_steps} steps; checkpoint {ckpt_dir}/last.pt, outputs in {out_dir}/")
    wait_for_all(world)


if __name__ == "__main__":
    main()
