"""The U-Net (model.py) and checkpoints (ddpm/checkpoint.py): the timestep embedding against its formula in float64,
attention against a float64 reference, shapes, initialisation, conditioning, size, that it can learn, and
checkpoint files (round trip and one-line errors)."""
import math
import os

import pytest
import torch
from helpers import CONFIG, ROOT, TINY_NET, make_diffusion, perturb_zero_params, tiny_checkpoint, tiny_unet

from config import ModelConfig, load_config, to_dict
from ddpm.checkpoint import (
    BEFORE_MODEL_OPTIONS,
    check_same_architecture,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    save_checkpoint,
)
from model import Attention, Downsample, ResBlock, UNet, group_norm, timestep_embedding
from utils import UserError

# ---- timestep embedding --------------------------------------------------------------------------------------

def float32_angle_tol(t):
    # the float32 angle t * w_i has a relative error of a few 2^-24, i.e. an absolute one of about
    # t * 4 * 6e-8 (up to 2.4e-4 at t = 999); sin and cos pass it on unamplified
    return 1e-6 + 4 * 2.0 ** -24 * t


@pytest.mark.parametrize("dim", [4, 16, 128])
def test_ddpm_timestep_embedding_is_the_formula_of_the_paper_code(dim):
    """[sin(t w_0) .. sin(t w_{h-1}) | cos(t w_0) .. cos(t w_{h-1})], w_i = 10000^(-i/(h-1)), h = dim/2."""
    ts = [0, 1, 2, 17, 500, 999]
    emb = timestep_embedding(torch.tensor(ts), dim, "ddpm")
    assert emb.shape == (len(ts), dim) and emb.dtype == torch.float32
    half = dim // 2
    for row, t in enumerate(ts):
        angles = [t * 10000 ** (-i / (half - 1)) for i in range(half)]
        ref = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles], dtype=torch.float64)
        err = (emb[row].double() - ref).abs().max().item()
        assert err <= float32_angle_tol(t), (t, err)


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_transformer_timestep_embedding_is_the_interleaved_formula(dim):
    """The embedding before the paper's (checkpoints without model.time_embedding):
    PE(t, 2i) = sin(t / 10000^(2i/d)), PE(t, 2i+1) = cos(t / 10000^(2i/d))."""
    ts = [0, 1, 2, 17, 500, 999]
    emb = timestep_embedding(torch.tensor(ts), dim, "transformer")
    assert emb.shape == (len(ts), dim) and emb.dtype == torch.float32
    for row, t in enumerate(ts):
        ref = []
        for i in range(dim // 2):
            angle = t / 10000 ** (2 * i / dim)
            ref += [math.sin(angle), math.cos(angle)]
        err = (emb[row].double() - torch.tensor(ref, dtype=torch.float64)).abs().max().item()
        assert err <= float32_angle_tol(t), (t, err)


def test_timestep_embedding_accepts_float_steps():
    emb = timestep_embedding(torch.tensor([0.5, 2.25]), 4, "transformer")
    ref = [[math.sin(0.5), math.cos(0.5), math.sin(0.5 / 100), math.cos(0.5 / 100)],
           [math.sin(2.25), math.cos(2.25), math.sin(2.25 / 100), math.cos(2.25 / 100)]]
    assert torch.allclose(emb.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-6)
    emb = timestep_embedding(torch.tensor([0.5, 2.25]), 4, "ddpm")   # w = 1, 1/10000
    ref = [[math.sin(0.5), math.sin(0.5e-4), math.cos(0.5), math.cos(0.5e-4)],
           [math.sin(2.25), math.sin(2.25e-4), math.cos(2.25), math.cos(2.25e-4)]]
    assert torch.allclose(emb.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-6)


# ---- building blocks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, heads", [(8, 1), (8, 2), (12, 4)])
def test_attention_against_float64_reference(channels, heads):
    torch.manual_seed(1)
    attn = perturb_zero_params(Attention(channels, heads, eps=1e-6), std=0.2).double()
    with torch.no_grad():
        for p in (attn.norm.weight, attn.norm.bias):
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.3 + (1.0 if p is attn.norm.weight else 0.0))
    b, h, w = 2, 3, 5
    x = torch.randn(b, channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
    # reference: GroupNorm by hand, 1x1 convs as matrices, per-head softmax(q^T k / sqrt(d)) v, residual
    groups = attn.norm.num_groups
    xg = x.reshape(b, groups, -1)
    xn = ((xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, unbiased=False, keepdim=True) + attn.norm.eps).sqrt())
    xn = xn.reshape(b, channels, h * w) * attn.norm.weight[None, :, None] + attn.norm.bias[None, :, None]
    qkv = torch.einsum("oc,bcn->bon", attn.qkv.weight[:, :, 0, 0], xn) + attn.qkv.bias[None, :, None]
    q, k, v = qkv[:, :channels], qkv[:, channels:2 * channels], qkv[:, 2 * channels:]
    d = channels // heads
    heads_out = []
    for i in range(heads):
        qi, ki, vi = (m[:, i * d:(i + 1) * d] for m in (q, k, v))           # (b, d, n)
        weights = torch.softmax(torch.einsum("bdn,bdm->bnm", qi, ki) / math.sqrt(d), dim=-1)
        heads_out.append(torch.einsum("bnm,bdm->bdn", weights, vi))
    a = torch.cat(heads_out, dim=1)
    ref = x + (torch.einsum("oc,bcn->bon", attn.proj.weight[:, :, 0, 0], a)
               + attn.proj.bias[None, :, None]).reshape(b, channels, h, w)
    assert (out - x).abs().max() > 1e-2
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_resblock_uses_the_time_embedding():
    """Adding the projected embedding must survive the GroupNorm after it (a norm with one channel per group
    subtracts every per-channel constant, which would make the network blind to t and y)."""
    for in_ch, out_ch in [(16, 16), (16, 32), (32, 32), (64, 64)]:
        torch.manual_seed(2)
        block = perturb_zero_params(ResBlock(in_ch, out_ch, emb_dim=8, dropout=0.0, eps=1e-6))
        x = torch.randn(2, in_ch, 6, 6)
        with torch.no_grad():
            a = block(x, torch.randn(2, 8))
            b = block(x, torch.randn(2, 8))
        assert (a - b).abs().max() > 1e-2, (in_ch, out_ch)


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_downsample_padding_against_a_float64_sum(padding):
    """out[o, i, j] = b[o] + sum_{c,u,v} w[o, c, u, v] xp[c, 2i + u, 2j + v], where xp is x padded with zeros:
    'same' (TensorFlow's 'SAME', the paper's code) by one row/column at the bottom/right, 'symmetric' on every side."""
    torch.manual_seed(3)
    down = Downsample(2, padding).double()
    x = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        out = down(x)
    before = 0 if padding == "same" else 1
    xp = torch.zeros(2, 6 + before + 1, 4 + before + 1, dtype=torch.float64)
    xp[:, before:before + 6, before:before + 4] = x[0]
    w, b = down.conv.weight, down.conv.bias
    assert out.shape == (1, 2, 3, 2)
    for o in range(2):
        for i in range(3):
            for j in range(2):
                ref = b[o] + sum(w[o, c, u, v] * xp[c, 2 * i + u, 2 * j + v]
                                 for c in range(2) for u in range(3) for v in range(3))
                assert abs(out[0, o, i, j].item() - ref.item()) < 1e-12, (o, i, j)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_group_norm_eps_against_a_float64_formula(eps):
    """(x - mean) / sqrt(var + eps) per group; on an input of variance ~1e-6 the two choices of eps differ a lot."""
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64) * 1e-3)
    norm = group_norm(8, eps).double()
    with torch.no_grad():
        out = norm(x)
    g = x.reshape(2, norm.num_groups, -1)
    ref = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    other = group_norm(8, 1e-5 if eps == 1e-6 else 1e-6).double()
    assert (other(x) - out).abs().max() > 0.1


