"""The one typed place for every setting: dataclasses loaded from YAML, overridden from the command line.

    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=64", "model.dropout=0.0"])

Values of overrides are parsed as YAML scalars or lists (`model.channel_mults=[1,2,2]`, `model.num_classes=null`).
An unknown key or a value of the wrong type raises ConfigError (a UserError: one line, exit code 2).
"""
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from ddpm.config_rules import (
    ConfigError,
    check,
    check_batch_split,
    check_ranges,
    validate_latent,
    validate_sample,
    validate_text,
    validate_widths,
)
from utils import first_line

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cifar10.yaml")


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "mnist", "fashion_mnist", "folder", "shapes"] = "cifar10"
    root: str = "data"              # download folder (torchvision sets) or the image folder (folder)
    image_size: int = 32            # images are resized and centre-cropped to this
    channels: Literal[1, 3] = 3     # 3 = RGB, 1 = grayscale
    hflip: bool = True              # random horizontal flip (applied per batch)
    num_images: int = 10000         # shapes only: how many images to generate
    seed: int = 0                   # shapes only: generation seed
    preload: Literal["auto", True, False] = "auto"  # decode once into a cached uint8 array kept in (GPU) memory
    preload_max_gib: float = 8.0    # 'auto' preloads when the uint8 array is smaller than this


@dataclass
class ModelConfig:
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (pixels) that get self-attention
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: int | Literal["auto"] | None = None  # None: unconditional; 'auto': from the data set
    # the paper's code in three details (model.py); a checkpoint saved without them had the other choices
    time_embedding: Literal["ddpm", "transformer"] = "ddpm"   # [sin | cos], or interleaved as in Vaswani et al.
    downsample_padding: Literal["same", "symmetric"] = "same"  # TensorFlow 'SAME' (bottom/right), or 1 each side
    norm_eps: float = 1e-6                                     # GroupNorm epsilon
    # text-conditional models (ddpm/text_encoders.py): captions through a text encoder, cross-attention in the U-Net
    text_encoder: Literal["learned", "clip"] | None = None     # None: no text; learned with the U-Net; frozen CLIP
    text_encoder_path: str = "openai/clip-vit-base-patch32"    # clip: a Hugging Face Hub name or a local folder
    text_max_tokens: int = 32       # tokens per caption, the start token included; longer captions are cut
    text_width: int = 256           # learned: width of the text transformer (heads of 64, one head below 64)
    text_layers: int = 2            # learned: its number of layers
    # a pruned network (compress.py prune): the channels of each layer in the order of nominal_widths; null: the
    # nominal widths base_channels x channel_mults
    widths: tuple[int, ...] | None = None


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    objective: Literal["eps", "x0", "v"] = "eps"
    # learned_range: improved DDPM's learned variances (the network outputs twice the channels), trained on L_hybrid
    variance: Literal["fixed_small", "fixed_large", "learned_range"] = "fixed_large"
    clip_denoised: bool = True
    vlb_weight: float = 0.001       # learned_range: L_hybrid = L_simple + vlb_weight * L_vlb (lambda of improved DDPM)


@dataclass
class TrainConfig:
    max_steps: int = 800_000
    batch_size: int = 128           # global batch (split over processes and accumulation steps)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0          # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1
    ema_decay: float = 0.9999
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto: on for CUDA, off on the CPU
    seed: int = 0
    deterministic: bool = False     # deterministic kernels (slower); used by the resume tests
    log_every: int = 100
    save_every: int = 5000
    sample_every: int = 5000
    sample_n: int = 64              # images in each training sample grid
    keep_last: int = 3              # step checkpoints kept besides last.pt
    num_workers: int = 4
    max_nonfinite: int = 10         # consecutive non-finite losses before the run stops
    cond_drop_prob: float = 0.1     # conditional only: fraction of labels (captions) replaced by the null one
    fid_every: int = 0              # 0 = off
    fid_samples: int = 5000
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5; null = off
    timestep_sampler: Literal["uniform", "loss_aware"] = "uniform"  # loss_aware: improved DDPM's importance sampling
    nll_every: int = 0              # bits/dim of held-out images every this many steps; 0 = off
    nll_images: int = 64            # how many held-out images nll_every scores


