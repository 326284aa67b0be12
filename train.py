"""Train a DDPM.

    python train.py [--config configs/cifar10.yaml] [--name NAME] [--resume auto|never|PATH]
                    [--device auto|cuda|cpu] [section.field=value ...]
    torchrun --nproc_per_node=4 train.py [same options]        # one process per GPU (DDP)

Outputs: checkpoints/<name>/last.pt (+ the newest step_*.pt), results/<name>/{config.yaml, samples/,
plots/, logs/ (TensorBoard)}. An interrupted run (Ctrl-C, SIGTERM, kill -9, a crash) continues where it
stopped when the same command is run again.

One step, in order: a batch from the data stream (dataset.Batches), the loss of the network on it
(GaussianDiffusion.loss), backward, the clipped optimiser step, the EMA of the weights; every few steps
the run logs, draws a grid, scores FID and writes a checkpoint (TrainingRun.loop).

A text-conditional model (model.text_encoder) trains on captions: each distinct caption of the data is encoded
once, at the start, into a table on the device (text.py), and a step indexes it by the batch's caption ids.

Reproducibility: the timesteps, noise and label dropout of step k are drawn from a generator seeded by
(seed, k) over the whole global batch, then sliced per process and micro-batch. So a resumed run, a run
with gradient accumulation and a run on several processes see exactly the same numbers as one plain run.
"""
import contextlib
import copy
import gc
import math
import os
import time

import torch
import torch.distributed as dist

