"""evaluate.py and ddpm/metrics.py: the metrics against closed forms, and the command end to end with a small
fixed random conv net in place of the Inception (whose real weights cannot be fetched here)."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import (
    ROOT,
    TinyExtractor,
    assert_one_line_error,
    fails_in_process,
    files_in,
    run_script,
    tiny_checkpoint,
)
from PIL import Image

import evaluate
from config import load_config
from ddpm import metrics
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint
from ddpm.generation import Sampling
from ddpm.shapes import make_shapes
from utils import UserError


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:07d}.png"))
    return str(folder)


@pytest.fixture
def folders(tmp_path):
    """Two folders holding the same 48 shapes images (16 x 16), and a third with other shapes."""
    a = write_pngs(tmp_path / "a", make_shapes(48, 16, 3, seed=0)[0])
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    c = write_pngs(tmp_path / "c", make_shapes(48, 16, 3, seed=1)[0])
    return a, b, c


# ---- the metrics -----------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]  # the same rotation of both: they still commute
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 20)) @ rng.normal(size=(20, 20))
    y = rng.normal(size=(600, 20)) @ rng.normal(size=(20, 20)) + 0.3
    (mu1, s1), (mu2, s2) = metrics.feature_stats(x), metrics.feature_stats(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_singular_covariances():
    f = np.random.default_rng(2).normal(size=(30, 64))  # fewer samples than dimensions: rank 29
    mu, sigma = metrics.feature_stats(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    mu2, sigma2 = metrics.feature_stats(f[:, ::-1].copy())
    assert metrics.frechet_distance(mu, sigma, mu2, sigma2) > 0


def test_feature_stats_in_chunks_equal_numpy():
    f = np.random.default_rng(3).normal(size=(103, 7)).astype(np.float32)
    mu, sigma = metrics.feature_stats(f, chunk=10)
    assert np.allclose(mu, f.astype(np.float64).mean(0), atol=1e-12)
    assert np.allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), atol=1e-12)


def unbiased_mmd2(x, y) -> float:
    """The unbiased MMD^2 of two samples of m rows each, summed pair by pair in float64, with the polynomial
    kernel k(a, b) = (a.b / d + 1)^3 (d the features' dimension)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape

    def k(a, b):
        return (a @ b / d + 1) ** 3
    return (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)


def test_polynomial_mmd_equals_the_sum_over_pairs():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1
    expected = unbiased_mmd2(x, y)
    assert metrics.polynomial_mmd(x, y) == pytest.approx(expected, rel=1e-12)


def test_kid_of_one_subset_of_the_whole_set_is_the_unbiased_mmd():
    """One subset as large as both sets is each set once in some order (drawn without replacement), and the MMD
    does not depend on the order: KID is the unbiased MMD^2 of the sets (float32 features, as the Inception's)."""
    rng = np.random.default_rng(7)
    f1 = rng.normal(size=(40, 8)).astype(np.float32)
    f2 = (rng.normal(size=(40, 8)) * 1.2 + 0.3).astype(np.float32)
    expected = unbiased_mmd2(f1, f2)
    for subset_size in (40, 1000):  # capped at the sets' size
        mean, std = metrics.kernel_inception_distance(f1, f2, num_subsets=1, subset_size=subset_size, seed=3)
        assert mean == pytest.approx(expected, rel=1e-12, abs=1e-14) and std == 0.0


def test_kid_near_zero_for_one_distribution_and_clearly_positive_for_two():
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    mean, std = metrics.kernel_inception_distance(f1, f2, num_subsets=30, subset_size=300)
    assert std > 0 and abs(mean) < 3 * std  # unbiased: zero is well within the subsets' spread
    shifted, shifted_std = metrics.kernel_inception_distance(f1, f2 + 0.5, num_subsets=30, subset_size=300)
    assert shifted > 10 * shifted_std and shifted > 10 * (abs(mean) + 3 * std)


def test_inception_score_closed_forms():
    row = np.random.default_rng(6).normal(size=10)
    mean, std = metrics.inception_score(np.tile(row, (100, 1)))  # identical predictions: p(y|x) = p(y)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 10
    confident = 50.0 * np.eye(k)[np.arange(300) % k]  # one-hot, every split holds each class equally
    mean, std = metrics.inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


# ---- the command -----------------------------------------------------------------------------------------


def run(tmp_path, *args, extractor=None):
    return evaluate.main([*args, "--device", "cpu", "--batch-size", "16", "--ref-cache", str(tmp_path / "refs"),
                          "--out", str(tmp_path / "metrics.json")], extractor=extractor or TinyExtractor())


def test_identical_folders_give_zero_fid_and_append_a_record(tmp_path, folders, capsys):
    a, b, c = folders
    same = run(tmp_path, "--samples-dir", a, "--ref-dir", b)
    assert abs(same["fid"]) < 1e-6 and abs(same["kid_mean"]) < 0.05
    assert same["is_mean"] > 1 and same["n"] == same["ref_n"] == 48 and same["image_size"] == 16
    other = run(tmp_path, "--samples-dir", c, "--ref-dir", b, "--n", "40")
    assert other["fid"] > 1e-3 and other["n"] == 40
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["samples_dir"] for r in records] == [a, c]
    assert records[0]["step"] is None and records[1]["fid"] == pytest.approx(other["fid"])
    assert "FID " in capsys.readouterr().out


