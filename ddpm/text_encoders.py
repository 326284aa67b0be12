"""Text conditioning: captions as the condition of a text-conditional U-Net (model.text_encoder).

    encoder = prompt_encoder(cfg.model, state, captions, device)   # a Vocabulary (learned) or a ClipEncoder (clip)
    cond = encoder.encode(["a red triangle", ""])                  # what UNet.forward takes as `cond`
    ckpt["text"] = encoder.state()                                 # plain data: the vocabulary, or CLIP's width

The condition of one caption, with L = model.text_max_tokens:

    learned  token ids (L,) of a vocabulary built from the training captions; the LearnedTextEncoder that embeds
             them is a submodule of the U-Net, so it is trained, EMA'd and saved with it.
    clip     a frozen CLIP text encoder's output (1 + L, width) in float16: its pooled embedding, then its L token
             embeddings; each distinct caption is encoded once and cached; CLIP is not part of the U-Net.

The empty caption is the null condition of classifier-free guidance and is all zeros either way (padding
tokens; zero embeddings), so UNet.null_condition needs no encoder. Tokens of the learned vocabulary: a caption is
put in Unicode NFKC form and lowercased, then split into words (runs of letters and digits) or, when the
captions look like tag lists (`looks_like_tags`), into its comma-separated tags; <cls> comes first.

"""
import collections
import os
import re
import unicodedata

import torch
import torch.nn as nn

from utils import UserError, first_line

PAD, CLS, UNK = 0, 1, 2
SPECIAL = ["<pad>", "<cls>", "<unk>"]
CLIP_BATCH = 256  # captions per CLIP forward pass


def looks_like_tags(captions) -> bool:
    """Tag lists ('1girl, solo, long hair'): at least half of the non-empty captions contain a comma, and their
    comma-separated pieces have at most 3 words on average (a sentence with a comma has longer pieces)."""
    filled = [c for c in captions if c.strip()]
    with_comma = [c for c in filled if "," in c]
    if not filled or 2 * len(with_comma) < len(filled):
        return False
    pieces = [p for c in with_comma for p in c.split(",") if p.strip()]
    return sum(len(p.split()) for p in pieces) <= 3 * len(pieces)


def split_caption(caption: str, tags: bool) -> list[str]:
    """A caption's words (runs of letters and digits) or tags (comma-separated, inner spaces kept single),
    after NFKC normalisation and lowercasing."""
    text = unicodedata.normalize("NFKC", caption).lower()
    if tags:
        return [" ".join(t.split()) for t in text.split(",") if t.strip()]
    return re.findall(r"\w+", text)


class Vocabulary:
    """The learned encoder's tokens: <pad> = 0, <cls> = 1, <unk> = 2, then `words` (or tags) in sorted order."""

    def __init__(self, words, tags: bool, max_tokens: int):
        self.words, self.tags, self.max_tokens = list(words), bool(tags), max_tokens
        self.index = {w: i for i, w in enumerate(SPECIAL + self.words)}

    @classmethod
    def from_captions(cls, captions, max_tokens: int) -> "Vocabulary":
        """Every word (or tag) of the training captions."""
        tags = looks_like_tags(captions)
        return cls(sorted({w for c in captions for w in split_caption(c, tags)}), tags, max_tokens)

    def __len__(self):
        return len(self.index)

    def encode(self, captions, say=print) -> torch.Tensor:
        """Token ids (N, max_tokens): <cls>, the caption's words, <pad>s; a caption without words is all <pad>
        (the null condition). Unknown words become <unk> and longer captions are cut, each said in one line."""
        out = torch.full((len(captions), self.max_tokens), PAD, dtype=torch.long)
        unknown, cut = collections.Counter(), 0
        for i, caption in enumerate(captions):
            words = split_caption(caption, self.tags)
            if words:
                ids = [CLS] + [self.index.get(w, UNK) for w in words]
                unknown.update(w for w in words if w not in self.index)
                cut += len(ids) > self.max_tokens
                out[i, :min(len(ids), self.max_tokens)] = torch.tensor(ids[:self.max_tokens])
        kind = "tags" if self.tags else "words"
        if unknown:
            say(f"warning: {kind} not in the model's vocabulary, read as <unk>: "
                + ", ".join(sorted(unknown)[:20]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 20 else ""))
        if cut:
            say(f"warning: {cut} caption(s) have more than {self.max_tokens - 1} {kind} and were cut to "
                f"model.text_max_tokens={self.max_tokens} tokens")
        return out

    def state(self) -> dict:
        return {"encoder": "learned", "words": self.words, "tags": self.tags}


