"""Text-conditional models: captions from each source, the vocabulary and its round trip through a checkpoint, the
network's text path, CLIP (a tiny random one; skipped without transformers), shapes trained on their captions that
show the prompted colour (judged by pixels), prompts on the command lines, exact resume and bad input."""
import contextlib
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from helpers import (
    CONFIG,
    SHAPE_CAPTIONS,
    TINY,
    TINY_TEXT,
    TINY_TEXT_CKPT,
    TinyExtractor,
    fails_in_process,
    files_in,
    perturb_zero_params,
    tiny_checkpoint,
    tiny_clip,
    tiny_unet,
)
from matplotlib.colors import rgb_to_hsv
from PIL import Image

import evaluate
import sample
import train
from config import DataConfig, SampleConfig, load_config
from dataset import build_dataset
from ddpm import generation
from ddpm.captions import SHAPE_COLOURS, colour_hue_range, label_captions
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint
from ddpm.conditions import grid_captions
from ddpm.config_rules import ConfigError
from ddpm.image_cache import load_uint8
from ddpm.text_encoders import CLS, PAD, UNK, ClipEncoder, Vocabulary, looks_like_tags, prompt_encoder, split_caption
from model import CrossAttention, UNet
from utils import UserError

SIZE = 8  # the trained model's images (helpers.TINY)
TILE = 64  # ... as the grids show them: enlarged 8x, to tiles of at least 64 pixels
KINDS = ("circle", "square", "triangle")
# the captioned shapes run: 8x8 RGB shapes, a learned encoder of width 32, 200 steps (about 40 s on 2 cores)
TEXT_RUN = [*TINY, "model.text_encoder=learned", "model.text_width=32", "model.text_layers=1",
            "model.text_max_tokens=4", "data.num_images=1024", "diffusion.beta_schedule=cosine",
            "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=20", "train.log_every=50",
            "train.ema_decay=0.95", "train.cond_drop_prob=0.2"]


def save_png(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def captions_of(root, **kw):
    ds = build_dataset(DataConfig(dataset="folder", root=str(root), image_size=8, **kw), captions=True)
    return {os.path.relpath(f, root): ds.captions[y] for f, y in zip(ds.files, ds.labels.tolist())}


# ---- captions --------------------------------------------------------------------------------------------------------

def test_folder_captions_from_sidecars_and_metadata_with_missing_and_empty_ones(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.jpg", "e.png", "sub/f.png", "sub/g.png"):
        save_png(tmp_path / name)
    (tmp_path / "a.txt").write_text("  a red\n square \n", encoding="utf-8")  # whitespace collapsed
    (tmp_path / "c.txt").write_text("", encoding="utf-8")  # empty: no caption
    (tmp_path / "e.txt").write_bytes("\ufeffun carré bleu".encode())  # UTF-8 with a byte-order mark
    lines = [{"file_name": "a.png", "text": "loses to the sidecar"}, {"file_name": "b.png", "text": "a blue circle"},
             {"file_name": "sub/f.png", "text": "from the top"}, {"file_name": "gone.png", "text": "no such image"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "f.png", "text": "deeper wins"}))
    with pytest.warns(UserWarning, match="1 metadata.jsonl entries name no image.*gone.png"):
        got = captions_of(tmp_path)
    assert got == {"a.png": "a red square", "b.png": "a blue circle", "c.png": "", "d.jpg": "",
                   "e.png": "un carré bleu", os.path.join("sub", "f.png"): "deeper wins",
                   os.path.join("sub", "g.png"): ""}


def test_captioned_labels_survive_the_decode_cache_and_an_unreadable_image(tmp_path):
    """The cache holds images and the file each came from, so captions (or classes) follow their image."""
    for name, colour in (("x/a.png", (255, 0, 0)), ("x/c.png", (0, 0, 255)), ("y/d.png", (0, 255, 0))):
        save_png(tmp_path / name, colour)
        (tmp_path / name).with_suffix(".txt").write_text(f"colour {name[2]}")
    (tmp_path / "x" / "b.png").write_bytes(b"not an image")  # replaced by the next readable image, c.png
    (tmp_path / "x" / "b.txt").write_text("colour b")
    cfg = DataConfig(dataset="folder", root=str(tmp_path), image_size=8)
    for cached in (False, True):
        ds = build_dataset(cfg, captions=True)
        with pytest.warns(UserWarning, match="b.png") if not cached else contextlib.nullcontext():
            images, ids = load_uint8(ds, cfg)
        assert [ds.captions[i] for i in ids.tolist()] == ["colour a", "colour c", "colour c", "colour d"]
        assert images[1].equal(images[2]) and images[1][2].min() == 255  # c.png twice
    labelled = build_dataset(cfg)  # the same cache serves the class labels of the sub-folders
    assert load_uint8(labelled, cfg)[1].tolist() == [0, 0, 0, 1]


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path):
    save_png(tmp_path / "img.png")
    (tmp_path / "img.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"caption file '.*img\.txt' is not UTF-8"):
        captions_of(tmp_path)
    (tmp_path / "img.txt").unlink()
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "img.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata file '.*metadata\.jsonl' is not UTF-8"):
        captions_of(tmp_path)