def test_reference_statistics_are_cached_and_reused(tmp_path, folders, capsys):
    a, b, _ = folders
    first = TinyExtractor()
    run(tmp_path, "--samples-dir", a, "--ref-dir", b, extractor=first)
    assert first.seen == 96 and "cached in" in capsys.readouterr().out
    second = TinyExtractor()
    record = run(tmp_path, "--samples-dir", a, "--ref-dir", b, extractor=second)
    assert second.seen == 48  # the samples only
    assert "reusing" in capsys.readouterr().out and abs(record["fid"]) < 1e-6
    os.remove(os.path.join(b, "0000047.png"))  # a changed folder is a new reference set
    third = TinyExtractor()
    assert run(tmp_path, "--samples-dir", a, "--ref-dir", b, extractor=third)["ref_n"] == 47
    assert third.seen == 48 + 47


def test_extractor_without_logits_gives_null_inception_score(tmp_path, folders, capsys):
    a, b, _ = folders
    record = run(tmp_path, "--samples-dir", a, "--ref-dir", b, extractor=TinyExtractor(logits=False))
    assert record["is_mean"] is None and record["is_std"] is None
    assert "IS not computed" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tmp_path, folders, capsys):
    a, b, _ = folders
    for args in (["--ref-dir", b], ["--samples-dir", a], ["--samples-dir", a, "--ref-dir", b, "--n", "49"],
                 ["--samples-dir", str(tmp_path / "none"), "--ref-dir", b],
                 ["--samples-dir", a, "--ref-dir", b, "--steps", "10"]):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, *args)
        assert e.value.code == 2
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit):
        run(tmp_path, "--samples-dir", a, "--ref-dir", b)
    assert (tmp_path / "metrics.json").read_text() == "{not json"  # never overwritten
    err = capsys.readouterr().err
    assert err.count("error:") == 6 and "Traceback" not in err


