"""Other projects' formats of the DDPM network, mapped onto ours (convert.py reads and writes the files):

    diffusers         UNet2DModel + DDPMScheduler (the google/ddpm-* models, the Hugging Face Hub)
    pytorch_diffusion pesser/pytorch_diffusion's PyTorch port of the paper's TensorFlow checkpoints

Our U-Net with the paper's options (model.py) is the same network as both, layer for layer. Our qkv convolution
is their query, key and value projections concatenated; diffusers' attention projections are nn.Linear where ours
are 1x1 convolutions. Anything we cannot represent is a UserError naming the first field that differs.
"""
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from config import DiffusionConfig
from ddpm.config_rules import nominal_widths
from diffusion import cosine_beta_schedule, linear_beta_schedule
from model import Attention, Block, Downsample
from utils import UserError

PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
            "fixed_large_log": "fixed_large", "learned_range": "learned_range"}  # theirs -> ours
SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
FREQ_SHIFT = {"ddpm": 1, "transformer": 0}        # model.time_embedding -> diffusers' freq_shift
DOWNSAMPLE_PADDING = {"same": 0, "symmetric": 1}  # model.downsample_padding -> diffusers' downsample_padding


# ---- where each layer lives in each format -------------------------------------------------------------------

@dataclass(frozen=True)
class Names:
    fixed: dict          # our module -> theirs, outside the blocks
    res: dict            # our ResBlock's parts -> theirs
    attn: tuple          # their names of the attention's (norm, q, k, v, output projection)
    place: Callable      # (kind 'res'|'attn'|'conv', place, number of levels) -> their module
    linear_attention: bool  # q, k, v and the projection are nn.Linear (2-D weights), not 1x1 convolutions


def _diffusers_place(kind, place, levels):
    part, *pos = place
    if part == "mid":
        return "mid_block.attentions.0" if kind == "attn" else f"mid_block.resnets.{pos[0]}"
    block = f"down_blocks.{pos[0]}" if part.startswith("down") else f"up_blocks.{levels - 1 - pos[0]}"
    if kind == "conv":
        return f"{block}.{part}rs.0.conv"  # downsamplers / upsamplers
    return f"{block}.{'attentions' if kind == 'attn' else 'resnets'}.{pos[1]}"


def _pytorch_diffusion_place(kind, place, levels):
    part, *pos = place
    if part == "mid":
        return "mid.attn_1" if kind == "attn" else f"mid.block_{pos[0] + 1}"
    if kind == "conv":
        return f"{part[:-6]}.{pos[0]}.{part}.conv"  # down.L.downsample.conv / up.L.upsample.conv
    return f"{part}.{pos[0]}.{'attn' if kind == 'attn' else 'block'}.{pos[1]}"


_DIFFUSERS_FIXED = {"time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2",
                    "label_emb": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out",
                    "conv_out": "conv_out"}
_DIFFUSERS_RES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"}
DIFFUSERS = Names(_DIFFUSERS_FIXED, _DIFFUSERS_RES, ("group_norm", "to_q", "to_k", "to_v", "to_out.0"),
                  _diffusers_place, True)
DIFFUSERS_OLD = Names(_DIFFUSERS_FIXED, _DIFFUSERS_RES, ("group_norm", "query", "key", "value", "proj_attn"),
                      _diffusers_place, True)  # the attention names of diffusers before 0.14 (google/ddpm-*)
PYTORCH_DIFFUSION = Names(
    {"time_mlp.0": "temb.dense.0", "time_mlp.2": "temb.dense.1", "conv_in": "conv_in", "norm_out": "norm_out",
     "conv_out": "conv_out"},
    {"norm1": "norm1", "conv1": "conv1", "emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
     "skip": "nin_shortcut"},
    ("norm", "q", "k", "v", "proj_out"), _pytorch_diffusion_place, False)


