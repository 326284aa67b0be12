"""sample.py's editing flags and their checks (the edits themselves: edits.py; running them over inputs:
edit_runs.py).
"""
import os

from ddpm import edits
from utils import UserError

DEFAULTS = {"strength": 0.5, "jump": 10}  # and --resample: 10, or 1 with DPM-Solver++ (check_sampler)
# flags that belong to some edits only: flag, the edits, what to say when given with another one
ONLY = [("strength", {"img2img"}, "is for image to image: --init IMG_OR_DIR without --mask, --invert or --interpolate"),
        ("jump", {"inpaint"}, "is RePaint's jump length, for inpainting (--init IMG --mask MASK)"),
        ("resample", {"inpaint"}, "is RePaint's number of resamplings, for inpainting (--init IMG --mask MASK)"),
        ("seed2", {"interpolate"}, "is for --interpolate N: the images between the x_T of --seed and --seed2"),
        ("init2", {"interpolate"}, "is for --interpolate N: the images between --init A and --init2 B")]
PLAIN = ("n", "process", "gif", "forward", "schedules")  # plain sampling's outputs


def add_flags(p) -> None:
    """sample.py's editing flags, in their own group."""
    g = p.add_argument_group("editing (README: Editing with a trained model)")
    g.add_argument("--init", help="the input: an image, or a folder of images (every one, sorted); alone, "
                                  "image to image (SDEdit)")
    g.add_argument("--strength", type=float, help="image to image: the fraction of the sampler's steps run "
                                                  "again from the noised input, in (0, 1] (default 0.5)")
    g.add_argument("--mask", help="inpainting (RePaint) of --init: white = regenerate, black = keep")
    g.add_argument("--jump", type=int, help="RePaint's jump length in sampler steps (default 10)")
    g.add_argument("--resample", type=int, help="RePaint's number of resamplings (default 10, DPM-Solver++: 1; "
                                                "1 = replace the known part at every step)")
    g.add_argument("--invert", action="store_true", help="DDIM inversion of --init: x_T (a .xT.pt tensor "
                                                         "file) and its reconstruction")
    g.add_argument("--interpolate", type=int, metavar="N", help="a row of N images between two seeds (--seed A "
                                                                "--seed2 B) or two images (--init A --init2 B)")
    g.add_argument("--seed2", type=int, help="--interpolate: the second seed")
    g.add_argument("--init2", help="--interpolate: the second image")


def requested(args) -> bool:
    return args.invert or any(getattr(args, f) is not None for f in
                              ("init", "init2", "mask", "interpolate", "seed2", "strength", "jump", "resample"))


def edit_of(args) -> str | None:
    """The edit the flags ask for (one of TITLES), or None when only a flag of some edit is given."""
    chosen = [flag for flag, on in (("--interpolate", args.interpolate is not None), ("--invert", args.invert),
                                    ("--mask", args.mask is not None)) if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are different edits; give one of them")
    if chosen:
        return {"--interpolate": "interpolate", "--invert": "invert", "--mask": "inpaint"}[chosen[0]]
    return "img2img" if args.init is not None else None


def check_flags(args, world: int) -> str:
    """The edit asked for, after checking the flags (before the checkpoint is loaded); fills in the defaults."""
    edit = edit_of(args)
    for flag, kinds, what in ONLY:
        if getattr(args, flag) is not None and edit not in kinds:
            raise UserError(f"--{flag} {what}")
    for flag in PLAIN:
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} is for plain sampling; it does not go with an edit "
                            "(--init, --interpolate)")
    if world > 1:
        raise UserError("editing runs in one process; run sample.py without torchrun")
    if edit == "interpolate":
        _check_interpolation(args)
    elif args.init is None:
        raise UserError(f"--{'mask' if edit == 'inpaint' else 'invert'} needs --init, the image(s) to edit")
    for flag, default in DEFAULTS.items():
        setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    if not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1] (the fraction of the sampler's steps run again), "
                        f"got {args.strength}")
    if args.jump < 1 or (args.resample is not None and args.resample < 1):
        raise UserError(f"--jump and --resample must be at least 1, got {args.jump} and {args.resample}")
    if args.class_label == "all" or (edit == "interpolate" and "," in (args.class_label or "")):
        raise UserError(f"--class-label {args.class_label} is for plain sampling; an edit takes one class K "
                        "(or K1,K2,... cycled over the inputs of image to image, inpainting and inversion)")
    for path in (args.init, args.init2, args.mask):
        if path is not None and not os.path.exists(path):
            raise UserError(f"'{path}' not found; give an image file{' or a folder' if path == args.init else ''}")
    return edit


def _check_interpolation(args) -> None:
    if args.interpolate < 2:
        raise UserError(f"--interpolate N needs N >= 2 (the two ends and N-2 images between), got {args.interpolate}")
    if args.seed2 is not None and args.init is not None:
        raise UserError("--interpolate takes two seeds (--seed A --seed2 B) or two images (--init A --init2 B), "
                        "not both")
    if args.seed2 is None and (args.init is None or args.init2 is None):
        raise UserError("--interpolate N needs --seed2 B (between the seeds --seed and --seed2) or "
                        "--init A --init2 B (between two images)")
    for path in (args.init, args.init2):
        if path is not None and os.path.isdir(path):
            raise UserError(f"--interpolate goes between two images; '{path}' is a folder")


def check_sampler(args, edit: str, sample_cfg, n: int) -> None:
    """What the sampler settings `sample_cfg` (the checkpoint's and the flags'; n timesteps) must be for this edit;
    fills in --resample."""
    if args.resample is None:
        args.resample = 1 if sample_cfg.sampler == "dpmpp" else 10
    if edit in ("invert", "interpolate"):
        try:
            edits.check_deterministic(sample_cfg)
        except ValueError:
            this = f"ddim with eta {sample_cfg.eta}" if sample_cfg.sampler == "ddim" else sample_cfg.sampler
            raise UserError(f"--{edit} runs the deterministic ODE: use --sampler ddim with --eta 0, or --sampler "
                            f"dpmpp (this is {this})") from None
    if edit == "inpaint" and args.resample > 1:
        if sample_cfg.sampler == "dpmpp":
            raise UserError("DPM-Solver++'s multistep history does not survive RePaint's jumps back: use "
                            "--resample 1 (replace the known part at every step) or --sampler ddim or ddpm")
        if args.jump >= n:
            raise UserError(f"--jump {args.jump} leaves no room to resample in {n} sampler steps; use a "
                            f"--jump below {n}, more --steps, or --resample 1")