class LearnedTextEncoder(nn.Module):
    """Token ids (B, L) to embeddings (B, L, width): token plus learned position embeddings, `layers` pre-norm
    transformer encoder layers (Vaswani et al. 2017; heads of 64 channels, one head below 64), a final LayerNorm.
    Position 0 holds <cls>: its output is the pooled embedding."""

    def __init__(self, vocab_size: int, width: int, layers: int, max_tokens: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        heads = max(1, width // 64)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        h = self.token(tokens) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("model.text_encoder=clip needs the transformers package, which is not installed: "
                        "pip install -r requirements-text.txt") from None
    transformers.logging.set_verbosity_error()  # its notes and progress bars while loading are not ours to show
    transformers.logging.disable_progress_bar()
    return transformers


class ClipEncoder:
    """A frozen CLIP text encoder: transformers' CLIPTextModel and tokenizer from `path`, a Hub name or a local
    folder (also a Stable Diffusion folder with text_encoder/ and tokenizer/ in it)."""

    def __init__(self, path: str, max_tokens: int, device):
        transformers = _import_transformers()

        def part(name):
            return os.path.join(path, name) if os.path.isdir(os.path.join(path, name)) else path
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(part("tokenizer"))
            model = transformers.CLIPTextModel.from_pretrained(part("text_encoder"))
        except Exception as e:
            raise UserError(f"cannot load the CLIP text encoder '{path}' ({first_line(e, 150)}); without network, "
                            "download it where there is one (huggingface-cli download openai/clip-vit-base-patch32 "
                            "--local-dir DIR), copy DIR here and set model.text_encoder_path=DIR") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.width, self.max_tokens, self.device = model.config.hidden_size, max_tokens, torch.device(device)
        self.cache = {}  # caption -> (1 + max_tokens, width) float16 on the CPU

    @torch.inference_mode()
    def encode(self, captions, say=print) -> torch.Tensor:
        """(N, 1 + max_tokens, width) float16: CLIP's pooled embedding (its final state at the end token), then
        the final states of the caption's tokens padded to max_tokens; zeros for the empty caption."""
        new = sorted({c for c in captions if c.strip() and c not in self.cache})
        cut = sum(len(ids) > self.max_tokens for ids in self.tokenizer(new)["input_ids"]) if new else 0
        for i in range(0, len(new), CLIP_BATCH):
            chunk = new[i:i + CLIP_BATCH]
            ids = self.tokenizer(chunk, padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt")["input_ids"]
            out = self.model(input_ids=ids.to(self.device))
            both = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1).half().cpu()
            self.cache.update(zip(chunk, both))
        if cut:
            say(f"warning: {cut} caption(s) have more than model.text_max_tokens={self.max_tokens} CLIP tokens "
                "and were cut")
        zero = torch.zeros(1 + self.max_tokens, self.width, dtype=torch.float16)
        return torch.stack([self.cache[c] if c.strip() else zero for c in captions]) if captions else zero[:0]

    def state(self) -> dict:
        return {"encoder": "clip", "width": self.width}


def prompt_encoder(m, state=None, captions=(), device="cpu"):
    """The caption encoder of model config `m`: the one a checkpoint's `state` describes, or for a new run a
    vocabulary of `captions` (learned) or CLIP (clip)."""
    if m.text_encoder == "learned":
        if state is None:
            return Vocabulary.from_captions(captions, m.text_max_tokens)
        return Vocabulary(state["words"], state["tags"], m.text_max_tokens)
    encoder = ClipEncoder(m.text_encoder_path, m.text_max_tokens, device)
    if state is not None and state["width"] != encoder.width:
        raise UserError(f"the CLIP text encoder '{m.text_encoder_path}' has width {encoder.width}, but this model "
                        f"was trained with one of width {state['width']}; set model.text_encoder_path to that one")
    return encoder


def text_dims(m, state) -> dict:
    """The U-Net's text arguments for a caption encoder's state: the vocabulary size (learned) or CLIP's width."""
    if m.text_encoder is None:
        return {}
    if not isinstance(state, dict) or state.get("encoder") != m.text_encoder:
        raise UserError(f"model.text_encoder={m.text_encoder}, but the checkpoint holds no state of that encoder "
                        "(its 'text' entry: the vocabulary or CLIP's width), which text-conditional training runs "
                        "save")
    if m.text_encoder == "learned":
        return {"vocab_size": len(SPECIAL) + len(state["words"])}
    return {"text_width": state["width"]}


class NegativePrompt(nn.Module):
    """`model` with an encoded caption (1, ...) in place of its null condition, so that classifier-free
    guidance pushes away from that caption: eps = eps(negative) + w (eps(cond) - eps(negative))."""

    def __init__(self, model, negative: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("negative", negative, persistent=False)
        self.image_channels, self.image_size = model.image_channels, model.image_size
        self.codec = getattr(model, "codec", None)  # a latent model's (ddpm/latent.py)

    def null_condition(self, cond):
        return self.negative.expand_as(cond)

    def forward(self, x, t, cond=None):
        return self.model(x, t, cond)
