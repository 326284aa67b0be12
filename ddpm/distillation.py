"""Progressive distillation (Salimans & Ho 2022, arXiv:2202.00512, Algorithm 2), used by distill.py.

A round halves the steps: its teacher samples with N DDIM steps (eta = 0) over spaced_timesteps(N), and its
student learns to take, in one DDIM step from grid[2i] to grid[2i+2], the teacher's two steps
grid[2i] -> grid[2i+1] -> grid[2i+2] (the last student step ends at the data). The student then teaches the next
round. Notation as the paper's: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), z_t = x_t,
SNR_t = alpha_t^2 / sigma_t^2; index -1 is the data (alpha = 1, sigma = 0).

The step (DistillTrainer) is the training step of ddpm/training_step.py with another loss and other randomness:
the student position i and the noise of step k of round r come from a generator seeded by (seed, r, k), so a
resumed round sees exactly the numbers of an uninterrupted one.
"""
import copy
import dataclasses

import numpy as np
import torch

from config import config_from_dict, network_shape
from ddpm.batches import stream_seed
from ddpm.checkpoint import load_weights
from ddpm.config_rules import check_distill
from ddpm.samplers import spaced_timesteps
from ddpm.training_step import Trainer
from diffusion import GaussianDiffusion, per_image
from utils import UserError

# ---- the math of a round -------------------------------------------------------------------------------------


def round_grid(alphas_cumprod64, teacher_steps: int, spacing: str) -> list[int]:
    """The teacher's N-step DDIM grid (spaced_timesteps), then -1 (the data). The student's N/2 steps visit its
    even entries, which must be spaced_timesteps(N/2): the timesteps the student is sampled with afterwards."""
    grid = spaced_timesteps(alphas_cumprod64, teacher_steps, spacing)
    if teacher_steps // 2 and grid[::2] != spaced_timesteps(alphas_cumprod64, teacher_steps // 2, spacing):
        raise UserError(f"sample.spacing={spacing}: the {teacher_steps // 2} timesteps of the student are not every "
                        f"other one of its teacher's {teacher_steps}; use sample.spacing=linspace or trailing")
    return grid + [-1]


def alpha_sigma(alphas_cumprod64, t) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) in float64 for index array t; the data (t = -1) has alpha 1, sigma 0."""
    t = np.asarray(t)
    abar = np.where(t >= 0, np.asarray(alphas_cumprod64, dtype=np.float64)[np.maximum(t, 0)], 1.0)
    return np.sqrt(abar), np.sqrt(1.0 - abar)


@dataclasses.dataclass
class RoundTable:
    """Per student step i (tensors of N/2): the timesteps t = grid[2i], t' = grid[2i+1], t'' = grid[2i+2]; alpha_t,
    sigma_t; the target's coefficients x~ = target_z2 z_t'' - target_zt z_t; the loss weight w(lambda_t)."""
    t: torch.Tensor
    t_mid: torch.Tensor
    t_next: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    target_z2: torch.Tensor
    target_zt: torch.Tensor
    weight: torch.Tensor


def round_table(alphas_cumprod64, grid: list[int], weighting: str, device=None) -> RoundTable:
    """The coefficients of a round on `grid` (round_grid), computed in float64 (stored as float32):
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (Algorithm 2), and
    w = max(SNR_t, 1) ('truncated_snr') or SNR_t + 1 ('snr_plus_one'), the weights of the x_0 error (sec. 4)."""
    if len(grid) % 2 == 0:  # N + 1 entries with the data
        raise ValueError("a round needs an even number of teacher steps")
    t, t_mid, t_next = np.array(grid[0:-1:2]), np.array(grid[1::2]), np.array(grid[2::2])
    alpha, sigma = alpha_sigma(alphas_cumprod64, t)
    alpha2, sigma2 = alpha_sigma(alphas_cumprod64, t_next)
    ratio = sigma2 / sigma
    denominator = alpha2 - ratio * alpha  # > 0: alpha_t'' > alpha_t and sigma_t'' < sigma_t
    snr = alpha ** 2 / sigma ** 2
    weight = np.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0

    def f32(a):
        return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32, device=device)

    def i64(a):
        return torch.tensor(a, dtype=torch.long, device=device)
    return RoundTable(i64(t), i64(t_mid), i64(t_next), f32(alpha), f32(sigma), f32(1 / denominator),
                      f32(ratio / denominator), f32(weight))


