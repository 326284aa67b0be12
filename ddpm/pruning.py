"""Structured channel pruning of the U-Net as in Diff-Pruning (Fang et al. 2023, "Structural Pruning for Diffusion
Models"), on torch-pruning's dependency graph (Fang et al. 2023, "DepGraph").

Importance is the first-order Taylor score |w dL/dw| of the diffusion loss (Molchanov et al. 2019), with the
gradient of L = sum_{t=0}^{t*} L_t accumulated over the early timesteps: t = 0, 1, 2, ... until L_t falls below
`threshold` x max_{s<=t} L_s (Diff-Pruning's stopping rule, their thr = 0.05), the later steps being the ones whose
coarse content the pruned network must keep anyway. Channels coupled by residual additions, skip concatenations,
the time embedding's addition and GroupNorm are found by torch-pruning's DependencyGraph and pruned together.

GroupNorm: the pruned network keeps every norm's number of groups (as torch-pruning does), each with fewer channels;
in every run of `unit` consecutive channels (the common size of the norms' groups) the same fraction `keep` is kept,
the channels of the lowest summed score, so an aligned group keeps its own channels. The widths go into
model.widths (config_rules.nominal_widths), so the pruned checkpoint is plain tensors and a config.
"""
import dataclasses
import math
from fractions import Fraction

import torch
import torch.nn as nn

from model import Attention, Block, CrossAttention, Downsample, UNet, Upsample
from utils import UserError

INSTALL = "pip install -r requirements-compress.txt"


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise UserError(f"pruning needs torch-pruning: {INSTALL}") from None
    return torch_pruning


def recorded_widths(model: UNet) -> list[int]:
    """The actual widths of `model` in the order of config_rules.nominal_widths (what model.widths holds)."""
    widths = [model.conv_in.out_channels]
    for layer in [*model.down, *model.mid, *model.up]:
        if isinstance(layer, Block):
            widths += [layer.res.conv1.out_channels, layer.res.conv2.out_channels]
        else:
            widths.append(layer.conv.out_channels)
    return widths


def norm_unit(model: UNet) -> int:
    """The pruning unit: the greatest common size of the groups of all GroupNorms (channels per group)."""
    return math.gcd(*[n.num_channels // n.num_groups for n in model.modules() if isinstance(n, nn.GroupNorm)])


def keep_fraction(model: UNet, ratio: float) -> Fraction:
    """The fraction of channels a pruning `ratio` keeps, rounded to whole channels per unit (norm_unit); a ratio
    that keeps none of a group's channels, or removes none, is a UserError."""
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be in (0, 1), the fraction of channels to remove; got {ratio}")
    unit = norm_unit(model)
    kept = round((1 - ratio) * unit)
    if kept < 1:
        raise UserError(f"--ratio {ratio} would leave fewer than one channel per GroupNorm group (groups of {unit} "
                        f"channels here); the most it can remove is {1 - 1 / unit:.3g} (one channel a group kept)")
    if kept == unit:
        raise UserError(f"--ratio {ratio} removes no channel: the GroupNorm groups of {unit} channels here are "
                        f"pruned in steps of 1/{unit}, so give at least {1 / (2 * unit):.3g}")
    return Fraction(kept, unit)


def ignored_layers(model: UNet) -> list[nn.Module]:
    """Layers whose outputs stay as they are: the image output, the time/label/text embeddings (their width is
    the embedding's), and the queries, keys and values of attention (their width stays nominal; model.py)."""
    ignored = [model.conv_out, *model.time_mlp, model.label_emb, model.text_encoder, model.text_proj]
    for m in model.modules():
        if isinstance(m, Attention):
            ignored.append(m.qkv)
        elif isinstance(m, CrossAttention):
            ignored += [m.q, m.kv]
    return [m for m in ignored if isinstance(m, nn.Module)]


def accumulate_taylor_gradients(model, diffusion, batches, threshold: float, max_t: int) -> list[float]:
    """Diff-Pruning's gradients: for t = 0, 1, ..., backward of the loss L_t at the single timestep t on every
    batch (x_0, cond, noise) until L_t < threshold x the largest L_s so far, or t = max_t - 1. The gradients
    add up in .grad; returns the losses L_t (mean over the batches) of the timesteps used."""
    model.zero_grad(set_to_none=True)
    losses = []
    for t in range(min(max_t, diffusion.num_timesteps)):
        total = 0.0
        for x0, cond, noise in batches:
            loss = diffusion.loss(model, x0, cond, torch.full((len(x0),), t, dtype=torch.long), noise)
            loss.backward()
            total += loss.item() / len(batches)
        losses.append(total)
        if total < threshold * max(losses):
            break
    return losses


def prune_indices(scores: torch.Tensor, keep: Fraction, unit: int) -> list[int]:
    """Within each run of `unit` channels, the indices of the unit x (1 - keep) lowest scores."""
    runs = scores.reshape(-1, unit)  # (channels / unit, unit)
    drop = unit - int(keep * unit)
    lowest = runs.argsort(dim=1)[:, :drop]  # (runs, drop)
    return (lowest + unit * torch.arange(len(runs))[:, None]).flatten().sort().values.tolist()


def prune_model(model: UNet, example_inputs: tuple, keep: Fraction) -> UNet:
    """Prune `model` in place (its .grad must hold the accumulated gradients): every dependency group keeps
    `keep` of its channels by the grouped Taylor score. Returns the model."""
    tp = require_torch_pruning()
    unit = norm_unit(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    importance = tp.importance.GroupTaylorImportance()
    groups = list(graph.get_all_groups(ignored_layers=ignored_layers(model),
                                       root_module_types=[nn.Conv2d, nn.Linear]))
    plans = []
    for group in groups:  # score every group before any is pruned: pruning changes the other groups' tensors
        scores = importance(group)
        if scores is None or len(scores) % unit:
            raise UserError(f"cannot prune a group of {len(scores)} channels in units of {unit} "
                            f"({group[0].dep.target.name})")
        plans.append((group[0].dep.target.module, group[0].dep.handler, prune_indices(scores, keep, unit)))
    for module, handler, idxs in plans:
        if idxs:
            graph.get_pruning_group(module, handler, idxs).prune()
    return model


def pruned_config(cfg, model: UNet):
    """cfg with model.widths recording the widths of the pruned `model`."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, widths=tuple(recorded_widths(model))))


def check_structure(model: UNet, nominal: UNet) -> None:
    """The pruned network is the nominal one's structure: same GroupNorm groups, identity skips still square."""
    for (name, m), n in zip(model.named_modules(), nominal.modules()):
        if isinstance(m, nn.GroupNorm) and m.num_groups != n.num_groups:
            raise UserError(f"pruning changed the groups of {name}")
    for layer in [*model.down, *model.mid, *model.up]:
        if isinstance(layer, (Downsample, Upsample)):
            continue
        res = layer.res
        if isinstance(res.skip, nn.Identity) and res.conv1.in_channels != res.conv2.out_channels:
            raise UserError("pruning left a residual block with different input and output widths")
