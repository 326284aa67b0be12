"""Smaller and faster networks from a trained checkpoint: structured pruning and post-training quantization.

    python compress.py prune --ckpt CKPT --ratio 0.3 --out pruned.pt      # Diff-Pruning (ddpm/pruning.py)
    python train.py --resume pruned.pt --name pruned train.max_steps=500  # fine-tune it (weights-only resume)
    python compress.py quantize --ckpt CKPT --bits 8 --out w8a8.pt        # W8A8 (ddpm/quantization.py)
    python compress.py quantize --ckpt CKPT --bits 4 --out w4a8.pt        # W4A8

Both write an ordinary checkpoint that sample.py and evaluate.py take: a pruned one records its widths in
model.widths, a quantized one holds integer weights with their scales and the activation ranges (its network
runs fake-quantized, in float). Both need requirements-compress.txt. An existing --out is refused unless --force;
bad input is one line and writes nothing.
"""
import dataclasses
import os

import torch

from config import config_from_dict, to_dict
from dataset import build_dataset
from ddpm import pruning, quantization
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ddpm.cli import ArgumentParser, cli
from model import UNet
from utils import UserError


def parse_args(argv=None):
    p = ArgumentParser(description="Prune or quantize a trained checkpoint.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="structured channel pruning (Diff-Pruning)", allow_abbrev=False)
    prune.add_argument("--ratio", type=float, required=True, help="fraction of the channels to remove, in (0, 1)")
    prune.add_argument("--batches", type=int, default=2, help="batches of the checkpoint's data for the scores")
    prune.add_argument("--batch-size", type=int, default=32)
    prune.add_argument("--threshold", type=float, default=0.05,
                       help="stop adding timesteps when L_t < threshold x max L_s (Diff-Pruning's thr)")
    prune.add_argument("--max-timesteps", type=int, default=100, help="at most this many timesteps t = 0, 1, ...")
    quant = sub.add_parser("quantize", help="post-training quantization (W8A8, W4A8)", allow_abbrev=False)
    quant.add_argument("--bits", type=int, required=True, help="weight bits, 8 or 4 (activations are 8)")
    quant.add_argument("--calib-images", type=int, default=64,
                       help="images the float model samples to calibrate the activations over every step")
    for s in (prune, quant):
        s.add_argument("--ckpt", required=True, help="the checkpoint to compress")
        s.add_argument("--out", required=True, help="the checkpoint to write")
        s.add_argument("--force", action="store_true", help="replace --out if it exists")
        s.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_args(args) -> None:
    """Every one-line error that needs no checkpoint, before anything is read or written."""
    if os.path.exists(args.out) and not args.force:
        raise UserError(f"--out {args.out} exists; give --force to replace it")
    if args.command == "prune":
        if not 0 < args.ratio < 1:
            raise UserError(f"--ratio must be in (0, 1), the fraction of channels to remove; got {args.ratio}")
        for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size),
                            ("--max-timesteps", args.max_timesteps)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        pruning.require_torch_pruning()
    else:
        if args.bits not in (4, 8):
            raise UserError(f"--bits must be 8 or 4 (the weights' bits; activations are 8), got {args.bits}")
        if args.calib_images < 1:
            raise UserError(f"--calib-images must be at least 1, got {args.calib_images}")


def load_float(path: str):
    ckpt = load_checkpoint(path)
    if "quantization" in ckpt:
        raise UserError(f"'{path}' is quantized already; compress the float checkpoint it came from")
    return ckpt


def data_batches(cfg, args) -> list[tuple]:
    """(x_0, labels or None, noise) of `args.batches` batches of the checkpoint's data, drawn with args.seed."""
    dataset = build_dataset(cfg.data)
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(dataset), generator=g)[:args.batches * args.batch_size].tolist()
    batches = []
    for start in range(0, len(picks), args.batch_size):
        images, labels = zip(*(dataset[i] for i in picks[start:start + args.batch_size]))
        x0 = torch.stack(images)
        cond = torch.tensor(labels) if cfg.model.num_classes else None
        batches.append((x0, cond, torch.randn(x0.shape, generator=g)))
    return batches


def prune(args) -> None:
    ckpt = load_float(args.ckpt)
    cfg, model, diffusion = model_from_checkpoint(ckpt, "cpu")
    keep, unit = pruning.keep_fraction(model, args.ratio), pruning.norm_unit(model)
    before = model.num_params()
    dense = UNet.from_config(cfg, ckpt.get("text"))
    batches = data_batches(cfg, args)
    losses = pruning.accumulate_taylor_gradients(model, diffusion, batches, args.threshold, args.max_timesteps)
    x0, cond, _ = batches[0]
    example = (x0[:1], torch.zeros(1, dtype=torch.long)) + ((cond[:1],) if cond is not None else ())
    pruning.prune_model(model, example, keep)
    pruning.check_structure(model, dense)
    new_cfg = pruning.pruned_config(cfg, model)
    rebuilt = UNet.from_config(new_cfg, ckpt.get("text"))
    rebuilt.load_state_dict(model.state_dict())  # the config builds exactly the pruned network
    state = {k: v.detach().clone() for k, v in rebuilt.state_dict().items()}
    record = {"source": os.path.abspath(args.ckpt), "source_step": ckpt.get("step", 0), "ratio": args.ratio,
              "kept": str(keep), "timesteps": len(losses), "losses": losses, "threshold": args.threshold,
              "images": sum(len(b[0]) for b in batches)}
    text = {"text": ckpt["text"]} if "text" in ckpt else {}
    save_checkpoint({"step": 0, "config": to_dict(new_cfg), "model": state, "ema": state, "pruning": record,
                     **text}, args.out)
    print(f"wrote {args.out}: kept {keep} of the channels (ratio {args.ratio} in steps of 1/{unit}), "
          f"{before / 1e6:.3f}M -> {rebuilt.num_params() / 1e6:.3f}M parameters; Taylor scores over "
          f"t = 0..{len(losses) - 1} on {record['images']} images; fine-tune it with train.py --resume {args.out}")


def quantize(args) -> None:
    ckpt = load_float(args.ckpt)
    cfg, model, diffusion = model_from_checkpoint(ckpt, "cpu")
    sample_cfg = dataclasses.replace(cfg.sample, seed=args.seed, precision="fp32")
    out = quantization.quantize_checkpoint(ckpt, model, diffusion, sample_cfg, args.bits, args.calib_images)
    config_from_dict(out["config"])  # still a valid config
    save_checkpoint(out, args.out)
    calib = out["quantization"]["calibration"]
    print(f"wrote {args.out}: W{args.bits}A8, {os.path.getsize(args.out) / 2 ** 20:.2f} MiB (was "
          f"{os.path.getsize(args.ckpt) / 2 ** 20:.2f}); activations calibrated on {calib['images']} images over "
          f"the {len(calib['timesteps'])} timesteps of {calib['sampler']}-{calib['steps']}")


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    {"prune": prune, "quantize": quantize}[args.command](args)


if __name__ == "__main__":
    main()
