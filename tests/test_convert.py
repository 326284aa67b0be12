"""convert.py and ddpm/weight_formats.py against diffusers itself (no network): its
UNet2DModel imported and our U-Net exported
give the same outputs, diffusers' DDIM loop on an export gives our DDIM images, a round trip is bit-identical,
pytorch_diffusion's key names (from pesser/pytorch_diffusion's model.py) import, the converted checkpoint samples,
fine-tunes and evaluates, and bad input is one line with nothing overwritten."""
import json
import os
import re
import shutil

import pytest
import torch
from helpers import (
    ROOT,
    TINY_TEXT_CKPT,
    RunsCode,
    TinyExtractor,
    assert_one_line_error,
    fails_in_process,
    run_script,
    tiny_checkpoint,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import convert  # noqa: E402
import evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from config import SampleConfig, load_config  # noqa: E402
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ddpm.samplers import sample_loop, sampler_timesteps  # noqa: E402

# the paper's layout on diffusers' side (google/ddpm-cifar10-32), and a small one (11M parameters, 16x16 images)
PAPER = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
             time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
             norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None, act_fn="silu")
SMALL = {**PAPER, "sample_size": 16, "block_out_channels": (128, 256), "layers_per_block": 1,
         "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
# diffusers' own defaults (its training example): [cos | sin] at 10000^(-i/half), padding 1, eps 1e-5, 64-wide heads
DIFFUSERS_STYLE = dict(flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5, attention_head_dim=64)
WIDE = ["model.base_channels=128"]  # our tiny checkpoint at a width diffusers can express (32 groups everywhere)


def run(*argv):
    convert.main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    return fails_in_process(capsys, convert.main, *argv).rstrip("\n")


def diffusers_unet(seed=0, **fields):
    torch.manual_seed(seed)
    return UNet2DModel(**{**SMALL, **fields}).eval()


def save_unet(net, folder):
    net.save_pretrained(str(folder))
    return str(folder)


def outputs_agree(ours, theirs, size=16, labels=None, tol=1e-5):
    """Both networks on the same x at several t (and labels) agree to tol (relative to the outputs' size)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, ours.image_channels, size, size, generator=g)
    t = torch.tensor([0, 437, 999])
    with torch.no_grad():
        a, b = ours(x, t, labels), theirs(x, t, labels).sample
    scale = b.abs().max().item()
    assert scale > 0.1  # not a trivial network
    err = (a - b).abs().max().item()
    assert err < tol * max(1.0, scale), (err, scale)  # float32 rounding grows with the outputs' size
    return err


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    return save_unet(diffusers_unet(), tmp_path_factory.mktemp("small") / "unet")


# ---- diffusers -> ours -----------------------------------------------------------------------------------------

def test_the_paper_network_imports_and_equals_diffusers(tmp_path, capsys):
    """The google/ddpm-cifar10-32 layout at random initialisation, flat as on the Hub, with its scheduler config:
    our U-Net with the paper's options (configs/cifar10.yaml) computes the same function."""
    net = UNet2DModel(**PAPER).eval()
    src = save_unet(net, tmp_path / "ddpm-cifar10-32")
    with open(os.path.join(src, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                   "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                   "variance_type": "fixed_large"}, f)
    run("from-diffusers", src, "--out", tmp_path / "paper.pt")
    assert "35.75M-parameter" in capsys.readouterr().out
    ckpt = load_checkpoint(str(tmp_path / "paper.pt"))
    paper = load_config(None)
    assert ckpt["config"]["model"] == {**vars(paper.model), "channel_mults": [1, 2, 2, 2],
                                       "attention_resolutions": [16], "dropout": 0.0}
    assert ckpt["config"]["diffusion"] == vars(paper.diffusion) and ckpt["step"] == 0
    _, ours, _ = model_from_checkpoint(ckpt, "cpu")
    assert ours.num_params() == 35_746_307
    outputs_agree(ours, net, size=32)


@pytest.mark.parametrize("fields", [{}, DIFFUSERS_STYLE, {"num_class_embeds": 4}],
                         ids=["paper-options", "diffusers-defaults", "class-conditional"])
def test_small_layouts_import_with_the_same_outputs(tmp_path, fields):
    net = diffusers_unet(**fields)
    run("from-diffusers", save_unet(net, tmp_path / "src"), "--out", tmp_path / "ours.pt")
    cfg, ours, _ = model_from_checkpoint(load_checkpoint(str(tmp_path / "ours.pt")), "cpu")
    m = cfg.model
    if fields is DIFFUSERS_STYLE:
        assert (m.time_embedding, m.downsample_padding, m.norm_eps, m.num_heads) == ("transformer", "symmetric",
                                                                                     1e-5, 4)
    labels = None
    if "num_class_embeds" in fields:
        assert m.num_classes == 3  # the last embedding is our null label
        labels = torch.tensor([0, 2, 3])
    outputs_agree(ours, net, labels=labels)


def test_pipeline_folder_old_attention_names_and_bin_weights(tmp_path):
    """A DDPMPipeline folder with unet/ and scheduler/, weights as .bin under diffusers' old attention names
    (query, key, value, proj_attn); its scheduler sets our diffusion section."""
    net = diffusers_unet(seed=2)
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda mo: f".{new_to_old[mo.group(1)]}.", k): v
          for k, v in net.state_dict().items()}
    assert any(".proj_attn." in k for k in sd) and not any(".to_q." in k for k in sd)
    unet_dir = tmp_path / "pipe" / "unet"
    unet_dir.mkdir(parents=True)
    with open(unet_dir / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DModel", **SMALL}, f)
    torch.save(sd, str(unet_dir / "diffusion_pytorch_model.bin"))
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              prediction_type="v_prediction", variance_type="fixed_small_log")
    scheduler.save_pretrained(str(tmp_path / "pipe" / "scheduler"))
    run("from-diffusers", tmp_path / "pipe", "--out", tmp_path / "ours.pt", "name=church", "sample.steps=7")
    cfg, ours, _ = model_from_checkpoint(load_checkpoint(str(tmp_path / "ours.pt")), "cpu")
    d = cfg.diffusion
    assert (d.timesteps, d.beta_schedule, d.objective, d.variance, d.clip_denoised) == (500, "cosine", "v",
                                                                                       "fixed_small", False)
    assert cfg.name == "church" and cfg.sample.steps == 7
    outputs_agree(ours, net)


def pytorch_diffusion_names(sd: dict, levels: int) -> dict:
    """diffusers' names -> pesser/pytorch_diffusion's (its model.py: temb.dense, down[l].block/attn/downsample,
    mid.block_1/attn_1/block_2, up[l] with l the level, nin_shortcut, q/k/v/proj_out as 1x1 convolutions)."""
    rules = [(r"^time_embedding\.linear_1", "temb.dense.0"), (r"^time_embedding\.linear_2", "temb.dense.1"),
             (r"^conv_norm_out", "norm_out"), (r"^mid_block\.resnets\.0", "mid.block_1"),
             (r"^mid_block\.resnets\.1", "mid.block_2"), (r"^mid_block\.attentions\.0", "mid.attn_1"),
             (r"^down_blocks\.(\d+)\.resnets", r"down.\1.block"), (r"^down_blocks\.(\d+)\.attentions", r"down.\1.attn"),
             (r"^down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample"),
             (r"^up_blocks\.(\d+)\.", lambda mo: f"up.{levels - 1 - int(mo.group(1))}."),
             (r"^(up\.\d+)\.resnets", r"\1.block"), (r"^(up\.\d+)\.attentions", r"\1.attn"),
             (r"^(up\.\d+)\.upsamplers\.0", r"\1.upsample"), (r"time_emb_proj", "temb_proj"),
             (r"conv_shortcut", "nin_shortcut"), (r"group_norm", "norm"), (r"to_q", "q"), (r"to_k", "k"),
             (r"to_v", "v"), (r"to_out\.0", "proj_out")]
    out = {}
    for key, v in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        attention_linear = re.search(r"\.(q|k|v|proj_out)\.weight$", key)
        out[key] = v.reshape(*v.shape, 1, 1) if attention_linear else v
    return out


def test_pytorch_diffusion_checkpoint_imports(tmp_path):
    net = diffusers_unet(seed=3)
    sd = pytorch_diffusion_names(net.state_dict(), levels=2)
    for key, shape in [("temb.dense.0.weight", (512, 128)), ("down.1.attn.0.q.weight", (256, 256, 1, 1)),
                       ("down.0.downsample.conv.weight", (128, 128, 3, 3)), ("mid.attn_1.proj_out.bias", (256,)),
                       ("up.0.block.0.nin_shortcut.weight", (128, 384, 1, 1)), ("up.1.upsample.conv.bias", (256,)),
                       ("up.1.attn.1.norm.weight", (256,)), ("norm_out.weight", (128,))]:
        assert tuple(sd[key].shape) == shape, key
    torch.save(sd, str(tmp_path / "model-790000.ckpt"))
    run("from-pytorch-diffusion", tmp_path / "model-790000.ckpt", "--out", tmp_path / "ours.pt")
    cfg, ours, _ = model_from_checkpoint(load_checkpoint(str(tmp_path / "ours.pt")), "cpu")
    # attention on the 16x16 maps, as in all of the paper's models, gives the image size; CIFAR-10's settings at 32
    assert cfg.data.image_size == 32 and cfg.model.attention_resolutions == (16,)
    assert (cfg.model.dropout, cfg.diffusion.variance) == (0.1, "fixed_large")
    outputs_agree(ours, net, size=32)


# ---- ours -> diffusers -----------------------------------------------------------------------------------------

def test_export_loads_as_a_ddpm_pipeline_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tiny_checkpoint(tmp_path / "ours.pt", *WIDE, "diffusion.variance=fixed_small")
    run("to-diffusers", ckpt, "--out", tmp_path / "pipe")
    assert sorted(os.listdir(tmp_path / "pipe")) == ["model_index.json", "scheduler", "unet"]
    assert sorted(os.listdir(tmp_path / "pipe" / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    s = pipe.scheduler.config
    assert (s.num_train_timesteps, s.beta_schedule, s.variance_type, s.clip_sample, s.prediction_type) == (
        20, "linear", "fixed_small", True, "epsilon")
    _, ema, diffusion = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    assert torch.allclose(pipe.scheduler.alphas_cumprod.double(), diffusion.alphas_cumprod.double(), atol=1e-6)
    outputs_agree(ema, pipe.unet.eval())
    run("to-diffusers", ckpt, "--out", tmp_path / "raw", "--no-ema")
    _, raw, _ = model_from_checkpoint(load_checkpoint(ckpt), "cpu", use_ema=False)
    outputs_agree(raw, UNet2DModel.from_pretrained(str(tmp_path / "raw" / "unet")).eval())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusers_ddim_loop_on_the_export_gives_our_ddim_images(tmp_path, eta):
    """DDIMScheduler's own timesteps (T // N apart, the last one stepping to alpha-bar = 1) drive both samplers;
    our DDIM re-derives eps from the clipped x_0, which is diffusers' use_clipped_model_output=True."""
    ckpt = tiny_checkpoint(tmp_path / "ours.pt", *WIDE)
    run("to-diffusers", ckpt, "--out", tmp_path / "pipe")
    unet = UNet2DModel.from_pretrained(str(tmp_path / "pipe" / "unet")).eval()
    scheduler = DDIMScheduler.from_pretrained(str(tmp_path / "pipe"), subfolder="scheduler")
    _, model, diffusion = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    steps, T = 5, diffusion.num_timesteps
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    ours = theirs = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = torch.randn(x_T.shape, generator=g)
            prev = max(int(t) - T // steps, -1)
            ours, _ = diffusion.ddim_step(diffusion.denoiser(model), ours, torch.full((2,), int(t)),
                                          torch.full((2,), prev), z, eta)
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs, eta=eta, use_clipped_model_output=True,
                                    variance_noise=z).prev_sample
    assert scheduler.timesteps.tolist() == [16, 12, 8, 4, 0]
    assert (ours - x_T).abs().max() > 0.5
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("options", [[], ["model.time_embedding=transformer", "model.downsample_padding=symmetric",
                                          "model.norm_eps=1e-5", "model.num_heads=4", "model.num_classes=3",
                                          "diffusion.beta_schedule=cosine", "diffusion.objective=v"],
                                     ["diffusion.variance=learned_range", "diffusion.objective=v"]],
                         ids=["paper", "earlier-options-conditional-cosine", "learned-range"])
def test_ours_to_diffusers_to_ours_is_bit_identical(tmp_path, options):
    ckpt = tiny_checkpoint(tmp_path / "ours.pt", *WIDE, *options)
    run("to-diffusers", ckpt, "--out", tmp_path / "pipe")
    if "diffusion.beta_schedule=cosine" in options:
        assert DDPMScheduler.from_pretrained(str(tmp_path / "pipe" / "scheduler")).config.beta_schedule == \
            "squaredcos_cap_v2"
    run("from-diffusers", tmp_path / "pipe", "--out", tmp_path / "back.pt")
    before, after = load_checkpoint(ckpt), load_checkpoint(str(tmp_path / "back.pt"))
    for section in ("model", "diffusion"):
        assert after["config"][section] == before["config"][section], section
    assert set(after["model"]) == set(before["ema"])
    for k, v in before["ema"].items():
        assert torch.equal(after["model"][k], v) and torch.equal(after["ema"][k], v), k


def test_diffusers_ddpm_loop_on_a_learned_range_export_gives_our_ddpm_images(tmp_path):
    """A learned-variance checkpoint exports as out_channels 2C and DDPMScheduler(variance_type='learned_range');
    diffusers' DDPM loop over our respaced timesteps, with the same noise, gives our respaced DDPM images."""
    ckpt = tiny_checkpoint(tmp_path / "ours.pt", *WIDE, "diffusion.variance=learned_range")
    run("to-diffusers", ckpt, "--out", tmp_path / "pipe")
    unet = UNet2DModel.from_pretrained(str(tmp_path / "pipe" / "unet")).eval()
    scheduler = DDPMScheduler.from_pretrained(str(tmp_path / "pipe"), subfolder="scheduler")
    assert (unet.config.out_channels, scheduler.config.variance_type) == (6, "learned_range")
    _, model, diffusion = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    sample_cfg = SampleConfig(sampler="ddpm", ddpm_steps=6)
    scheduler.set_timesteps(timesteps=sampler_timesteps(diffusion, sample_cfg))
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)  # float32 loses digits of small betas
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = sample_loop(diffusion, diffusion.denoiser(model), x_T, sample_cfg, torch.Generator().manual_seed(1))
    g, theirs = torch.Generator().manual_seed(1), x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs, generator=g).prev_sample.float()
    assert (ours - x_T).abs().max() > 0.5
    # the two networks agree to 1e-5 of their outputs' size (outputs_agree), which is about 8 for this random one
    assert (ours - theirs).abs().max() < 1e-5 * 8


# ---- the converted checkpoint in our scripts ---------------------------------------------------------------------

def test_converted_checkpoint_samples_and_fine_tunes(tmp_path, monkeypatch, small_src):
    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "paper.pt")
    run("from-diffusers", small_src, "--out", ckpt, "data.dataset=shapes", "data.num_images=8")
    sample.main(["--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 0
    train.main(["--resume", ckpt, "train.max_steps=2", "train.batch_size=2", "train.num_workers=0",
                "train.compile=false", "train.log_every=1", "train.sample_n=1", "sample.steps=2",
                "train.warmup_steps=1"])
    tuned = load_checkpoint(str(tmp_path / "checkpoints" / "paper" / "last.pt"))
    start = load_checkpoint(ckpt)
    assert tuned["step"] == 2 and "optimizer" in tuned
    changed = [k for k, v in start["model"].items() if not torch.equal(tuned["model"][k], v)]
    assert len(changed) > len(start["model"]) // 2  # trained from the converted weights, not from scratch
    assert max((tuned["model"][k] - v).abs().max().item() for k, v in start["model"].items()) < 0.05


def test_converted_checkpoint_evaluates(tmp_path, monkeypatch, small_src):
    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "paper.pt")
    run("from-diffusers", small_src, "--out", ckpt, "data.dataset=shapes", "data.num_images=8")
    extractor = TinyExtractor()
    evaluate.main(["--ckpt", ckpt, "--n", "4", "--steps", "2", "--batch-size", "4"], extractor=extractor)
    record = json.loads((tmp_path / "results" / "paper" / "metrics.json").read_text())[-1]
    assert record["n"] == 4 and record["fid"] > 0 and extractor.seen == 4 + 8


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_not_a_diffusers_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "config.json" in fails(capsys, "from-diffusers", tmp_path / "empty", "--out", tmp_path / "o.pt")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert "UNet2DConditionModel" in fails(capsys, "from-diffusers", tmp_path / "sd", "--out", tmp_path / "o.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "JSON" in fails(capsys, "from-diffusers", tmp_path / "bad", "--out", tmp_path / "o.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, str(tmp_path / "x.ckpt"))
    assert "no state dict" in fails(capsys, "from-pytorch-diffusion", tmp_path / "x.ckpt", "--out", tmp_path / "o.pt")
    torch.save({"w": torch.zeros(1)}, str(tmp_path / "x.ckpt"))
    assert "not a pytorch_diffusion" in fails(capsys, "from-pytorch-diffusion", tmp_path / "x.ckpt", "--out",
                                              tmp_path / "o.pt")
    assert "not a file" in fails(capsys, "from-pytorch-diffusion", tmp_path, "--out", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("fields, field", [
    (dict(block_out_channels=(32, 64), norm_num_groups=8), "norm_num_groups"),
    (dict(downsample_type="resnet"), "downsample_type"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")), "up_block_types"),
    (dict(freq_shift=2), "freq_shift"),
])
def test_unsupported_layouts_are_refused_naming_the_field(tmp_path, capsys, fields, field):
    src = save_unet(diffusers_unet(**fields), tmp_path / "src")
    line = fails(capsys, "from-diffusers", src, "--out", tmp_path / "o.pt")
    assert line.split(": ")[2].startswith(field), line  # error: cannot convert 'SRC': FIELD...
    assert not (tmp_path / "o.pt").exists()


def test_unsupported_schedulers_and_fixed_fields(tmp_path, capsys, small_src):
    small_src = shutil.copytree(small_src, tmp_path / "src")
    for sched, field in [({"beta_schedule": "scaled_linear"}, "beta_schedule"),
                         ({"trained_betas": [0.1] * 1000}, "trained_betas"),
                         ({"variance_type": "learned"}, "variance_type"),
                         ({"variance_type": "learned_range"}, "out_channels"),  # learned variances need 2C out
                         ({"thresholding": True}, "thresholding")]:
        with open(os.path.join(small_src, "scheduler_config.json"), "w") as f:
            json.dump(sched, f)
        assert f"{field}=" in fails(capsys, "from-diffusers", small_src, "--out", tmp_path / "o.pt")
    os.remove(os.path.join(small_src, "scheduler_config.json"))
    for override in ("model.base_channels=64", "data.image_size=32", "diffusion.timesteps=10"):
        assert override.split("=")[0] in fails(capsys, "from-diffusers", small_src, "--out", tmp_path / "o.pt",
                                               override)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_truncated_weights_file(tmp_path, capsys, name):
    src = tmp_path / "src"
    save_unet(diffusers_unet(), src)
    if name.endswith(".bin"):
        torch.save(load_file(str(src / "diffusion_pytorch_model.safetensors")), str(src / name))
        os.remove(src / "diffusion_pytorch_model.safetensors")
    data = (src / name).read_bytes()
    (src / name).write_bytes(data[:len(data) // 2])
    line = fails(capsys, "from-diffusers", src, "--out", tmp_path / "o.pt")
    assert name in line and "truncated" in line
    assert not (tmp_path / "o.pt").exists()


def test_a_pickle_that_would_run_code_is_refused_as_such(tmp_path, capsys):
    """A .bin whose pickle calls os.system: weights_only refuses it before anything runs, and the error says so
    (not "damaged or truncated")."""
    from safetensors.torch import load_file
    src = tmp_path / "src"
    save_unet(diffusers_unet(), src)
    sd = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    torch.save({**sd, "x": RunsCode(tmp_path / "ran")}, str(src / "diffusion_pytorch_model.bin"))
    os.remove(src / "diffusion_pytorch_model.safetensors")
    line = fails(capsys, "from-diffusers", src, "--out", tmp_path / "o.pt")
    assert "diffusion_pytorch_model.bin" in line and "system" in line and "could run code" in line, line
    assert "damaged" not in line and "truncated" not in line
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o.pt").exists()


def test_a_text_conditional_checkpoint_is_refused_for_what_it_is(tmp_path, capsys):
    """Its checkpoint holds the text encoder's state; diffusers' UNet2DModel has no text conditioning."""
    ckpt = tiny_checkpoint(tmp_path / "text.pt", *WIDE, *TINY_TEXT_CKPT)
    assert load_checkpoint(ckpt)["text"]["encoder"] == "learned"
    line = fails(capsys, "to-diffusers", ckpt, "--out", tmp_path / "pipe")
    assert "text-conditional" in line and "text_encoder=learned" in line and "holds no state" not in line, line
    assert not (tmp_path / "pipe").exists()


def test_existing_targets_are_refused_or_replaced_whole(tmp_path, capsys, monkeypatch, small_src):
    out = tmp_path / "o.pt"
    out.write_bytes(b"mine")
    assert "--force" in fails(capsys, "from-diffusers", small_src, "--out", out)
    assert out.read_bytes() == b"mine"
    run("from-diffusers", small_src, "--out", out, "--force")
    assert load_checkpoint(str(out))["step"] == 0

    ckpt = tiny_checkpoint(tmp_path / "ours.pt", *WIDE)
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert "--force" in fails(capsys, "to-diffusers", ckpt, "--out", folder)

    def broken(self, path, **kwargs):  # a failure half-way through writing
        (tmp_path / "half").write_text(path)
        open(os.path.join(path, "model_index.json"), "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", broken)
    assert "No space left" in fails(capsys, "to-diffusers", ckpt, "--out", folder, "--force")
    monkeypatch.undo()
    assert os.listdir(folder) == ["keep.txt"] and not os.path.exists((tmp_path / "half").read_text())
    run("to-diffusers", ckpt, "--out", folder, "--force")
    assert sorted(os.listdir(folder)) == ["model_index.json", "scheduler", "unet"]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no temporary folders left


def test_what_diffusers_cannot_express_is_refused(tmp_path, capsys):
    narrow = tiny_checkpoint(tmp_path / "narrow.pt")  # 16 channels: 4 groups there, 8 at 32 channels
    assert "norm_num_groups" in fails(capsys, "to-diffusers", narrow, "--out", tmp_path / "pipe")
    first = tiny_checkpoint(tmp_path / "first.pt", *WIDE, "model.channel_mults=[2,2]")
    assert "channel_mults" in fails(capsys, "to-diffusers", first, "--out", tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_missing_packages_and_the_command_line(tmp_path, monkeypatch, capsys, small_src):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    assert "requirements-convert.txt" in fails(capsys, "from-diffusers", small_src, "--out", tmp_path / "o.pt")
    monkeypatch.undo()
    proc = run_script([os.path.join(ROOT, "convert.py"), "to-diffusers", str(tmp_path / "nope.pt"), "--out",
                       str(tmp_path / "pipe")], tmp_path)
    assert_one_line_error(proc, "nope.pt", "not found")
