"""Compression benchmark on the CPU: pruning and quantization of a checkpoint (compress.py), measured.

    python bench/compress_bench.py --ckpt checkpoints/quickstart/last.pt
    python bench/compress_bench.py --ckpt ... --kid-n 256 --finetune-steps 200 --compile

For the dense checkpoint, the pruned ones (30% and 50%, before and after --finetune-steps of train.py --resume),
W8A8 and W4A8 (fake-quantized, in float): parameters, multiply-accumulates per image (torch's FLOP counter, one
call of the network), the size of the weights file (weights only, one copy, as compress.py writes them), DDIM-25
images/s at batch 64 (eager fp32; with --compile also the dense network under torch.compile and torchao's real
int8 kernels, ddpm.quantization.int8_inductor), the RMS pixel distance (in [-1, 1]) to the dense model's samples
from the same x_T, and KID (ddpm/metrics.py's Inception) of --kid-n samples against as many images of the data
(subsets of half of them, 100 times: mean and spread). The machine may be shared: every model is timed --rounds
times, round-robin, and the best time is kept. Writes bench/results/compress-<date>.json and .md with the command,
the machine and the load average.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import compress  # noqa: E402
import train  # noqa: E402
from dataset import build_dataset  # noqa: E402
from ddpm import metrics, quantization  # noqa: E402
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ddpm.cli import ArgumentParser, cli  # noqa: E402
from ddpm.generation import batch_generator  # noqa: E402
from ddpm.images import to_uint8  # noqa: E402
from ddpm.samplers import sample_loop  # noqa: E402

BATCH = 64


def parse_args(argv=None):
    p = ArgumentParser(description="Pruning and quantization on the CPU, measured.", allow_abbrev=False)
    p.add_argument("--ckpt", default=os.path.join(ROOT, "checkpoints", "quickstart", "last.pt"))
    p.add_argument("--kid-n", type=int, default=256, help="samples per model for KID (a multiple of 64)")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="timed DDIM batches per model, round-robin; the best is kept")
    p.add_argument("--prune-flags", default="--batches 1 --max-timesteps 20",
                   help="compress.py prune's flags for the Taylor scores")
    p.add_argument("--compile", action="store_true", help="also torch.compile fp32 and torchao int8 (slow to build)")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--work-dir", help="keep the pruned, fine-tuned and quantized checkpoints here (and reuse them)")
    args = p.parse_args(argv)
    if args.kid_n < BATCH or args.kid_n % BATCH:
        p.error(f"--kid-n must be a positive multiple of {BATCH}")
    return args


@contextlib.contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def make_variants(args, tmp) -> dict:
    """{name: checkpoint path}: the dense one, pruned (and fine-tuned), quantized."""
    paths, timings = {"dense": args.ckpt}, {}
    for ratio in (0.3, 0.5):
        name = f"pruned{int(ratio * 100)}"
        paths[name] = os.path.join(tmp, f"{name}.pt")
        paths[f"{name}+ft"] = os.path.join(tmp, "checkpoints", f"{name}-ft", "last.pt")
        start = time.perf_counter()
        if not os.path.exists(paths[name]):
            compress.main(["prune", "--ckpt", args.ckpt, "--ratio", str(ratio), "--out", paths[name],
                           *args.prune_flags.split()])
            timings[f"prune {name} s"] = time.perf_counter() - start
        start = time.perf_counter()
        if not os.path.exists(paths[f"{name}+ft"]):
            with cwd(tmp):
                train.main(["--resume", paths[name], "--name", f"{name}-ft", f"train.max_steps={args.finetune_steps}",
                            f"train.save_every={args.finetune_steps}", f"train.sample_every={10 ** 9}"])
            timings[f"fine-tune {name} s"] = time.perf_counter() - start
    for bits in (8, 4):
        paths[f"W{bits}A8"] = os.path.join(tmp, f"w{bits}a8.pt")
        if not os.path.exists(paths[f"W{bits}A8"]):
            compress.main(["quantize", "--ckpt", args.ckpt, "--bits", str(bits), "--out", paths[f"W{bits}A8"]])
    return paths, timings


def weights_file_size(ckpt: dict, tmp: str) -> int:
    """Bytes of the checkpoint's sampling weights saved alone (one copy, with the config), as compress.py writes."""
    path = os.path.join(tmp, "size.pt")
    keep = {k: ckpt[k] for k in ("config", "quantization") if k in ckpt}
    torch.save({**keep, "ema": ckpt["ema"]}, path)
    return os.path.getsize(path)


