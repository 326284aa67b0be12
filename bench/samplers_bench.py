"""Sampler benchmark on the CPU: the error against the exact ODE solution versus network calls for DDIM and
DPM-Solver++ of orders 1-3, ours and diffusers' side by side; with --ckpt, images/s and the distance of
few-step samples to 1,000-step samples from the same x_T.

    python bench/samplers_bench.py                                       # the ODE part, under a minute
    python bench/samplers_bench.py --ckpt checkpoints/quickstart/last.pt # and the checkpoint part

The ODE part needs no network: for data x_0 ~ N(0.3, 0.5^2) the optimal noise prediction and the exact
solution of the probability-flow ODE are closed forms (tests/diffusion_refs.GaussianEps), on DDPM's linear
schedule with T = 1000. The error is the RMS over --ode-n draws of x_T. The checkpoint part compares each
sampler's samples with DDIM (eta 0) over all T steps, a fine discretisation of the same ODE, from the same
x_T: the distance is the RMS pixel difference (in [-1, 1]) per image, averaged over the images.

Writes bench/results/samplers-<date>.json and .md with the command, the machine (lscpu's model name) and the
date, and prints the tables. diffusers is optional: without it its rows say so.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

# (not bench/samplers.py: run from bench/, that name would shadow the samplers module it measures)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from diffusion_refs import GaussianEps  # noqa: E402  (the closed forms the tests use)

from config import DiffusionConfig, SampleConfig  # noqa: E402
from ddpm.cli import ArgumentParser, cli  # noqa: E402
from ddpm.samplers import SPACINGS, sample_loop  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402

PARTS = ("ode", "ckpt")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", help="ode and/or ckpt (default: ode, and ckpt when --ckpt is given)")
    p.add_argument("--steps", default="5,10,20,50,100", help="ODE part: network calls per sample")
    p.add_argument("--ode-n", type=int, default=1024, help="ODE part: draws of x_T")
    p.add_argument("--ckpt", help="a checkpoint, e.g. checkpoints/quickstart/last.pt")
    p.add_argument("--ckpt-steps", default="10,20", help="checkpoint part: steps of the fast samplers")
    p.add_argument("--n", type=int, default=16, help="checkpoint part: images (one batch)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    args.parts = args.parts.split(",") if args.parts else ["ode"] + (["ckpt"] if args.ckpt else [])
    if bad := [x for x in args.parts if x not in PARTS]:
        p.error(f"unknown part {bad}; choose from {', '.join(PARTS)}")
    try:
        args.steps, args.ckpt_steps = ([int(v) for v in a.split(",")] for a in (args.steps, args.ckpt_steps))
    except ValueError:
        p.error("--steps and --ckpt-steps take comma-separated integers, e.g. 5,10,20")
    if "ckpt" in args.parts and not args.ckpt:
        p.error("--parts ckpt needs --ckpt (a checkpoint trained by the quickstart, say)")
    return args


# ---- the ODE part ------------------------------------------------------------------------------------------------

def ours_rows(diffusion, model, x_T, exact, steps):
    """Our DDIM and DPM-Solver++ 1-3 on every spacing: (sampler, spacing, {steps: RMS error})."""
    rows = []
    for sampler, order in (("ddim", None), ("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3)):
        for spacing in SPACINGS:
            kind = dict(sampler=sampler, spacing=spacing, **({"order": order} if order else {}))
            err = {n: rms(sample_loop(diffusion, diffusion.denoiser(model), x_T, SampleConfig(steps=n, **kind)), exact)
                   for n in steps}
            rows.append({"impl": "ours", "sampler": name(sampler, order), "spacing": spacing, "error": err})
    return rows


def diffusers_rows(model, x_T, exact, steps):
    """diffusers' DDIMScheduler (its default 'leading' spacing, and 'trailing') and DPMSolverMultistepScheduler
    (dpmsolver++, midpoint, orders 1-3; linspace and trailing) driven by the same model."""
    try:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    except ImportError:
        return [{"impl": "diffusers", "sampler": "-", "spacing": "-", "error": {}, "note": "diffusers not installed"}]
    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    makers = [(name("ddim"), spacing, lambda sp=spacing: DDIMScheduler(**common, timestep_spacing=sp, clip_sample=False,
                                                                    set_alpha_to_one=True))
              for spacing in ("leading", "trailing")]
    makers += [(name("dpmpp", order), spacing, lambda o=order, sp=spacing: DPMSolverMultistepScheduler(
        **common, solver_order=o, algorithm_type="dpmsolver++", solver_type="midpoint", timestep_spacing=sp))
        for order in (1, 2, 3) for spacing in ("linspace", "trailing")]
    rows = []
    for sampler, spacing, make in makers:
        err = {n: rms(diffusers_loop(make(), model, x_T, n), exact) for n in steps}
        rows.append({"impl": "diffusers", "sampler": sampler, "spacing": spacing, "error": err})
    return rows


def diffusers_loop(scheduler, model, x_T, steps):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.reshape(1).expand(len(x))), t, x).prev_sample
    return x


def name(sampler, order=None) -> str:
    return {"ddim": "DDIM", "ddpm": "DDPM"}.get(sampler) or f"DPM-Solver++ {order}" + ("M" if order > 1 else "")


def rms(x, exact) -> float:
    return ((x.double() - exact) ** 2).mean().sqrt().item()


def ode_part(args) -> dict:
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=1000, clip_denoised=False))
    model = GaussianEps(diffusion.alphas_cumprod64)
    x_T = torch.randn(args.ode_n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = model.exact_x0(x_T)
    rows = ours_rows(diffusion, model, x_T, exact, args.steps) + diffusers_rows(model, x_T, exact, args.steps)
    try:
        import diffusers
        version = diffusers.__version__
    except ImportError:
        version = None
    return {"steps": args.steps, "n": args.ode_n, "data": "N(0.3, 0.5^2)", "schedule": "linear, T=1000",
            "diffusers": version, "rows": rows}


# ---- the checkpoint part -----------------------------------------------------------------------------------------

def timed_samples(model, diffusion, sample_cfg, n, seed=0):
    """(n images, images/s) of sampler settings s, x_T from the seed's generator (the same for every sampler)."""
    from ddpm.generation import Sampling, batch_generator, generate
    start = time.perf_counter()
    x = generate(Sampling(model, diffusion, sample_cfg, "cpu"), n, batch_generator(seed, 0, n, "cpu"))
    return x, n / (time.perf_counter() - start)