def test_missing_weights_is_one_line_error_without_download(tmp_path, folders):
    a, b, _ = folders
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    # TORCH_HOME moves the hub cache to an empty folder; the dead proxy makes any download fail, not hang
    env = {"TORCH_HOME": str(torch_home), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = run_script([os.path.join(ROOT, "evaluate.py"), "--samples-dir", a, "--ref-dir", b, "--device", "cpu",
                       "--out", str(tmp_path / "m.json")], cwd=tmp_path, env_extra=env)
    expected = os.path.join(str(torch_home), "hub", "checkpoints", metrics.WEIGHTS_FILES[0])
    assert_one_line_error(proc, expected, metrics.WEIGHTS_URL, "--inception-weights")
    assert list(torch_home.rglob("*")) == []  # nothing downloaded, not even a partial file
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(UserError, match="nowhere.pth"):
        metrics.load_inception("nowhere.pth", "cpu")


def test_inputs_a_user_can_fix_are_reported_before_the_missing_weights(tmp_path, folders, capsys):
    """One image in --samples-dir, an empty --ref-dir and --prompts on an unconditional checkpoint are each
    reported as such with no Inception weights anywhere; with good inputs the same command names the weights."""
    a, b, _ = folders
    one, empty = tmp_path / "one", tmp_path / "empty"
    write_pngs(one, make_shapes(1, 16, 3, seed=0)[0])
    empty.mkdir()
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    ckpt = tiny_checkpoint(tmp_path / "uncond.pt")
    weights = ["--inception-weights", str(tmp_path / "none.pth"), "--device", "cpu", "--out", str(tmp_path / "m.json")]
    for args, needle in ((["--samples-dir", str(one), "--ref-dir", b], "holds 1 image"),
                         (["--samples-dir", a, "--ref-dir", str(empty)], "no images"),
                         (["--ckpt", ckpt, "--prompts", str(tmp_path / "prompts.txt"), "--ref-dir", b], "prompt")):
        line = fails_in_process(capsys, evaluate.main, *args, *weights)
        assert needle in line and "none.pth" not in line, line
    assert "none.pth" in fails_in_process(capsys, evaluate.main, "--samples-dir", a, "--ref-dir", b, *weights)
    assert not (tmp_path / "m.json").exists()


def test_real_extractor_loads_a_local_weights_file(tmp_path):
    """The torch-fidelity path with random weights of the right layout (the real file cannot be fetched)."""
    pytest.importorskip("torch_fidelity")
    import torchvision
    fake = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    torch.save(fake.state_dict(), tmp_path / "fake.pth")
    extractor = metrics.load_inception(str(tmp_path / "fake.pth"), "cpu")
    features, logits = extractor(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and features.dtype == np.float32
    assert extractor.name.startswith("inception-") and extractor.name != metrics.InceptionExtractor.name
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="cannot load the Inception weights"):
        metrics.load_inception(str(tmp_path / "wrong.pth"), "cpu")


# ---- a checkpoint ------------------------------------------------------------------------------------------


def test_checkpoint_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "last.pt")
    extractor = TinyExtractor()
    args = ["--ckpt", ckpt, "--n", "8", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--batch-size", "4"]
    record = evaluate.main(args, extractor=extractor)
    folder = tmp_path / "results" / "tiny" / "samples-step0-ddim2-linspace"
    assert files_in(folder) == [f"{i:07d}.png" for i in range(8)]
    assert extractor.seen == 8 + 64  # the samples and the checkpoint's data set (64 shapes)
    assert (record["step"], record["sampler"], record["steps"], record["eta"], record["n"]) == (0, "ddim", 2, 0.0, 8)
    assert (record["order"], record["spacing"], record["dynamic_threshold"]) == (None, "linspace", False)
    assert record["ref"] == "shapes-train" and record["ref_n"] == 64 and np.isfinite(record["fid"])
    stamps = {f: os.stat(folder / f).st_mtime_ns for f in files_in(folder)}
    again = evaluate.main(args, extractor=extractor)  # the samples and the reference statistics are reused
    assert {f: os.stat(folder / f).st_mtime_ns for f in files_in(folder)} == stamps
    assert again["fid"] == pytest.approx(record["fid"]) and extractor.seen == 8 + 64 + 8
    assert len(json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())) == 2


def test_conditional_checkpoint_with_guidance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "cond.pt", "model.num_classes=3")
    record = evaluate.main(["--ckpt", ckpt, "--n", "4", "--device", "cpu", "--guidance-scale", "2",
                            "--class-label", "1", "--sampler", "ddpm"], extractor=TinyExtractor())
    assert (record["guidance_scale"], record["class_label"], record["steps"], record["eta"]) == (2.0, "1", 20, None)
    assert (record["order"], record["spacing"]) == (None, None)
    assert len(files_in(tmp_path / "results" / "tiny" / "samples-step0-ddpm-w2-class1")) == 4
    unconditional = tiny_checkpoint(tmp_path / "uncond.pt")
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", unconditional, "--n", "4", "--device", "cpu", "--guidance-scale", "2"],
                      extractor=TinyExtractor())


def test_grayscale_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "gray.pt", "data.channels=1")
    # the extractor asserts that it is given 3 channels
    record = evaluate.main(["--ckpt", ckpt, "--n", "4", "--device", "cpu", "--samples-dir", "gray"],
                           extractor=TinyExtractor())
    assert record["samples_dir"] == "gray" and np.isfinite(record["fid"])
    assert Image.open(tmp_path / "gray" / "0000000.png").mode == "L"


