"""The CUDA paths: the GPU-resident batches, torch.compile, bf16 and fp16, channels_last, exact resume,
sampling, and train.py + sample.py end to end. Skipped without a GPU (as in CI); on a GPU machine run
`python3 -m pytest -q tests/test_cuda.py`."""
import copy
import os

import pytest
import torch
from helpers import CONFIG, ROOT, TINY, perturb_zero_params, run_script, tiny_trainer

from config import SampleConfig, load_config
from dataset import build_dataset
from ddpm import generation
from ddpm.batches import Batches
from ddpm.checkpoint import load_checkpoint
from ddpm.samplers import sample_loop
from diffusion import GaussianDiffusion
from model import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
FAST = ["train.compile=auto", "train.precision=auto", "train.deterministic=false"]


def test_gpu_resident_batches_equal_the_cpu_ones():
    cfg = load_config(CONFIG, TINY)
    dataset = build_dataset(cfg.data)
    on_gpu, on_cpu = (Batches(dataset, 8, seed=3, device=d, hflip=True, preload=True) for d in (CUDA, "cpu"))
    assert on_gpu.images.is_cuda and on_gpu.images.dtype == torch.uint8
    for _ in range(20):  # 8 batches per epoch: crosses two epoch boundaries
        (xg, yg), (xc, yc) = next(on_gpu), next(on_cpu)
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


def test_fast_path_compiles_and_trains_in_bf16():
    messages = []
    trainer = tiny_trainer(*FAST, log=messages.append, device=CUDA)
    assert trainer.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    losses = [trainer.train_step_with_compile_fallback()[0]] + [trainer.train_step()[0] for _ in range(5)]
    assert trainer.compiled and not messages, messages
    assert all(torch.isfinite(loss) for loss in losses)
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())


def test_bf16_gradients_are_close_to_fp32():
    fast, plain = tiny_trainer(*FAST, device=CUDA), tiny_trainer("train.precision=fp32", device=CUDA)
    (loss_fast, norm_fast), (loss_plain, norm_plain) = fast.train_step_with_compile_fallback(), plain.train_step()
    assert torch.allclose(loss_fast, loss_plain, rtol=2e-2)
    assert torch.allclose(norm_fast, norm_plain, rtol=5e-2)


def test_fp16_scales_the_loss_and_stays_finite():
    trainer = tiny_trainer("train.precision=fp16", device=CUDA)
    for _ in range(5):
        loss, norm = trainer.train_step()
        assert torch.isfinite(loss) and torch.isfinite(norm)
    assert trainer.scaler.get_scale() > 1.0


def random_model(*overrides):
    cfg = load_config(CONFIG, [*TINY, *overrides])
    model = perturb_zero_params(UNet.from_config(cfg))
    return cfg, model.to(CUDA).eval(), GaussianDiffusion(cfg.diffusion).to(CUDA)


def ddim(model, diffusion, precision):
    gen = torch.Generator(CUDA).manual_seed(0)
    s = SampleConfig(sampler="ddim", steps=5, precision=precision)
    return generation.generate(generation.Sampling(model, diffusion, s, CUDA), 8, gen)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_sampling_bf16_and_compiled_agree_with_fp32_eager():
    cfg, model, diffusion = random_model("train.compile=auto")
    reference = ddim(model, diffusion, "fp32")
    assert relative_error(ddim(model, diffusion, "bf16"), reference) < 5e-2
    compiled = generation.prepare_model(generation.Sampling(model, diffusion, cfg.sample, CUDA), cfg.train.compile, 8,
                                         None).model
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert relative_error(ddim(compiled, diffusion, "fp32"), reference) < 1e-2


def test_dpm_solver_on_cuda_agrees_with_the_cpu():
    """DPM-Solver++ 3M with logsnr steps and dynamic thresholding (a sort per image): fp32 on the GPU as on the
    CPU up to kernel rounding, and bf16 autocast close."""
    cfg, model, diffusion = random_model()
    s = SampleConfig(sampler="dpmpp", steps=6, order=3, spacing="logsnr", dynamic_threshold=True)
    x_T = torch.randn(8, model.image_channels, model.image_size, model.image_size,
                      generator=torch.Generator().manual_seed(0)) * 2

    def run(net, diff, x, dtype=None):
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return sample_loop(diff, diff.denoiser(net, threshold=True), x, s).float().cpu()
    cpu = GaussianDiffusion(cfg.diffusion)
    reference = run(copy.deepcopy(model).cpu(), cpu, x_T)
    assert relative_error(run(model, diffusion, x_T.to(CUDA)), reference) < 1e-3
    assert relative_error(run(model, diffusion, x_T.to(CUDA), torch.bfloat16), reference) < 5e-2


def test_resume_on_cuda_is_exact(tmp_path):
    common = ["--config", CONFIG, "--device", "cuda", *TINY]
    for name, stops in (("straight", [6]), ("resumed", [3, 6])):
        for stop in stops:
            proc = run_script([os.path.join(ROOT, "train.py"), "--name", name, *common, f"train.max_steps={stop}"],
                              cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_checkpoint(str(tmp_path / "checkpoints" / n / "last.pt")) for n in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_train_and_sample_scripts_on_cuda(tmp_path):
    proc = run_script([os.path.join(ROOT, "train.py"), "--config", CONFIG, "--name", "gpu", "--device", "cuda",
                       *TINY, *FAST, "train.max_steps=10"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.compile failed" not in proc.stdout + proc.stderr
    ckpt = tmp_path / "checkpoints" / "gpu" / "last.pt"
    out = tmp_path / "grid.png"
    proc = run_script([os.path.join(ROOT, "sample.py"), "--ckpt", str(ckpt), "--out", str(out), "--n", "4",
                       "--device", "cuda"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and "torch.compile failed" not in proc.stdout + proc.stderr