@pytest.mark.parametrize("line, needle", [
    ('{"file_name": "img.png", "text": "a"', "line 2 is not JSON"),
    ('{"text": "a red square"}', 'line 2 has no "file_name"'),
    ('["img.png", "a red square"]', 'line 2 has no "file_name"'),
    ('{"file_name": "img.png", "text": 7}', 'line 2: "text" must be a string'),
])
def test_bad_metadata_lines_are_named(tmp_path, line, needle):
    save_png(tmp_path / "img.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "img.png", "text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=needle):
        captions_of(tmp_path)


def test_torchvision_sets_are_captioned_from_their_labels():
    cifar = ["airplane", "automobile", "bird"]
    assert label_captions("cifar10", cifar, torch.tensor([2, 0, 1])) == [
        "a photo of a bird", "a photo of an airplane", "a photo of an automobile"]
    assert label_captions("mnist", ["0 - zero", "7 - seven"], torch.tensor([1])) == ["a handwritten digit seven"]
    assert label_captions("fashion_mnist", ["T-shirt/top", "Ankle boot"], torch.tensor([0, 1])) == [
        "a photo of a t-shirt/top", "a photo of an ankle boot"]


def measured_hue(image) -> float | None:
    """The hue (degrees) of an image's bright, saturated pixels (the shape: value >= 0.85 and saturation >= 0.7
    in the data, the background's value <= 0.3), as their circular mean weighted by S*V; None if there are
    fewer than 3. image: float C x H x W in [-1, 1]."""
    hsv = rgb_to_hsv(((image.permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1))
    fg = (hsv[..., 2] > 0.6) & (hsv[..., 1] > 0.35)
    if fg.sum() < 3:
        return None
    angle, weight = 2 * np.pi * hsv[..., 0][fg], (hsv[..., 1] * hsv[..., 2])[fg]
    return math.degrees(math.atan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum())) % 360


def in_range(hue, colour) -> bool:
    low, high = colour_hue_range(colour)
    return hue is not None and (hue - low) % 360 < (high - low) % 360


def test_shape_captions_name_the_colour_their_pixels_show():
    """'a red triangle': the kind is the label's, and the colour name's hue range holds the hue measured from the
    image's pixels (all but the few shapes whose hue lies within a degree or two of a sector's edge)."""
    cfg = DataConfig(dataset="shapes", num_images=300, image_size=16)
    labelled, captioned = build_dataset(cfg), build_dataset(cfg, captions=True)
    captions = [captioned.captions[y] for y in captioned.labels.tolist()]
    hits = []
    for i, caption in enumerate(captions):
        article, colour, kind = caption.split()
        assert article == "a" and colour in SHAPE_COLOURS and kind == KINDS[int(labelled.labels[i])]
        hits.append(in_range(measured_hue(captioned[i][0]), colour))
    assert np.mean(hits) >= 0.97
    assert {c.split()[1] for c in captions} == set(SHAPE_COLOURS)
    gray = build_dataset(DataConfig(dataset="shapes", num_images=20, image_size=16, channels=1), captions=True)
    assert set(gray.captions) <= {"", "a circle", "a square", "a triangle"}


def test_colour_names_cover_the_circle_in_six_sectors():
    assert colour_hue_range("red") == (330, 30) and colour_hue_range("blue") == (210, 270)
    named = [c for h in range(360) for c in SHAPE_COLOURS if in_range(h, c)]
    assert len(named) == 360 and named[0] == "red" and named[45] == "yellow" and named[359] == "red"