def test_fid_of_for_training(tmp_path):
    cfg, model, diffusion = model_from_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path / "last.pt")), "cpu")
    model.train()
    model.res = torch.nn.Dropout().eval()  # a submodule in another mode than its parent keeps its own mode
    extractor = TinyExtractor()
    fid = metrics.fid_of(Sampling(model, diffusion, cfg.sample, "cpu"), cfg.data, 8, extractor,
                         cache_dir=str(tmp_path / "refs"))
    assert np.isfinite(fid) and fid > 0 and model.training and not model.res.training  # the modes it was in
    assert extractor.seen == 8 + 64
    assert metrics.fid_of(Sampling(model, diffusion, cfg.sample, "cpu"), cfg.data, 8, extractor,
                          cache_dir=str(tmp_path / "refs")) == pytest.approx(fid)  # same seed, cached reference
    assert extractor.seen == 8 + 64 + 8


def test_dpmpp_checkpoint_and_folder_names(tmp_path, monkeypatch):
    """--sampler dpmpp with its flags through evaluate.py; every sampler setting gets its own folder."""
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "last.pt")
    record = evaluate.main(["--ckpt", ckpt, "--n", "4", "--device", "cpu", "--sampler", "dpmpp", "--steps", "3",
                            "--order", "3", "--spacing", "logsnr", "--dynamic-threshold"], extractor=TinyExtractor())
    assert (record["sampler"], record["steps"], record["order"], record["spacing"], record["eta"],
            record["dynamic_threshold"]) == ("dpmpp", 3, 3, "logsnr", None, True)
    assert len(files_in(tmp_path / "results" / "tiny" / "samples-step0-dpmpp3-order3-logsnr-dynthresh")) == 4
    cfg = load_config(None)
    variants = [[], ["sample.steps=50"], ["sample.spacing=trailing"], ["sample.eta=1.0"], ["sample.sampler=ddpm"],
                ["sample.sampler=dpmpp"], ["sample.sampler=dpmpp", "sample.order=1"], ["sample.dynamic_threshold=true"],
                ["sample.sampler=dpmpp", "sample.spacing=logsnr"]]
    folders = {evaluate.default_samples_dir(load_config(None, v), 7, None) for v in variants}
    assert len(folders) == len(variants)
    expected = os.path.join("results", "cifar10", "samples-step7-ddim100-linspace")
    assert evaluate.default_samples_dir(cfg, 7, None) == expected


def test_fid_of_with_dpm_solver(tmp_path):
    """train.fid_every uses cfg.sample: DPM-Solver++ works there too, and gives other samples than DDIM."""
    cfg, model, diffusion = model_from_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path / "last.pt")), "cpu")
    extractor, refs = TinyExtractor(), str(tmp_path / "refs")
    ddim = metrics.fid_of(Sampling(model, diffusion, cfg.sample, "cpu"), cfg.data, 8, extractor, cache_dir=refs)
    cfg.sample = dataclasses.replace(cfg.sample, sampler="dpmpp", order=2)
    dpm = metrics.fid_of(Sampling(model, diffusion, cfg.sample, "cpu"), cfg.data, 8, extractor, cache_dir=refs)
    assert np.isfinite(dpm) and dpm != ddim


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_two_processes_share_the_sampling_and_rank_0_scores(tmp_path, monkeypatch):
    """evaluate.py under torchrun (2 gloo processes, the tiny extractor swapped in by a wrapper script): the
    samples folder is the one a single process writes, and one record is appended, by rank 0."""
    ckpt = tiny_checkpoint(tmp_path / "last.pt")
    wrapper = tmp_path / "evaluate_tiny.py"
    wrapper.write_text("import sys\nsys.path.insert(0, sys.argv.pop(1))\nimport evaluate\n"
                       "from helpers import TinyExtractor\nevaluate.main(extractor=TinyExtractor())\n")
    args = ["--ckpt", ckpt, "--num-images", "6", "--batch-size", "2", "--sampler", "dpmpp", "--steps", "2",
            "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    # one process, here (one thread, as the subprocesses)
    evaluate.main([*args, "--samples-dir", "one"], extractor=TinyExtractor())
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
                      os.path.join(ROOT, "tests"), *args, "--samples-dir", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert files_in(tmp_path / "two") == files_in(tmp_path / "one") == \
        [f"{i:07d}.png" for i in range(6)]
    for f in files_in(tmp_path / "one"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert two.stdout.count("FID ") == 1 and two.stdout.count("appended to") == 1, two.stdout
    records = json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())
    assert len(records) == 2 and records[0]["fid"] == pytest.approx(records[1]["fid"])