def test_the_paper_choices_are_the_defaults_and_reach_every_layer():
    for m in (ModelConfig(), load_config(None).model, load_config(CONFIG).model):
        assert (m.time_embedding, m.downsample_padding, m.norm_eps) == ("ddpm", "same", 1e-6)
    for fields, pad, eps in [({}, (0, 1, 0, 1), 1e-6),
                             (dict(downsample_padding="symmetric", norm_eps=1e-5), None, 1e-5)]:
        model = tiny_unet(perturb=False, **fields)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) > 10 and all(n.eps == eps for n in norms)
        downs = [m for m in model.modules() if isinstance(m, Downsample)]
        assert downs and all(d.pad == pad and d.conv.padding == ((0, 0) if pad else (1, 1)) for d in downs)


def test_base_channels_must_suit_the_time_embedding():
    for bad in ("model.base_channels=2", "model.base_channels=15"):
        with pytest.raises(UserError, match="model.base_channels"):
            load_config(None, TINY_NET + [bad])
    load_config(None, TINY_NET + ["model.base_channels=2", "model.time_embedding=transformer"])
    with pytest.raises(UserError, match="model.norm_eps"):
        load_config(None, TINY_NET + ["model.norm_eps=0"])


# ---- the U-Net -------------------------------------------------------------------------------------------------

