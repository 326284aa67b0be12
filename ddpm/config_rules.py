"""The rules a config must follow: the range of every numeric field (RANGES) and the rules between fields, each
failure one line (ConfigError) that names the key and what it must be; config.validate applies them."""
import math
import typing

from utils import UserError


class ConfigError(UserError):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class Range(typing.NamedTuple):
    """An interval of allowed values; an end of None is unbounded, an open end excludes its value."""
    low: float | None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, v) -> bool:
        above = self.low is None or (v > self.low if self.open_low else v >= self.low)
        below = self.high is None or (v < self.high if self.open_high else v <= self.high)
        return above and below

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.open_low else '['}{self.low}"
        high = "inf)" if self.high is None else f"{self.high}{')' if self.open_high else ']'}"
        return f"{low}, {high}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, open_low=True)
FRACTION = Range(0, 1, open_high=True)  # [0, 1)
SEED = Range(0, 2 ** 63 - 1)
# the range of every numeric field (floats are finite already); rules between fields are in validate
RANGES = {
    "data.image_size": Range(8), "data.num_images": AT_LEAST_1, "data.seed": SEED, "data.preload_max_gib": POSITIVE,
    "model.base_channels": AT_LEAST_1, "model.num_res_blocks": AT_LEAST_1, "model.num_heads": AT_LEAST_1,
    "model.dropout": FRACTION, "model.norm_eps": Range(0, 1, open_low=True, open_high=True),
    "model.text_max_tokens": Range(2), "model.text_width": AT_LEAST_1, "model.text_layers": AT_LEAST_1,
    "diffusion.timesteps": Range(2), "diffusion.beta_start": Range(0, 1, True, True),
    "diffusion.beta_end": Range(0, 1, True, True),
    "train.max_steps": AT_LEAST_0, "train.batch_size": AT_LEAST_1, "train.lr": POSITIVE,
    "train.weight_decay": AT_LEAST_0, "train.warmup_steps": AT_LEAST_0, "train.grad_clip": AT_LEAST_0,
    "train.grad_accum": AT_LEAST_1, "train.ema_decay": FRACTION, "train.seed": SEED, "train.log_every": AT_LEAST_1,
    "train.save_every": AT_LEAST_1, "train.sample_every": AT_LEAST_1, "train.sample_n": AT_LEAST_1,
    "train.keep_last": AT_LEAST_0, "train.num_workers": AT_LEAST_0, "train.max_nonfinite": AT_LEAST_1,
    "train.cond_drop_prob": FRACTION, "train.fid_every": AT_LEAST_0, "train.fid_samples": Range(2),
    "diffusion.vlb_weight": AT_LEAST_0, "train.nll_every": AT_LEAST_0, "train.nll_images": Range(2),
    "sample.steps": AT_LEAST_1, "sample.eta": Range(0, 1), "sample.order": Range(1, 3), "sample.n": AT_LEAST_1,
    "sample.batch_size": AT_LEAST_1, "sample.seed": SEED, "sample.guidance_scale": Range(None),
    "autoencoder.latent_channels": AT_LEAST_1, "autoencoder.ch": AT_LEAST_1, "autoencoder.num_res_blocks": AT_LEAST_1,
    "autoencoder.kl_weight": AT_LEAST_0, "autoencoder.perceptual_weight": AT_LEAST_0,
    "autoencoder.disc_weight": AT_LEAST_0, "autoencoder.disc_start": AT_LEAST_0, "autoencoder.lr": POSITIVE,
    "autoencoder.batch_size": AT_LEAST_1, "autoencoder.steps": AT_LEAST_0, "latent.encode_batch_size": AT_LEAST_1,
    "distill.start_steps": Range(2), "distill.steps": AT_LEAST_1, "distill.updates": AT_LEAST_1,
    "distill.lr": POSITIVE, "distill.batch_size": AT_LEAST_1, "distill.ema_decay": FRACTION,
}


def check_ranges(cfg) -> None:
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check(value in allowed, f"{key} must be in {allowed}, got {value}")


def validate_latent(cfg) -> None:
    lat = cfg.latent
    check(lat.scale_factor is None or lat.scale_factor > 0,
           f"latent.scale_factor must be null (computed from the data) or positive, got {lat.scale_factor}")
    check(lat.channels is None or lat.channels >= 1, f"latent.channels must be null or at least 1, got {lat.channels}")
    check(lat.factor is None or (lat.factor >= 1 and cfg.data.image_size % lat.factor == 0),
           f"latent.factor={lat.factor} must divide data.image_size={cfg.data.image_size}")
    check(lat.autoencoder is None or not cfg.sample.dynamic_threshold,
           "sample.dynamic_threshold clips x_0 to the images' [-1, 1], which latents are not in; turn it off for a "
           "latent model (latent.autoencoder)")
    check(lat.autoencoder is None or cfg.train.nll_every == 0,
           "train.nll_every scores the bound in bits/dim of 8-bit images, which a latent model (latent.autoencoder) "
           "does not model; set train.nll_every=0")


