"""Distillation benchmark on the CPU: distil a checkpoint with distill.py, then compare each K-step student with the
teacher's own few-step samplers, from the same x_T.

    python bench/distill_bench.py --teacher checkpoints/quickstart/last.pt          # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    python bench/distill_bench.py --teacher ... --start-steps 64 --updates 400 --kid 500

For each K: the RMS distance (pixels in [-1, 1], over all images) to the teacher's DDIM with all T steps (a fine
discretisation of the probability-flow ODE the students learn to shortcut) of the K-step student (DDIM, its own
sampler), of the teacher's DDIM and DPM-Solver++(2M) with K, 2K and 4K steps; with --kid N, the KID of N samples of
each against the data set (real Inception features, ddpm/metrics.py); and the time each round of distill.py took
(from the students' checkpoints). The run is distill.py itself (checkpoints/<name>/), so it resumes when rerun.

Writes <out>.json and <out>.md with the command, the machine (lscpu's model name) and the date, and prints them.
"""
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import distill  # noqa: E402
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ddpm.cli import ArgumentParser, cli  # noqa: E402
from ddpm.generation import Sampling, batch_generator, generate  # noqa: E402
from ddpm.images import to_uint8  # noqa: E402
from ddpm.metrics import (  # noqa: E402
    REF_CACHE,
    extract_features,
    kernel_inception_distance,
    load_inception,
    reference_stats,
)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher, e.g. checkpoints/quickstart/last.pt")
    p.add_argument("--name", default="distill-bench", help="distill.py's run name")
    p.add_argument("--start-steps", type=int, default=32)
    p.add_argument("--steps", default="8,4,2,1", help="the students' K to compare (down to the smallest)")
    p.add_argument("--updates", type=int, default=300, help="distill.updates: optimiser steps per round")
    p.add_argument("--batch-size", type=int, default=32, help="distill.batch_size")
    p.add_argument("--lr", type=float, default=3e-4, help="distill.lr")
    p.add_argument("--n", type=int, default=32, help="images for the RMS distances (one batch, the same x_T)")
    p.add_argument("--kid", type=int, default=0, help="samples for KID against the data (0: none)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", f"distill-{datetime.date.today()}"))
    p.add_argument("--dir", default=ROOT, help="where distill.py's checkpoints/ and results/ go")
    args = p.parse_args(argv)
    args.teacher, args.out = os.path.abspath(args.teacher), os.path.abspath(args.out)
    args.steps = sorted({int(v) for v in args.steps.split(",")}, reverse=True)
    return args


def samples(ckpt, n, sampler, steps, seed=0):
    """n images of a checkpoint with DDIM or DPM-Solver++(2M) and `steps` steps, x_T from (seed, 0, n): every
    call with the same n and seed starts from the same x_T."""
    cfg, model, diffusion = model_from_checkpoint(ckpt, "cpu")
    sample_cfg = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps, eta=0.0, order=2, precision="fp32")
    return generate(Sampling(model, diffusion, sample_cfg, "cpu"), n, batch_generator(seed, 0, n, "cpu"))


def rms(x, ref) -> float:
    return (x.double() - ref.double()).square().mean().sqrt().item()


def kid(ckpt, sampler, steps, n, extractor, ref) -> float:
    x = torch.cat([samples(ckpt, min(256, n - i), sampler, steps, seed=1 + i) for i in range(0, n, 256)])
    features, _ = extract_features(extractor, [to_uint8(x)], n, desc=f"{sampler}{steps}")
    mean, _ = kernel_inception_distance(features, ref["features"], subset_size=min(1000, n))
    return mean


def measure(args, teacher, students) -> list[dict]:
    T = teacher["config"]["diffusion"]["timesteps"]
    t0 = time.perf_counter()
    reference = samples(teacher, args.n, "ddim", T)
    print(f"reference: teacher DDIM-{T}, {args.n} images in {time.perf_counter() - t0:.0f} s")
    extractor = ref = None
    if args.kid:
        extractor = load_inception(None, "cpu")
        cfg, _, _ = model_from_checkpoint(teacher, "cpu")
        ref = reference_stats(cfg.data, extractor, REF_CACHE)
    rows = []
    for k in args.steps:
        row = {"K": k, "student": rms(samples(students[k], args.n, "ddim", k), reference),
               "seconds": students[k]["distilled"]["seconds"]}
        for sampler in ("ddim", "dpmpp"):
            for m in (1, 2, 4):
                if k * m <= T:
                    row[f"teacher_{sampler}_{m}K"] = rms(samples(teacher, args.n, sampler, k * m), reference)
        if args.kid:
            row["kid_student"] = kid(students[k], "ddim", k, args.kid, extractor, ref)
            row["kid_teacher_ddim_K"] = kid(teacher, "ddim", k, args.kid, extractor, ref)
            row["kid_teacher_dpmpp_K"] = kid(teacher, "dpmpp", k, args.kid, extractor, ref)
            row["kid_teacher_dpmpp_2K"] = kid(teacher, "dpmpp", 2 * k, args.kid, extractor, ref)
        rows.append(row)
        print(row)
    if args.kid:
        row = {"K": T, "kid_teacher_ddim_K": kid(teacher, "ddim", T, args.kid, extractor, ref)}
        rows.append(row)
    return rows


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def table(rows, seconds) -> str:
    lines = ["| K | student (DDIM-K) | teacher DDIM-K | DDIM-2K | DDIM-4K | DPM-Solver++ K | 2K | 4K "
             "| round to K (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "student" not in r:
            continue
        cells = [r.get(f"teacher_{sampler}_{m}K") for sampler in ("ddim", "dpmpp") for m in (1, 2, 4)]
        lines.append(f"| {r['K']} | {r['student']:.4f} | " + " | ".join("-" if c is None else f"{c:.4f}"
                                                                          for c in cells)
                     + f" | {seconds.get(r['K'], float('nan')):.0f} |")
    return "\n".join(lines)


@cli
def main(argv=None):
    args = parse_args(argv)
    K = args.steps[-1]
    overrides = [f"distill.start_steps={args.start_steps}", f"distill.updates={args.updates}",
                 f"distill.batch_size={args.batch_size}", f"distill.lr={args.lr}", "train.log_every=25",
                 f"train.save_every={args.updates}", "train.sample_every=1000000", "train.num_workers=0"]
    t0 = time.perf_counter()
    os.chdir(args.dir)
    distill.main(["--teacher", args.teacher, "--steps", str(K), "--name", args.name, *overrides])
    folder = os.path.join("checkpoints", args.name)
    students = {k: load_checkpoint(os.path.join(folder, f"student_{k}steps.pt")) for k in args.steps}
    teacher = load_checkpoint(args.teacher)
    seconds = dict(zip([args.start_steps >> (r + 1) for r in range(64)], students[K]["distilled"]["seconds"]))
    rows = measure(args, teacher, students)
    command = "python " + " ".join(["bench/distill_bench.py", *(argv if argv is not None else sys.argv[1:])])
    record = {"command": command, "machine": machine(), "date": str(datetime.date.today()),
              "distill_overrides": overrides, "n": args.n, "rows": rows, "round_seconds": seconds,
              "total_seconds": time.perf_counter() - t0}
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    md = (f"# Progressive distillation on {args.teacher}\n\n`{command}`\n\n{record['machine']}, {record['date']}\n\n"
          f"RMS distance to the teacher's DDIM-{teacher['config']['diffusion']['timesteps']} samples from the same "
          f"x_T ({args.n} images, pixels in [-1, 1]):\n\n{table(rows, seconds)}\n")
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