def test_paper_model_has_35_7m_parameters():
    model = UNet.from_config(load_config(None))
    n = sum(p.numel() for p in model.parameters())
    assert n == 35_746_307  # the paper's 35.7M, and exactly diffusers' google/ddpm-cifar10-32
    assert model.num_params() == n


@pytest.mark.parametrize("size, channels, mults, attn", [
    (28, 1, (1, 2, 2), (14,)),       # 28 -> 14 -> 7: two halvings divide 28
    (28, 3, (1, 2, 2), (14,)),
    (32, 3, (1, 2, 2, 2), (16,)),
    (32, 1, (1, 2, 2, 2), (16,)),
    (64, 3, (1, 2, 2, 2), (16,)),
    (64, 1, (1, 1, 2, 2), (16, 8)),
])
def test_output_shape_equals_input_and_starts_at_zero(size, channels, mults, attn):
    model = tiny_unet(3, perturb=False, channels=channels, size=size, channel_mults=mults, attention_resolutions=attn)
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # the output convolution is zero-initialised
    # some attention was placed (the resolutions named exist), and the network is not blind to its input
    assert any(isinstance(m, Attention) for m in model.modules())
    perturb_zero_params(model)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_attention_is_placed_at_the_named_resolutions():
    # 16x16 (level 0), 8x8 (level 1): attention only at 8, i.e. in level 1's blocks, the middle, and level 1 up
    for nrb in (1, 2):
        model = tiny_unet(perturb=False, num_res_blocks=nrb)
        n_attn = sum(isinstance(m, Attention) for m in model.modules())
        assert n_attn == nrb + 1 + (nrb + 1), nrb
        model = tiny_unet(perturb=False, num_res_blocks=nrb, attention_resolutions=(16,))
        assert sum(isinstance(m, Attention) for m in model.modules()) == nrb + 1 + (nrb + 1)
        model = tiny_unet(perturb=False, num_res_blocks=nrb, attention_resolutions=())
        assert sum(isinstance(m, Attention) for m in model.modules()) == 1  # the middle always has one


def test_output_depends_on_t():
    model = perturb_zero_params(tiny_unet(4, perturb=False))
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 700]))
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_class_labels_and_the_null_label():
    model = tiny_unet(5, perturb=False, num_classes=4)
    assert model.label_emb.num_embeddings == 5  # labels 0..3 and the null label 4
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([10, 10, 10])
    with torch.no_grad():
        assert torch.all(model(x, t, torch.tensor([0, 1, 2])) == 0)  # zero output at init, with labels too
        perturb_zero_params(model)
        none = model(x, t, None)
        null = model(x, t, torch.full((3,), 4))
        assert torch.equal(none, null)
        xs = x[:1].expand(4, -1, -1, -1)
        per_label = model(xs, torch.full((4,), 10), torch.arange(4))
        null1 = model(x[:1], t[:1], None)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (per_label[i] - per_label[j]).abs().max() > 1e-3, (i, j)
        assert (per_label[i] - null1[0]).abs().max() > 1e-3, i


def test_unconditional_model_has_no_label_embedding():
    model = tiny_unet(perturb=False)
    assert model.label_emb is None
    assert not any("label_emb" in k for k in model.state_dict())


def test_num_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match="num_heads"):
        tiny_unet(perturb=False, num_heads=3)   # 32 channels at 8x8 (the attention resolution)
    with pytest.raises(ValueError, match="num_heads"):
        Attention(10, 4, eps=1e-6)
    model = tiny_unet(perturb=False, num_heads=4)  # 4 divides 16 and 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16), torch.tensor([1])).shape == (1, 3, 16, 16)


def test_from_config_refuses_unresolved_auto_classes():
    cfg = load_config(None, TINY_NET + ["model.num_classes=auto"])
    with pytest.raises(ValueError, match="auto"):
        UNet.from_config(cfg)