def ckpt_part(args) -> dict:
    from ddpm.checkpoint import load_checkpoint, model_from_checkpoint
    cfg, model, diffusion = model_from_checkpoint(load_checkpoint(args.ckpt), "cpu")
    T = cfg.diffusion.timesteps
    ref_settings = SampleConfig(sampler="ddim", steps=T, eta=0.0, precision="fp32")
    timed_samples(model, diffusion, SampleConfig(steps=1, precision="fp32"), args.n)  # warm-up, not counted
    ref, ref_speed = timed_samples(model, diffusion, ref_settings, args.n)
    rows = [{"sampler": name("ddim"), "spacing": "linspace", "steps": T, "img_per_s": ref_speed, "distance": 0.0}]
    fast = [("ddim", None, "linspace")] + [("dpmpp", o, "linspace") for o in (1, 2, 3)] + \
        [("dpmpp", o, "logsnr") for o in (2, 3)]
    for steps in args.ckpt_steps:
        for sampler, order, spacing in fast:
            sample_cfg = SampleConfig(sampler=sampler, steps=steps, order=order or 2, spacing=spacing, precision="fp32")
            x, speed = timed_samples(model, diffusion, sample_cfg, args.n)
            distance = (x - ref).pow(2).flatten(1).mean(1).sqrt().mean().item()
            rows.append({"sampler": name(sampler, order), "spacing": spacing, "steps": steps, "img_per_s": speed,
                         "distance": distance})
    return {"ckpt": args.ckpt, "n": args.n, "reference": f"DDIM, eta 0, all {T} steps", "image_size":
            cfg.data.image_size, "clip_denoised": cfg.diffusion.clip_denoised,
            "threads": torch.get_num_threads(), "rows": rows}


# ---- results -----------------------------------------------------------------------------------------------------

def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        return platform.processor() or platform.machine()


def markdown(record) -> str:
    lines = [f"# Samplers, {record['date']}, {record['machine']}", "", "    " + record["command"], ""]
    if "ode" in record:
        ode = record["ode"]
        lines += [f"## RMS error against the exact ODE solution (data {ode['data']}, {ode['schedule']}, "
                  f"{ode['n']} draws of x_T) by network calls", "",
                  f"torch {record['torch']}, diffusers {ode['diffusers']}. diffusers' DDIM 'leading' is its "
                  "DDIMScheduler's default spacing; its 'trailing' is our DDIM when the steps divide T.", "",
                  "| impl | sampler | spacing | " + " | ".join(str(n) for n in ode["steps"]) + " |",
                  "|---|---|---|" + "---|" * len(ode["steps"])]
        for r in ode["rows"]:
            cells = [f"{r['error'][n]:.2e}" if n in r["error"] else r.get("note", "") for n in ode["steps"]]
            lines.append(f"| {r['impl']} | {r['sampler']} | {r['spacing']} | " + " | ".join(cells) + " |")
        lines.append("")
    if "ckpt" in record:
        c = record["ckpt"]
        lines += [f"## {c['ckpt']}: {c['n']} images of {c['image_size']}x{c['image_size']}, one batch, fp32, "
                  f"{c['threads']} threads; distance to {c['reference']} from the same x_T", "",
                  "| sampler | spacing | steps | images/s | mean RMS distance |", "|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['img_per_s']:.1f} | {r['distance']:.4f} |"
                  for r in c["rows"]]
        lines.append("")
    return "\n".join(lines)


def write(record, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"samplers-{record['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(record))
    return stem


@cli
def main(argv=None):
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "command": command,
              "torch": torch.__version__}
    if "ode" in args.parts:
        record["ode"] = ode_part(args)
    if "ckpt" in args.parts:
        record["ckpt"] = ckpt_part(args)
    stem = write(record, args.out)
    print(markdown(record))
    print(f"written: {stem}.json, {stem}.md")
    return record


if __name__ == "__main__":
    main()
