"""Command-line helpers, imported by the commands only: the argument parser whose errors are one line, the
wrapper that turns user errors and interrupts into exit codes, the stop signal of a training loop, and the flags
that sample.py and evaluate.py share (the sampler's, --class-label, the prompts).
"""
import argparse
import functools
import signal
import sys

import torch

from ddpm.conditions import Conditions
from ddpm.samplers import SPACINGS
from utils import Terminated, UserError, read_text


def _raise_terminated(signum, frame):
    raise Terminated


def cli(main):
    """Run a script's main(). A UserError becomes 'error: ...' on stderr and exit code 2; Ctrl-C and SIGTERM
    become 'interrupted: ...' (see on_interrupt) and exit codes 130 and 143, as a shell reports them."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, Terminated) as e:
            note = getattr(e, "note", "nothing was written; run the command again")
            print(f"\ninterrupted: {note}", file=sys.stderr)
            sys.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapper


class StopSignal:
    """Ctrl-C and SIGTERM set `signum`, which the loop reads between steps; a second one ends the process."""

    def __enter__(self):
        self.signum = 0
        self.previous = {signum_: signal.signal(signum_, self._handle) for signum_ in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for signum_, handler in self.previous.items():
            signal.signal(signum_, handler)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one 'error: ...' line and exit code 2, like every other user error, and whose
    positional arguments (the section.field=value overrides) may come before, between or after the flags."""

    def error(self, message):
        raise UserError(message)

    def parse_args(self, args=None, namespace=None):
        if self._subparsers is not None:  # argparse cannot intermix with sub-commands
            return super().parse_args(args, namespace)
        return self.parse_intermixed_args(args, namespace)


SAMPLER_FLAGS = ("sampler", "steps", "eta", "order", "spacing", "dynamic_threshold", "seed", "batch_size",
                 "guidance_scale")


def add_sampler_flags(p) -> None:
    """The sampling flags of sample.py and evaluate.py; each is shorthand for a sample.<field> override
    and defaults to the checkpoint's value."""
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], help="sample.sampler (dpmpp: DPM-Solver++)")
    p.add_argument("--steps", type=int, help="network calls, 1..T (sample.steps; with DDPM sample.ddpm_steps, 2..T: "
                                             "respaced; without it DDPM takes all T)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 like DDPM (sample.eta)")
    p.add_argument("--order", type=int, help="DPM-Solver++ order 1, 2 or 3 (sample.order)")
    p.add_argument("--spacing", choices=SPACINGS, help="DDIM and DPM-Solver++ timesteps (sample.spacing)")
    p.add_argument("--dynamic-threshold", action=argparse.BooleanOptionalAction,
                   help="Imagen's dynamic thresholding of the predicted x_0 (sample.dynamic_threshold)")
    p.add_argument("--seed", type=int, help="sample.seed")
    p.add_argument("--batch-size", type=int, help="images per sampler run (sample.batch_size)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance weight w, 1 = plain conditional (sample.guidance_scale)")


def sampler_overrides(args) -> list[str]:
    """The sampling flags given on the command line, as sample.<field>=value overrides; --steps sets DDPM's
    sample.ddpm_steps too when the sampler is DDPM (--sampler ddpm, or the checkpoint's without --sampler)."""
    overrides = [f"sample.{k}={getattr(args, k)}" for k in SAMPLER_FLAGS if getattr(args, k) is not None]
    if args.steps is not None and args.sampler in (None, "ddpm"):
        overrides.append(f"sample.ddpm_steps={args.steps}")
    return overrides


def class_labels(spec, num_classes, n) -> Conditions:
    """The conditions of --class-label for n images: labels cycled over the images (None: unconditional); 'all'
    makes n a multiple of the number of classes, so that each grid row (nrow images) is one class."""
    if num_classes is None:
        if spec is not None:
            raise UserError("--class-label needs a class-conditional checkpoint; this one was trained without "
                            "labels (model.num_classes is null)")
        return Conditions(None, n)
    if spec == "all":
        per_class = max(1, n // num_classes)
        return Conditions(torch.arange(num_classes).repeat_interleave(per_class), per_class * num_classes, per_class)
    if spec is None:
        return Conditions(list(range(num_classes)), n)
    try:
        labels = [int(k) for k in spec.split(",")]
    except ValueError:
        raise UserError(f"--class-label must be 'all', a class index or a comma list of them, got '{spec}'") from None
    for k in labels:
        if not 0 <= k < num_classes:
            raise UserError(f"--class-label {k} is out of range; this checkpoint has {num_classes} classes "
                            f"(0..{num_classes - 1})")
    return Conditions(labels, n)


def add_prompt_flags(p, repeatable: bool = True) -> None:
    """sample.py's and evaluate.py's text flags, in their own group."""
    g = p.add_argument_group("text-conditional models")
    if repeatable:
        g.add_argument("--prompt", action="append", help="a caption to sample (repeatable: one grid row each)")
    g.add_argument("--prompts", help="a UTF-8 file of prompts, one per line (blank lines are skipped)")
    g.add_argument("--negative-prompt", help="guide away from this caption instead of the empty one "
                                             "(with --guidance-scale above 1)")


def read_prompts(args, model_cfg, guidance_scale: float) -> list[str]:
    """The prompts of --prompt and then --prompts, after checking that the flags suit the model config `model_cfg`."""
    prompts = list(getattr(args, "prompt", None) or [])
    if args.prompts:
        prompts += [line.strip() for line in read_text(args.prompts, "--prompts file").splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts file '{args.prompts}' holds no prompts; write one per line")
    if model_cfg.text_encoder is None:
        if prompts or args.negative_prompt is not None:
            raise UserError("--prompt, --prompts and --negative-prompt need a text-conditional checkpoint "
                            "(model.text_encoder); this one has none")
        return []
    if args.class_label is not None:
        raise UserError("--class-label is for class-conditional checkpoints; this one is text-conditional: "
                        "give --prompt TEXT")
    if args.negative_prompt is not None and (not prompts or guidance_scale == 1.0):
        prompt = "--prompt or --prompts" if hasattr(args, "prompt") else "--prompts"  # evaluate.py has no --prompt
        raise UserError(f"--negative-prompt acts through guidance: give {prompt} and --guidance-scale above 1 "
                        "(e.g. 3)")
    return prompts