def _places(model):
    """(our module, kind, place) of every block part and resampler, place = (part, level, index) in the encoder
    ('down') and decoder ('up'), (resampler, level), or ('mid', index)."""
    levels = 1 + sum(isinstance(m, Downsample) for m in model.down)
    for part, layers, level, step in (("down", model.down, 0, 1), ("up", model.up, levels - 1, -1)):
        i = 0
        for k, layer in enumerate(layers):
            if not isinstance(layer, Block):
                yield f"{part}.{k}.conv", "conv", (part + "sample", level)
                level, i = level + step, 0
                continue
            yield f"{part}.{k}.res", "res", (part, level, i)
            if layer.attn is not None:
                yield f"{part}.{k}.attn", "attn", (part, level, i)
            i += 1
    for k, layer in enumerate(model.mid):
        yield f"mid.{k}.res", "res", ("mid", k)
        if layer.attn is not None:
            yield f"mid.{k}.attn", "attn", ("mid", k)


def tensor_names(model, names: Names) -> dict:
    """Our state-dict key -> their key(s): three (q, k, v) for the qkv convolution, one for every other tensor."""
    levels = 1 + sum(isinstance(m, Downsample) for m in model.down)
    modules = dict(names.fixed)
    for ours, kind, place in _places(model):
        theirs = names.place(kind, place, levels)
        if kind == "res":
            modules.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in names.res.items()})
        elif kind == "attn":
            norm, q, k, v, proj = (f"{theirs}.{n}" for n in names.attn)
            modules.update({f"{ours}.norm": norm, f"{ours}.qkv": (q, k, v), f"{ours}.proj": proj})
        else:
            modules[ours] = theirs
    out = {}
    for key in model.state_dict():
        module, param = key.rsplit(".", 1)
        target = modules[module]
        out[key] = tuple(f"{t}.{param}" for t in (target if isinstance(target, tuple) else (target,)))
    return out


def import_weights(theirs: dict, model, names: Names) -> dict:
    """Our state dict (float32) from theirs; a tensor missing, left over or of the wrong size is a UserError."""
    own, out, used = model.state_dict(), {}, set()
    for key, their_keys in tensor_names(model, names).items():
        missing = [k for k in their_keys if k not in theirs]
        if missing:
            raise UserError(f"the weights have no '{missing[0]}', which this layout needs; the file does not "
                            "belong to its config, or is incomplete")
        parts = [theirs[k] for k in their_keys]
        if sum(p.numel() for p in parts) != own[key].numel():
            raise UserError(f"'{their_keys[0]}' is {list(parts[0].shape)} in the weights, but the layout needs "
                            f"{[own[key].shape[0] // len(parts), *own[key].shape[1:]]}")
        out[key] = torch.cat([p.float().reshape(-1) for p in parts]).reshape(own[key].shape).contiguous()
        used.update(their_keys)
    extra = sorted(set(theirs) - used)
    if extra:
        raise UserError(f"the weights hold '{extra[0]}', for which this layout has no place")
    return out


def export_weights(ours: dict, model, names: Names) -> dict:
    """Their state dict from ours: the qkv convolution split in three, attention 1x1 convolutions as nn.Linear."""
    out = {}
    for key, their_keys in tensor_names(model, names).items():
        linear = names.linear_attention and (".attn.qkv." in key or ".attn.proj." in key)
        for their_key, part in zip(their_keys, ours[key].chunk(len(their_keys))):
            out[their_key] = (part.flatten(1) if linear and part.ndim == 4 else part).contiguous()
    return out


def embedding_order(time_embedding: str, flip_sin_to_cos: bool, dim: int) -> list[int]:
    """For each position of diffusers' timestep embedding ([sin | cos], or [cos | sin] when flipped), the position
    of the same sin/cos in ours; ours has 'ddpm' [sin | cos] or 'transformer' interleaved (sin_i at 2i)."""
    half = dim // 2
    sin, cos = (list(range(half)), list(range(half, dim))) if time_embedding == "ddpm" else (
        list(range(0, dim, 2)), list(range(1, dim, 2)))
    return cos + sin if flip_sin_to_cos else sin + cos


def to_diffusers(ours: dict, model, time_embedding: str) -> dict:
    """UNet2DModel weights (flip_sin_to_cos=False) from our state dict."""
    out = export_weights(ours, model, DIFFUSERS)
    w = out["time_embedding.linear_1.weight"]
    out["time_embedding.linear_1.weight"] = w[:, embedding_order(time_embedding, False, w.shape[1])].contiguous()
    return out


