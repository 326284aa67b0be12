"""One training step of a DDPM and the state it carries (Trainer), used by train.py; ddpm/distillation.py subclasses it.

One step, in order: a batch from the data stream (ddpm/batches.Batches), the loss of the network on it
(GaussianDiffusion.loss), backward, the clipped optimiser step, the EMA of the weights.

A text-conditional model (model.text_encoder) trains on captions: each distinct caption of the data is encoded
once, at the start, into a table on the device (text_encoders.py), and a step indexes it by the batch's caption ids.

Reproducibility: the timesteps, noise and label dropout of step k are drawn from a generator seeded by
(seed, k) over the whole global batch, then sliced per process and micro-batch. So a resumed run, a run
with gradient accumulation and a run on several processes see exactly the same numbers as one plain run.
"""
import contextlib
import copy
import gc
import math
import os

import torch

from config import network_shape, to_dict
from dataset import preload_wanted
from ddpm.batches import Batches, stream_seed
from ddpm.checkpoint import load_weights, rng_state, set_rng_state
from ddpm.loss_weights import LossAwareSampler, UniformSampler, min_snr_weights, timestep_sampler
from ddpm.text_encoders import prompt_encoder
from diffusion import GaussianDiffusion, per_image
from model import UNet
from utils import autocast_dtype, first_call_or_fallback


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