def macs_per_image(model) -> int:
    x = torch.zeros(1, model.image_channels, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([500]))
    return counter.get_total_flops() // 2


@torch.no_grad()
def sample_batch(net, built, start: int) -> torch.Tensor:
    """DDIM-25 on the batch of 64 whose x_T (and noise) come from batch_generator(seed, start, 64)."""
    cfg, model, diffusion, sample_cfg, shape = built
    g = batch_generator(sample_cfg.seed, start, BATCH, "cpu")
    x_T = torch.randn((BATCH, *shape), generator=g)
    return sample_loop(diffusion, diffusion.denoiser(net), x_T, sample_cfg, g).clamp(-1, 1)


def timed_rounds(nets: dict, rounds: int) -> tuple[dict, dict]:
    """Images/s of each network on the first batch, timed `rounds` times round-robin (the machine is shared: the
    best of the rounds is kept, and every model is timed in the same stretch); and that batch's images."""
    best, first, names = {name: float("inf") for name in nets}, {}, list(nets)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts with another model
            net, built = nets[name]
            begin = time.perf_counter()
            first[name] = sample_batch(net, built, 0)
            best[name] = min(best[name], time.perf_counter() - begin)
    return {name: BATCH / s for name, s in best.items()}, first


def kid(extractor, images, ref_features) -> tuple[float, float]:
    batches = [to_uint8(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
    features, _ = metrics.extract_features(extractor, batches, len(images), desc="samples")
    # subsets of half the samples, so that the spread over subsets shows how uncertain a KID of so few samples is
    return metrics.kernel_inception_distance(features, ref_features, num_subsets=100, subset_size=len(images) // 2)


def load_variant(path):
    """(checkpoint, (cfg, model, diffusion, DDIM-25 sample config, image shape)) of one checkpoint."""
    ckpt = load_checkpoint(path)
    cfg, model, diffusion = model_from_checkpoint(ckpt, "cpu", overrides=["sample.precision=fp32"])
    sample_cfg = dataclasses.replace(cfg.sample, sampler="ddim", steps=25, eta=0.0, seed=0)
    return ckpt, (cfg, model, diffusion, sample_cfg, (model.image_channels, model.image_size, model.image_size))


def describe(name, path, ckpt, built, tmp) -> dict:
    cfg, model = built[0], built[1]
    return {"model": name, "params": model.num_params(), "macs_per_image": macs_per_image(model),
            "file_bytes": os.path.getsize(path) if "quantization" in ckpt else weights_file_size(ckpt, tmp),
            "widths": cfg.model.widths and list(cfg.model.widths),
            "finetune_steps": ckpt.get("step") if "+ft" in name else None}


def quality(rows, nets, first, args, extractor, ref_features) -> None:
    """RMS distance of each model's first batch to the dense one's, and KID of its --kid-n samples."""
    for row in rows:
        net, built = nets[row["model"]]
        row["rms_to_dense"] = float((first[row["model"]] - first["dense"]).pow(2).flatten(1).mean(1).sqrt().mean())
        images = torch.cat([first[row["model"]]] + [sample_batch(net, built, s) for s in range(BATCH, args.kid_n,
                                                                                               BATCH)])
        row["kid"], row["kid_std"] = kid(extractor, images, ref_features)
        print(json.dumps(row), flush=True)


def compiled_nets(dense_built) -> tuple[dict, dict]:
    """The dense network under torch.compile (fp32) and torchao's int8 flow, each built and compiled now (its
    first call); {name: (net, built)} and {name: seconds to build, or the error}."""
    cfg, model, diffusion, sample_cfg, shape = dense_built
    calibration = []
    handle = model.register_forward_pre_hook(lambda m, a: calibration.append((a[0].clone(), a[1].clone())))
    sample_batch(model, dense_built, 0)  # the 25 calls of one batch: (x_t, t) over the sampler's steps
    handle.remove()
    nets, info = {}, {}
    for name, build in (("dense compiled", lambda: torch.compile(model)),
                        ("int8 (torchao)", lambda: quantization.int8_inductor(model, calibration))):
        begin = time.perf_counter()
        try:
            net = build()
            with torch.no_grad():
                net(*calibration[0])
        except Exception as e:  # report it, and measure the rest
            info[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        # the exported int8 graph takes (x_t, t) only; the samplers pass the condition too
        nets[name], info[name] = (lambda x, t, cond=None, net=net: net(x, t), dense_built), time.perf_counter() - begin
    return nets, info


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def table_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | | | | error: {r['error']} | | |"

    def num(key, scale=1.0, fmt="{:.1f}"):
        return "" if r.get(key) is None else fmt.format(r[key] * scale)
    return (f"| {r['model']} | {num('params', fmt='{:,.0f}')} | {num('macs_per_image', 1e-6)} | "
            f"{num('file_bytes', 1 / 1024, '{:.0f}')} | {num('images_per_s')} | {num('rms_to_dense', fmt='{:.4f}')} | "
            f"{num('kid', 1e3, '{:.2f}')} ({num('kid_std', 1e3, '{:.2f}')}) |")


def write(args, rows, timings, started) -> None:
    record = {"command": "python " + " ".join(sys.argv), "date": args.date, "machine": machine(),
              "cpus": os.cpu_count(), "load_average_at_start": started, "torch": torch.__version__,
              "ddim_steps": 25, "batch": BATCH, "kid_n": args.kid_n, "finetune_steps": args.finetune_steps,
              "timings_s": timings, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"compress-{args.date}")
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=1)
    head = ("| model | params | MMACs/image | file KiB | images/s | RMS to dense | KID x 1e3 (std) |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [table_row(r) for r in rows]
    with open(base + ".md", "w") as f:
        f.write(f"# Compression on the CPU, {args.date}\n\n`{record['command']}`\n\n{record['machine']}, "
                f"{record['cpus']} CPUs (load average {started} at the start), torch {torch.__version__}; DDIM-25, "
                f"batch {BATCH}, KID of {args.kid_n} samples against {args.kid_n} data images; fine-tune "
                f"{args.finetune_steps} steps.\n\n" + head + "\n".join(lines) + "\n\n"
                + "".join(f"- {k}: {v:.0f}\n" for k, v in timings.items()))
    print(open(base + ".md").read())


@cli
def main(argv=None):
    args = parse_args(argv)
    started = os.getloadavg()[0]
    torch.manual_seed(0)
    extractor = metrics.load_inception(None, "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work_dir or scratch
        os.makedirs(tmp, exist_ok=True)
        ckpt = load_checkpoint(args.ckpt)
        data = build_dataset(model_from_checkpoint(ckpt, "cpu")[0].data)
        picks = torch.randperm(len(data))[:args.kid_n].tolist()
        real = torch.stack([data[i][0] for i in picks])
        ref_features, _ = metrics.extract_features(extractor, [to_uint8(real[i:i + BATCH])
                                                               for i in range(0, len(real), BATCH)], len(real), "data")
        paths, timings = make_variants(args, tmp)
        nets, rows = {}, []
        for name, path in paths.items():
            ckpt, built = load_variant(path)
            nets[name] = (built[1], built)
            rows.append(describe(name, path, ckpt, built, tmp))
        if args.compile:
            compiled, info = compiled_nets(nets["dense"][1])
            nets.update(compiled)
            for name, value in info.items():
                rows.append({"model": name, **({"compile_s": value} if name in compiled else {"error": value})})
                timings[f"compile {name} s"] = value if name in compiled else float("nan")
        speeds, first = timed_rounds(nets, args.rounds)
        for row in rows:
            row["images_per_s"] = speeds.get(row["model"])
        quality([r for r in rows if r["model"] in nets], nets, first, args, extractor, ref_features)
        write(args, rows, timings, round(started, 1))


if __name__ == "__main__":
    main()
