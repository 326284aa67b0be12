"""The variational bound of a model on a set of images, in bits per dimension (ddpm/likelihood.py): what
`evaluate.py --nll` reports and `train.nll_every` logs.

    result = dataset_nll(Sampling(model, diffusion, cfg.sample, device), dataset, n=256)
    # {"bits_per_dim": 3.1, "bits_per_dim_ci95": 0.02, "prior_bits_per_dim": ..., "decoder_bits_per_dim": ..., "n": 256}

Every term of every image is one draw of x_t ~ q(x_t | x_0), from a generator seeded by (sample_cfg.seed, first
index, sample_cfg.batch_size) as the samples' are, so a score is reproducible. The 95% interval is over images
(1.96 s / sqrt(n)); it does not include the noise of the single draws, which it averages over too. Class- and
text-conditional models are scored unconditionally (the null condition).
"""
import dataclasses
import math

import torch

from dataset import build_dataset
from ddpm.generation import Sampling, batch_generator
from ddpm.likelihood import image_bound, mean_and_ci95


def dataset_nll(sampling: Sampling, dataset, n: int) -> dict:
    """The bound of sampling's model and diffusion on the first n images of `dataset` (in batches of
    sample_cfg.batch_size, the noise seeded by sample_cfg.seed; the sampler itself plays no part): mean bits/dim
    with its 95% interval, and the mean of the prior term and of the decoder term (t = 0) in bits/dim."""
    model, diffusion, device = sampling.model, sampling.diffusion, sampling.device
    batch_size, seed = sampling.sample_cfg.batch_size, sampling.sample_cfg.seed
    bits, prior, decoder = [], [], []
    model.eval()
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        x0 = torch.stack([dataset[i][0] for i in range(start, start + size)]).to(device)  # (B, C, H, W) on the levels
        bound = image_bound(diffusion, model, x0, None, batch_generator(seed, start, size, device))
        bits.append(bound.bits_per_dim)
        prior.append(bound.prior / math.log(2))
        decoder.append(bound.terms[:, 0] / math.log(2))
    mean, half = mean_and_ci95(torch.cat(bits))
    return {"bits_per_dim": mean, "bits_per_dim_ci95": half, "prior_bits_per_dim": torch.cat(prior).mean().item(),
            "decoder_bits_per_dim": torch.cat(decoder).mean().item(), "n": n}


def held_out_data(data_cfg, n: int):
    """(images a run did not train on, their name for the record): the test split of a torchvision set, or shapes
    drawn from another seed; a folder has no such split, so its first n images (named 'train')."""
    if data_cfg.dataset == "shapes":
        other = dataclasses.replace(data_cfg, seed=data_cfg.seed + 1, num_images=n)
        return build_dataset(other), f"shapes seed {other.seed}"
    if data_cfg.dataset == "folder":
        return build_dataset(data_cfg), "train"
    return build_dataset(data_cfg, train=False), f"{data_cfg.dataset}-test"