@dataclass
class SampleConfig:
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddim"
    steps: int = 100                # network calls of DDIM and DPM-Solver++
    ddpm_steps: int | None = None   # DDPM: null = all T; N = N timesteps, respaced (improved DDPM); --steps sets it
    eta: float = 0.0                # DDIM only: 0 deterministic, 1 DDPM-like
    order: int = 2                  # DPM-Solver++: 1 (= DDIM with eta 0), 2 (2M) or 3 (3M)
    spacing: Literal["linspace", "trailing", "logsnr"] = "linspace"  # DDIM and DPM-Solver++ timesteps
    dynamic_threshold: bool = False  # Imagen's dynamic thresholding of the predicted x_0 (percentile 0.995)
    n: int = 64
    batch_size: int = 256
    seed: int = 0
    guidance_scale: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


@dataclass
class AutoencoderConfig:
    """Our own KL-regularised autoencoder (ddpm/autoencoder.py), trained by train_autoencoder.py; its run settings
    (seed, log_every, save_every, sample_every, keep_last, num_workers, grad_clip) are those of `train`."""
    factor: Literal[4, 8] = 4       # downsampling: latents of image_size / factor
    latent_channels: int = 4
    ch: int = 64                    # channels at full resolution, doubled at each halving up to 4 ch
    num_res_blocks: int = 1
    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6         # the LDM paper's weight of KL(q(z|x) || N(0, I)) against the reconstruction
    perceptual_weight: float = 0.0  # LPIPS (the lpips package and its VGG weights: requirements-latent.txt); 0 = off
    disc_weight: float = 0.0        # patch discriminator with the hinge loss; 0 = off
    disc_start: int = 5000          # steps of reconstruction alone before the adversarial loss starts
    lr: float = 2e-4
    batch_size: int = 32
    steps: int = 20000


@dataclass
class LatentConfig:
    """Latent diffusion (ddpm/codecs.py, ddpm/latent_cache.py): the U-Net denoises an autoencoder's scaled latents."""
    autoencoder: str | None = None  # null: pixel space; a train_autoencoder.py checkpoint or a diffusers AutoencoderKL
    scale_factor: float | None = None  # null: 1 / std of the data's latents, computed once and recorded
    channels: int | None = None     # the autoencoder's latent channels, filled in (another value is an error)
    factor: int | None = None       # its downsampling factor, filled in likewise
    encode_batch_size: int = 32     # images per autoencoder call while building the latent cache


@dataclass
class DistillConfig:
    """Progressive distillation (Salimans & Ho 2022; distill.py): the student learns in one DDIM step two DDIM steps
    of its teacher, then teaches the next round with half the steps, from start_steps down to steps. train.lr,
    train.batch_size, train.max_steps, train.warmup_steps and train.ema_decay come from here (the rest of the train
    section, e.g. log_every, save_every, precision, seed, is the training run's)."""
    start_steps: int = 512          # DDIM steps of the first teacher (the paper starts at 1024 to 8192 steps)
    steps: int = 4                  # K: the student's steps at the end; start_steps / 2^rounds
    updates: int = 50_000           # optimiser steps per halving (the paper's CIFAR-10 setting)
    lr: float = 1e-4                # Adam, decayed linearly to 0 within each round
    batch_size: int = 128
    ema_decay: float = 0.0          # 0: no EMA (the student of a round is its raw weights)
    objective: Literal["v", "x0"] = "v"  # what the student predicts (an eps student breaks at few steps)
    weighting: Literal["truncated_snr", "snr_plus_one"] = "truncated_snr"  # max(SNR, 1) or SNR + 1, on the x_0 error


@dataclass
class Config:
    name: str = "cifar10"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return "a finite number" if tp is float else tp.__name__