@torch.no_grad()
def x0_target(diffusion, denoise, x_t, table: RoundTable, i):
    """The student's x_0 target x~ at student positions i (B,): two DDIM steps (eta = 0) of the teacher, z_t ->
    z_t' -> z_t'' (diffusion.ddim_step with the teacher's `denoise`), solved for the x_0 with which one DDIM step
    from t lands on z_t'':  alpha_t'' x~ + (sigma_t''/sigma_t)(z_t - alpha_t x~) = z_t''."""
    z_mid, _ = diffusion.ddim_step(denoise, x_t, table.t[i], table.t_mid[i], 0.0, 0.0)  # eta = 0: no noise
    z_next, _ = diffusion.ddim_step(denoise, z_mid, table.t_mid[i], table.t_next[i], 0.0, 0.0)
    z2, zt = per_image(table.target_z2[i], x_t.ndim), per_image(table.target_zt[i], x_t.ndim)  # (B, 1, 1, 1)
    return z2 * z_next.float() - zt * x_t.float()


def v_target(x0_tilde, x_t, table: RoundTable, i):
    """x~ in v-space: v~ = alpha_t eps~ - sigma_t x~ with eps~ = (z_t - alpha_t x~)/sigma_t, which is
    v~ = (alpha_t z_t - x~)/sigma_t."""
    return (per_image(table.alpha[i], x_t.ndim) * x_t - x0_tilde) / per_image(table.sigma[i], x_t.ndim)


def predicted_x0(objective: str, out, x_t, table: RoundTable, i):
    """The student's x_0 from its output: x_0 = alpha_t z_t - sigma_t v (v-prediction), or the output (x0). Unlike the
    route through eps, no division by alpha_t, which is about 0 at the first step."""
    if objective == "x0":
        return out
    return per_image(table.alpha[i], x_t.ndim) * x_t - per_image(table.sigma[i], x_t.ndim) * out


def distillation_loss(objective: str, out, x0_tilde, x_t, table: RoundTable, i):
    """mean over the batch of w(lambda_t) ||x~ - x^_theta(z_t)||^2 / pixels (the paper's L_theta with its weighting;
    with v-prediction and SNR+1 it is exactly the MSE of v)."""
    err = (predicted_x0(objective, out.float(), x_t, table, i) - x0_tilde).square().flatten(1).mean(1)
    return (table.weight[i] * err).mean()


# ---- the student's configuration and the record in its checkpoints -----------------------------------------------


def student_config(cfg, name: str, rounds: int, round_index: int):
    """The config of the student of round `round_index`: the teacher's, with distill's optimiser settings in train,
    the student's objective, and DDIM (eta 0) with the round's steps as its sampler, so that sample.py, evaluate.py
    and the edits use them by default."""
    d = cfg.distill
    train = dataclasses.replace(cfg.train, lr=d.lr, batch_size=d.batch_size, max_steps=rounds * d.updates,
                                warmup_steps=0, ema_decay=d.ema_decay, optimizer="adam", weight_decay=0.0,
                                lr_schedule="constant", fid_every=0)
    sample = dataclasses.replace(cfg.sample, sampler="ddim", steps=d.start_steps >> (round_index + 1), eta=0.0)
    return dataclasses.replace(cfg, name=name, train=train, sample=sample,
                               diffusion=dataclasses.replace(cfg.diffusion, objective=d.objective))


def sampler_warning(record: dict | None, sample_cfg) -> str | None:
    """A warning when a distilled checkpoint, whose 'distilled' entry is `record` (None: not a student), is sampled
    otherwise than it was distilled for; None when it is not."""
    if not isinstance(record, dict):
        return None
    asked = (sample_cfg.sampler, sample_cfg.steps, sample_cfg.eta, sample_cfg.spacing)
    if asked == ("ddim", record["steps"], 0.0, record["spacing"]):
        return None
    return (f"warning: this student was distilled for DDIM with {record['steps']} steps (eta 0, {record['spacing']} "
            f"spacing); sampling with {sample_cfg.sampler}, {sample_cfg.steps} steps, eta {sample_cfg.eta:g}, "
            f"{sample_cfg.spacing} spacing is not what it learned and may give worse samples")


# ---- the training step -------------------------------------------------------------------------------------------


