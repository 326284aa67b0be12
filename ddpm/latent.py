"""Latent diffusion's wiring (Rombach et al. 2022): a config made latent by latent.autoencoder trains the U-Net on
the autoencoder's scaled latents of the data, and its samples become images through the decoder.

    cfg, latents = latent_training_data(cfg, dataset, device, ckpt)   # train.py: the cached latents, cfg resolved
    loaded.model.codec = codec_of_checkpoint(loaded)                  # sample.py, evaluate.py
    images = to_images(model, x)                                      # generation: decoded (latent), then clamped

The model carries its codec (model.codec, None in pixel space) as it carries the shape of what it denoises
(image_channels, image_size), so that every sampler loop, grid, folder and metric stays as it is and only the
last step, making images, decodes. The checkpoint records the autoencoder (ddpm/codecs.py) and its scale factor
(latent.scale_factor in its config) and refuses another autoencoder.
"""
import dataclasses

import torch

from config import validate
from ddpm.codecs import Codec, autoencoder_of_checkpoint, check_same, load_autoencoder
from ddpm.latent_cache import latent_dataset
from utils import UserError


def resolved_latent(cfg, autoencoder, scale_factor: float):
    """cfg with the autoencoder's latent channels and factor and the scale factor filled in, and clip_denoised off
    (x_0 is a latent, not an image in [-1, 1]); a config that contradicts the autoencoder is a one-line error."""
    lat, ae = cfg.latent, autoencoder
    for field, value in (("channels", ae.latent_channels), ("factor", ae.factor)):
        if getattr(lat, field) not in (None, value):
            raise UserError(f"latent.{field}={getattr(lat, field)} does not match the autoencoder '{ae.path}', whose "
                            f"latents have {field} {value}; leave latent.{field} unset (null)")
    if cfg.data.channels != ae.channels:
        raise UserError(f"data.channels={cfg.data.channels} but the autoencoder '{ae.path}' takes images of "
                        f"{ae.channels} channels; set data.channels={ae.channels}")
    if cfg.data.image_size % ae.factor:
        raise UserError(f"data.image_size={cfg.data.image_size} must be a multiple of the autoencoder's "
                        f"downsampling factor {ae.factor}")
    latent = dataclasses.replace(lat, channels=ae.latent_channels, factor=ae.factor, scale_factor=scale_factor)
    return validate(dataclasses.replace(cfg, latent=latent,
                                        diffusion=dataclasses.replace(cfg.diffusion, clip_denoised=False)))


def check_checkpoint_space(ckpt: dict | None, cfg, path: str | None) -> None:
    """A latent config resumes only a latent checkpoint, and a pixel config only a pixel one."""
    if ckpt is None or ("latent" in ckpt) == (cfg.latent.autoencoder is not None):
        return
    if "latent" in ckpt:
        raise UserError(f"checkpoint '{path}' is a latent model (autoencoder '{ckpt['latent']['path']}'); set "
                        f"latent.autoencoder to it, or start a new run with --name")
    raise UserError(f"checkpoint '{path}' is a pixel-space model; latent.autoencoder={cfg.latent.autoencoder} needs "
                    "a new run (--name)")


def latent_training_data(cfg, dataset, device, ckpt=None):
    """(cfg resolved, the data set's latents: ddpm/latent_cache.LatentDataset) of latent.autoencoder; a resumed run
    (ckpt, a latent one: check_checkpoint_space) keeps its scale factor and must have the same autoencoder."""
    autoencoder = load_autoencoder(cfg.latent.autoencoder, device)
    if ckpt is not None:
        check_same(ckpt["latent"], autoencoder)
        cfg = dataclasses.replace(cfg, latent=dataclasses.replace(
            cfg.latent, scale_factor=ckpt["config"]["latent"]["scale_factor"]))
    resolved_latent(cfg, autoencoder, 1.0)  # a config that contradicts the autoencoder fails before encoding
    latents = latent_dataset(dataset, cfg, autoencoder, device)
    return resolved_latent(cfg, autoencoder, latents.scale_factor), latents


def codec_of_checkpoint(loaded) -> Codec | None:
    """The Codec of a LoadedCheckpoint (ddpm/checkpoint.py) of a latent model, None for a pixel one: its own
    autoencoder from the weights inside, or the diffusers folder of cfg.latent.autoencoder (which may have moved) if
    its content is the recorded one."""
    if loaded.latent is None:
        return None
    autoencoder = autoencoder_of_checkpoint(loaded.latent, loaded.cfg.latent.autoencoder, loaded.device)
    return Codec(autoencoder, loaded.cfg.latent.scale_factor)


def to_images(model, x: torch.Tensor) -> torch.Tensor:
    """Samples x of `model` as images in [-1, 1], on x's device: decoded by its codec in latent space, then clamped
    (the samplers clip x_0 when diffusion.clip_denoised; without it the last step may overshoot a little)."""
    codec = getattr(model, "codec", None)
    return (x if codec is None else codec.decode(x).to(x.device)).clamp(-1, 1)


def trajectory_images(model, trajectory: dict) -> dict:
    """A sampler's recorded trajectory (samplers.sample_loop) with a latent model's x_t and x_0 decoded to images
    (float32 on the CPU, as recorded); a pixel model's as it is."""
    codec = getattr(model, "codec", None)
    if codec is None:
        return trajectory
    return {**trajectory, **{k: [codec.decode(x).float().cpu() for x in trajectory[k]] for k in ("x_t", "x0")}}