def test_small_model_overfits_a_small_batch():
    torch.manual_seed(6)
    model = tiny_unet(6, perturb=False).train()
    d = make_diffusion(timesteps=100)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([5, 30, 60, 90])
    noise = torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss = d.loss(model, x0, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the model starts at exactly 0, so the first loss is mean(noise^2)
    assert losses[0] == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    final = sum(losses[-10:]) / 10
    assert final < 0.5 * losses[0], (losses[0], final)


def test_gradients_reach_every_parameter():
    """After the zero-initialised layers are perturbed, every parameter gets a gradient (nothing is dead)."""
    model = perturb_zero_params(tiny_unet(7, perturb=False, num_classes=3)).train()
    d = make_diffusion(timesteps=50)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    d.loss(model, x0, torch.tensor([0, 1, 2, 0]), t=torch.tensor([1, 10, 20, 40])).backward()
    for name, p in model.named_parameters():
        if name.startswith("label_emb"):
            # rows 0..2 are used (row 3, the null label, is not, with cond_drop_prob=0)
            assert p.grad[:3].abs().sum(1).min() > 0 and torch.all(p.grad[3] == 0)
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ---- checkpoints -----------------------------------------------------------------------------------------------

def make_state(cfg, model):
    return {"step": 7, "config": to_dict(cfg), "model": model.state_dict(), "ema": model.state_dict(),
            "log": {"step": [1, 2], "loss": [0.5, 0.25]}}


def test_checkpoint_round_trip(tmp_path):
    cfg = load_config(None, TINY_NET)
    model = perturb_zero_params(UNet.from_config(cfg))
    path = str(tmp_path / "sub" / "last.pt")
    save_checkpoint(make_state(cfg, model), path)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "ddpm-checkpoint-v1"
    assert ckpt["step"] == 7 and ckpt["log"] == {"step": [1, 2], "loss": [0.5, 0.25]}
    assert ckpt["config"] == to_dict(cfg)
    sd = model.state_dict()
    assert set(ckpt["model"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ckpt["model"][k], v), k
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["last.pt"]  # no temporary file left over
    # a model built from the checkpoint's config computes the same function
    cfg2, model2, diffusion = model_from_checkpoint(ckpt, "cpu")
    assert cfg2 == cfg and not model2.training and diffusion.num_timesteps == 20
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 19])
    with torch.no_grad():
        assert torch.equal(model2(x, t), model.eval()(x, t))


def assert_one_line_user_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for f in fragments:
        assert f in msg, (f, msg)


def write_junk(path):
    path.write_bytes(bytes(range(256)) * 40)


def write_text(path):
    path.write_text("line one\nline two\n")


def write_foreign(path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, str(path))


def write_tensor(path):
    torch.save(torch.zeros(3), str(path))


@pytest.mark.parametrize("write, fragments", [
    (None, ["not found"]),
    (write_junk, []),
    (write_text, []),
    (write_foreign, ["ddpm-checkpoint-v1"]),
    (write_tensor, ["ddpm-checkpoint-v1"]),
    (lambda path: path.mkdir(), ["is a folder"]),
])
def test_load_checkpoint_errors(tmp_path, write, fragments):
    path = tmp_path / "x.pt"
    if write:
        write(path)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert_one_line_user_error(e, str(path), *fragments)


def test_load_weights_names_the_mismatch():
    small = tiny_unet(perturb=False, base_channels=16)
    other = tiny_unet(perturb=False, base_channels=32)
    with pytest.raises(UserError) as e:
        load_weights(small, other.state_dict(), "the checkpoint's weights")
    msg = str(e.value)
    assert "\n" not in msg and "the checkpoint's weights" in msg
    named = [k for k, v in small.state_dict().items() if f"'{k}'" in msg]
    assert len(named) == 1 and small.state_dict()[named[0]].shape != other.state_dict()[named[0]].shape
    assert str(list(other.state_dict()[named[0]].shape)) in msg

    # a missing key is named too (a conditional checkpoint into an unconditional model)
    cond = tiny_unet(perturb=False, num_classes=3)
    with pytest.raises(UserError) as e:
        load_weights(small, cond.state_dict(), "weights")
    assert "label_emb.weight" in str(e.value)

    # and matching weights load
    src = perturb_zero_params(tiny_unet(9, perturb=False))
    dst = tiny_unet(10, perturb=False)
    load_weights(dst, src.state_dict(), "weights")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_check_same_architecture_names_the_field():
    cfg = load_config(None, TINY_NET)
    ckpt = {"config": to_dict(cfg)}
    check_same_architecture(ckpt, cfg, "x.pt")  # the same: no error
    check_same_architecture(ckpt, load_config(None, TINY_NET + ["model.dropout=0.3"]), "x.pt")
    check_same_architecture(ckpt, load_config(None, TINY_NET + ["train.lr=1e-3"]), "x.pt")
    for override, field in [("model.base_channels=32", "model.base_channels"),
                            ("model.channel_mults=[1,1]", "model.channel_mults"),
                            ("model.num_classes=10", "model.num_classes"),
                            ("data.channels=1", "data.channels"),
                            ("data.image_size=32", "data.image_size"),
                            ("diffusion.timesteps=30", "diffusion.timesteps"),
                            ("model.time_embedding=transformer", "model.time_embedding"),
                            ("model.downsample_padding=symmetric", "model.downsample_padding"),
                            ("model.norm_eps=1e-5", "model.norm_eps")]:
        other = load_config(None, TINY_NET + [override])
        with pytest.raises(UserError) as e:
            check_same_architecture(ckpt, other, "x.pt")
        msg = str(e.value)
        assert "\n" not in msg and field in msg and "x.pt" in msg, (override, msg)
        # only the field that differs is named
        for f in ("model.base_channels", "data.channels", "diffusion.timesteps"):
            if f != field:
                assert f not in msg, (override, msg)



