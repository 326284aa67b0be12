"""GPU speed benchmark: ours against diffusers and lucidrains on the DDPM paper's CIFAR-10 network, one run.

    python bench/bench.py --data data/cifar10-folder            # everything (about 15 minutes on an H100)
    python bench/bench.py --parts compute,sample                # no image folder needed
    python bench/bench.py --quick --device cpu --data DIR       # toy networks, 16x16: checks the script itself

Parts: compute (training img/s on data already on the device, each implementation eager and compiled),
sample (DDIM-50 img/s at batch 500), e2e (training img/s from the image folder: train.py's own loop for
ours, lucidrains' Trainer), loss (train.py's loss curve: the fast path against plain fp32 eager). Every part
also reports forward GFLOP per image, MFU against the bf16 matrix-multiply peak timed in the same run, and
peak memory. Writes bench/results/<gpu>-<date>.json and .md (merged with earlier runs of that day) and
prints the table last. An anchor that cannot be imported is reported and skipped.
"""

import csv
import datetime
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import anchors  # noqa: E402
from anchors import CIFAR10, QUICK_OURS, ROOT  # noqa: E402

from ddpm.cli import ArgumentParser, cli  # noqa: E402
from utils import enable_tf32, first_line, thread_map  # noqa: E402

PARTS = ("compute", "sample", "e2e", "loss")
FIGURES = ("train_img_per_s", "train_e2e_img_per_s", "sample_ddim50_img_per_s", "fwd_gflop_per_img", "mfu",
           "peak_mem_gib", "setting")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="compute,sample,e2e", help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--impls", default="ours,diffusers,lucidrains")
    p.add_argument("--settings", default=None, help="eager,compile (default: both on CUDA, eager on the CPU)")
    p.add_argument("--data", default=None, help="image folder for the e2e and loss parts (CIFAR-10 as JPEGs)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="autocast of every part (default: bf16 on CUDA; fp32 on the CPU, which emulates bf16 slowly)")
    p.add_argument("--quick", action="store_true", help="toy networks and sizes: a smoke test, not a benchmark")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of each loss-curve run (default 2000)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    args.parts, args.impls = args.parts.split(","), args.impls.split(",")
    for name, given, valid in (("part", args.parts, PARTS), ("implementation", args.impls, anchors.BUILDERS)):
        if bad := [g for g in given if g not in valid]:
            p.error(f"unknown {name} {bad}; choose from {', '.join(valid)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if args.device == "cpu" and not args.quick:
        p.error("the full benchmark needs a CUDA GPU; use --quick for a CPU smoke run")
    # Without bf16 instructions (AVX2) the smoke sizes trained 8x and sampled 27x slower in bf16 than in fp32
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if {"e2e", "loss"} & set(args.parts) and not (args.data and os.path.isdir(args.data)):
        p.error(f"the e2e and loss parts need --data, an image folder (got {args.data!r}); "
                "python ../shared/data/unpack_cifar10.py DEST writes CIFAR-10 as one")
    args.settings = (args.settings or ("eager,compile" if args.device == "cuda" else "eager")).split(",")
    # batch, sample batch, DDIM steps, timed iterations, e2e steps, e2e log interval, loss-curve steps, matmul size
    sizes = (4, 4, 3, 2, 6, 2, 10, 128) if args.quick else (128, 500, 50, 20, 400, 50, 2000, 8192)
    (args.batch, args.sample_batch, args.steps, args.iters, args.e2e_steps, args.log_every,
     default_loss_steps, args.matmul_n) = sizes
    args.loss_steps = args.loss_steps or default_loss_steps
    if args.loss_steps < 2 * args.log_every:
        p.error(f"--loss-steps must be at least {2 * args.log_every} (two logged intervals)")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=3, repeats=3) -> float:
    """Median seconds per call of fn over `repeats` windows of `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        windows.append((time.perf_counter() - start) / iters)
    return sorted(windows)[len(windows) // 2]


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def fresh(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(name, setting, args, device):
    impl = anchors.BUILDERS[name](device, args.quick)
    if setting == "compile":
        impl.net = torch.compile(impl.eager)
    return impl


def matmul_peak(args, device) -> float:
    """FLOP/s of a large bf16 matrix product: the ceiling that MFU is measured against."""
    n = args.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    # about a second of warm-up on an H100 first, so the clocks have ramped up before the windows
    return 2 * n ** 3 / timed(lambda: a @ b, device, iters=args.iters * 5, warmup=2 if args.quick else 500)


def forward_flops(impl, device) -> float:
    """Forward FLOPs per image at the implementation's image size, counted by torch.utils.flop_counter (a
    multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t = torch.randn(4, 3, impl.size, impl.size, device=device), torch.randint(0, 1000, (4,), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        impl.forward(x, t)
    return counter.get_total_flops() / 4


def train_compute(name, setting, args, device) -> dict:
    """Training img/s on one batch that stays on the device: loss, backward, clipping, fused AdamW step."""
    impl = build(name, setting, args, device)
    params = list(impl.eager.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    x = torch.rand(args.batch, 3, impl.size, impl.size, device=device) * 2 - 1

    def step():
        with autocast(args, device):
            loss = impl.loss(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, device, args.iters)
    return {"img_per_s": args.batch / sec, "peak_mem_gib": peak_gib(device), "params": impl.params,
            "version": impl.version, "gflop": forward_flops(impl, device) / 1e9}


def sample_speed(name, setting, args, device) -> dict:
    """DDIM (eta = 0) img/s at batch args.sample_batch, after one short call that compiles and warms up."""
    impl = build(name, setting, args, device)
    impl.eager.eval()
    with torch.inference_mode(), autocast(args, device):
        sec = timed(lambda: impl.sample(args.sample_batch, args.steps), device, iters=1, warmup=1,
                    repeats=1 if args.quick else 3)
    return {"img_per_s": args.sample_batch / sec, "peak_mem_gib": peak_gib(device)}


def train_py(args, device, overrides, steps, tmp) -> list[dict]:
    """Run train.py on the image folder in `tmp`; returns the rows of its losses.csv."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CIFAR10, "--name", "bench",
           "--resume", "never", "--device", device.type, "data.dataset=folder",
           f"data.root={os.path.abspath(args.data)}", f"train.max_steps={steps}",
           f"train.log_every={args.log_every}", f"train.save_every={steps}", f"train.sample_every={steps}",
           "train.sample_n=4", "sample.steps=2", f"train.batch_size={args.batch}",
           f"train.precision={args.precision}"] + (QUICK_OURS if args.quick else []) + overrides
    # a hang in the smoke mode fails its test (the runs took 25-35 s on a busy 2-core machine); on a GPU the
    # caller caps the time (bench/gpu_check.sh)
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300 if args.quick else None)
    if done.returncode:
        raise RuntimeError(f"train.py exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    with open(os.path.join(tmp, "results", "bench", "plots", "losses.csv")) as f:
        return list(csv.DictReader(f))


def ours_e2e(name, setting, args, device) -> dict:
    """train.py's own loop: data, EMA, optimiser and logging. The first logged interval (compilation,
    warm-up) is left out."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_py(args, device, [f"train.compile={setting == 'compile'}"], args.e2e_steps, tmp)
    # total images over total time of the intervals, as for lucidrains (equal intervals: the harmonic mean)
    return {"img_per_s": len(rows[1:]) / sum(1 / float(r["img_per_s"]) for r in rows[1:])}


def lucidrains_e2e(name, setting, args, device) -> dict:
    """lucidrains' Trainer.train(): its DataLoader over the folder, Adam, clipping, EMA, accelerate autocast."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = anchors.lucidrains_trainer(args.data, args.batch, args.precision, tmp, args.quick)
        if setting == "compile":  # in place: a wrapper would rename the parameters, and ema-pytorch matches names
            trainer.model.model.compile()
        warm = 3 if args.quick else 30
        trainer.train_num_steps = warm
        trainer.train()
        trainer.train_num_steps = warm + args.e2e_steps
        sync(device)
        start = time.perf_counter()
        trainer.train()
        sync(device)
        return {"img_per_s": args.e2e_steps * args.batch / (time.perf_counter() - start)}


E2E = {"ours": ours_e2e, "lucidrains": lucidrains_e2e}  # diffusers ships no training loop


def best(cases: dict) -> tuple[str | None, dict | None]:
    ok = {setting: c for setting, c in cases.items() if "error" not in c}
    if not ok:
        return None, None
    setting = max(ok, key=lambda setting: ok[setting]["img_per_s"])
    return setting, ok[setting]


def run_case(fn, name, setting, args, device) -> dict:
    fresh(device)
    print(f"  {name:<10} {setting:<8} {fn.__name__} ...", flush=True)
    try:
        out = fn(name, setting, args, device)
        print(f"  {name:<10} {setting:<8} {out['img_per_s']:,.0f} img/s", flush=True)
        return out
    except Exception as e:  # one case failing (say, a compiler error in an anchor) must not end the run
        error = f"{type(e).__name__}: {first_line(e)}"
        print(f"  {name:<10} {setting:<8} failed: {error}")
        return {"error": error}


def measure(name, args, device, peak) -> dict:
    """All figures for one implementation; an ImportError (anchor not installed) is reported, not raised."""
    res, detail = dict.fromkeys(FIGURES), {}
    if name in anchors.PACKAGES:
        try:
            importlib.import_module(anchors.PACKAGES[name][0])
        except ImportError as e:
            res["error"] = f"not measured: {e}; pip install {anchors.PACKAGES[name][1]}"
            print(f"  {name}: {res['error']}")
            return res
    for part, fn in (("compute", train_compute), ("sample", sample_speed)):
        if part in args.parts:
            detail[part] = {setting: run_case(fn, name, setting, args, device) for setting in args.settings}
    if "e2e" in args.parts and name in E2E:
        detail["e2e"] = {setting: run_case(E2E[name], name, setting, args, device) for setting in args.settings}
    res["settings"] = {}
    for part, key in (("compute", "train_img_per_s"), ("sample", "sample_ddim50_img_per_s"),
                      ("e2e", "train_e2e_img_per_s")):
        setting, case = best(detail.get(part, {}))
        if case:
            res[key] = case["img_per_s"]
            res["settings"][part] = f"{setting}, {args.precision} autocast"
            if part == "compute":
                res.update(fwd_gflop_per_img=case["gflop"], peak_mem_gib=case["peak_mem_gib"],
                           params=case["params"], version=case["version"],
                           mfu=3 * case["gflop"] * 1e9 * case["img_per_s"] / peak)  # backward = 2x forward
    res["cases"] = detail
    return res


def loss_curves(args, device) -> dict:
    """train.py's loss, logged every log_every steps, for the fast path (bf16, compile on CUDA), the same
    seed in plain fp32 eager, and the fast path with another seed (run-to-run noise)."""
    runs = {"fast": [], "fp32_eager": ["train.precision=fp32", "train.compile=false"],
            "fast_seed1": ["train.seed=1"]}

    def curve(item):
        label, overrides = item
        print(f"  loss curve: {label} ({args.loss_steps} steps)", flush=True)
        if label != "fp32_eager":
            overrides = overrides + [f"train.precision={args.precision}"]
        with tempfile.TemporaryDirectory() as tmp:
            rows = train_py(args, device, overrides, args.loss_steps, tmp)
        return label, [(int(r["step"]), float(r["loss"])) for r in rows]

    # the smoke mode's three runs side by side: each spends most of its time importing torch, on one core
    curves = dict(thread_map(curve, runs.items(), workers=len(runs) if args.quick else 1))

    def mean_abs(a, b):
        return sum(abs(x[1] - y[1]) for x, y in zip(a, b)) / len(a)

    return {"steps": args.loss_steps, "curves": curves,
            "fast_vs_fp32": mean_abs(curves["fast"], curves["fp32_eager"]),
            "seed0_vs_seed1": mean_abs(curves["fast"], curves["fast_seed1"])}


def fmt(v, spec=",.0f"):
    return "n/a" if v is None else format(v, spec)


def table(record) -> str:
    res = record["results"]
    names = list(res)
    rows = [("parameters (M)", lambda r: fmt(r.get("params") and r["params"] / 1e6, ".2f")),
            ("train img/s, compute only", lambda r: fmt(r["train_img_per_s"])),
            ("train img/s, end to end", lambda r: fmt(r["train_e2e_img_per_s"])),
            (f"DDIM-{record['ddim_steps']} img/s, batch {record['sample_batch']}",
             lambda r: fmt(r["sample_ddim50_img_per_s"])),
            ("forward GFLOP/img", lambda r: fmt(r["fwd_gflop_per_img"], ".2f")),
            ("MFU (training)", lambda r: fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else "")),
            ("peak memory (GiB)", lambda r: fmt(r["peak_mem_gib"], ".2f")),
            ("setting", lambda r: r.get("setting") or r.get("error") or "n/a")]
    lines = [f"{record['gpu']}, torch {record['torch']}, {record['date']}, bf16 matmul peak "
             f"{fmt(record['matmul_tflops'], '.0f')} TFLOP/s", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(f(res[n]) for n in names) + " |" for label, f in rows]
    if lc := record.get("loss_curve"):
        lines += ["", f"Loss over the first {lc['steps']} steps, mean |difference| per logged interval: "
                      f"fast vs fp32 eager (same seed) {lc['fast_vs_fp32']:.4f}; "
                      f"fast seed 0 vs seed 1 {lc['seed0_vs_seed1']:.4f}"]
    return "\n".join(lines) + "\n"


def merge(path, record) -> dict:
    """Fold this run into the day's file: figures measured now replace older ones, others are kept."""
    if not os.path.exists(path):
        return record
    with open(path) as f:
        old = json.load(f)
    for name, res in record["results"].items():
        kept = old["results"].get(name, {})
        if "error" in kept and "error" not in res:
            kept = {}
        for k, v in res.items():
            if isinstance(v, dict):
                kept[k] = {**kept.get(k, {}), **v}
            elif v is not None:
                kept[k] = v
        old["results"][name] = kept
    old["commands"] = old.get("commands", [old["command"]]) + [record["command"]]
    for k in ("command", "torch", "matmul_tflops") + (("loss_curve",) if "loss_curve" in record else ()):
        old[k] = record[k]
    return old


@cli
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    enable_tf32(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    print(f"{gpu}, torch {torch.__version__}: {', '.join(args.parts)} for {', '.join(args.impls)}", flush=True)
    peak = matmul_peak(args, device)
    record = {"gpu": gpu, "date": date, "command": command, "torch": torch.__version__, "matmul_tflops": peak / 1e12,
              "ddim_steps": args.steps, "sample_batch": args.sample_batch, "batch": args.batch, "quick": args.quick,
              "results": {name: measure(name, args, device, peak) for name in args.impls}}
    if "loss" in args.parts:
        record["loss_curve"] = loss_curves(args, device)
    slug = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower() + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{slug}-{date}")
    record = merge(path + ".json", record)
    for res in record["results"].values():
        res["setting"] = "; ".join(f"{part}: {setting}" for part, setting in res.get("settings", {}).items()) or None
    text = table(record)
    with open(path + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write("".join(f"    {c}\n" for c in record.get("commands", [record["command"]])) + "\n" + text)
    print(f"wrote {path}.json and .md\n")
    print(text, end="")


if __name__ == "__main__":
    main()