# ---- the vocabulary --------------------------------------------------------------------------------------------------

def test_words_or_tags_by_the_rule():
    tags = ["1girl, solo, long hair, blue eyes", "2girls, smile", "solo"]
    sentences = ["a photo of a cat, sitting on a warm mat", "a dog"]
    assert looks_like_tags(tags) and not looks_like_tags(sentences) and not looks_like_tags(["", ""])
    assert split_caption("1girl,  Long   Hair ,blue eyes,", True) == ["1girl", "long hair", "blue eyes"]
    assert split_caption("A photo of a CAT, sitting!", False) == ["a", "photo", "of", "a", "cat", "sitting"]
    assert split_caption("ｆｕｌｌｗｉｄｔｈ", False) == ["fullwidth"]  # NFKC


def test_vocabulary_tokens_unknown_words_and_cutting():
    messages = []
    vocab = Vocabulary.from_captions(["a red circle", "a blue square", ""], max_tokens=4)
    assert vocab.words == ["a", "blue", "circle", "red", "square"] and not vocab.tags and len(vocab) == 8
    ids = vocab.encode(["a red circle", "", "a purple circle", "a red red red circle"], messages.append)
    word = {w: i + 3 for i, w in enumerate(vocab.words)}
    assert ids.tolist() == [[CLS, word["a"], word["red"], word["circle"]], [PAD] * 4,
                            [CLS, word["a"], UNK, word["circle"]], [CLS, word["a"], word["red"], word["red"]]]
    assert len(messages) == 2 and "purple" in messages[0] and "<unk>" in messages[0]
    assert "1 caption(s)" in messages[1] and "model.text_max_tokens=4" in messages[1]
    assert vocab.encode(["a red circle"], messages.append) is not None and len(messages) == 2  # nothing to say


def test_vocabulary_round_trip_through_a_checkpoint(tmp_path):
    """Tags or words, the vocabulary comes back from a weights_only load and encodes the same tokens."""
    for captions in (SHAPE_CAPTIONS, ["1girl, solo, blue eyes", "2girls, smile, blue eyes"]):
        path = tiny_checkpoint(tmp_path / "t.pt", *TINY_TEXT_CKPT, captions=captions)
        ckpt = torch.load(path, weights_only=True)
        again = prompt_encoder(load_config(None, TINY_TEXT_CKPT).model, ckpt["text"])
        fresh = Vocabulary.from_captions(captions, TINY_TEXT["text_max_tokens"])
        assert (again.words, again.tags) == (fresh.words, fresh.tags)
        assert torch.equal(again.encode(captions), fresh.encode(captions))
        cfg, model, _ = model_from_checkpoint(load_checkpoint(path), "cpu")
        assert model.text_encoder.token.num_embeddings == len(fresh)
    assert again.tags and again.words == ["1girl", "2girls", "blue eyes", "smile", "solo"]


