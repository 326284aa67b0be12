"""Writes legacy_tiny_ddpm_expected.pt: what legacy_tiny.pt gave with the code of commit d3e43c5, from before
learned variances and respaced DDPM existed: DDPM samples over all T (fixed_large, its own variance, and
fixed_small), and the training loss of a seeded batch. Run it in a copy of that commit, not in the current tree:

    git archive d3e43c5 | tar -x -C /tmp/d3e43c5 && cd /tmp/d3e43c5 && python3 /path/to/this.py /path/to/tests/data
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

from ddpm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ddpm.generation import generate  # noqa: E402


def outputs(path):
    out = {}
    for variance in ("fixed_large", "fixed_small"):
        cfg, model, diffusion = model_from_checkpoint(load_checkpoint(path), "cpu",
                                                      overrides=[f"diffusion.variance={variance}"])
        s = dataclasses.replace(cfg.sample, sampler="ddpm", precision="fp32")
        out[f"ddpm_{variance}"] = generate(model, diffusion, 2, s, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t, noise = torch.tensor([0, 5, 12, 19]), torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        out.update(x0=x0, t=t, noise=noise, loss=diffusion.loss(model, x0, t=t, noise=noise))
    return out


if __name__ == "__main__":
    torch.save(outputs(os.path.join(sys.argv[1], "legacy_tiny.pt")),
               os.path.join(sys.argv[1], "legacy_tiny_ddpm_expected.pt"))
