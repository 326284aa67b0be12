"""The U-Net noise predictor eps_theta(x_t, t) of the DDPM paper (Ho et al. 2020, Appendix B).

A PixelCNN++-style U-Net: residual blocks at each resolution with the timestep embedding added in,
GroupNorm + SiLU, dropout, self-attention at chosen feature-map sizes, skip connections from every
encoder block to the decoder. With base_channels=128, channel_mults=(1,2,2,2), 2 blocks per resolution
and attention at 16x16 it has the paper's 35.7M parameters.

By default it is the network of the paper's code (hojonathanho/diffusion) exactly, so its weights load (convert.py):
the [sin | cos] timestep embedding, TensorFlow's 'SAME' padding when downsampling and GroupNorm's eps = 1e-6.
`model.time_embedding`, `model.downsample_padding` and `model.norm_eps` select the earlier choices of this toolkit.

A text-conditional model (`model.text_encoder`, ddpm/text_encoders.py) adds what Rombach et al. 2022 add to it:
cross-attention from the image features to the caption's token embeddings after each self-attention, and the pooled
caption embedding added to the timestep embedding. Both enter through zero-initialised layers, so a fresh text model is
the unconditional one.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import network_shape
from ddpm.text_encoders import LearnedTextEncoder, text_dims


def timestep_embedding(t: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps t (B,) as (B, dim) float32, with half = dim / 2 frequencies w_i:

    'ddpm' (the paper's code, after tensor2tensor): [sin(t w_0) .. sin(t w_{half-1}) | cos(t w_0) .. cos(t w_{half-1})],
        w_i = 10000^(-i / (half - 1));
    'transformer' (Vaswani et al.): PE(t, 2i) = sin(t w_i), PE(t, 2i+1) = cos(t w_i), w_i = 10000^(-2i / dim)."""
    assert dim % 2 == 0, "timestep embedding dimension must be even"
    if kind == "ddpm":
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=t.device, dtype=torch.float32) / dim)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def norm_groups(channels: int) -> int:
    # 32 groups as in the paper; fewer when a small model has fewer channels than that, keeping at least
    # 4 channels per group: with one channel per group the norm would subtract (erase) the per-channel
    # time/label embedding that ResBlock adds just before its second norm
    return math.gcd(channels, max(1, min(32, channels // 4)))


def group_norm(channels: int, eps: float, nominal: int | None = None) -> nn.GroupNorm:
    """GroupNorm over `channels`, with the groups of the `nominal` width: a pruned network (model.widths) keeps
    the groups of the dense one, each with fewer channels (ddpm/pruning.py)."""
    groups = norm_groups(nominal or channels)
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into the {groups} GroupNorm groups of the "
                         f"{nominal} nominal ones; model.widths must keep multiples of the groups")
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch so every block starts as the identity (as in the paper's code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Widths(NamedTuple):
    """The channels of a block of a pruned network (model.widths): its input, its hidden layer, its output."""
    in_ch: int
    hidden: int
    out_ch: int


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the projected time embedding, GN-SiLU-dropout-conv, plus a (1x1) skip.
    in_ch and out_ch are the nominal widths; `widths` those of a pruned block (which keeps the nominal structure)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, eps: float,
                 widths: Widths | None = None):
        super().__init__()
        w = widths or Widths(in_ch, out_ch, out_ch)
        self.norm1 = group_norm(w.in_ch, eps, in_ch)
        self.conv1 = nn.Conv2d(w.in_ch, w.hidden, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, w.hidden)
        self.norm2 = group_norm(w.hidden, eps, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(w.hidden, w.out_ch, 3, padding=1))
        self.skip = nn.Conv2d(w.in_ch, w.out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection.
    Queries, keys and values have the `nominal` width also in a pruned network (model.widths)."""

    def __init__(self, channels: int, num_heads: int, eps: float, nominal: int | None = None):
        super().__init__()
        inner = nominal or channels
        if inner % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the {inner} channels at attention")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps, inner)
        self.qkv = nn.Conv2d(channels, 3 * inner, 1)
        self.proj = zero_init(nn.Conv2d(inner, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, -1, h * w).unbind(1)
        # (B, heads, head_dim, HW) -> (B, heads, HW, head_dim), the layout SDPA (flash attention) expects
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


class CrossAttention(nn.Module):
    """Multi-head attention from the H*W positions of a feature map (queries) to the L token embeddings of a
    caption (keys and values), with a residual connection: x + proj(softmax(q k^T / sqrt(d)) v)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, eps: float, nominal: int | None = None):
        super().__init__()
        inner = nominal or channels  # as in Attention
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps, inner)
        self.q = nn.Conv2d(channels, inner, 1)
        self.kv = nn.Linear(context_dim, 2 * inner)
        self.proj = zero_init(nn.Conv2d(inner, channels, 1))

    def forward(self, x, context):
        b, c, h, w = x.shape
        q = self.q(self.norm(x)).reshape(b, self.num_heads, -1, h * w).transpose(-1, -2)
        # (B, L, 2C) -> keys and values of (B, heads, L, head_dim)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


def embedding_width(cfg) -> int:
    """The width of the timestep (and label) embedding of a ModelConfig: 4 x base_channels, as in the paper's code."""
    return 4 * cfg.base_channels


class Block(nn.Module):
    """A residual block, followed by attention at the resolutions that have it (and there, in a text model,
    cross-attention to the caption)."""

    def __init__(self, in_ch: int, out_ch: int, cfg, attention: bool, context_dim: int | None = None,
                 widths: Widths | None = None):
        """cfg: the ModelConfig (dropout, heads, norm epsilon); context_dim: the caption's token width (None: no
        text); in_ch and out_ch are the nominal widths, `widths` a pruned block's (model.widths)."""
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, embedding_width(cfg), cfg.dropout, cfg.norm_eps, widths)
        self.out_channels = widths.out_ch if widths else out_ch
        self.attn = Attention(self.out_channels, cfg.num_heads, cfg.norm_eps, out_ch) if attention else None
        self.cross = (CrossAttention(self.out_channels, context_dim, cfg.num_heads, cfg.norm_eps, out_ch)
                      if attention and context_dim else None)

    def forward(self, x, emb, context=None):
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return self.cross(x, context) if self.cross is not None else x


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2. Padding 'same' is TensorFlow's 'SAME' on an even size, as in the paper's
    code: one row and column of zeros at the bottom and right only; 'symmetric' pads one on every side."""

    def __init__(self, ch, padding: str, out_ch: int | None = None):
        super().__init__()
        self.pad = (0, 1, 0, 1) if padding == "same" else None
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, stride=2, padding=0 if self.pad else 1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.pad(x, self.pad) if self.pad else x)


class Upsample(nn.Module):
    def __init__(self, ch, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t, cond): the U-Net of the paper, shaped by a ModelConfig (config.py holds the defaults).
    `image_channels` is the input's (and the images'); the output may have more (out_channels)."""

    def __init__(self, cfg, image_channels: int, image_size: int, vocab_size: int | None = None,
                 text_width: int | None = None, out_channels: int | None = None):
        """vocab_size: the learned text encoder's (ddpm/text_encoders.text_dims); text_width: that of CLIP's
        embeddings; out_channels: the output's (default image_channels; twice that with learned variances)."""
        super().__init__()
        if cfg.num_classes == "auto":
            raise ValueError("resolve model.num_classes='auto' from the data set before building the model")
        self.image_channels, self.image_size, self.num_classes = image_channels, image_size, cfg.num_classes
        self.codec = None  # a latent model's ddpm/codecs.Codec (ddpm/latent.py), which makes its samples images
        self.time_embedding = cfg.time_embedding
        ch, emb_dim = cfg.base_channels, embedding_width(cfg)
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # labels 0..num_classes-1 and one extra 'null' label (index num_classes) for classifier-free guidance
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        context_dim = self._text_layers(cfg, emb_dim, vocab_size, text_width)
        # a pruned network's widths, layer by layer (ddpm/config_rules.nominal_widths tells the order): each layer
        # has its nominal width (base_channels x channel_mults, `ch`) and its actual one (`act`), the same unless pruned
        recorded = iter(cfg.widths) if cfg.widths is not None else None

        def width(nominal: int) -> int:
            return nominal if recorded is None else next(recorded)

        self.conv_in = nn.Conv2d(image_channels, width(ch), 3, padding=1)

        def block(in_ch, out_ch, attention, act_in):
            return Block(in_ch, out_ch, cfg, attention, context_dim, Widths(act_in, width(out_ch), width(out_ch)))
        # built in this order, the order in which the parameters draw their initial values
        skip_channels = self._down_path(cfg, block, width, image_size)
        ch, act = skip_channels[-1]
        self.mid = nn.ModuleList([block(ch, ch, True, act)])
        self.mid.append(block(ch, ch, False, self.mid[0].out_channels))
        ch, act = self._up_path(cfg, block, width, skip_channels, image_size // 2 ** (len(cfg.channel_mults) - 1))
        self.norm_out = group_norm(act, cfg.norm_eps, ch)
        self.conv_out = zero_init(nn.Conv2d(act, out_channels or image_channels, 3, padding=1))

    def _down_path(self, cfg, block, width, res: int) -> list[tuple[int, int]]:
        """self.down: num_res_blocks blocks per level, then a Downsample (but after the last level); returns the
        (nominal, actual) channels of every skip connection, conv_in's first."""
        self.down, ch, act = nn.ModuleList(), cfg.base_channels, self.conv_in.out_channels
        skip_channels = [(ch, act)]
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, cfg.base_channels * mult, res in cfg.attention_resolutions, act))
                ch, act = cfg.base_channels * mult, self.down[-1].out_channels
                skip_channels.append((ch, act))
            if level != len(cfg.channel_mults) - 1:
                self.down.append(Downsample(act, cfg.downsample_padding, width(ch)))
                act = self.down[-1].conv.out_channels
                skip_channels.append((ch, act))
                res //= 2
        return skip_channels

    def _up_path(self, cfg, block, width, skip_channels: list[tuple[int, int]], res: int) -> tuple[int, int]:
        """self.up: num_res_blocks + 1 blocks per level, each taking a skip connection (popped from
        skip_channels), then an Upsample (but after the first level); returns the (nominal, actual) channels it
        ends with. The middle blocks keep the last skip connection's width (their residuals are identities)."""
        self.up, (ch, act) = nn.ModuleList(), skip_channels[-1]
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                skip, act_skip = skip_channels.pop()
                self.up.append(block(ch + skip, cfg.base_channels * mult, res in cfg.attention_resolutions,
                                     act + act_skip))
                ch, act = cfg.base_channels * mult, self.up[-1].out_channels
            if level != 0:
                self.up.append(Upsample(act, width(ch)))
                act = self.up[-1].conv.out_channels
                res *= 2
        return ch, act

    def _text_layers(self, cfg, emb_dim, vocab_size, text_width) -> int | None:
        """The learned text encoder and the projection of the pooled caption embedding of a text model; returns
        the width of the token embeddings that cross-attention reads (None without text)."""
        self.text_encoder = self.text_proj = None
        self.text_shape = None  # the shape of one caption's condition
        if cfg.text_encoder is None:
            return None
        if cfg.text_encoder == "learned":
            if vocab_size is None:
                raise ValueError("a learned text encoder needs its vocabulary size (ddpm/text_encoders.text_dims)")
            self.text_encoder = LearnedTextEncoder(vocab_size, cfg.text_width, cfg.text_layers, cfg.text_max_tokens)
            text_width, self.text_shape = cfg.text_width, (cfg.text_max_tokens,)
        elif text_width is None:
            raise ValueError("a CLIP-conditioned model needs CLIP's width (ddpm/text_encoders.text_dims)")
        else:
            self.text_shape = (1 + cfg.text_max_tokens, text_width)
        self.text_proj = zero_init(nn.Linear(text_width, emb_dim))
        return text_width

    @classmethod
    def from_config(cls, cfg, text_state=None):
        """The network of a whole Config: its model section at the data's channels and image size (a latent model's
        at its latents', config.network_shape), with twice the output channels for learned variances
        (diffusion.variance=learned_range: the mean's, then v's); a text model also needs its caption encoder's state
        (ddpm/text_encoders.py: the vocabulary, or CLIP's width)."""
        channels, size = network_shape(cfg)
        out = 2 * channels if cfg.diffusion.variance == "learned_range" else channels
        return cls(cfg.model, channels, size, **text_dims(cfg.model, text_state), out_channels=out)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The 'no condition' input of classifier-free guidance, batched like `cond`: the null label, or for a
        text model the empty caption, which is all zeros (ddpm/text_encoders.py)."""
        return torch.zeros_like(cond) if self.text_proj is not None else torch.full_like(cond, self.num_classes)

    def forward(self, x, t, cond=None):
        """Predict from x_t (B x C x H x W) at integer steps t (B,). cond: (B,) labels, or a text model's
        encoded captions (ddpm/text_encoders.py); None for the null condition."""
        emb = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features, self.time_embedding))
        context = None
        if self.label_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(cond)
        elif self.text_proj is not None:
            if cond is None:
                dtype = torch.long if self.text_encoder is not None else torch.float32
                cond = torch.zeros((x.shape[0], *self.text_shape), device=x.device, dtype=dtype)
            context = self.text_encoder(cond) if self.text_encoder is not None else cond.float()
            emb = emb + self.text_proj(context[:, 0])  # the pooled embedding: <cls> (learned) or CLIP's pooled
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, context)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb, context)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb, context) if isinstance(layer, Block) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