from captions import caption_summary
from checkpoint import (
    check_same_architecture,
    load_checkpoint,
    load_weights,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from config import check_batch_split, config_from_dict, dump, load_config, resolved, schedule_warning, to_dict
from dataset import Batches, build_dataset, num_classes, preload_wanted, stream_seed
from diffusion import GaussianDiffusion
from distributed import close_distributed, setup_distributed, wait_for_all
from model import UNet
from text import grid_captions, prompt_encoder
from utils import (
    ArgumentParser,
    FolderLock,
    StopSignal,
    UserError,
    atomic_write,
    autocast_dtype,
    check_writable,
    cli,
    enable_tf32,
    first_call_or_fallback,
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


def lr_factor(step: int, train_cfg) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at max_steps."""
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, train_cfg.max_steps - warmup)))
    return 1.0


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay warms up as (1 + k)/(10 + k) so early EMA weights are not stuck at the random init."""
    return min(decay, (1 + step) / (10 + step))


def step_randomness(gen, cfg, step, shape, rank, world, device, conditional):
    """Timesteps, noise and the label-drop mask of step `step` (None for an unconditional model), drawn over the
    global batch; this rank's slice."""
    gen.manual_seed(stream_seed("step", cfg.train.seed, step))
    b = cfg.train.batch_size
    timesteps = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=gen, device=device)
    noise = torch.randn((b, *shape), generator=gen, device=device)
    drop = torch.rand(b, generator=gen, device=device) < cfg.train.cond_drop_prob if conditional else None
    sl = slice(rank * b // world, (rank + 1) * b // world)
    return timesteps[sl], noise[sl], drop[sl] if conditional else None


# ---- one optimisation step ----------------------------------------------------------------------------------

class Trainer:
    """The model, its EMA, the optimiser and the data stream of a run, and one optimisation step.

    text_state: a text model's caption encoder from its checkpoint (None: a new vocabulary of the data's captions)."""

    def __init__(self, cfg, device, rank, world, dataset, log=print, text_state=None):
        self.cfg, self.device, self.rank, self.world, self.log = cfg, device, rank, world, log
        tc = cfg.train
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
            torch.use_deterministic_algorithms(True)
        self.text_state, self.captions = text_state, None
        if cfg.model.text_encoder:  # the condition of each distinct caption, on the device: a step indexes it
            encoder = prompt_encoder(cfg.model, text_state, dataset.captions, device)
            say = print if rank == 0 else (lambda *a, **k: None)
            self.text_state, self.captions = encoder.state(), encoder.encode(dataset.captions, say).to(device)
        torch.manual_seed(tc.seed)
        self.model = UNet.from_config(cfg, self.text_state).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else None
        self.eager = self.ddp or self.model  # what backward runs through; `net` may be its compiled version
        self.compiled = device.type == "cuda" if tc.compile == "auto" else tc.compile
        self.net = torch.compile(self.eager) if self.compiled else self.eager

        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                           fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, tc))
        self.amp_dtype = autocast_dtype(tc.precision, device)
        # Always a scaler: its on-device found_inf check skips a non-finite step without a host sync.
        # Only fp16 needs real loss scaling; otherwise the scale is pinned to 1 after each update.
        self.fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if self.fp16 else 1.0)
        self.gen = torch.Generator(device)
        self.batches = Batches(dataset, tc.batch_size, seed=tc.seed, device=device, hflip=cfg.data.hflip,
                               preload=preload_wanted(cfg.data, dataset), num_workers=tc.num_workers,
                               rank=rank, world_size=world)
        self.conditional = cfg.model.num_classes is not None or self.captions is not None
        self.step = 0
        self.bad_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite losses
        self.bad_total = torch.zeros((), device=device, dtype=torch.long)

    def state_dict(self) -> dict:
        text = {"text": self.text_state} if self.text_state is not None else {}
        return {"step": self.step, "config": to_dict(self.cfg), "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.device), "data": self.batches.state_dict(), **text}

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
        tc = self.cfg.train
        for group in self.opt.param_groups:
            group.update(initial_lr=tc.lr, weight_decay=tc.weight_decay, fused=self.device.type == "cuda",
                         lr=tc.lr * lr_factor(self.sched.last_epoch, tc))
        self.sched.base_lrs = [tc.lr] * len(self.opt.param_groups)

    def train_step(self):
        """One optimiser step over the global batch; returns (loss, grad_norm) as device tensors."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        x, y = next(self.batches)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        timesteps, noise, drop = step_randomness(self.gen, cfg, self.step, x.shape[1:], self.rank, self.world,
                                                 self.device, self.conditional)
        # dropout masks from (seed, rank, step): exact on resume on every rank, and different across ranks
        torch.manual_seed(stream_seed("dropout", cfg.train.seed, self.rank, self.step))
        y = self.condition(y, drop)
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            part = slice(i * x.shape[0] // accum, (i + 1) * x.shape[0] // accum)
            # all-reduce the gradients once, on the last micro-batch
            sync = self.ddp.no_sync() if self.ddp and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss = self.diffusion.loss(self.net, x[part], None if y is None else y[part],
                                               timesteps[part], noise[part]) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        grad_norm = self._optimiser_step()
        self._update_ema()
        finite = torch.isfinite(total)
        self.bad_streak = torch.where(finite, 0, self.bad_streak + 1)
        self.bad_total += (~finite).long()
        self.step += 1
        return total, grad_norm

    def condition(self, y, drop=None):
        """The network's condition for the batch's labels y: None (unconditional), the labels, or the encodings of
        the captions with these ids; those where `drop` is true replaced by the null condition."""
        if not self.conditional:
            return None
        cond = y if self.captions is None else self.captions[y]
        if drop is None:
            return cond
        return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), self.model.null_condition(cond), cond)

    def _optimiser_step(self):
        """Clip the global gradient norm, step (skipped on the device when non-finite), advance the LR."""
        self.scaler.unscale_(self.opt)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update(None if self.fp16 else 1.0)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return grad_norm

    @torch.no_grad()
    def _update_ema(self):
        """ema <- decay ema + (1 - decay) weights, as one fused lerp over all parameters."""
        torch._foreach_lerp_(self.ema_params, self.params, 1 - ema_decay(self.step, self.cfg.train.ema_decay))

    def train_step_with_compile_fallback(self):
        """train_step; when torch.compile fails on it, one message, and the same step again in eager mode."""
        if not self.compiled:
            return self.train_step()
        position = self.batches.state_dict()

        def eager_step():
            self.net, self.compiled = self.eager, False
            self.opt.zero_grad(set_to_none=True)
            self.batches.load_state_dict(position)  # the failed attempt uses up no batch
            return self.train_step()
        return first_call_or_fallback(self.train_step, eager_step, self.log,
                                      "training in eager mode (set train.compile=false to skip compiling)")

    def release(self):
        """Drop the DDP wrapper and free it now: it holds the process group, and one freed only when the
        interpreter shuts down can abort the process ('terminate called without an active exception')."""
        if self.ddp is not None:
            self.ddp = None
            self.eager = self.net = self.model
            gc.collect()


# ---- the run: when to log, draw, score, save and stop --------------------------------------------------------

class TrainingRun:
    """A Trainer and what happens around its steps. Only rank 0 has a RunLog and writes files."""

    def __init__(self, trainer, ckpt_dir, out_dir, runlog, stop, extractor=None):
        self.trainer, self.cfg, self.world = trainer, trainer.cfg, trainer.world
        self.ckpt_dir, self.out_dir, self.runlog, self.stop_signal = ckpt_dir, out_dir, runlog, stop
        self.extractor = extractor
        self.saved_step, self.warned = trainer.step, 0
        self.loss_sum, self.logged_steps, self.last_log = 0, 0, time.perf_counter()

    def loop(self):
        tc, trainer = self.cfg.train, self.trainer
        first = trainer.step
        while trainer.step < tc.max_steps:
            loss, grad_norm = (trainer.train_step_with_compile_fallback() if trainer.step == first
                               else trainer.train_step())
            self.loss_sum, self.logged_steps = self.loss_sum + loss, self.logged_steps + 1
            agreed_signal = self.log(grad_norm) if self.due(tc.log_every) else 0
            if self.runlog:
                self.runlog.advance(trainer.step)
                if self.due(tc.sample_every):
                    self.sample_grid()
                if tc.fid_every and trainer.step % tc.fid_every == 0:
                    self.log_fid()
            # one process stops at once; several stop only on the signal they agreed on at a log step
            signum = self.stop_signal.signum if self.world == 1 else agreed_signal
            if (self.due(tc.save_every) or signum) and trainer.step != self.saved_step:
                self.save()
            if signum:
                self.stop(signum)
        if self.runlog:
            self.runlog.write_files()
            print(f"done: {tc.max_steps} steps; checkpoint {self.ckpt_dir}/last.pt, outputs in {self.out_dir}/")
        wait_for_all(self.world)

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
        from sampling import generate
        cfg, trainer = self.cfg, self.trainer
        gen = torch.Generator(trainer.device).manual_seed(cfg.train.seed)
        labels, nrow = None, None
        if cfg.model.num_classes is not None:
            labels = torch.arange(cfg.train.sample_n, device=trainer.device) % cfg.model.num_classes
        elif trainer.captions is not None:  # a row per caption
            labels, nrow = self.grid_conditions()
        x = generate(trainer.ema, trainer.diffusion, cfg.train.sample_n, cfg.sample, gen, trainer.device, labels)
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
        from metrics import append_record, fid_of
        from sampling import sampler_record
        cfg, step, n = self.cfg, self.trainer.step, self.cfg.train.fid_samples
        fid = fid_of(self.trainer.ema, self.trainer.diffusion, cfg, n, self.trainer.device, self.extractor)
        self.runlog.scalar("eval/fid", fid, step)
        self.runlog.message(f"step {step}: FID {fid:.2f} ({n} samples)")
        append_record(os.path.join(self.out_dir, "metrics.json"),
                      {"step": step, "fid": fid, "n": n, **sampler_record(cfg.sample, cfg.diffusion.timesteps),
                       "source": "train.fid_every"})

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

def load_run(args):
    """(config, run name, checkpoint folder, results folder, resume path or None, loaded checkpoint or None).

    Without --config, a resumed run takes the checkpoint's own config, and with --resume PATH its name."""
    cfg = load_config(args.config, args.overrides)
    if args.name is not None and not is_run_name(args.name):
        raise UserError(f"--name '{args.name}' is a run name, not a path: no '/', '\\', or a name of dots; "
                        "outputs go to checkpoints/NAME and results/NAME")
    given = args.resume not in ("auto", "never")
    ckpt = load_checkpoint(args.resume) if given else None
    own_config = args.config is None
    name = args.name or (ckpt["config"].get("name") if ckpt and own_config else None) or cfg.name
    ckpt_dir, out_dir = os.path.join("checkpoints", name), os.path.join("results", name)
    last = os.path.join(ckpt_dir, "last.pt")
    if given and os.path.exists(last) and not os.path.samefile(last, args.resume):
        raise UserError(f"--resume {args.resume} would write into run '{name}', whose {last} is another "
                        "checkpoint; give a new --name")
    if args.resume == "never" and os.path.exists(last):
        raise UserError(f"{last} exists and --resume never would overwrite it; use another --name, "
                        "or delete that folder to start over")
    path = args.resume if given else (last if args.resume == "auto" and os.path.exists(last) else None)
    if ckpt is None and path:
        ckpt = load_checkpoint(path)
    if ckpt is not None and own_config:
        cfg = config_from_dict(ckpt["config"], args.overrides)
    return cfg, name, ckpt_dir, out_dir, path, ckpt


def is_run_name(name: str) -> bool:
    return bool(name) and not set(name) & {"/", "\\", "\0"} and name.strip(".") != ""


def load_data(cfg, rank, world):
    """The data set; rank 0 downloads or decodes and caches it first, alone, then the others read it."""
    if rank != 0:
        wait_for_all(world)
    dataset = build_dataset(cfg.data, captions=cfg.model.text_encoder is not None)
    if rank == 0:
        wait_for_all(world)
    if dataset.captions is not None:
        summary = caption_summary(dataset)  # on every rank: a set without captions stops them all
        if rank == 0:
            print(summary)
    return dataset


@cli
def main(argv=None, extractor=None):
    """extractor: the FID feature network for train.fid_every (default: the Inception of metrics.py)."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        run(args, rank, world, device, extractor)
    finally:
        close_distributed(world)


def run(args, rank, world, device, extractor=None):
    cfg, name, ckpt_dir, out_dir, path, ckpt = load_run(args)
    check_batch_split(cfg.train, world)
    if ckpt is None and cfg.train.max_steps == 0:
        raise UserError("train.max_steps=0 on a new run trains nothing and writes no checkpoint; give "
                        "train.max_steps of at least 1")
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(FolderLock(ckpt_dir, "training run"))  # a second run of this name is refused
            for folder in (ckpt_dir, out_dir):  # fail now, not at the first save hours later
                check_writable(folder, folder=True)
        cfg, trainer, history = start_trainer(cfg, name, rank, world, device, ckpt, path)
        del ckpt  # the weights now live in the trainer
        stack.callback(trainer.release)
        if cfg.train.fid_every and rank == 0 and extractor is None:
            from metrics import load_inception  # now: a missing weights file fails before training
            extractor = load_inception(None, device)
        stop = stack.enter_context(StopSignal())
        runlog = stack.enter_context(open_runlog(cfg, trainer, ckpt_dir, out_dir, path, history)) if rank == 0 else None
        TrainingRun(trainer, ckpt_dir, out_dir, runlog, stop, extractor).loop()


def start_trainer(cfg, name, rank, world, device, ckpt, path):
    """(config with its run-time values resolved, Trainer at the checkpoint's state, the checkpoint's log)."""
    enable_tf32(device)
    dataset = load_data(cfg, rank, world)
    auto = cfg.model.num_classes == "auto"
    cfg = resolved(cfg, name=name, num_classes=num_classes(dataset) if auto else cfg.model.num_classes)
    if ckpt is not None:
        check_same_architecture(ckpt, cfg, path)
    if rank == 0 and (warning := schedule_warning(cfg.diffusion)):
        print(warning)
    trainer = Trainer(cfg, device, rank, world, dataset, text_state=ckpt.get("text") if ckpt else None)
    if ckpt is None:
        return cfg, trainer, None
    trainer.load_state_dict(ckpt)
    return cfg, trainer, ckpt.get("log")


@contextlib.contextmanager
def open_runlog(cfg, trainer, ckpt_dir, out_dir, path, history):
    """Rank 0's RunLog, after printing the config and writing it to results/<name>/config.yaml."""
    from runlog import RunLog
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


if __name__ == "__main__":
    main()