def from_diffusers(theirs: dict, model, time_embedding: str, flip_sin_to_cos: bool) -> dict:
    """Our state dict from UNet2DModel weights, under the attention names of any diffusers version."""
    old = any(k.endswith(".query.weight") for k in theirs)
    out = import_weights(theirs, model, DIFFUSERS_OLD if old else DIFFUSERS)
    w = out["time_mlp.0.weight"]
    order = embedding_order(time_embedding, flip_sin_to_cos, w.shape[1])
    out["time_mlp.0.weight"] = w[:, np.argsort(order)].contiguous()
    return out


# ---- UNet2DModel's config ------------------------------------------------------------------------------------

def unet_defaults() -> dict:
    """UNet2DModel's defaults, which a config.json without some field means."""
    from diffusers import UNet2DModel
    return {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}


def _one(values: set, field: str, why: str):
    if len(values) != 1:
        raise UserError(f"{field}: diffusers' UNet2DModel has one value for every layer, but this U-Net has "
                        f"{sorted(values)} ({why})")
    return next(iter(values))


def check_widths(m) -> None:
    """A pruned U-Net (model.widths, compress.py) is not a UNet2DModel, unless its widths are the nominal ones."""
    if m.widths is not None and list(m.widths) != nominal_widths(m):
        raise UserError("model.widths: this pruned U-Net has its own width in every layer (and attention wider than "
                        "its input), but UNet2DModel has one width per level")


