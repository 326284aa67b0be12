"""Checkpoints: one dict of plain data, written atomically, read with weights_only=True.

    {"format": FORMAT, "step": int, "config": nested dict (model.num_classes resolved),
     "model": state_dict, "ema": state_dict, "optimizer", "scheduler", "scaler": state_dicts,
     "rng": {...}, "data": {"epoch", "batch"}, "log": {"step": [...], "loss": [...], ...},
     "text": the caption encoder's state of a text model (ddpm/text_encoders.py: the vocabulary, or CLIP's width)}
"""
import contextlib
import dataclasses
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from config import config_from_dict
from ddpm import quantization
from diffusion import GaussianDiffusion
from model import UNet
from utils import UserError, atomic_write, first_line, replace_via

FORMAT = "ddpm-checkpoint-v1"

# Model options that came after the first checkpoints, with the values those were trained with: a stored config
# without a field means this value (new configs get the paper's choices, the defaults in config.py)
BEFORE_MODEL_OPTIONS = {"time_embedding": "transformer", "downsample_padding": "symmetric", "norm_eps": 1e-5}


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a crash or kill -9 mid-save leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def save_run_checkpoint(state: dict, ckpt_dir: str, step: int, keep_last: int) -> None:
    """A training run's save: last.pt atomically, a hard link of it as step_XXXXXXX.pt (last.pt is later
    replaced by a new file, so the link keeps this version), and only the newest keep_last step files."""
    last = os.path.join(ckpt_dir, "last.pt")
    save_checkpoint(state, last)
    step_file = os.path.join(ckpt_dir, f"step_{step:07d}.pt")
    replace_via(step_file, step_file + ".tmp", lambda tmp: link_or_copy(last, tmp))
    steps = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("step_") and f.endswith(".pt"))
    for old in steps[:max(0, len(steps) - keep_last)]:
        os.remove(os.path.join(ckpt_dir, old))


def link_or_copy(src: str, dst: str) -> None:
    """dst as a hard link of src (a copy on a file system without hard links), over a stale dst."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def rng_state(device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain lists: checkpoints hold no numpy
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read one of our checkpoints as data (weights_only=True); anything else is a one-line UserError."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint '{path}' is a folder; give a checkpoint file in it, e.g. {path}/last.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found; train first (python train.py) or check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if code := code_it_would_run(e):
            raise UserError(f"refused to load '{path}': its pickle would call {code}, and loading it could run "
                            "code; this toolkit's checkpoints hold only tensors and plain data") from None
        raise UserError(f"cannot read checkpoint '{path}' ({first_line(e)}); it is damaged or not a "
                        "PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (no '{FORMAT}' marker)")
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        # the one place where a checkpoint from before the model options gets the ones it was trained with
        config["model"] = {**BEFORE_MODEL_OPTIONS, **config["model"]}
    return ckpt


def code_it_would_run(e: Exception) -> str | None:
    """What a pickle that torch.load(weights_only=True) refused would have imported and called (e.g. 'posix.system'),
    or None when `e` is another failure (a damaged or foreign file). weights_only unpickles only tensors and plain
    data, and stops at any other global, before anything runs."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "weights only" not in text.lower().replace("_", " "):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    # other refusals ('Unsupported operand', a bad opcode) are files that are not pickles of ours at all
    return "a function that is not a tensor's" if "unrecognized function" in text else None


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
    learned = saved["diffusion"].get("variance") == "learned_range"  # the output's channels
    if learned != (cfg.diffusion.variance == "learned_range"):
        diffs.append(f"diffusion.variance: checkpoint {saved['diffusion'].get('variance')!r}, "
                     f"config {cfg.diffusion.variance!r}")
    # neither changes the weights: dropout, and where CLIP is read from (a moved folder)
    diffs = [d for d in diffs if not d.startswith(("model.dropout", "model.text_encoder_path"))]
    if diffs:
        raise UserError(f"checkpoint '{path}' is from another architecture ({'; '.join(diffs)}); "
                        "use its config or start a new run with --name or --resume never")


def to_plain(section) -> dict:
    d = section if isinstance(section, dict) else vars(section)
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint read for use: its config (with the overrides of this use), the network (in eval mode, on
    `device`), its diffusion, the training step it was saved at, a text model's caption encoder state (None
    otherwise), the file it came from, a latent model's record of its autoencoder (ddpm/codecs.py; None for a
    pixel-space model), and a distilled student's record of what it was distilled for (ddpm/distillation.py; None
    otherwise)."""
    cfg: object
    model: torch.nn.Module
    diffusion: GaussianDiffusion
    step: int
    text_state: dict | None
    path: str
    device: torch.device
    latent: dict | None = None
    distilled: dict | None = None


def load_for_use(path: str, device, use_ema: bool = True, overrides=()) -> LoadedCheckpoint:
    """The checkpoint at `path` ready to sample from (see model_from_checkpoint for use_ema and overrides)."""
    ckpt = load_checkpoint(path)
    cfg, model, diffusion = model_from_checkpoint(ckpt, device, use_ema, overrides)
    return LoadedCheckpoint(cfg, model, diffusion, ckpt["step"], ckpt.get("text"), path, torch.device(device),
                            ckpt.get("latent"), ckpt.get("distilled"))


def model_from_checkpoint(ckpt: dict, device, use_ema: bool = True, overrides=()):
    """(cfg, model, diffusion) of a loaded checkpoint, on `device` in eval mode, EMA weights by default.

    `overrides` ('sample.steps=50', ...) change the checkpoint's config for this use only.
    A quantized checkpoint (compress.py) gives its dequantized weights with its activations fake-quantized."""
    cfg = config_from_dict(ckpt["config"], overrides)
    model = UNet.from_config(cfg, ckpt.get("text"))
    state = ckpt["ema" if use_ema else "model"]
    quant = ckpt.get("quantization")
    load_weights(model, quantization.dequantize_state(state, quant) if quant else state, "the checkpoint's weights")
    if quant:
        quantization.apply_quantization(model, quant)
    return cfg, model.to(device).eval(), GaussianDiffusion(cfg.diffusion).to(device)