def step_randomness(gen, cfg, step: int, process, conditional: bool, sampler=None):
    """Timesteps (drawn by `sampler`, ddpm/loss_weights.py; default uniform), noise (of the U-Net's input shape) and
    the label-drop mask of step `step` (None for an unconditional model), drawn from `gen` (on the device) over the
    global batch; the slice of `process` (ddpm/distributed.Process: its rank of its world)."""
    gen.manual_seed(stream_seed("step", cfg.train.seed, step))
    b, device = cfg.train.batch_size, gen.device
    channels, size = network_shape(cfg)  # the images', or a latent model's latents'
    shape = (channels, size, size)
    timesteps = (sampler or UniformSampler(cfg.diffusion.timesteps)).sample(b, gen, device)
    noise = torch.randn((b, *shape), generator=gen, device=device)
    drop = torch.rand(b, generator=gen, device=device) < cfg.train.cond_drop_prob if conditional else None
    sl = slice(process.rank * b // process.world, (process.rank + 1) * b // process.world)
    return timesteps[sl], noise[sl], drop[sl] if conditional else None


# ---- one optimisation step ----------------------------------------------------------------------------------

class Trainer:
    """The model, its EMA, the optimiser and the data stream of a run, and one optimisation step.

    process: this process of the run (ddpm/distributed.Process: its rank, the number of processes, its device);
    text_state: a text model's caption encoder from its checkpoint (None: a new vocabulary of the data's captions)."""

    def __init__(self, cfg, process, dataset, log=print, text_state=None):
        device, rank, world = process.device, process.rank, process.world
        self.cfg, self.process, self.device, self.rank, self.world = cfg, process, device, rank, world
        self.log, tc = log, cfg.train
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
            torch.use_deterministic_algorithms(True)
        self.text_state, self.captions = text_state, None
        if cfg.model.text_encoder:  # the condition of each distinct caption, on the device: a step indexes it
            encoder = prompt_encoder(cfg.model, text_state, dataset.captions, device)
            self.text_state, self.captions = encoder.state(), encoder.encode(dataset.captions, process.say).to(device)
        torch.manual_seed(tc.seed)
        self.model = UNet.from_config(cfg, self.text_state).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # latent diffusion (ddpm/latent_cache.py): the data are latents, and the codec makes the grids' images
        self.codec = getattr(dataset, "codec", None)
        self.model.codec = self.ema.codec = self.codec
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self._diffusion_and_loss_weights(device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else None
        self.eager = self.ddp or self.model  # what backward runs through; `net` may be its compiled version
        self.compiled = device.type == "cuda" if tc.compile == "auto" else tc.compile
        self.net = torch.compile(self.eager) if self.compiled else self.eager
        self._optimiser_and_precision(tc, device)
        self.gen = torch.Generator(device)
        # latents are not flipped: their cache holds the mirrored images' latents instead
        self.batches = Batches(dataset, tc.batch_size, seed=tc.seed, device=device,
                               hflip=cfg.data.hflip and self.codec is None,
                               preload=preload_wanted(cfg.data, dataset), num_workers=tc.num_workers,
                               rank=rank, world_size=world)
        self.conditional = cfg.model.num_classes is not None or self.captions is not None
        self.step, self.step_losses = 0, []  # step_losses: see loss
        self.bad_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite losses
        self.bad_total = torch.zeros((), device=device, dtype=torch.long)

    def _optimiser_and_precision(self, tc, device) -> None:
        """Adam(W) with the LR schedule, the autocast dtype and the gradient scaler."""
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                           fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.schedule_factor)
        self.amp_dtype = autocast_dtype(tc.precision, device)
        # Always a scaler: its on-device found_inf check skips a non-finite step without a host sync.
        # Only fp16 needs real loss scaling; otherwise the scale is pinned to 1 after each update.
        self.fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if self.fp16 else 1.0)

    def _diffusion_and_loss_weights(self, device) -> None:
        """The diffusion, the timestep sampler (train.timestep_sampler) and the Min-SNR weights of each timestep
        (train.snr_gamma; None when off)."""
        cfg, tc = self.cfg, self.cfg.train
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(device)
        self.timestep_sampler = timestep_sampler(tc.timestep_sampler, cfg.diffusion.timesteps)
        self.snr_weights = None if tc.snr_gamma is None else torch.tensor(
            min_snr_weights(self.diffusion.alphas_cumprod64, tc.snr_gamma, cfg.diffusion.objective),
            dtype=torch.float32, device=device)

    def state_dict(self) -> dict:
        extra = {"text": self.text_state} if self.text_state is not None else {}
        if self.codec is not None:  # which autoencoder (ddpm/codecs.py): refused if another one resumes
            extra["latent"] = self.codec.autoencoder.record()
        return {"step": self.step, "config": to_dict(self.cfg), "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.device), "data": self.batches.state_dict(),
                "timestep_sampler": self.timestep_sampler.state_dict(), **extra}

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
        self.timestep_sampler.load_state_dict(ckpt.get("timestep_sampler") or {})
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"], self.device)

    def _apply_run_settings(self):
        """Only the optimiser's moments and step counts come from a checkpoint: lr, weight decay and the fused
        kernel are this run's (a CPU checkpoint resumed on a GPU, or a new train.lr)."""
        tc = self.cfg.train
        for group in self.opt.param_groups:
            group.update(initial_lr=tc.lr, weight_decay=tc.weight_decay, fused=self.device.type == "cuda",
                         lr=tc.lr * self.schedule_factor(self.sched.last_epoch))
        self.sched.base_lrs = [tc.lr] * len(self.opt.param_groups)

    def train_step(self):
        """One optimiser step over the global batch; returns (loss, grad_norm) as device tensors."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        x, y = next(self.batches)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        timesteps, noise, drop = self.randomness()
        # dropout masks from (seed, rank, step): exact on resume on every rank, and different across ranks
        torch.manual_seed(stream_seed("dropout", cfg.train.seed, self.rank, self.step))
        y = self.condition(y, drop)
        total, self.step_losses = torch.zeros((), device=self.device), []
        for i in range(accum):
            part = slice(i * x.shape[0] // accum, (i + 1) * x.shape[0] // accum)
            # all-reduce the gradients once, on the last micro-batch
            sync = self.ddp.no_sync() if self.ddp and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss = self.loss(x[part], None if y is None else y[part], timesteps[part], noise[part]) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.step_losses:  # the loss-aware sampler's history (see loss)
            self.timestep_sampler.update(*self._gathered(timesteps, torch.cat(self.step_losses)))
        grad_norm = self._optimiser_step()
        self._update_ema()
        finite = torch.isfinite(total)
        self.bad_streak = torch.where(finite, 0, self.bad_streak + 1)
        self.bad_total += (~finite).long()
        self.step += 1
        return total, grad_norm

    def schedule_factor(self, step: int) -> float:
        """The learning rate of optimiser step `step`, as a fraction of train.lr (lr_factor)."""
        return lr_factor(step, self.cfg.train)

    def randomness(self):
        """This step's (timesteps, noise, label-drop mask) for this rank (step_randomness), the timesteps drawn by
        the run's timestep sampler."""
        return step_randomness(self.gen, self.cfg, self.step, self.process, self.conditional, self.timestep_sampler)

    def loss(self, x, y, t, noise):
        """The loss of a micro-batch: GaussianDiffusion.loss; with Min-SNR weights or the loss-aware sampler, the
        mean of its per-example terms, L_simple's weighted by train.snr_gamma's weights and each example's by the
        sampler's 1 / (T p_t); the loss-aware sampler's per-example losses (before that weight, detached) are kept
        in step_losses for its history."""
        loss_aware = isinstance(self.timestep_sampler, LossAwareSampler)
        if self.snr_weights is None and not loss_aware:
            return self.diffusion.loss(self.net, x, y, t, noise)
        terms = self.diffusion.loss_terms(self.net, x, y, t, noise)
        if self.snr_weights is not None:
            terms.mse = terms.mse * self.snr_weights[t]
        losses = self.diffusion.hybrid(terms)
        if loss_aware:
            self.step_losses.append(losses.detach())
        return (losses * self.timestep_sampler.weights(t)).mean()

    def _gathered(self, t, losses):
        """The timesteps and per-example losses of the whole global batch, from every process, in rank order."""
        if self.world == 1:
            return t, losses
        out = [torch.empty_like(a).repeat(self.world) for a in (t, losses)]
        for o, a in zip(out, (t, losses)):
            torch.distributed.all_gather_into_tensor(o, a.contiguous())
        return out

    def condition(self, y, drop=None):
        """The network's condition for the batch's labels y: None (unconditional), the labels, or the encodings of
        the captions with these ids; those where `drop` is true replaced by the null condition."""
        if not self.conditional:
            return None
        cond = y if self.captions is None else self.captions[y]
        if drop is None:
            return cond
        return torch.where(per_image(drop, cond.ndim), self.model.null_condition(cond), cond)

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