def _coerce(value, tp):
    """Return value as type tp, or raise TypeError. YAML reads '1e-4' as a string, so floats accept those."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_coerce(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:  # a finite number: nan and inf pass every comparison check the wrong way
        try:
            number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise TypeError
        return number
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError


def _set(cfg: Config, key: str, value) -> None:
    if key == "name":
        cfg.name = str(value)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key '{key}'; keys look like section.field with section one of: "
                          f"{', '.join(SECTIONS)} (or the top-level 'name')")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise ConfigError(f"unknown config key '{key}'; valid fields of '{section}': {', '.join(fields)}")
    tp = typing.get_type_hints(SECTIONS[section])[name]
    try:
        setattr(getattr(cfg, section), name, _coerce(value, tp))
    except TypeError:
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}") from None


def network_shape(cfg: Config) -> tuple[int, int]:
    """(channels, size) of what the U-Net denoises: the images, or in latent space the autoencoder's latents
    (size image_size / factor; before the autoencoder is read, factor 1)."""
    lat = cfg.latent
    if lat.autoencoder is None:
        return cfg.data.channels, cfg.data.image_size
    return lat.channels or 0, cfg.data.image_size // (lat.factor or 1)


def validate(cfg: Config) -> Config:
    """The range of every numeric field (RANGES), then the rules between fields; each failure is one line that
    names the key and what it must be."""
    check_ranges(cfg)
    validate_latent(cfg)
    data, model, diffusion, train = cfg.data, cfg.model, cfg.diffusion, cfg.train
    size = network_shape(cfg)[1]  # the U-Net's input size: the image's, or the latent's
    check(len(model.channel_mults) >= 1 and min(model.channel_mults) >= 1,
           f"model.channel_mults must be a non-empty list of positive integers, got {list(model.channel_mults)}")
    check(all(r >= 1 for r in model.attention_resolutions),
           f"model.attention_resolutions must be feature-map sizes in pixels, got {list(model.attention_resolutions)}")
    latent = f" / latent.factor={cfg.latent.factor}" if size != data.image_size else ""
    check(size % 2 ** (len(model.channel_mults) - 1) == 0,
           f"data.image_size={data.image_size}{latent} must be divisible by 2^(len(model.channel_mults)-1)="
           f"{2 ** (len(model.channel_mults) - 1)}; change one of them")
    widths = [model.base_channels * model.channel_mults[-1]] + [  # the middle block, and each level with attention
        model.base_channels * mult for i, mult in enumerate(model.channel_mults)
        if size // 2 ** i in model.attention_resolutions]
    check(all(w % model.num_heads == 0 for w in widths),
           f"model.num_heads={model.num_heads} must divide the channels at every attention layer "
           f"({sorted(set(widths))})")
    check(model.base_channels % 2 == 0 and (model.base_channels >= 4 or model.time_embedding != "ddpm"),
           f"model.base_channels={model.base_channels} is the size of the sin/cos timestep embedding: it must be even "
           "(and at least 4 with model.time_embedding 'ddpm')")
    check(model.num_classes is None or model.num_classes == "auto" or model.num_classes >= 1,
           f"model.num_classes must be null, 'auto' or at least 1, got {model.num_classes}")
    check(diffusion.beta_start <= diffusion.beta_end,
           f"need diffusion.beta_start <= diffusion.beta_end, got {diffusion.beta_start}, {diffusion.beta_end}")
    check(train.snr_gamma is None or train.snr_gamma > 0,
           f"train.snr_gamma must be null (off) or above 0, got {train.snr_gamma}")
    check_batch_split(train)
    validate_widths(model)
    validate_text(model)
    validate_sample(cfg.sample, diffusion.timesteps, model.num_classes is not None or model.text_encoder is not None)
    return cfg


def resolved(cfg: Config, *, name: str, num_classes: int | None) -> Config:
    """A copy of cfg with the values known only at run time filled in, once: the run name and
    model.num_classes (the data set's count where the config says 'auto'). Nothing changes it afterwards."""
    return dataclasses.replace(cfg, name=name, model=dataclasses.replace(cfg.model, num_classes=num_classes))


def parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"cannot read override '{text}'; write it as section.field=value, "
                          "e.g. train.batch_size=64")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"cannot parse the value of override '{text}' as YAML") from None


def config_from_dict(d: dict, overrides=()) -> Config:
    """Build a Config from a nested dict (a YAML file or a checkpoint's 'config'), then apply overrides."""
    if not isinstance(d, dict):
        raise ConfigError("a config must be a mapping of sections (data, model, diffusion, train, sample)")
    cfg = Config()
    for section, values in d.items():
        if section == "name":
            _set(cfg, "name", values)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'; valid sections: {', '.join(SECTIONS)}, name")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of field: value")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    for text in overrides:
        _set(cfg, *parse_override(text))
    return validate(cfg)


def load_config(path: str | None = None, overrides=()) -> Config:
    """Load a YAML config (None = configs/cifar10.yaml) and apply 'section.field=value' overrides."""
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; see configs/ for the shipped ones")
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {first_line(e)}") from None
    if isinstance(d, dict) and "name" not in d:
        d["name"] = os.path.splitext(os.path.basename(path))[0]
    return config_from_dict(d, overrides)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of built-in types (tuples as lists), for YAML files and checkpoints."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {k: ({f: plain(x) for f, x in v.items()} if isinstance(v, dict) else v)
            for k, v in dataclasses.asdict(cfg).items()}


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
