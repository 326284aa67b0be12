"""Per-timestep weights of the training loss and how its timesteps are drawn.

Min-SNR-gamma (Hang et al. 2023): with SNR_t = alpha-bar_t / (1 - alpha-bar_t), the loss at t is weighted so that,
measured as an error of x_0, it is min(SNR_t, gamma) || x_0 - x_0_hat ||^2: no timestep of high SNR dominates.
The same weight in each parametrisation, whose squared error is SNR_t (eps) or SNR_t + 1 (v) times less:
    eps: min(SNR_t, gamma) / SNR_t     x_0: min(SNR_t, gamma)     v: min(SNR_t, gamma) / (SNR_t + 1)

The loss-aware sampler (improved DDPM sec. 3.3, improved-diffusion's LossSecondMomentResampler): t is drawn with
p_t proportional to sqrt(E[L_t^2]), estimated from the last 10 losses of each t, mixed with 0.001 of the uniform
distribution, and uniform until every t has 10; each loss is weighted 1 / (T p_t), so its mean still estimates the
uniform one, with less variance.
"""
import numpy as np
import torch


def min_snr_weights(alphas_cumprod64: np.ndarray, gamma: float, objective: str) -> np.ndarray:
    """The Min-SNR-gamma weight of every timestep index for the objective 'eps', 'x0' or 'v' (float64)."""
    abar = np.asarray(alphas_cumprod64, dtype=np.float64)
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[objective]


class UniformSampler:
    """t ~ U{0..T-1}, every weight 1."""

    def __init__(self, timesteps: int):
        self.num_timesteps = timesteps

    def sample(self, n: int, generator, device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape, device=t.device)

    def update(self, t, losses) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """improved DDPM's importance sampler of timesteps (see the module docstring); its history is on the host."""

    def __init__(self, timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(timesteps)
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(timesteps, history, dtype=torch.float64)  # the last losses of each t, oldest first
        self.counts = torch.zeros(timesteps, dtype=torch.long)

    def probs(self) -> torch.Tensor:
        """p_t (float64): uniform until every t has a full history, then sqrt(mean of L_t^2), normalised and mixed
        with uniform_prob of the uniform distribution."""
        T = self.num_timesteps
        if (self.counts < self.history.shape[1]).any():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.history.pow(2).mean(1).sqrt()
        return (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob / T

    def sample(self, n, generator, device):
        return torch.multinomial(self.probs().float().to(device), n, replacement=True, generator=generator)

    def weights(self, t):
        return (1.0 / (self.num_timesteps * self.probs().to(t.device)[t])).float()

    def update(self, t, losses) -> None:
        """Append each loss to the history of its t, in batch order (the oldest one dropped from a full history);
        a batch with a non-finite loss (a skipped step) is left out."""
        losses = losses.detach().double().cpu()
        if not torch.isfinite(losses).all():
            return
        size = self.history.shape[1]
        for k, loss in zip(t.cpu().tolist(), losses.tolist()):
            if self.counts[k] == size:
                self.history[k] = torch.cat([self.history[k, 1:], torch.tensor([loss], dtype=torch.float64)])
            else:
                self.history[k, self.counts[k]] = loss
                self.counts[k] += 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.counts = state["history"].double().clone(), state["counts"].long().clone()


def timestep_sampler(kind: str, timesteps: int) -> UniformSampler:
    """train.timestep_sampler: 'uniform' or 'loss_aware'."""
    return LossAwareSampler(timesteps) if kind == "loss_aware" else UniformSampler(timesteps)
