"""Train a DDPM.

    python train.py [--config configs/cifar10.yaml] [--name NAME] [--resume auto|never|PATH]
                    [--device auto|cuda|cpu] [section.field=value ...]
    torchrun --nproc_per_node=4 train.py [same options]        # one process per GPU (DDP)

Outputs: checkpoints/<name>/last.pt (+ the newest step_*.pt), results/<name>/{config.yaml, samples/,
plots/, logs/ (TensorBoard)}. An interrupted run (Ctrl-C, SIGTERM, kill -9, a crash) continues where it
stopped when the same command is run again.

The step itself is ddpm/training_step.py's Trainer; every few steps the run logs, draws a grid, scores FID and
writes a checkpoint (ddpm/training_run.py's TrainingRun.loop); here the command line sets the run up and resumes it.
"""
import contextlib
import os

from config import config_from_dict, load_config
from ddpm.checkpoint import load_checkpoint
from ddpm.cli import ArgumentParser, StopSignal, cli
from ddpm.config_rules import check_batch_split
from ddpm.distributed import process_group
from ddpm.metrics import load_inception
from ddpm.training_run import RunPaths, TrainingRun, is_run_name, open_runlog, start_trainer
from utils import FolderLock, UserError, check_writable


def parse_args(argv=None):
    # allow_abbrev=False, and no option is a prefix of one of torchrun's (it would swallow it)
    p = ArgumentParser(description="Train a denoising diffusion model.", allow_abbrev=False)
    p.add_argument("--config", help="YAML config (default: configs/cifar10.yaml)")
    p.add_argument("--name", help="run name: outputs in checkpoints/NAME and results/NAME (default: config name)")
    p.add_argument("--resume", default="auto", help="auto (continue from last.pt if any), never, or a path")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.batch_size=64")
    return p.parse_args(argv)


def load_run(args):
    """(config, the run's paths, the checkpoint it resumes from or None).

    Without --config, a resumed run takes the checkpoint's own config, and with --resume PATH its name."""
    cfg = load_config(args.config, args.overrides)
    if args.name is not None and not is_run_name(args.name):
        raise UserError(f"--name '{args.name}' is a run name, not a path: no '/', '\\', or a name of dots; "
                        "outputs go to checkpoints/NAME and results/NAME")
    given = args.resume not in ("auto", "never")
    ckpt = load_checkpoint(args.resume) if given else None
    own_config = args.config is None
    name = args.name or (ckpt["config"].get("name") if ckpt and own_config else None) or cfg.name
    ckpt_dir, out_dir = os.path.join("checkpoints", name), os.path.join("results", name)
    last = os.path.join(ckpt_dir, "last.pt")
    if given and os.path.exists(last) and not os.path.samefile(last, args.resume):
        raise UserError(f"--resume {args.resume} would write into run '{name}', whose {last} is another "
                        "checkpoint; give a new --name")
    if args.resume == "never" and os.path.exists(last):
        raise UserError(f"{last} exists and --resume never would overwrite it; use another --name, "
                        "or delete that folder to start over")
    path = args.resume if given else (last if args.resume == "auto" and os.path.exists(last) else None)
    if ckpt is None and path:
        ckpt = load_checkpoint(path)
    if ckpt is not None and "quantization" in ckpt:
        raise UserError(f"{path} is quantized (compress.py quantize), for sampling only; fine-tune the float "
                        "checkpoint it came from")
    if ckpt is not None and own_config:
        cfg = config_from_dict(ckpt["config"], args.overrides)
    return cfg, RunPaths(name, ckpt_dir, out_dir, path), ckpt


@cli
def main(argv=None, extractor=None):
    """extractor: the FID feature network for train.fid_every (default: the Inception of ddpm/metrics.py)."""
    args = parse_args(argv)
    with process_group(args.device) as process:
        run(args, process, extractor)


def run(args, process, extractor=None):
    cfg, paths, ckpt = load_run(args)
    check_batch_split(cfg.train, process.world)
    if ckpt is None and cfg.train.max_steps == 0:
        raise UserError("train.max_steps=0 on a new run trains nothing and writes no checkpoint; give "
                        "train.max_steps of at least 1")
    main_process = process.rank == 0
    with contextlib.ExitStack() as stack:
        if main_process:
            stack.enter_context(FolderLock(paths.ckpt_dir, "training run"))  # a second run of this name is refused
            for folder in (paths.ckpt_dir, paths.out_dir):  # fail now, not at the first save hours later
                check_writable(folder, folder=True)
        cfg, trainer, history = start_trainer(cfg, paths, ckpt, process)
        del ckpt  # the weights now live in the trainer
        stack.callback(trainer.release)
        if cfg.train.fid_every and main_process and extractor is None:
            extractor = load_inception(None, process.device)
        stop = stack.enter_context(StopSignal())
        runlog = stack.enter_context(open_runlog(cfg, trainer, paths, history)) if main_process else None
        TrainingRun(trainer, paths, runlog, stop, extractor).loop()


if __name__ == "__main__":
    main()