# ---- the network -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2])
def test_cross_attention_against_a_float64_reference(heads):
    torch.manual_seed(0)
    layer = perturb_zero_params(CrossAttention(16, 12, heads, 1e-6)).double()
    x, context = torch.randn(2, 16, 3, 5, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    q = torch.einsum("oc,bchw->bhwo", layer.q.weight[:, :, 0, 0], layer.norm(x)) + layer.q.bias  # B, H, W, C
    kv = context @ layer.kv.weight.T + layer.kv.bias
    k, v = kv[..., :16], kv[..., 16:]
    d = 16 // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(torch.einsum("byxd,bld->byxl", q[..., s], k[..., s]) / math.sqrt(d), dim=-1)
        out[..., s] = torch.einsum("byxl,bld->byxd", weights, v[..., s])
    expected = x + torch.einsum("oc,bhwc->bohw", layer.proj.weight[:, :, 0, 0], out) + layer.proj.bias[:, None, None]
    assert torch.allclose(layer(x, context), expected, atol=1e-10)


def text_unet(perturb_text: bool):
    """A tiny learned-text U-Net with every zero-initialised layer perturbed, those of the text path only when
    `perturb_text`."""
    model = tiny_unet(perturb=False, vocab_size=10, **TINY_TEXT)
    text_path = {n for n, _ in model.named_parameters() if n.startswith("text_proj") or ".cross.proj" in n}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any() and (perturb_text or name not in text_path):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_a_fresh_text_model_is_the_unconditional_one():
    """With the zero-initialised text layers as they start, the output is that of the unconditional U-Net with the
    same weights, whatever the caption; once they are trained (here: perturbed), the caption matters."""
    model, plain = text_unet(perturb_text=False), tiny_unet(perturb=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    tokens = torch.randint(0, 10, (3, TINY_TEXT["text_max_tokens"]))
    with torch.no_grad():
        expected = plain(x, t)
        assert expected.abs().max() > 0.01
        for cond in (tokens, torch.zeros_like(tokens), None):
            assert torch.allclose(model(x, t, cond), expected, atol=1e-6)
        trained = text_unet(perturb_text=True)
        a, b, c = trained(x, t, tokens), trained(x, t, model.null_condition(tokens)), trained(x, t, None)
    assert (a - b).abs().max() > 1e-3 and torch.equal(b, c)
    assert model.null_condition(tokens).eq(PAD).all()


def test_gradients_reach_the_text_encoder():
    model = text_unet(perturb_text=True).train()
    tokens = torch.tensor([[CLS, 3, 4, 5, PAD, PAD, PAD, PAD]] * 2)
    model(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), tokens).square().mean().backward()
    for name, p in model.named_parameters():
        if name != "text_encoder.token.weight":
            assert p.grad is not None and p.grad.abs().max() > 0, name
    used = model.text_encoder.token.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [i in (PAD, CLS, 3, 4, 5) for i in range(10)]


def test_text_options_are_checked():
    with pytest.raises(ConfigError, match="model.text_encoder=learned and model.num_classes=3 cannot"):
        load_config(None, ["model.text_encoder=learned", "model.num_classes=3"])
    with pytest.raises(ConfigError, match="at most 77 with CLIP"):
        load_config(None, ["model.text_encoder=clip", "model.text_max_tokens=78"])
    with pytest.raises(ConfigError, match=r"model.text_max_tokens must be in \[2, inf\)"):
        load_config(None, ["model.text_encoder=learned", "model.text_max_tokens=1"])
    with pytest.raises(ConfigError, match="model.text_width must be below 64 or a multiple of 64"):
        load_config(None, ["model.text_encoder=learned", "model.text_width=100"])
    with pytest.raises(ConfigError, match="model.text_encoder"):
        load_config(None, ["model.text_encoder=gpt"])
    assert load_config(None, ["model.text_encoder=learned", "sample.guidance_scale=3"]).sample.guidance_scale == 3


# ---- CLIP ------------------------------------------------------------------------------------------------------------

def test_clip_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(UserError, match="needs the transformers package.*pip install -r requirements-text.txt"):
        ClipEncoder("openai/clip-vit-base-patch32", 8, "cpu")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_encodings_cached_per_caption_and_zero_for_the_empty_one(clip_folder):
    import transformers
    encoder = ClipEncoder(clip_folder, 16, "cpu")
    got = encoder.encode(["a red circle", "", "a blue square", "a red circle"])
    assert got.shape == (4, 17, 32) and got.dtype == torch.float16
    assert got[1].eq(0).all() and torch.equal(got[0], got[3])
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_folder)
    clip = transformers.CLIPTextModel.from_pretrained(clip_folder).eval()
    ids = tokenizer(["a blue square"], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = clip(input_ids=ids)
    assert torch.allclose(got[2, 0].float(), out.pooler_output[0], rtol=1e-3, atol=1e-3)  # float16
    assert torch.allclose(got[2, 1:].float(), out.last_hidden_state[0], rtol=1e-3, atol=1e-3)
    calls, model = [], encoder.model
    encoder.model = lambda **kw: calls.append(len(kw["input_ids"])) or model(**kw)
    assert torch.equal(encoder.encode(["a blue square", "a green circle"])[0], got[2])
    assert calls == [1]  # only the new caption went through CLIP


def test_clip_model_trains_and_samples_by_prompt(clip_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--config", CONFIG, "--name", "c", *TINY, "model.text_encoder=clip", "model.text_max_tokens=16",
                f"model.text_encoder_path={clip_folder}", "train.max_steps=3"])
    ckpt = load_checkpoint("checkpoints/c/last.pt")
    assert ckpt["text"] == {"encoder": "clip", "width": 32}
    assert not any("text_model" in k or k.startswith("text_encoder") for k in ckpt["model"])  # CLIP stays outside
    assert ckpt["model"]["text_proj.weight"].shape[1] == 32
    sample.main(["--ckpt", "checkpoints/c/last.pt", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--n", "4", "--guidance-scale", "2", "--negative-prompt", "a green triangle", "--out", "g.png"])
    assert Image.open("g.png").size == (2 + 2 * (TILE + 2), 2 + 2 * (TILE + 2))


def test_clip_weights_missing_or_of_another_width(clip_folder, tmp_path):
    with pytest.raises(UserError, match=r"cannot load the CLIP text encoder '.*nowhere'.*model.text_encoder_path"):
        ClipEncoder(str(tmp_path / "nowhere"), 8, "cpu")
    m = load_config(None, ["model.text_encoder=clip", f"model.text_encoder_path={clip_folder}"]).model
    with pytest.raises(UserError, match="has width 32, but this model was trained with one of width 64"):
        prompt_encoder(m, {"encoder": "clip", "width": 64})


# ---- a model trained on captioned shapes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        train.main(["--config", CONFIG, "--name", "t", *TEXT_RUN, "train.max_steps=200", "train.save_every=200"])
    finally:
        os.chdir(old)
    return tmp


def colour_hit_rate(path, guidance, n=384):
    """The fraction of n samples whose measured hue is in the prompted colour's range; prompts 'a <colour>
    <kind>' over all colours and kinds, one batch, the same noise for every guidance scale."""
    ckpt = load_checkpoint(str(path))
    cfg, model, diffusion = model_from_checkpoint(ckpt, "cpu")
    colours = [SHAPE_COLOURS[i % 6] for i in range(n)]
    prompts = [f"a {c} {KINDS[(i // 6) % 3]}" for i, c in enumerate(colours)]
    cond = prompt_encoder(cfg.model, ckpt["text"]).encode(prompts)
    s = SampleConfig(sampler="ddim", steps=10, guidance_scale=guidance, batch_size=n)
    x = generation.generate(generation.Sampling(model, diffusion, s, "cpu"), n, torch.Generator().manual_seed(1), cond)
    return float(np.mean([in_range(measured_hue(im), c) for im, c in zip(x, colours)]))


def test_samples_show_the_prompted_colour_and_more_so_with_guidance(text_run):
    """Chance is 1/6 (six equal hue sectors). With guidance 3 the prompted colour must beat chance by 4 binomial
    standard errors of n = 384, and guidance 1 by 3 standard errors of the difference of the two rates (taken
    as independent; the samples share their noise, which makes the difference's spread smaller)."""
    path, n, chance = text_run / "checkpoints" / "t" / "last.pt", 384, 1 / 6
    plain, guided = colour_hit_rate(path, 1.0, n), colour_hit_rate(path, 3.0, n)
    print(f"colour hit rate: guidance 1 {plain:.3f}, guidance 3 {guided:.3f}, chance {chance:.3f}")
    assert guided > chance + 4 * math.sqrt(chance * (1 - chance) / n), (plain, guided)
    spread = math.sqrt((plain * (1 - plain) + guided * (1 - guided)) / n)
    assert guided - plain > 3 * spread, (plain, guided)


def test_training_writes_the_vocabulary_and_grids_of_the_datas_captions(text_run):
    ckpt = load_checkpoint(str(text_run / "checkpoints" / "t" / "last.pt"))
    assert ckpt["text"] == {"encoder": "learned", "words": sorted({"a", *SHAPE_COLOURS, *KINDS}), "tags": False}
    rows = (text_run / "results" / "t" / "samples" / "captions.txt").read_text().splitlines()
    assert len(rows) == 4 and all(r.split()[1] in SHAPE_COLOURS and r.split()[2] in KINDS for r in rows)
    grid = Image.open(text_run / "results" / "t" / "samples" / "step_0000200.png")
    assert grid.size == (2 + TILE + 2, 2 + 4 * (TILE + 2))  # train.sample_n = 4 images: one row per caption


def test_prompt_rows_and_a_folder_with_the_prompts_beside_the_images(text_run, tmp_path, capsys):
    path = text_run / "checkpoints" / "t" / "last.pt"
    sample.main(["--ckpt", str(path), "--prompt", "a red circle", "--prompt", "a tiny blue square", "--n", "5",
                 "--out", str(tmp_path / "g.png"), "--steps", "3"])
    out = capsys.readouterr().out
    assert "2 images for each of the 2 prompts, 4 in all" in out and "<unk>: tiny" in out
    assert Image.open(tmp_path / "g.png").size == (2 + 2 * (TILE + 2), 2 + 2 * (TILE + 2))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green triangle\n\na yellow square\n", encoding="utf-8")
    argv = ["--ckpt", str(path), "--prompts", str(prompts), "--n", "4", "--save-dir", str(tmp_path / "s"),
            "--steps", "3", "--guidance-scale", "3", "--negative-prompt", "a red circle"]
    sample.main(argv)
    names = files_in(tmp_path / "s")
    assert names == [f"{i:07d}.{ext}" for i in range(4) for ext in ("png", "txt")]
    assert [(tmp_path / "s" / f"{i:07d}.txt").read_text() for i in range(4)] == \
        ["a green triangle\n"] * 2 + ["a yellow square\n"] * 2
    sample.main(argv)
    assert "(4 images, 0 new)" in capsys.readouterr().out
    other = ["--ckpt", path, "--prompt", "a red circle", *argv[4:]]
    assert "made with other prompts" in fails_in_process(capsys, sample.main, *other)
    err = fails_in_process(capsys, sample.main, "--ckpt", path, "--save-dir", tmp_path / "s")
    assert "holds images of prompts" in err


def test_evaluate_with_a_prompts_file(text_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n", encoding="utf-8")
    args = ["--ckpt", str(text_run / "checkpoints" / "t" / "last.pt"), "--n", "4", "--steps", "2",
            "--prompts", "p.txt", "--guidance-scale", "2", "--device", "cpu"]
    record = evaluate.main(args, extractor=TinyExtractor())
    assert (record["prompts"], record["negative_prompt"], record["guidance_scale"]) == ("p.txt", None, 2.0)
    folders = os.listdir(tmp_path / "results" / "t")
    with_neg = evaluate.main([*args, "--negative-prompt", "a green circle"], extractor=TinyExtractor())
    assert with_neg["negative_prompt"] == "a green circle" and np.isfinite(with_neg["fid"])
    new = set(os.listdir(tmp_path / "results" / "t")) - set(folders)
    assert len(new) == 1 and "-prompts" in new.pop()  # its own folder: the hash covers the negative prompt
    # the prompts reach the samples, cycled: image i is what sample.py draws for i's prompt at index i
    scored = next(f for f in folders if "-prompts" in f)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        sample.main(["--ckpt", args[1], "--prompt", prompt, "--n", "4", "--steps", "2", "--guidance-scale", "2",
                     "--save-dir", str(tmp_path / f"plain{i}")])
        for j in range(i, 4, 2):
            assert (tmp_path / f"plain{i}" / f"{j:07d}.png").read_bytes() == \
                (tmp_path / "results" / "t" / scored / f"{j:07d}.png").read_bytes(), (prompt, j)


def test_grid_captions_are_distinct_and_spread():
    for n in range(1, 13):
        captions = [f"caption {i}" for i in range(n) for _ in range(3)] + [""]
        rows = grid_captions(captions, 8)
        assert len(rows) == min(8, n) and len(set(rows)) == len(rows), (n, rows)
    assert grid_captions(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"], 4) == ["a", "c", "f", "h"]


def test_edits_take_the_prompts(text_run, tmp_path):
    """Image to image at strength 1 is plain sampling (tests/test_editing.py), so an edit by prompt must give the
    file a plain run of that prompt gives, prompts cycled over the inputs; the settings name the prompts."""
    path, common = text_run / "checkpoints" / "t" / "last.pt", ["--steps", "3", "--seed", "4", "--batch-size", "2"]
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "in" / name)
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square"]
    sample.main(["--ckpt", str(path), *common, *prompts, "--init", str(tmp_path / "in"), "--strength", "1",
                 "--save-dir", str(tmp_path / "edit")])
    sample.main(["--ckpt", str(path), *common, *prompts, "--n", "2", "--save-dir", str(tmp_path / "plain")])
    for name, number in (("a.png", 0), ("b.png", 1)):
        assert (tmp_path / "edit" / name).read_bytes() == (tmp_path / "plain" / f"{number:07d}.png").read_bytes()
    settings = json.loads((tmp_path / "edit" / "settings.json").read_text())
    assert settings["prompt"] == ["a red circle", "a blue square"] and settings["negative_prompt"] is None


@pytest.mark.parametrize("argv, needle", [
    (["--class-label", "1"], "--class-label is for class-conditional checkpoints; this one is text-conditional"),
    (["--prompt", "a red circle", "--negative-prompt", "a blue circle"], "--guidance-scale above 1"),
    (["--negative-prompt", "a blue circle", "--guidance-scale", "3"], "give --prompt"),
    (["--prompts", "missing.txt"], "cannot read --prompts file 'missing.txt'"),
    (["--prompts", "latin1.txt"], "--prompts file 'latin1.txt' is not UTF-8"),
    (["--prompts", "blank.txt"], "holds no prompts"),
])
def test_bad_prompt_flags_are_one_line(text_run, tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert needle in fails_in_process(capsys, sample.main, "--ckpt", text_run / "checkpoints" / "t" / "last.pt", *argv)


def test_prompts_need_a_text_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plain = tiny_checkpoint(tmp_path / "plain.pt")

    def scores(argv):
        return evaluate.main(argv, extractor=TinyExtractor())
    for main, flag in ((sample.main, "--prompt"), (scores, "--negative-prompt")):
        err = fails_in_process(capsys, main, "--ckpt", plain, flag, "a red circle")
        assert "need a text-conditional checkpoint" in err
    assert "need --ckpt" in fails_in_process(capsys, scores, "--samples-dir", tmp_path, "--prompts", "p.txt")


def test_training_without_captions_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "images" / name)
    argv = ["--config", CONFIG, *TINY, "data.dataset=folder", f"data.root={tmp_path / 'images'}",
            "model.text_encoder=learned", "train.batch_size=2"]
    err = fails_in_process(capsys, train.main, *argv)
    assert "none of the 2 images" in err and "001.txt" in err


# ---- resume ----------------------------------------------------------------------------------------------------------

def test_resumed_text_run_is_exact(tmp_path, monkeypatch):
    """Stopped at step 4 and run again to 8, a text run logs the same losses and ends with the same weights,
    EMA (the text encoder's included) and optimiser state as one run of 8 steps."""
    args = ["--config", CONFIG, "--name", "r", *TINY, *TINY_TEXT_CKPT, "train.save_every=4", "model.dropout=0.1",
            "train.cond_drop_prob=0.3"]
    for folder, stops in (("whole", [8]), ("resumed", [4, 8])):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        for steps in stops:
            train.main([*args, f"train.max_steps={steps}"])
    a, b = (load_checkpoint(str(tmp_path / f / "checkpoints" / "r" / "last.pt")) for f in ("whole", "resumed"))
    assert a["step"] == b["step"] == 8 and a["log"]["loss"] == b["log"]["loss"] and a["text"] == b["text"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and any(k.startswith("text_encoder.") for k in a[part])
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in state.items())


def test_bf16_autocast_on_the_cpu(tmp_path, monkeypatch):
    """A text model trains, draws its grid and samples by prompt under bf16 autocast, as on a GPU."""
    monkeypatch.chdir(tmp_path)
    train.main(["--config", CONFIG, "--name", "b", *TINY, *TINY_TEXT_CKPT, "train.max_steps=2",
                "train.precision=bf16", "sample.precision=bf16"])
    assert all(math.isfinite(v) for v in load_checkpoint("checkpoints/b/last.pt")["log"]["loss"])
    sample.main(["--ckpt", "checkpoints/b/last.pt", "--prompt", "a red circle", "--n", "2", "--guidance-scale", "2",
                 "--out", "g.png", "sample.precision=bf16"])
    assert Image.open("g.png").size == (2 + 2 * (TILE + 2), 2 + TILE + 2)


def test_from_config_needs_the_text_state():
    cfg = load_config(CONFIG, [*TINY, *TINY_TEXT_CKPT])
    with pytest.raises(UserError, match="holds no state of that encoder"):
        UNet.from_config(cfg)
