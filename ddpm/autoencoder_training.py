"""One training step of our autoencoder (ddpm/autoencoder.py) and the state it carries, used by
train_autoencoder.py as ddpm/training_step.py's Trainer is by train.py.

One step: a batch from the data stream (ddpm/batches.Batches), z drawn from q(z | x) with noise seeded by
(seed, step), the loss (reconstruction + kl_weight KL, and the optional perceptual and adversarial terms),
backward, the clipped Adam step; after disc_start steps, one step of the discriminator on the same batch.
The checkpoint holds the weights, both optimisers, the step, the RNG state and the data position, so a resumed
run sees exactly the numbers of an uninterrupted one.
"""
import os

import torch

from config import to_dict
from dataset import preload_wanted
from ddpm.autoencoder import (
    KIND,
    Autoencoder,
    PatchDiscriminator,
    autoencoder_loss,
    hinge_discriminator_loss,
    reparameterise,
)
from ddpm.batches import Batches, stream_seed
from ddpm.checkpoint import load_weights, rng_state, set_rng_state
from utils import UserError

ADAM_BETAS = (0.5, 0.9)  # LDM's and taming-transformers' for both the autoencoder and the discriminator


def lpips_network(weight: float, device):
    """LPIPS (Zhang et al. 2018) of the `lpips` package, frozen, or None when perceptual_weight is 0. Its VGG
    weights come from torchvision's download on first use: offline they must already be in torch's cache."""
    if weight == 0:
        return None
    try:
        import lpips
    except ImportError:
        raise UserError("autoencoder.perceptual_weight needs the lpips package: pip install -r "
                        "requirements-latent.txt (or set autoencoder.perceptual_weight=0)") from None
    try:
        net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as e:  # the VGG weights are downloaded: no network, no weights
        raise UserError(f"cannot load LPIPS's VGG weights ({type(e).__name__}); put them in torch's cache or set "
                        "autoencoder.perceptual_weight=0") from None
    return net.to(device).eval().requires_grad_(False)


class AutoencoderTrainer:
    """The autoencoder, its optimiser, the optional discriminator and its optimiser, the data stream, one step."""

    def __init__(self, cfg, device, dataset):
        self.cfg, self.device, ac, tc = cfg, device, cfg.autoencoder, cfg.train
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(tc.seed)
        self.model = Autoencoder(ac, cfg.data.channels).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=ac.lr, betas=ADAM_BETAS)
        self.disc = self.disc_opt = None
        if ac.disc_weight > 0:
            self.disc = PatchDiscriminator(cfg.data.channels).to(device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=ac.lr, betas=ADAM_BETAS)
        self.perceptual = lpips_network(ac.perceptual_weight, device)
        self.batches = Batches(dataset, ac.batch_size, seed=tc.seed, device=device, hflip=cfg.data.hflip,
                               preload=preload_wanted(cfg.data, dataset), num_workers=tc.num_workers)
        self.gen = torch.Generator(device)
        self.step = 0

    def adversarial(self) -> bool:
        """Whether this step has the adversarial loss: after the warm-up of disc_start steps."""
        return self.disc is not None and self.step >= self.cfg.autoencoder.disc_start

    def train_step(self):
        """One step; returns (Losses of the autoencoder, its gradient norm, the discriminator's loss or None)."""
        x, _ = next(self.batches)
        self.gen.manual_seed(stream_seed("autoencoder", self.cfg.train.seed, self.step))
        mean, logvar = self.model.encode(x)  # (B, c, h, w) each
        z = reparameterise(mean, logvar, torch.randn(mean.shape, generator=self.gen, device=self.device))
        x_hat = self.model.decode(z)  # (B, C, H, W)
        adversarial = self.adversarial()
        losses = autoencoder_loss(x, x_hat, mean, logvar, self.cfg.autoencoder, self.perceptual,
                                  self.disc if adversarial else None)
        self.opt.zero_grad(set_to_none=True)
        losses.total.backward()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        disc_loss = self._discriminator_step(x, x_hat.detach()) if adversarial else None
        self.step += 1
        return losses, grad_norm, disc_loss

    def _discriminator_step(self, x, x_hat):
        """One step of the discriminator's hinge loss on the batch's real images and their reconstructions."""
        loss = hinge_discriminator_loss(self.disc(x), self.disc(x_hat))
        self.disc_opt.zero_grad(set_to_none=True)  # also drops what the generator's loss left on it
        loss.backward()
        self.disc_opt.step()
        return loss.detach()

    def state_dict(self) -> dict:
        disc = {"disc": self.disc.state_dict(), "disc_optimizer": self.disc_opt.state_dict()} if self.disc else {}
        return {"kind": KIND, "step": self.step, "config": to_dict(self.cfg),
                "autoencoder": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": rng_state(self.device), "data": self.batches.state_dict(), **disc}

    def load_state_dict(self, ckpt: dict) -> None:
        load_weights(self.model, ckpt["autoencoder"], "the checkpoint's autoencoder weights")
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.disc is not None and "disc" in ckpt:
            load_weights(self.disc, ckpt["disc"], "the checkpoint's discriminator weights")
            self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
        for opt in filter(None, (self.opt, self.disc_opt)):  # this run's learning rate, not the saved one
            for group in opt.param_groups:
                group["lr"] = self.cfg.autoencoder.lr
        self.batches.load_state_dict(ckpt["data"])
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"], self.device)
