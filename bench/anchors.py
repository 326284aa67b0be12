"""The three implementations the benchmark compares, behind one small interface.

ours:       model.UNet + diffusion.GaussianDiffusion, configs/cifar10.yaml (35.7M parameters).
diffusers:  diffusers.UNet2DModel in the google/ddpm-cifar10-32 layout + DDPMScheduler / DDIMScheduler.
lucidrains: denoising_diffusion_pytorch.Unet(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1) + its
            GaussianDiffusion (objective pred_noise, linear betas, as in the DDPM paper).

Each builder returns an Impl; an anchor whose package is missing raises ImportError, which bench.py
reports and skips. `quick` builds each network at toy size and for 16x16 images (the CPU smoke test: bf16
on a CPU without bf16 instructions is emulated and slow, so the smoke run keeps every tensor small).
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from ddpm.samplers import sample_loop  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from model import UNet  # noqa: E402

CIFAR10 = os.path.join(ROOT, "configs", "cifar10.yaml")
SIZE, QUICK_SIZE = 32, 16  # image size of the benchmark, and of its smoke mode
QUICK_OURS = ["model.base_channels=32", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
              f"model.attention_resolutions=[{QUICK_SIZE // 2}]", f"data.image_size={QUICK_SIZE}"]


@dataclass
class Impl:
    """One implementation: its network, how it trains on x0 in [-1, 1], and how it samples with DDIM.

    `net` is what torch.compile wraps; `loss(x0)` and `sample(n, steps)` always call the current `net`."""
    name: str
    version: str
    eager: torch.nn.Module
    loss_fn: Callable = None        # (net, x0) -> scalar loss
    sample_fn: Callable = None      # (net, n, steps) -> images
    forward_fn: Callable = None     # (net, x_t, t) -> predicted noise, for counting FLOPs
    size: int = SIZE                # images are size x size, 3 channels
    net: torch.nn.Module = field(init=False)

    def __post_init__(self):
        self.net = self.eager

    def loss(self, x0):
        return self.loss_fn(self.net, x0)

    def sample(self, n, steps):
        return self.sample_fn(self.net, n, steps)

    def forward(self, x_t, t):
        return self.forward_fn(self.eager, x_t, t)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.eager.parameters())


def ours(device, quick=False) -> Impl:
    cfg = load_config(CIFAR10, QUICK_OURS if quick else [])
    model = UNet.from_config(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # as train.py and sample.py do
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    size = cfg.data.image_size

    def sample_fn(net, n, steps):
        sample_cfg = dataclasses.replace(cfg.sample, sampler="ddim", steps=steps, eta=0.0)
        return sample_loop(diffusion, diffusion.denoiser(net), torch.randn(n, 3, size, size, device=device), sample_cfg)

    return Impl("ours", "this repository", model, diffusion.loss, sample_fn, lambda net, x, t: net(x, t), size)


def linear_betas(device):
    return torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, device=device)


def diffusers(device, quick=False) -> Impl:
    import diffusers as hf
    from diffusers import DDIMScheduler, UNet2DModel

    size = QUICK_SIZE if quick else SIZE
    if quick:
        layout = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    else:  # google/ddpm-cifar10-32: attention on the 16x16 maps, both ways
        layout = dict(block_out_channels=(128, 256, 256, 256),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2)
    net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, time_embedding_type="positional",
                      flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
                      attention_head_dim=None, dropout=0.1, **layout).to(device)
    alphas_cumprod = torch.cumprod(1 - linear_betas(device), 0).float()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

    def loss_fn(net, x0):  # what diffusers' train_unconditional.py does, with its scheduler's add_noise
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample.float(), noise)

    def sample_fn(net, n, steps):  # diffusers' DDIMPipeline loop, eta = 0
        scheduler.set_timesteps(steps)
        x = torch.randn(n, 3, size, size, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t).sample, t, x).prev_sample
        return x

    return Impl("diffusers", hf.__version__, net, loss_fn, sample_fn, lambda net, x, t: net(x, t).sample, size)


def lucidrains(device, quick=False) -> Impl:
    import denoising_diffusion_pytorch as ddp

    wrapper = lucid_diffusion(quick).to(device)
    net = wrapper.model

    def loss_fn(net, x0):
        wrapper.model = net
        return wrapper((x0 + 1) / 2)  # it takes images in [0, 1] and rescales them itself

    def sample_fn(net, n, steps):
        wrapper.model = net
        wrapper.sampling_timesteps, wrapper.is_ddim_sampling = steps, steps < wrapper.num_timesteps
        return wrapper.sample(batch_size=n)

    version = getattr(ddp, "__version__", None) or _dist_version("denoising-diffusion-pytorch")
    return Impl("lucidrains", version, net, loss_fn, sample_fn, lambda net, x, t: net(x, t),
                QUICK_SIZE if quick else SIZE)


def lucid_diffusion(quick=False):
    """lucidrains' Unet in its GaussianDiffusion, set to the DDPM paper's choices (its defaults are pred_v
    and a sigmoid schedule)."""
    from denoising_diffusion_pytorch import GaussianDiffusion as LucidDiffusion
    from denoising_diffusion_pytorch import Unet

    net = Unet(dim=32 if quick else 128, dim_mults=(1, 2) if quick else (1, 2, 2, 2), dropout=0.1)
    return LucidDiffusion(net, image_size=QUICK_SIZE if quick else SIZE, timesteps=1000, sampling_timesteps=50,
                          objective="pred_noise", beta_schedule="linear")


def lucidrains_trainer(folder, batch, precision, results_folder, quick=False):
    """lucidrains' own Trainer on an image folder: its DataLoader, Adam, EMA and accelerate's autocast."""
    from denoising_diffusion_pytorch import Trainer

    return Trainer(lucid_diffusion(quick), folder, train_batch_size=batch, train_lr=2e-4, train_num_steps=0,
                   save_and_sample_every=10 ** 9, results_folder=results_folder, amp=precision != "fp32",
                   mixed_precision_type=precision if precision != "fp32" else "no", calculate_fid=False)


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


BUILDERS = {"ours": ours, "diffusers": diffusers, "lucidrains": lucidrains}
PACKAGES = {"diffusers": ("diffusers", "diffusers"),  # anchor: (module, PyPI name)
            "lucidrains": ("denoising_diffusion_pytorch", "denoising-diffusion-pytorch")}