# ---- checkpoints from before the model options -----------------------------------------------------------------

LEGACY = os.path.join(ROOT, "tests", "data")


def test_a_stored_config_without_the_options_means_the_old_network(tmp_path):
    path = tiny_checkpoint(tmp_path / "new.pt")
    ckpt = load_checkpoint(path)
    assert {k: ckpt["config"]["model"][k] for k in BEFORE_MODEL_OPTIONS} == {
        "time_embedding": "ddpm", "downsample_padding": "same", "norm_eps": 1e-6}  # a new one keeps its own
    for k in BEFORE_MODEL_OPTIONS:
        del ckpt["config"]["model"][k]
    save_checkpoint(ckpt, str(tmp_path / "old.pt"))
    old = load_checkpoint(str(tmp_path / "old.pt"))
    assert old["config"]["model"]["time_embedding"] == "transformer"
    assert old["config"]["model"]["downsample_padding"] == "symmetric"
    assert old["config"]["model"]["norm_eps"] == 1e-5
    cfg, model, _ = model_from_checkpoint(old, "cpu")
    assert model.time_embedding == "transformer" and cfg.model.norm_eps == 1e-5
    assert all(n.eps == 1e-5 for n in model.modules() if isinstance(n, torch.nn.GroupNorm))
    assert all(d.pad is None for d in model.modules() if isinstance(d, Downsample))
    # resuming it under today's defaults is refused, naming the option
    with pytest.raises(UserError, match="model.time_embedding"):
        check_same_architecture(old, load_config(None, TINY_NET), "old.pt")


def test_an_old_checkpoint_gives_the_images_it_gave():
    """tests/data/legacy_tiny.pt and the outputs it gave were written by the code of commit c8364ef, before the
    options existed (tests/data/make_legacy_checkpoint.py). Float32 on another CPU may differ in the last bits;
    any one of the paper's options changes them by far more than the tolerance."""
    expected = torch.load(os.path.join(LEGACY, "legacy_tiny_expected.pt"), weights_only=True)
    ckpt = load_checkpoint(os.path.join(LEGACY, "legacy_tiny.pt"))
    assert not set(BEFORE_MODEL_OPTIONS) & set(torch.load(os.path.join(LEGACY, "legacy_tiny.pt"),
                                                          weights_only=True)["config"]["model"])

    def outputs(overrides=()):
        _, model, diffusion = model_from_checkpoint(ckpt, "cpu", overrides=overrides)
        x_t, steps = expected["x_T"], expected["steps"]
        with torch.no_grad():
            eps = model(expected["x"], expected["t"])
            for s, s_prev in zip(steps, steps[1:] + [-1]):
                x_t, _ = diffusion.ddim_step(diffusion.denoiser(model), x_t, torch.full((2,), s),
                                             torch.full((2,), s_prev), torch.zeros_like(x_t), 0.0)
        return eps, x_t

    eps, images = outputs()  # identical on the machine that wrote them
    assert (eps - expected["eps"]).abs().max() < 2e-6
    assert (images - expected["images"]).abs().max() < 2e-6
    # each of the paper's choices alone moves the outputs by 1.3e-4 (eps) to 1.8 (padding)
    for option in ("model.time_embedding=ddpm", "model.downsample_padding=same", "model.norm_eps=1e-6"):
        eps, _ = outputs([option])
        assert (eps - expected["eps"]).abs().max() > 5e-5, option