def nominal_widths(m) -> list[int]:
    """The widths model.widths replaces, in the U-Net's order (model.py): conv_in; per block of the encoder, the
    middle and the decoder, its hidden and its output channels; per down- and upsampling, its output channels."""
    levels = [m.base_channels * mult for mult in m.channel_mults]
    down = [w for i, ch in enumerate(levels) for w in [ch, ch] * m.num_res_blocks + [ch] * (i < len(levels) - 1)]
    up = [w for i, ch in reversed(list(enumerate(levels))) for w in [ch, ch] * (m.num_res_blocks + 1) + [ch] * (i > 0)]
    return [levels[0], *down, *[levels[-1]] * 4, *up]


def validate_widths(m) -> None:
    """model.widths (a pruned network, compress.py): null, or one positive width per entry of nominal_widths."""
    if m.widths is None:
        return
    n = len(nominal_widths(m))
    check(len(m.widths) == n and min(m.widths) >= 1,
          f"model.widths must be null or {n} positive channel counts (config_rules.nominal_widths), got "
          f"{list(m.widths)}")


def validate_text(m) -> None:
    if m.text_encoder is None:
        return
    check(m.num_classes is None, f"model.text_encoder={m.text_encoder} and model.num_classes={m.num_classes} cannot "
           "be combined; set model.num_classes=null for a text-conditional model")
    check(m.text_encoder != "clip" or m.text_max_tokens <= 77,  # CLIP's position embeddings
           f"model.text_max_tokens must be at most 77 with CLIP, got {m.text_max_tokens}")
    check(m.text_width < 64 or m.text_width % 64 == 0,
           f"model.text_width must be below 64 or a multiple of 64 (attention heads of 64), got {m.text_width}")


def validate_sample(sample_cfg, timesteps: int, conditional: bool) -> None:
    check(sample_cfg.steps <= timesteps,
           f"sample.steps must be between 1 and diffusion.timesteps={timesteps}, got {sample_cfg.steps}")
    check(sample_cfg.ddpm_steps is None or sample_cfg.sampler != "ddpm" or 2 <= sample_cfg.ddpm_steps <= timesteps,
           f"sample.ddpm_steps (--steps with --sampler ddpm) must be null (all T) or between 2 and "
           f"diffusion.timesteps={timesteps}, got {sample_cfg.ddpm_steps}")
    check(sample_cfg.sampler != "dpmpp" or sample_cfg.eta == 0,
           f"sample.eta={sample_cfg.eta} (--eta) is for DDIM; DPM-Solver++ (sample.sampler=dpmpp) is deterministic, "
           "so leave eta at 0")
    check(conditional or sample_cfg.guidance_scale == 1.0,
           f"sample.guidance_scale={sample_cfg.guidance_scale} (--guidance-scale) needs a class-conditional or "
           "text-conditional "
           "model; this one has model.num_classes and model.text_encoder null (trained without labels or captions)")


def check_distill(cfg) -> int:
    """The rules between distill's fields and the teacher's config (distill.py only: a training config need not
    allow a distillation); returns the number of rounds (halvings) from distill.start_steps to distill.steps."""
    d, timesteps = cfg.distill, cfg.diffusion.timesteps
    check(d.start_steps <= timesteps, f"distill.start_steps={d.start_steps} must be at most the teacher's "
           f"diffusion.timesteps={timesteps}")
    halvings = [d.start_steps >> r for r in range(1, d.start_steps.bit_length()) if d.start_steps % (1 << r) == 0]
    check(d.steps in halvings, f"distill.steps={d.steps} (--steps) is not reached by halving distill.start_steps="
           f"{d.start_steps}: it must be one of {', '.join(map(str, halvings))}" if halvings else
           f"distill.start_steps={d.start_steps} is odd: it cannot be halved; give a power-of-two multiple of --steps")
    check(d.batch_size % cfg.train.grad_accum == 0, f"distill.batch_size={d.batch_size} must be divisible by "
           f"train.grad_accum={cfg.train.grad_accum}")
    return (d.start_steps // d.steps).bit_length() - 1


def check_batch_split(train, world: int = 1) -> None:
    """train.batch_size is the global batch: it must split evenly over the processes and micro-batches."""
    check(train.batch_size % (world * train.grad_accum) == 0,
           f"train.batch_size={train.batch_size} must be divisible by processes x train.grad_accum = "
           f"{world} x {train.grad_accum}; change train.batch_size or train.grad_accum")


def schedule_warning(d) -> str | None:
    """A warning when the schedule leaves x_T far from pure noise: sqrt(alpha-bar_T) above 0.05, as the linear
    betas meant for T = 1000 do with a small T (T = 50 keeps x_T = 0.77 x_0 + noise)."""
    if d.beta_schedule != "linear":
        return None
    signal = math.sqrt(math.prod(1 - (d.beta_start + (d.beta_end - d.beta_start) * i / (d.timesteps - 1))
                                 for i in range(d.timesteps)))
    if signal <= 0.05:
        return None
    scaled = min(0.999, d.beta_end * 1000 / d.timesteps)
    return (f"warning: with diffusion.timesteps={d.timesteps} the linear betas ({d.beta_start:g}..{d.beta_end:g}) "
            f"leave x_T = {signal:.2f} x_0 + noise, so sampling from pure noise starts off the training data; "
            f"use diffusion.beta_schedule=cosine or diffusion.beta_end={scaled:.3g}")
