"""Convert models to and from other formats: diffusers (the Hugging Face Hub) and pesser/pytorch_diffusion.

    python convert.py from-diffusers SRC --out CKPT [--force] [section.field=value ...]
    python convert.py from-pytorch-diffusion FILE --out CKPT [--force] [section.field=value ...]
    python convert.py to-diffusers CKPT --out DIR [--no-ema] [--force]

from-diffusers reads a UNet2DModel folder (config.json with diffusion_pytorch_model.safetensors or .bin), flat as
google/ddpm-cifar10-32 is published or a pipeline folder with unet/ and scheduler/; the scheduler config, when
there is one, sets the diffusion section. from-pytorch-diffusion reads one of pytorch_diffusion's .ckpt files.
The checkpoint written holds the same weights as model and EMA, at step 0, with no optimiser state: sample.py,
evaluate.py and train.py --resume CKPT (fine-tuning) take it. Overrides set what the weights do not fix
(name, data.*, diffusion.variance, sample.*, model.dropout). to-diffusers writes a DDPMPipeline folder from a
checkpoint's EMA weights (--no-ema: the raw ones). An existing target is refused unless --force, and a failed
conversion leaves it as it was.
"""
import os
import shutil
import tempfile

import torch

from config import DiffusionConfig, SampleConfig, config_from_dict, parse_override, to_dict
from ddpm import weight_formats
from ddpm.checkpoint import code_it_would_run, load_checkpoint, load_weights, save_checkpoint
from ddpm.cli import ArgumentParser, cli
from model import UNet
from utils import UserError, first_line, read_json

INSTALL = "pip install -r requirements-convert.txt"
# the fields that the converted weights fix; the others can be set on the command line
FIXED = ("data.image_size", "data.channels", "diffusion.timesteps", "diffusion.objective")


