"""Checkpoints: one dict of plain data, written atomically, read with weights_only=True.

    {"format": FORMAT, "step": int, "config": nested dict (model.num_classes resolved),
     "model": state_dict, "ema": state_dict, "optimizer", "scheduler", "scaler": state_dicts,
     "rng": {...}, "data": {"epoch", "batch"}, "log": {"step": [...], "loss": [...], ...}}
"""
import os

import torch

from config import config_from_dict
from diffusion import GaussianDiffusion
from model import UNet
from utils import UserError, atomic_write

FORMAT = "ddpm-checkpoint-v1"

# Model options that came after the first checkpoints, with the values those were trained with: a stored config
# without a field means this value (new configs get the paper's choices, the defaults in config.py)
BEFORE_MODEL_OPTIONS = {"time_embedding": "transformer", "downsample_padding": "symmetric", "norm_eps": 1e-5}


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a crash or kill -9 mid-save leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read one of our checkpoints as data (weights_only=True); anything else is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found; train first (python train.py) or check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint '{path}' ({first[:200]}); it is damaged or not a "
                        "PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (no '{FORMAT}' marker)")
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        # the one place where a checkpoint from before the model options gets the ones it was trained with
        config["model"] = {**BEFORE_MODEL_OPTIONS, **config["model"]}
    return ckpt


def load_weights(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict, with an architecture mismatch reported as one line naming the first difference."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        if shapes:
            k = shapes[0]
            detail = f"'{k}' is {list(state_dict[k].shape)} in the checkpoint but {list(own[k].shape)} here"
        else:
            detail = f"missing: {missing[:3]}, unexpected: {unexpected[:3]}"
        raise UserError(f"{what} does not match the model architecture ({detail}); use the config the "
                        "checkpoint was trained with, or start a new run with --name/--resume never")
    module.load_state_dict(state_dict)


def check_same_architecture(ckpt: dict, cfg, path: str) -> None:
    """Name the config fields that differ from the checkpoint's, before loading any weights."""
    saved = ckpt["config"]
    diffs = [f"model.{k}: checkpoint {saved['model'][k]!r}, config {v!r}"
             for k, v in to_plain(cfg.model).items() if k in saved["model"] and to_plain(saved["model"])[k] != v]
    for k in ("image_size", "channels"):
        if saved["data"][k] != getattr(cfg.data, k):
            diffs.append(f"data.{k}: checkpoint {saved['data'][k]!r}, config {getattr(cfg.data, k)!r}")
    if saved["diffusion"]["timesteps"] != cfg.diffusion.timesteps:
        diffs.append(f"diffusion.timesteps: checkpoint {saved['diffusion']['timesteps']}, "
                     f"config {cfg.diffusion.timesteps}")
    diffs = [d for d in diffs if not d.startswith("model.dropout")]  # dropout does not change the weights
    if diffs:
        raise UserError(f"checkpoint '{path}' is from another architecture ({'; '.join(diffs)}); "
                        "use its config or start a new run with --name or --resume never")


def to_plain(section) -> dict:
    d = section if isinstance(section, dict) else vars(section)
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}


def model_from_checkpoint(ckpt: dict, device, use_ema: bool = True, overrides=()):
    """(cfg, model, diffusion) of a loaded checkpoint, on `device` in eval mode, EMA weights by default.

    `overrides` ('sample.steps=50', ...) change the checkpoint's config for this use only."""
    cfg = config_from_dict(ckpt["config"], overrides)
    model = UNet.from_config(cfg)
    load_weights(model, ckpt["ema" if use_ema else "model"], "the checkpoint's weights")
    return cfg, model.to(device).eval(), GaussianDiffusion(cfg.diffusion).to(device)
