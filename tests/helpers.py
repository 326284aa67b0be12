"""Shared bits of the tests: one factory for tiny networks, diffusions and checkpoints, a tiny training setup
that runs in a second on the CPU, and a subprocess runner."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sample
from config import DiffusionConfig, ModelConfig, load_config, to_dict
from dataset import build_dataset
from ddpm.autoencoder import KIND, Autoencoder
from ddpm.checkpoint import save_checkpoint
from ddpm.distributed import Process
from ddpm.text_encoders import prompt_encoder
from ddpm.training_step import Trainer
from diffusion import GaussianDiffusion
from model import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart.yaml")


def as_overrides(section: str, fields: dict) -> list[str]:
    """Config overrides `section.field=value` of these fields (tuples as YAML lists)."""
    return [f"{section}.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in fields.items()]


# the tiny network of the tests, once: 16 channels, two levels, attention at 8x8 (of 16x16 images)
TINY_MODEL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
# ... as config overrides, with its images (16x16), T = 20 and 5 sampling steps
TINY_NET = [*as_overrides("model", TINY_MODEL), "data.image_size=16", "diffusion.timesteps=20", "sample.steps=5"]
# ... for checkpoints: shapes as the data set, 4 images
TINY_CKPT = ["name=tiny", *TINY_NET, "data.dataset=shapes", "data.num_images=64", "sample.n=4", "sample.batch_size=4"]

# train.py on 8x8 shapes (attention at 4x4), T=50: a step takes a few milliseconds
TINY = ["data.dataset=shapes", "data.image_size=8", "data.num_images=64",
        *as_overrides("model", {**TINY_MODEL, "attention_resolutions": (4,)}), "diffusion.timesteps=50",
        "train.batch_size=8", "train.lr=1e-3",
        "diffusion.objective=eps", "diffusion.beta_schedule=linear",  # the quickstart has v, cosine
        "train.warmup_steps=2", "train.num_workers=0", "train.log_every=1", "train.save_every=5",
        "train.sample_every=1000", "train.sample_n=4", "sample.steps=3", "train.deterministic=true",
        "train.compile=false", "train.ema_decay=0.9"]


def perturb_zero_params(model: torch.nn.Module, std=0.05, seed=0) -> torch.nn.Module:
    """Give the zero-initialised parameters small random values, so that every path of the network matters
    (a fresh U-Net outputs exactly 0 and ignores t and the label)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# our autoencoder of the latent tests (ddpm/autoencoder.py): factor 4, 3 latent channels, widths 8, 16, 32
TINY_AUTOENCODER = ["autoencoder.factor=4", "autoencoder.ch=8", "autoencoder.latent_channels=3"]


def tiny_autoencoder_checkpoint(path, seed=0) -> str:
    """A train_autoencoder.py checkpoint of a random TINY_AUTOENCODER for 16x16 RGB shapes. Returns the path."""
    cfg = load_config(None, ["data.dataset=shapes", "data.image_size=16", *TINY_AUTOENCODER])
    torch.manual_seed(seed)
    ae = Autoencoder(cfg.autoencoder, cfg.data.channels)
    save_checkpoint({"kind": KIND, "step": 0, "config": to_dict(cfg), "autoencoder": ae.state_dict()}, str(path))
    return str(path)


# ... with a learned text encoder, 8 tokens, and the vocabulary of SHAPE_CAPTIONS' words
TINY_TEXT = dict(text_encoder="learned", text_width=32, text_layers=1, text_max_tokens=8)
TINY_TEXT_CKPT = [f"model.{k}={v}" for k, v in TINY_TEXT.items()]
SHAPE_CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def tiny_unet(seed=0, perturb=True, channels=3, size=16, vocab_size=None, text_width=None, **fields) -> UNet:
    """The tiny U-Net (fields override TINY_MODEL), in eval mode; perturbed so that its output is not zero.
    A text model needs vocab_size (learned) or text_width (clip), as UNet does."""
    torch.manual_seed(seed)
    model = UNet(ModelConfig(**{**TINY_MODEL, **fields}), channels, size, vocab_size, text_width)
    return (perturb_zero_params(model, seed=seed) if perturb else model).eval()


def make_diffusion(**fields) -> GaussianDiffusion:
    """GaussianDiffusion of a DiffusionConfig with these fields (the rest at their defaults)."""
    return GaussianDiffusion(DiffusionConfig(**fields))


def tiny_config(*overrides, config=None):
    """TINY_CKPT + overrides on configs/cifar10.yaml (or on `config`)."""
    return load_config(config or os.path.join(ROOT, "configs", "cifar10.yaml"), [*TINY_CKPT, *overrides])