def parse_args(argv=None):
    p = ArgumentParser(description="Convert models to and from diffusers and pytorch_diffusion.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for name, src in (("from-diffusers", "a diffusers UNet2DModel or DDPMPipeline folder"),
                      ("from-pytorch-diffusion", "a pesser/pytorch_diffusion .ckpt file")):
        command = sub.add_parser(name, help=f"{src} -> our checkpoint", allow_abbrev=False)
        command.add_argument("src", help=src)
        command.add_argument("--out", required=True,
                             help="the checkpoint to write, e.g. checkpoints/ddpm-cifar10/paper.pt")
        command.add_argument("--force", action="store_true", help="replace --out if it exists")
        command.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.dataset=folder")
    command = sub.add_parser("to-diffusers", help="our checkpoint -> a diffusers DDPMPipeline folder",
                             allow_abbrev=False)
    command.add_argument("ckpt", help="our checkpoint")
    command.add_argument("--out", required=True, help="the folder to write")
    command.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones")
    command.add_argument("--force", action="store_true", help="replace --out if it exists")
    args, extra = p.parse_known_args(argv)  # overrides may come after --out too
    if extra and (args.command == "to-diffusers" or any(a.startswith("-") or "=" not in a for a in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    return args


def require_diffusers():
    try:
        import diffusers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        raise UserError(f"convert.py needs diffusers and safetensors ({e.name} is missing): {INSTALL}") from None


def check_target(path: str, force: bool) -> None:
    if os.path.lexists(path) and not force:
        raise UserError(f"'{path}' exists; give --force to replace it, or another --out")


def read_weights(path: str) -> dict:
    """A state dict from .safetensors, or from .bin / .ckpt with torch.load(weights_only=True)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each reader fails in its own way on a truncated or foreign file
        if code := code_it_would_run(e):
            raise UserError(f"refused to read the weights file '{path}': its pickle would call {code}, so loading "
                            "it could run code; use the model's .safetensors file") from None
        raise UserError(f"cannot read the weights file '{path}' ({first_line(e)}); it is damaged or truncated: "
                        "download it again") from None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"'{path}' holds no state dict of tensors")
    return sd


def diffusers_files(src: str) -> tuple[dict, str, str | None]:
    """(config, weights file, scheduler config file or None) of a flat UNet2DModel folder or a pipeline folder."""
    unet = os.path.join(src, "unet")
    flat = not os.path.isfile(os.path.join(unet, "config.json"))
    folder = src if flat else unet
    config = os.path.join(folder, "config.json")
    if not os.path.isdir(src) or not os.path.isfile(config):
        raise UserError(f"'{src}' is not a diffusers model folder: it has no config.json (nor unet/config.json)")
    d = read_json(config, "diffusers config")
    if d.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"'{config}' is a {d['_class_name']}; convert.py converts UNet2DModel (DDPM) models")
    weights = [os.path.join(folder, f"diffusion_pytorch_model.{e}") for e in ("safetensors", "bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise UserError(f"'{folder}' has no diffusion_pytorch_model.safetensors or .bin (sharded and fp16-variant "
                        "files are not read)")
    sched = os.path.join(src, "scheduler_config.json" if flat else os.path.join("scheduler", "scheduler_config.json"))
    return d, weights[0], sched if os.path.isfile(sched) else None


def converted_config(sections: dict, overrides, out: str):
    """Our Config of converted weights: `sections` (what the weights fix), then the command line's overrides."""
    for text in overrides:
        key = parse_override(text)[0]
        if key in FIXED or (key.startswith("model.") and key != "model.dropout"):
            raise UserError(f"{key} is fixed by the weights being converted; only name, data.dataset/root/..., "
                            "diffusion.variance/clip_denoised, sample.* and model.dropout can be set")
    name = os.path.splitext(os.path.basename(out))[0]
    timesteps = sections.get("diffusion", {}).get("timesteps", DiffusionConfig.timesteps)
    sample = {"steps": min(SampleConfig.steps, timesteps)}  # our default DDIM steps, where T allows them
    return config_from_dict({"name": name, "sample": sample, **sections}, overrides)


def write_checkpoint(cfg, model, sd: dict, src: str, out: str) -> None:
    load_weights(model, sd, f"the weights of '{src}'")
    save_checkpoint({"step": 0, "config": to_dict(cfg), "model": sd, "ema": sd, "converted_from": src}, out)
    m, d = cfg.model, cfg.diffusion
    print(f"wrote {out}: a {model.num_params() / 1e6:.2f}M-parameter U-Net (base_channels={m.base_channels}, "
          f"channel_mults={list(m.channel_mults)}, attention at {list(m.attention_resolutions)}, "
          f"{cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}), {d.beta_schedule} betas, "
          f"T={d.timesteps}, objective {d.objective}, variance {d.variance}; the same weights as model and EMA")


def from_diffusers(args) -> None:
    require_diffusers()
    check_target(args.out, args.force)
    d, weights_path, sched_path = diffusers_files(args.src)
    try:
        d = weight_formats.normalized_unet_config(d)
        sections, flip = weight_formats.config_from_unet(d)
        if sched_path:
            sections["diffusion"] = weight_formats.diffusion_from_scheduler(read_json(sched_path, "scheduler config"))
        cfg = converted_config(sections, args.overrides, args.out)
        model = UNet.from_config(cfg)
        weight_formats.check_layout(d, weight_formats.unet_config(cfg, model, flip))
        sd = weight_formats.from_diffusers(read_weights(weights_path), model, cfg.model.time_embedding, flip)
    except UserError as e:
        raise UserError(f"cannot convert '{args.src}': {e}") from None
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"cannot convert '{args.src}': its config.json is not one we can read "
                        f"({type(e).__name__}: {e})") from None
    if not sched_path:
        print(f"no scheduler config in '{args.src}': the diffusion section is ours by default (the paper's: linear "
              "betas 1e-4..0.02, T=1000, eps, fixed_large, clipping)")
    write_checkpoint(cfg, model, sd, args.src, args.out)


def from_pytorch_diffusion(args) -> None:
    check_target(args.out, args.force)
    if not os.path.isfile(args.src):
        raise UserError(f"'{args.src}' is not a file; give a pytorch_diffusion checkpoint, e.g. model-790000.ckpt")
    try:
        theirs = read_weights(args.src)
        cfg = converted_config(weight_formats.config_from_pytorch_diffusion(theirs), args.overrides, args.out)
        model = UNet.from_config(cfg)
        weight_formats.check_pytorch_diffusion_groups(model)
        sd = weight_formats.import_weights(theirs, model, weight_formats.PYTORCH_DIFFUSION)
    except UserError as e:
        raise UserError(f"cannot convert '{args.src}': {e}") from None
    write_checkpoint(cfg, model, sd, args.src, args.out)


def to_diffusers(args) -> None:
    check_target(args.out, args.force)
    ckpt = load_checkpoint(args.ckpt)
    if "quantization" in ckpt:
        raise UserError(f"'{args.ckpt}' is quantized (compress.py); convert the float checkpoint it came from")
    cfg = config_from_dict(ckpt["config"])
    if cfg.model.text_encoder:  # UNet2DModel has no text conditioning (diffusers' UNet2DConditionModel is another net)
        raise UserError(f"'{args.ckpt}' is a text-conditional model (model.text_encoder={cfg.model.text_encoder}); "
                        "convert.py converts unconditional and class-conditional models only")
    if "latent" in ckpt:  # a DDPMPipeline samples pixels; its U-Net would denoise the latents without the decoder
        raise UserError(f"'{args.ckpt}' is a latent model (latent.autoencoder={cfg.latent.autoencoder}); convert.py "
                        "converts pixel-space models only")
    try:
        weight_formats.check_widths(cfg.model)
    except UserError as e:
        raise UserError(f"diffusers cannot express '{args.ckpt}': {e}") from None
    require_diffusers()
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    model = UNet.from_config(cfg)
    load_weights(model, ckpt["model" if args.no_ema else "ema"], "the checkpoint's weights")
    try:
        unet = UNet2DModel(**weight_formats.unet_config(cfg, model))
        scheduler = DDPMScheduler(**weight_formats.scheduler_config(cfg.diffusion))
    except UserError as e:
        raise UserError(f"diffusers cannot express '{args.ckpt}': {e}") from None
    unet.load_state_dict(weight_formats.to_diffusers(model.state_dict(), model, cfg.model.time_embedding), strict=True)
    write_folder(args.out, lambda tmp: DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp))
    print(f"wrote {args.out}: a DDPMPipeline ({'raw' if args.no_ema else 'EMA'} weights of {args.ckpt}, step "
          f"{ckpt['step']}); load it with DDPMPipeline.from_pretrained('{args.out}')")


def write_folder(path: str, write) -> None:
    """Write a folder as a whole: into a temporary one beside it, then renamed over `path` (which, when it
    exists, is moved aside first and deleted last); a failure leaves `path` as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    old = tmp + ".old"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes an owner-only folder
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
    except OSError as e:
        raise UserError(f"cannot write '{path}' ({e.strerror or e}); it is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)


@cli
def main(argv=None):
    args = parse_args(argv)
    {"from-diffusers": from_diffusers, "from-pytorch-diffusion": from_pytorch_diffusion,
     "to-diffusers": to_diffusers}[args.command](args)


if __name__ == "__main__":
    main()
