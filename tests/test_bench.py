"""bench/bench.py: the CPU smoke mode end to end, its FLOP count against a count by hand, merging runs,
and bad input. The anchors are hidden behind modules that fail to import, so the test is the same whether
or not diffusers and denoising-diffusion-pytorch are installed, and checks that a missing anchor is
reported while ours is still measured. The speed figures themselves need the GPU (bench/README.md)."""
import datetime
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_line_error
from PIL import Image

sys.path.insert(0, os.path.join(ROOT, "bench"))
import anchors  # noqa: E402

import bench  # noqa: E402


@pytest.fixture
def missing_anchors(monkeypatch):
    """`import diffusers` and `import denoising_diffusion_pytorch` fail, whether or not they are installed."""
    for package in ("diffusers", "denoising_diffusion_pytorch"):
        monkeypatch.setitem(sys.modules, package, None)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def quick_run(tmp_path, monkeypatch, capsys, *args):
    """bench.py --quick on the CPU, in this process (its train.py runs are subprocesses, as always): one import
    of torch less, 5-10 s on a busy 2-core machine. Returns (the day's record, printed output, its path)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for those train.py runs, as run_script does
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    bench.main(["--quick", "--device", "cpu", *args, "--out", str(out)])
    path = out / f"cpu-quick-{datetime.date.today().isoformat()}.json"
    return json.loads(path.read_text()), capsys.readouterr().out, path


def test_quick_run_measures_ours_and_reports_missing_anchors(tmp_path, folder, missing_anchors, monkeypatch, capsys):
    record, stdout, path = quick_run(tmp_path, monkeypatch, capsys, "--parts", "compute,sample,e2e", "--data", folder)
    for key in ("gpu", "date", "command", "torch", "results"):
        assert record[key], key
    assert "--parts compute,sample,e2e" in record["command"]
    ours = record["results"]["ours"]
    for key in ("train_img_per_s", "train_e2e_img_per_s", "sample_ddim50_img_per_s", "fwd_gflop_per_img", "mfu"):
        assert ours[key] > 0, key
    assert "compute: eager, fp32" in ours["setting"] and "e2e: eager" in ours["setting"]  # fp32: the CPU default
    assert ours["params"] == 702_499  # the quick network: base 32, mults (1, 2), one block
    for name, package in (("diffusers", "diffusers"), ("lucidrains", "denoising-diffusion-pytorch")):
        res = record["results"][name]
        assert "not measured" in res["error"] and f"pip install {package}" in res["error"]
        assert res["train_img_per_s"] is None and res["sample_ddim50_img_per_s"] is None
    # the table comes last, and the markdown file holds the command and the same table
    tail = stdout[stdout.rindex("wrote "):]
    assert "| train img/s, compute only |" in tail and tail.rstrip().splitlines()[-1].startswith("| setting |")
    markdown = path.with_suffix(".md").read_text()
    assert record["command"] in markdown and "| train img/s, end to end |" in markdown


def test_quick_loss_curves(tmp_path, folder, monkeypatch, capsys):
    record, stdout, _ = quick_run(tmp_path, monkeypatch, capsys, "--parts", "loss", "--impls", "ours", "--data", folder)
    lc = record["loss_curve"]
    steps = [[s for s, _ in curve] for curve in lc["curves"].values()]
    assert list(lc["curves"]) == ["fast", "fp32_eager", "fast_seed1"]
    assert steps[0] == [2, 4, 6, 8, 10] and all(s == steps[0] for s in steps)
    # On the CPU the fast path is fp32 eager too, so with the same seed train.py logs exactly the same losses
    # (on a GPU this compares bf16 + compile with fp32); another seed logs other ones.
    assert lc["fast_vs_fp32"] == 0 and lc["seed0_vs_seed1"] > 0
    assert stdout.rstrip().splitlines()[-1].startswith("Loss over the first 10 steps")


def flops_by_hand(model, x, t) -> float:
    """2 x multiply-adds of every Conv2d and Linear, plus QK^T and AV in each attention block (2 HW^2 C
    multiply-adds), from the shapes seen by forward hooks: a count independent of torch's flop counter."""
    total = 0

    def conv_or_linear(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            k = module.in_features
        total += 2 * output.numel() * k

    def attention(module, inputs, output):
        nonlocal total
        b, c, h, w = inputs[0].shape
        total += 2 * 2 * b * (h * w) ** 2 * c

    hooks = [m.register_forward_hook(conv_or_linear) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks += [m.register_forward_hook(attention) for m in model.modules() if type(m).__name__ == "Attention"]
    assert len(hooks) > sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return total / x.shape[0]


def test_full_size_network_has_the_ddpm_paper_parameter_count():
    assert anchors.ours(torch.device("cpu")).params == 35_746_307  # 35.7M in Ho et al. (2020)


def test_forward_flops_match_a_count_by_hand():
    impl = anchors.ours(torch.device("cpu"), quick=True)
    x, t = torch.randn(4, 3, impl.size, impl.size), torch.randint(0, 1000, (4,))
    expected = flops_by_hand(impl.eager, x, t)
    assert bench.forward_flops(impl, torch.device("cpu")) == pytest.approx(expected, rel=0.01)


def test_merge_keeps_earlier_figures_of_the_day(tmp_path):
    def record(command, **ours):
        figures = {**dict.fromkeys(bench.FIGURES), **ours}
        return {"gpu": "g", "date": "d", "command": command, "torch": "t", "matmul_tflops": 1.0,
                "results": {"ours": figures, "diffusers": {**dict.fromkeys(bench.FIGURES), "error": "not measured"}}}

    path = tmp_path / "day.json"
    path.write_text(json.dumps(record("first", train_img_per_s=100.0, settings={"compute": "compile"})))
    merged = bench.merge(str(path), record("second", sample_ddim50_img_per_s=50.0, settings={"sample": "eager"}))
    assert merged["results"]["ours"]["train_img_per_s"] == 100.0
    assert merged["results"]["ours"]["sample_ddim50_img_per_s"] == 50.0
    assert merged["results"]["ours"]["settings"] == {"compute": "compile", "sample": "eager"}
    assert merged["commands"] == ["first", "second"] and merged["command"] == "second"


@pytest.mark.parametrize("args, needles", [
    (["--quick", "--parts", "speed"], ["unknown part", "compute"]),
    (["--quick", "--impls", "ours,flax"], ["unknown implementation", "lucidrains"]),
    (["--quick", "--parts", "e2e"], ["--data", "unpack_cifar10.py"]),
    (["--device", "cpu"], ["CUDA GPU", "--quick"]),
])
def test_bad_input_is_one_line(capsys, args, needles):
    # in this process: a subprocess would spend its time importing torch (8-15 s each on a busy 2-core machine)
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert_one_line_error(SimpleNamespace(returncode=e.value.code, stderr=capsys.readouterr().err), *needles)