class DistillTrainer(Trainer):
    """Trainer whose step is one of progressive distillation. self.step counts over all rounds: step k of round r
    is r * updates + k; a round begins (begin_round) before its first step. `teacher`: the teacher's checkpoint
    (read from teacher_path), whose EMA weights start the student and are the first teacher."""

    def __init__(self, cfg, process, dataset, teacher: dict, teacher_path: str):
        self.updates, self.rounds = cfg.distill.updates, check_distill(cfg)  # schedule_factor needs them now
        self.teacher_path = teacher_path
        super().__init__(cfg, process, dataset, text_state=teacher.get("text"))
        # a latent model's codec (its autoencoder) is shared with the teacher, not copied
        self.teacher = copy.deepcopy(self.model, {id(self.codec): self.codec}).requires_grad_(False).eval()
        self.teacher_net = torch.compile(self.teacher) if self.compiled else self.teacher
        for module in (self.model, self.ema, self.teacher):
            load_weights(module, teacher["ema"], "the teacher's weights")
        self.teacher_round, self.teacher_objective = 0, config_from_dict(teacher["config"]).diffusion.objective
        self.teacher_diffusion = self._diffusion(self.teacher_objective)
        abar, spacing = self.diffusion.alphas_cumprod64, cfg.sample.spacing
        self.tables = [round_table(abar, round_grid(abar, cfg.distill.start_steps >> r, spacing),
                                   cfg.distill.weighting, self.device) for r in range(self.rounds)]
        self.seconds = [0.0] * self.rounds  # the time each round took, over every resume

    def _diffusion(self, objective: str) -> GaussianDiffusion:
        return GaussianDiffusion(dataclasses.replace(self.cfg.diffusion, objective=objective)).to(self.device)

    def schedule_factor(self, step: int) -> float:
        """Linear decay from distill.lr to 0 within each round (the paper's schedule)."""
        return 1.0 - (step % self.updates) / self.updates

    def model_round(self) -> int:
        """The round whose student the model is (the last finished one between two rounds)."""
        return max(0, self.step - 1) // self.updates

    def begin_round(self) -> None:
        """At the first step of round r > 0: the last student (its EMA weights) becomes the teacher and the new
        student; Adam starts afresh (the learning rate restarts by schedule_factor)."""
        r = self.step // self.updates
        if r == self.teacher_round:
            return
        with torch.no_grad():
            for module in (self.teacher, self.model):
                module.load_state_dict(self.ema.state_dict())
        self.opt.state.clear()
        self.teacher_round, self.teacher_objective = r, self.cfg.diffusion.objective
        self.teacher_diffusion = self._diffusion(self.teacher_objective)
        self.cfg = student_config(self.cfg, self.cfg.name, self.rounds, r)

    def train_step(self):
        self.begin_round()
        return super().train_step()

    def randomness(self):
        """This rank's slice of the student positions i, the noise (of the U-Net's input shape) and the label-drop
        mask of step k of round r, drawn over the global batch from a generator seeded by (seed, r, k)."""
        r, k = divmod(self.step, self.updates)
        cfg = self.cfg
        self.gen.manual_seed(stream_seed("distill", cfg.train.seed, r, k))
        b, gen, device = cfg.train.batch_size, self.gen, self.device
        channels, size = network_shape(cfg)  # the images', or a latent model's latents'
        shape = (channels, size, size)
        positions = torch.randint(0, len(self.tables[r].t), (b,), generator=gen, device=device)
        noise = torch.randn((b, *shape), generator=gen, device=device)
        drop = torch.rand(b, generator=gen, device=device) < cfg.train.cond_drop_prob if self.conditional else None
        sl = slice(self.rank * b // self.world, (self.rank + 1) * b // self.world)
        return positions[sl], noise[sl], drop[sl] if self.conditional else None

    def loss(self, x, y, positions, noise):
        """The distillation loss of a micro-batch at student positions `positions` (distillation_loss)."""
        table = self.tables[self.step // self.updates]
        t = table.t[positions]
        x_t = self.diffusion.q_sample(x, t, noise)
        denoise = self.teacher_diffusion.denoiser(self.teacher_net if self.compiled else self.teacher, y)
        target = x0_target(self.teacher_diffusion, denoise, x_t, table, positions)
        return distillation_loss(self.cfg.diffusion.objective, self.net(x_t, t, y), target, x_t, table, positions)

    def record(self) -> dict:
        """The checkpoint's 'distilled' entry: what the student was distilled for (sample.py reads it)."""
        d = self.cfg.distill
        return {"steps": self.cfg.sample.steps, "spacing": self.cfg.sample.spacing, "start_steps": d.start_steps,
                "teacher": self.teacher_path, "round_done": self.step % self.updates == 0 and self.step > 0,
                "seconds": list(self.seconds)}

    def state_dict(self) -> dict:
        state = {"teacher": self.teacher.state_dict(), "round": self.teacher_round, "objective": self.teacher_objective,
                 "seconds": self.seconds}
        return {**super().state_dict(), "distilled": self.record(), "distill_state": state}

    def load_state_dict(self, ckpt: dict) -> None:
        super().load_state_dict(ckpt)
        state = ckpt["distill_state"]
        load_weights(self.teacher, state["teacher"], "the checkpoint's teacher weights")
        self.teacher_round, self.teacher_objective = state["round"], state["objective"]
        self.teacher_diffusion = self._diffusion(self.teacher_objective)
        self.seconds = [float(v) for v in state["seconds"]]
        self.cfg = student_config(self.cfg, self.cfg.name, self.rounds, self.model_round())


RUN_STATE = ("optimizer", "scheduler", "scaler", "rng", "data", "distill_state")  # what only resuming needs


def round_checkpoint(trainer: DistillTrainer) -> dict:
    """The student at the end of a round as an ordinary checkpoint: the trainer's state (weights, config, the text
    encoder or autoencoder record, what it was distilled for) without what only resuming the run needs."""
    return {k: v for k, v in trainer.state_dict().items() if k not in RUN_STATE}