def unet_config(cfg, model, flip_sin_to_cos: bool = False) -> dict:
    """The UNet2DModel config of our U-Net `model` of Config `cfg` (every field, so no default is relied on);
    learned variances: twice the channels out, the mean's then the variance's, as diffusers' learned_range."""
    m, size = cfg.model, cfg.data.image_size
    check_widths(m)
    if m.channel_mults[0] != 1:
        raise UserError(f"block_out_channels: diffusers' first level has the width of the embedding input; our "
                        f"model.channel_mults must start with 1 for that, not {list(m.channel_mults)}")
    groups = _one({n.num_groups for n in model.modules() if isinstance(n, torch.nn.GroupNorm)}, "norm_num_groups",
                  "GroupNorm groups; 32 everywhere when model.base_channels is a multiple of 32 and at least 128")
    widths = {a.norm.num_channels for a in model.modules() if isinstance(a, Attention)}
    head_dim = None if m.num_heads == 1 else _one({c // m.num_heads for c in widths}, "attention_head_dim",
                                                  f"model.num_heads={m.num_heads} at widths {sorted(widths)}")
    attn = [size // 2 ** i in m.attention_resolutions for i in range(len(m.channel_mults))]
    out = 2 * cfg.data.channels if cfg.diffusion.variance == "learned_range" else cfg.data.channels
    return {
        "sample_size": size, "in_channels": cfg.data.channels, "out_channels": out,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": FREQ_SHIFT[m.time_embedding], "flip_sin_to_cos": flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [m.base_channels * k for k in m.channel_mults], "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": DOWNSAMPLE_PADDING[m.downsample_padding],
        "downsample_type": "conv", "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": groups, "attn_norm_num_groups": None,
        "norm_eps": m.norm_eps, "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": m.num_classes + 1 if m.num_classes else None,
    }


def _refuse(field, value, why):
    raise UserError(f"{field}={value!r}: {why}")


def normalized_unet_config(d: dict) -> dict:
    """d with diffusers' defaults filled in and equivalent spellings made one (sample_size [s, s] is s, ...)."""
    d = {**unet_defaults(), **{k: v for k, v in d.items() if not k.startswith("_")}}
    size = d["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        d["sample_size"] = size = size[0]
    if not isinstance(size, int):
        _refuse("sample_size", size, "we need one image size (square images)")
    if d["act_fn"] == "swish":
        d["act_fn"] = "silu"
    if d["attn_norm_num_groups"] == d["norm_num_groups"]:
        d["attn_norm_num_groups"] = None
    boc = list(d["block_out_channels"])
    if d["time_embedding_dim"] == 4 * boc[0]:
        d["time_embedding_dim"] = None
    attn_widths = {c for c, t in zip(boc, d["down_block_types"]) if t == "AttnDownBlock2D"} | {boc[-1]}
    if d["attention_head_dim"] is not None and attn_widths == {d["attention_head_dim"]}:
        d["attention_head_dim"] = None  # one head everywhere
    d.pop("num_train_timesteps", None)  # only the 'learned' time embedding uses it
    return d


def config_from_unet(d: dict) -> tuple[dict, bool]:
    """Our config sections (model, data) for a normalized UNet2DModel config, and its flip_sin_to_cos.
    Whether the rest of `d` is what we can represent is then checked with `check_layout`."""
    boc, size = list(d["block_out_channels"]), d["sample_size"]
    base, head_dim = boc[0], d["attention_head_dim"]
    attn = [i for i, t in enumerate(d["down_block_types"]) if t == "AttnDownBlock2D"]
    widths = {boc[i] for i in attn} | {boc[-1]}
    heads = 1 if head_dim is None else _one({c // head_dim for c in widths}, "attention_head_dim",
                                            f"heads of size {head_dim} at widths {sorted(widths)}")
    if d["freq_shift"] not in (0, 1):
        _refuse("freq_shift", d["freq_shift"], "our timestep embeddings have freq_shift 1 (ddpm) or 0 (transformer)")
    if d["downsample_padding"] not in (0, 1):
        _refuse("downsample_padding", d["downsample_padding"], "we pad 0 ('same') or 1 ('symmetric')")
    if d["num_class_embeds"] is not None and d["num_class_embeds"] < 2:
        _refuse("num_class_embeds", d["num_class_embeds"], "our last class embedding is the null label")
    model = {"base_channels": base, "channel_mults": [c // base for c in boc], "num_res_blocks": d["layers_per_block"],
             "attention_resolutions": [size // 2 ** i for i in attn], "num_heads": heads, "dropout": d["dropout"],
             "num_classes": d["num_class_embeds"] - 1 if d["num_class_embeds"] else None,
             "time_embedding": {1: "ddpm", 0: "transformer"}[d["freq_shift"]],
             "downsample_padding": {0: "same", 1: "symmetric"}[d["downsample_padding"]], "norm_eps": d["norm_eps"]}
    sections = {"model": model, "data": {"image_size": size, "channels": d["in_channels"]}}
    if d["out_channels"] == 2 * d["in_channels"]:  # a learned variance (a scheduler config may say which)
        sections["diffusion"] = {"variance": "learned_range"}
    return sections, bool(d["flip_sin_to_cos"])


def check_layout(d: dict, expected: dict) -> None:
    """Name the first field of the normalized UNet2DModel config `d` that differs from what our U-Net is."""
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    for key, want in expected.items():
        if plain(d.get(key)) != plain(want):
            _refuse(key, d.get(key), f"the nearest U-Net we have needs {want!r} there")


# ---- the scheduler -------------------------------------------------------------------------------------------

def check_betas(sched: dict, df) -> None:
    """diffusers' betas for `sched` must be ours for DiffusionConfig `df`, to float32 precision."""
    from diffusers import DDPMScheduler
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    theirs = DDPMScheduler(**{k: sched[k] for k in keys}).betas.double().numpy()
    ours = (linear_beta_schedule(df.timesteps, df.beta_start, df.beta_end) if df.beta_schedule == "linear"
            else cosine_beta_schedule(df.timesteps))
    if not np.allclose(theirs, ours, rtol=1e-6, atol=1e-9):
        raise UserError(f"beta_schedule={sched['beta_schedule']!r}: diffusers' betas differ from ours (diffusion."
                        f"beta_schedule={df.beta_schedule!r}) by up to {np.abs(theirs - ours).max():.2e}")


def scheduler_config(df) -> dict:
    """The DDPMScheduler config of our DiffusionConfig (the betas checked against diffusers' own)."""
    sched = {"num_train_timesteps": df.timesteps, "beta_start": df.beta_start, "beta_end": df.beta_end,
             "beta_schedule": SCHEDULE[df.beta_schedule], "trained_betas": None, "variance_type": df.variance,
             "clip_sample": df.clip_denoised, "clip_sample_range": 1.0, "prediction_type": PREDICTION[df.objective],
             "thresholding": False, "rescale_betas_zero_snr": False}
    check_betas(sched, df)
    return sched


def diffusion_from_scheduler(d: dict) -> dict:
    """Our diffusion section from a scheduler config (DDPMScheduler's defaults where a field is missing)."""
    from diffusers import DDPMScheduler
    defaults = {k: p.default for k, p in inspect.signature(DDPMScheduler.__init__).parameters.items()}
    d = {**defaults, **d}
    if d["trained_betas"] is not None:
        _refuse("trained_betas", "[...]", "we have the linear and squaredcos_cap_v2 schedules")
    for key, table in (("beta_schedule", {v: k for k, v in SCHEDULE.items()}), ("variance_type", VARIANCE),
                       ("prediction_type", {v: k for k, v in PREDICTION.items()})):
        if d[key] not in table:
            _refuse(key, d[key], f"we have {', '.join(table)}")
    for key, ours in (("thresholding", False), ("rescale_betas_zero_snr", False)):
        if d[key] != ours:
            _refuse(key, d[key], f"we sample with {key}={ours}")
    if d["clip_sample"] and d["clip_sample_range"] != 1.0:
        _refuse("clip_sample_range", d["clip_sample_range"], "we clip the predicted x_0 to [-1, 1]")
    fields = {"timesteps": d["num_train_timesteps"], "beta_start": d["beta_start"], "beta_end": d["beta_end"],
              "beta_schedule": {v: k for k, v in SCHEDULE.items()}[d["beta_schedule"]],
              "objective": {v: k for k, v in PREDICTION.items()}[d["prediction_type"]],
              "variance": VARIANCE[d["variance_type"]], "clip_denoised": bool(d["clip_sample"])}
    check_betas(d, DiffusionConfig(**fields))
    return fields


# ---- pesser/pytorch_diffusion --------------------------------------------------------------------------------

def config_from_pytorch_diffusion(sd: dict) -> dict:
    """Our config sections for a pytorch_diffusion state dict, read off its tensors. The image size is not in
    the weights: all of the paper's models attend at 16x16, which gives it; dropout and the sampling variance
    are the paper's (CIFAR-10 at 32x32: 0.1 and fixed_large; LSUN at 256x256: 0 and fixed_small)."""
    try:
        base, channels = sd["conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
        mults = [sd[f"down.{lvl}.block.0.conv1.weight"].shape[0] // base for lvl in range(levels)]
        blocks = len({k.split(".")[3] for k in sd if k.startswith("down.0.block.")})
    except (KeyError, ValueError, AttributeError):
        raise UserError("this is not a pytorch_diffusion checkpoint (no conv_in.weight and down.* tensors)") from None
    attn = [lvl for lvl in range(levels) if f"down.{lvl}.attn.0.q.weight" in sd]
    if not attn:
        raise UserError("this pytorch_diffusion model has no attention layer, so its image size cannot be told")
    size = 16 * 2 ** attn[0]
    dropout, variance = (0.1, "fixed_large") if size == 32 else (0.0, "fixed_small")
    model = {"base_channels": int(base), "channel_mults": mults, "num_res_blocks": blocks,
             "attention_resolutions": [size // 2 ** lvl for lvl in attn], "num_heads": 1, "dropout": dropout,
             "time_embedding": "ddpm", "downsample_padding": "same", "norm_eps": 1e-6}
    return {"model": model, "data": {"image_size": size, "channels": int(channels)},
            "diffusion": {"variance": variance}}


def check_pytorch_diffusion_groups(model) -> None:
    """pytorch_diffusion's GroupNorms have 32 groups everywhere; ours must too."""
    groups = {n.num_groups for n in model.modules() if isinstance(n, torch.nn.GroupNorm)}
    if groups != {32}:
        raise UserError(f"pytorch_diffusion normalises with 32 groups, but this width gives ours {sorted(groups)} "
                        "(model.base_channels must be a multiple of 32 and at least 128)")
