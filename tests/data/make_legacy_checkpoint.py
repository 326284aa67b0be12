"""Writes legacy_tiny.pt (a checkpoint) and legacy_tiny_expected.pt (what it gave) with the code of commit c8364ef,
from before the model options time_embedding, downsample_padding and norm_eps existed. Run it in a copy of that
commit, not in the current tree:

    git archive c8364ef | tar -x -C /tmp/c8364ef && cd /tmp/c8364ef && python3 /path/to/this.py /path/to/tests/data
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))

from helpers import tiny_checkpoint  # noqa: E402

from ddpm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402

STEPS = [19, 14, 9, 4]  # an explicit DDIM timestep list: the expected images do not depend on a spacing rule


def outputs(model, diffusion):
    """The network's output at three t, and DDIM images (eta = 0) over STEPS, from seeded inputs (float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 7, 19])
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    x_t = x_T
    denoise = diffusion.denoiser(model)
    with torch.no_grad():
        eps = model(x, t)
        for s, s_prev in zip(STEPS, STEPS[1:] + [-1]):
            step = torch.full((2,), s)
            x_t, _ = diffusion.ddim_step(denoise, x_t, step, torch.full((2,), s_prev), torch.zeros_like(x_t), 0.0)
    return {"x": x, "t": t, "eps": eps, "x_T": x_T, "steps": STEPS, "images": x_t}


def main(out_dir):
    path = tiny_checkpoint(os.path.join(out_dir, "legacy_tiny.pt"), "model.base_channels=8")
    _, model, diffusion = model_from_checkpoint(load_checkpoint(path), "cpu")
    torch.save(outputs(model, diffusion), os.path.join(out_dir, "legacy_tiny_expected.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