def tiny_checkpoint(path, *overrides, config=None, captions=SHAPE_CAPTIONS) -> str:
    """A checkpoint of a random tiny network (TINY_CKPT + overrides on configs/cifar10.yaml, or on `config`);
    its EMA weights differ a little from the raw ones; a text model (TINY_TEXT_CKPT among the overrides) has
    the vocabulary of `captions`, or the CLIP its config names. Returns the path."""
    cfg = tiny_config(*overrides, config=config)
    text = {"text": prompt_encoder(cfg.model, None, captions).state()} if cfg.model.text_encoder else {}
    model = perturb_zero_params(UNet.from_config(cfg, text.get("text")), std=0.1)
    sd = model.state_dict()
    ema = {k: v + 0.02 * torch.randn(v.shape) if k == "conv_out.weight" else v for k, v in sd.items()}
    save_checkpoint({"step": 0, "config": to_dict(cfg), "model": sd, "ema": ema, **text}, str(path))
    return str(path)


# the tiny network on 8x8 shapes with T = 100 on the cosine schedule, for trained_tiny_checkpoint
TRAINED_TINY = ["data.image_size=8", "model.attention_resolutions=[4]", "diffusion.timesteps=100",
                "diffusion.beta_schedule=cosine", "sample.steps=10"]


def trained_tiny_checkpoint(path, *overrides, steps=120, num_images=2) -> str:
    """A checkpoint of the tiny network (TINY_CKPT, TRAINED_TINY, then overrides) trained with Adam for `steps`
    steps on the first `num_images` images of its data set (batches of 4 of them; about 6 s of one CPU core),
    deterministic; the trained weights are its model and EMA alike. Returns the path."""
    cfg = tiny_config(*TRAINED_TINY, *overrides)
    dataset = build_dataset(cfg.data)
    x = torch.stack([dataset[i][0] for i in range(num_images)]).repeat(max(1, 4 // num_images), 1, 1, 1)
    diffusion = GaussianDiffusion(cfg.diffusion)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet.from_config(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.randint(0, cfg.diffusion.timesteps, (len(x),), generator=g)
        loss = diffusion.loss(model, x, t=t, noise=torch.randn(x.shape, generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sd = model.state_dict()
    save_checkpoint({"step": steps, "config": to_dict(cfg), "model": sd, "ema": sd}, str(path))
    return str(path)


def tiny_trainer(*overrides, device="cpu", log=print) -> Trainer:
    """The Trainer of train.py's tiny run (configs/quickstart.yaml, TINY, then overrides) on one process."""
    cfg = load_config(CONFIG, [*TINY, *overrides])
    return Trainer(cfg, Process(0, 1, torch.device(device)), build_dataset(cfg.data), log)


def tiny_clip(folder) -> str:
    """A random CLIPTextModel of width 32 with a tokenizer of single letters and digits, saved to `folder` as
    a Hub model is (config.json, weights, tokenizer files): model.text_encoder_path=folder. Needs transformers."""
    import transformers  # optional: the tests that need it skip without it
    os.makedirs(folder, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {c: i for i, c in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class TinyExtractor:
    """A fixed random conv net (seeded): 32 pooled features and 10 logits per image; counts the images."""

    name = "tiny-test-net"

    def __init__(self, logits=True):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
            self.head = nn.Linear(32, 10)
        self.logits, self.seen = logits, 0

    @torch.no_grad()
    def __call__(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.seen += len(images)
        f = self.body(images.float() / 127.5 - 1)
        return f.numpy(), (self.head(f).numpy() if self.logits else None)


class RunsCode:
    """An object whose unpickling calls os.system('touch MARKER'), as a malicious weights file's would: pickled
    into a file, loading it with weights_only=False would create the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def files_in(folder) -> list[str]:
    """The names in a folder, sorted, without hidden ones (the .lock of a run that wrote it)."""
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def run_script(args, cwd, env_extra=None, timeout=300, **kwargs):
    """Run `python <args>` in cwd with the repo importable; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def fails_in_process(capsys, main, *argv) -> str:
    """main(argv as strings) in-process; expect exit code 2 and exactly one 'error: ...' line on stderr,
    which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def run_sample(*argv):
    """sample.py in-process on these arguments (as strings)."""
    sample.main([str(a) for a in argv])


def sample_fails(capsys, *argv) -> str:
    """sample.py in-process on these arguments: exit code 2 and one 'error: ...' line, which is returned."""
    return fails_in_process(capsys, sample.main, *argv)


def assert_one_line_error(proc, *needles):
    """Exit code 2, exactly one 'error:' line on stderr, no traceback, and the line names each needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
