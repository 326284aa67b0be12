"""compress.py: structured pruning (ddpm/pruning.py, torch-pruning) and post-training quantization
(ddpm/quantization.py) on the tiny networks of tests/helpers.py."""
import copy
import dataclasses
import os
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from helpers import TINY_MODEL, fails_in_process, make_diffusion, tiny_checkpoint, tiny_config, tiny_unet
from torch.utils.flop_counter import FlopCounterMode

import compress
import convert
import sample
import train
from config import ModelConfig, SampleConfig, config_from_dict
from ddpm import quantization
from ddpm.checkpoint import load_checkpoint, model_from_checkpoint
from ddpm.config_rules import nominal_widths
from ddpm.generation import Sampling, batch_generator, generate
from ddpm.samplers import sample_loop, sampler_timesteps
from model import UNet

SAMPLE = SampleConfig(sampler="ddim", steps=5, seed=0, precision="fp32")


def pruning_module():
    pytest.importorskip("torch_pruning")
    from ddpm import pruning
    return pruning


def with_gradients(model, seed=0):
    """Gradients of the diffusion loss at a few timesteps on random data (what the Taylor score reads)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    batches = [(x0, None, torch.randn(x0.shape, generator=g))]
    pruning_module().accumulate_taylor_gradients(model, make_diffusion(timesteps=20), batches, 0.0, 3)
    return model


EXAMPLE = (torch.randn(1, 3, 16, 16), torch.tensor([3]))


def pruned_tiny(keep: Fraction, seed=0):
    """(dense copy, pruned model) of the tiny U-Net."""
    dense = tiny_unet(seed)
    model = with_gradients(copy.deepcopy(dense))
    pruning_module().prune_model(model, EXAMPLE, keep)
    return dense, model


# ---- pruning ----------------------------------------------------------------------------------------------------

def test_the_stopping_rule_adds_timesteps_until_the_loss_falls_below_the_threshold():
    pruning = pruning_module()
    losses = [4.0, 8.0, 5.0, 1.0, 0.7, 0.3, 0.1]  # 0.7 < 0.1 x 8 stops at t = 4

    class StandIn:  # L_t = losses[t] x w, so dL/dw summed over the timesteps used is the sum of those losses
        num_timesteps = len(losses)

        def loss(self, model, x0, cond, t, noise):
            return losses[int(t[0])] * model.w.sum()

    model = nn.Module()
    model.w = nn.Parameter(torch.ones(1))
    used = pruning.accumulate_taylor_gradients(model, StandIn(), [(torch.zeros(2, 1), None, None)] * 2, 0.1, 100)
    assert used == pytest.approx(losses[:5])
    assert model.w.grad.item() == pytest.approx(2 * sum(losses[:5]))  # two batches
    assert len(pruning.accumulate_taylor_gradients(model, StandIn(), [(torch.zeros(2, 1), None, None)], 0.1, 2)) == 2


def test_prune_indices_drop_the_lowest_scores_of_each_run():
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 7.0])
    assert pruning_module().prune_indices(scores, Fraction(2, 4), 4) == [1, 3, 4, 7]


def test_pruning_that_removes_no_channel_leaves_the_outputs_unchanged():
    dense, model = pruned_tiny(Fraction(1))
    assert pruning_module().recorded_widths(model) == nominal_widths(ModelConfig(**TINY_MODEL))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 7, 19])
    with torch.no_grad():
        assert torch.equal(model(x, t), dense(x, t))


def kept_indices(dense_w: torch.Tensor, pruned_w: torch.Tensor, dim: int) -> list[int]:
    """For each slice of pruned_w along dim, the index of the dense slice it equals exactly (after the other
    dimension was matched); fails if one has no exact match."""
    found = []
    for j in range(pruned_w.shape[dim]):
        target = pruned_w.select(dim, j)
        matches = [i for i in range(dense_w.shape[dim]) if torch.equal(dense_w.select(dim, i), target)]
        assert matches, f"slice {j} is no slice of the dense tensor"
        found.append(matches[0])
    return found


def test_pruned_weights_are_exactly_the_kept_slices_of_the_dense_ones():
    dense, model = pruned_tiny(Fraction(3, 4))
    dense_layers = dict(dense.named_modules())
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        d = dense_layers[name]
        out_idx = kept_indices(d.bias.detach(), layer.bias.detach(), 0)  # biases are random: unique values
        rows = d.weight.detach()[out_idx]
        in_idx = kept_indices(rows, layer.weight.detach(), 1)
        assert torch.equal(rows[:, in_idx], layer.weight.detach()), name
        assert out_idx == sorted(out_idx) and in_idx == sorted(in_idx), name
        if layer.weight.shape[0] != d.weight.shape[0] and isinstance(layer, nn.Conv2d):
            # GroupNorm groups of 4 channels: 3 kept in every run of 4
            assert [sum(1 for i in out_idx if i // 4 == r) for r in range(d.weight.shape[0] // 4)] == \
                [3] * (d.weight.shape[0] // 4), name
        checked += 1
    assert checked == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in dense.modules())
    for name, layer in model.named_modules():  # the norms keep their groups and the matching affine values
        if isinstance(layer, nn.GroupNorm):
            assert layer.num_groups == dense_layers[name].num_groups
            assert layer.num_channels == dense_layers[name].num_channels * 3 // 4


def macs(model, x, t) -> tuple[int, int]:
    """(all multiply-accumulates, those of the convolutions) of one call, by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    convs = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return counter.get_total_flops() // 2, convs // 2


def conv_macs(model, size=16) -> int:
    """Multiply-accumulates of every convolution by hand: H_out W_out k^2 C_in C_out."""
    total, hooks = 0, []

    def count(module, args, out):
        nonlocal total
        total += out.shape[-2] * out.shape[-1] * module.weight[0].numel() * module.out_channels
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("keep", [Fraction(3, 4), Fraction(1, 2)])
def test_parameters_and_macs_fall_as_the_ratio_says(keep):
    dense, model = pruned_tiny(keep)
    fixed = ("conv_in", "conv_out", ".qkv", ".proj", "time_mlp")  # one side stays: image channels, attention, emb
    for (name, d), (_, p) in zip(dense.named_modules(), model.named_modules()):
        if isinstance(d, nn.Conv2d) and not any(f in name for f in fixed):
            assert p.weight.numel() == d.weight.numel() * keep ** 2, name  # both sides pruned by `keep`
    params = model.num_params() / dense.num_params()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    (total, convs), (dense_total, dense_convs) = macs(model, x, t), macs(dense, x, t)
    assert (convs, dense_convs) == (conv_macs(model), conv_macs(dense))  # the counter and the hand count agree
    flops = total / dense_total
    for ratio in (params, flops):  # between keep^2 (all pruned on both sides) and keep (one side)
        assert keep ** 2 < ratio < keep ** 2 + 0.6 * (keep - keep ** 2), (params, flops)


def test_a_pruned_checkpoint_saves_loads_samples_and_fine_tunes(tmp_path, monkeypatch, capsys):
    pruning_module()
    src = tiny_checkpoint(tmp_path / "dense.pt")
    out = tmp_path / "pruned.pt"
    compress.main(["prune", "--ckpt", str(src), "--ratio", "0.25", "--out", str(out), "--batches", "1",
                   "--batch-size", "4", "--max-timesteps", "3"])
    assert "kept 3/4" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    widths = ckpt["config"]["model"]["widths"]
    assert widths == [w * 3 // 4 for w in nominal_widths(tiny_config().model)]
    assert "optimizer" not in ckpt and ckpt["pruning"]["kept"] == "3/4"
    cfg, model, _ = model_from_checkpoint(load_checkpoint(str(out)), "cpu")
    assert model.conv_in.out_channels == 12
    sample.main(["--ckpt", str(out), "--n", "2", "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert os.path.getsize(tmp_path / "grid.png") > 0
    monkeypatch.chdir(tmp_path)
    train.main(["--resume", str(out), "--name", "ft", "train.max_steps=2", "train.batch_size=4",
                "train.num_workers=0", "train.sample_every=1000", "train.compile=false"])
    tuned = load_checkpoint(str(tmp_path / "checkpoints" / "ft" / "last.pt"))
    assert tuned["step"] == 2 and tuned["config"]["model"]["widths"] == widths
    err = fails_in_process(capsys, convert.main, "to-diffusers", str(out), "--out", str(tmp_path / "d"))
    assert "model.widths" in err and not (tmp_path / "d").exists()


def test_pruning_at_one_channel_per_group_is_refused(tmp_path, capsys):
    pruning_module()
    quarter = [w // 4 for w in nominal_widths(tiny_config().model)]  # one channel in each group of 4
    src = tiny_checkpoint(tmp_path / "thin.pt", f"model.widths={quarter}")
    err = fails_in_process(capsys, compress.main, "prune", "--ckpt", src, "--ratio", "0.5", "--out", tmp_path / "o.pt")
    assert "fewer than one channel per GroupNorm group" in err and not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["prune", "--ratio", "0"], "--ratio must be in (0, 1)"),
    (["prune", "--ratio", "1"], "--ratio must be in (0, 1)"),
    (["prune", "--ratio", "-0.3"], "--ratio must be in (0, 1)"),
    (["prune", "--ratio", "0.05"], "removes no channel"),
    (["quantize", "--bits", "3"], "--bits must be 8 or 4"),
    (["quantize", "--bits", "16"], "--bits must be 8 or 4"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    pytest.importorskip("torch_pruning")
    src = tiny_checkpoint(tmp_path / "dense.pt")
    err = fails_in_process(capsys, compress.main, *argv, "--ckpt", src, "--out", tmp_path / "o.pt")
    assert needle in err and not (tmp_path / "o.pt").exists()


def test_a_missing_library_names_the_requirements_file(tmp_path, capsys, monkeypatch):
    src = tiny_checkpoint(tmp_path / "dense.pt")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    err = fails_in_process(capsys, compress.main, "prune", "--ckpt", src, "--ratio", "0.5", "--out", tmp_path / "o.pt")
    assert "requirements-compress.txt" in err and not (tmp_path / "o.pt").exists()


def test_old_checkpoints_are_unaffected(tmp_path):
    src = tiny_checkpoint(tmp_path / "old.pt")
    ckpt = load_checkpoint(src)
    del ckpt["config"]["model"]["widths"]  # as written before model.widths existed
    assert config_from_dict(ckpt["config"]).model.widths is None
    _, model, _ = model_from_checkpoint(ckpt, "cpu")
    torch.manual_seed(0)
    reference = UNet(tiny_config().model, 3, 16)
    reference.load_state_dict(ckpt["ema"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 19])
    with torch.no_grad():
        assert torch.equal(model(x, t), reference.eval()(x, t))


# ---- quantization ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_dequantize_error_is_within_half_a_step(bits):
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64) * torch.logspace(-3, 1, 16, dtype=torch.float64)[:, None, None,
                                                                                                       None]
    w[3] = 0  # an all-zero channel
    q, scale = quantization.quantize_weight(w, bits)
    top = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) == top
    err = (w - q.double() * scale.double()[:, None, None, None]).abs()
    assert (err <= scale.double()[:, None, None, None] / 2 * (1 + 1e-6)).all()
    ref_scale = w.flatten(1).abs().amax(1) / top  # s_c = max |w_c| / q_max, in float64
    assert torch.allclose(scale.double()[ref_scale > 0], ref_scale[ref_scale > 0], rtol=1e-6)
    assert torch.equal(q[3], torch.zeros_like(q[3]))


def test_int4_packing_round_trips_two_to_a_byte():
    q = torch.tensor([[-8, -1, 0, 7], [3, -5, 1, 6], [2, 0, -7, 5]], dtype=torch.int8)
    packed = quantization.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 6
    assert torch.equal(quantization.unpack_int4(packed, q.shape), q)
    odd = torch.arange(-7, 8, dtype=torch.int8)  # 15 values: the last byte half used
    assert torch.equal(quantization.unpack_int4(quantization.pack_int4(odd), odd.shape), odd)


def trained_like(seed=0):
    return tiny_unet(seed)


@torch.no_grad()
def input_ranges(model, x_t, t: int) -> dict:
    """(min, max) of the input of every convolution and linear layer in one call of the network at step t."""
    ranges = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, name=name: ranges.__setitem__(name, (args[0].min().item(), args[0].max().item())))
        for name, layer in model.named_modules() if isinstance(layer, (nn.Conv2d, nn.Linear))]
    model(x_t, torch.full((len(x_t),), t))
    for h in hooks:
        h.remove()
    return ranges


def test_calibration_covers_the_sampler_timesteps():
    model, diffusion = trained_like(), make_diffusion(timesteps=20)
    ranges, seen = quantization.calibrate(model, diffusion, SAMPLE, 3, "cpu")
    grid = sampler_timesteps(diffusion, SAMPLE)
    assert seen == sorted(grid) and len(seen) == 5
    # the ranges are the union over the x_t of every step: rebuilt from the recorded trajectory, step by step
    g = torch.Generator().manual_seed(SAMPLE.seed)  # the x_T and noise of calibration_samples
    x_T = torch.randn((3, 3, 16, 16), generator=g)
    _, trajectory = sample_loop(diffusion, diffusion.denoiser(model), x_T, SAMPLE, g, record=grid)
    per_step = []
    for x_t, t in zip(trajectory["x_t"], trajectory["t"]):
        per_step.append(input_ranges(model, x_t, t))
    for name, (low, high) in ranges.items():
        assert low == pytest.approx(min(r[name][0] for r in per_step), abs=1e-5)
        assert high == pytest.approx(max(r[name][1] for r in per_step), abs=1e-5)
    # and the steps differ: the extremes of the layers come from more than one timestep
    sources = {min(range(5), key=lambda i: per_step[i][name][0]) for name in ranges}
    sources |= {max(range(5), key=lambda i: per_step[i][name][1]) for name in ranges}
    assert len(sources) >= 2, sources


def noise_model_rms(model, ranges, x, t, bits_w, seeds=3) -> float:
    """RMS change of the output when every weight and every layer input gets independent uniform noise of
    +-step/2 (the additive noise model of rounding, Widrow 1956): the quantizer's expected error, computed from
    the step sizes alone."""
    out = model(x, t)
    layers = quantization.quantized_layers(model)
    errors = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        noisy = copy.deepcopy(model)
        hooks = []
        for name, layer in quantization.quantized_layers(noisy).items():
            w = layers[name].weight
            step = w.detach().flatten(1).abs().amax(1) / (2 ** (quantization.weight_bits(name, bits_w) - 1) - 1)
            shape = (-1,) + (1,) * (w.dim() - 1)
            layer.weight.data += (torch.rand(w.shape, generator=g) - 0.5) * step.reshape(shape)
            low, high = min(ranges[name][0], 0), max(ranges[name][1], 0)
            a_step = (high - low) / 255

            def hook(module, args, a_step=a_step, g=g):
                return (args[0] + (torch.rand(args[0].shape, generator=g) - 0.5) * a_step, *args[1:])
            hooks.append(layer.register_forward_pre_hook(hook))
        errors.append(((noisy(x, t) - out) ** 2).mean())
    return float(torch.stack(errors).mean().sqrt())


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_quantized_outputs_are_as_close_to_fp32_as_the_rounding_noise_model_says(bits):
    model, diffusion = trained_like(), make_diffusion(timesteps=20)
    ranges, _ = quantization.calibrate(model, diffusion, SAMPLE, 4, "cpu")
    state, info = quantization.quantize_state(model.state_dict(), model, bits)
    quantized = copy.deepcopy(model)
    quantized.load_state_dict(quantization.dequantize_state(state, {"weights": info}))
    quantization.add_activation_quantizers(quantized, ranges, 8)
    middle = sampler_timesteps(diffusion, SAMPLE)[2]  # an x_t from the middle of the sampler's path
    _, trajectory = generate(Sampling(model, diffusion, SAMPLE, "cpu"), 4, batch_generator(1, 0, 4, "cpu"),
                             record=[middle])
    x, t = trajectory["x_t"][0], torch.full((4,), middle)
    rms = float(((quantized(x, t) - model(x, t)) ** 2).mean().sqrt())
    predicted = noise_model_rms(model, ranges, x, t, bits)
    # the noise model predicts the RMS error (measured here: 1.06x the prediction at W8A8, 0.96x at W4A8); rounding
    # is not exactly independent noise, so the margin is 2x either way
    assert predicted / 2 < rms < 2 * predicted, (rms, predicted)
    assert rms < 0.1 * float(model(x, t).pow(2).mean().sqrt()) * (1 if bits == 8 else 10)


def test_a_quantized_checkpoint_is_smaller_and_samples(tmp_path, monkeypatch, capsys):
    src = tiny_checkpoint(tmp_path / "dense.pt")
    ckpt = load_checkpoint(src)
    weights_only = tmp_path / "weights.pt"
    torch.save({"config": ckpt["config"], "ema": ckpt["ema"]}, weights_only)
    sizes = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}.pt"
        compress.main(["quantize", "--ckpt", src, "--bits", str(bits), "--out", str(out), "--calib-images", "2"])
        sizes[bits] = os.path.getsize(out)
        q = torch.load(out, weights_only=True)
        assert q["ema"]["down.0.res.conv1.weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert q["quantization"]["calibration"]["timesteps"] == sorted(
            sampler_timesteps(make_diffusion(timesteps=20), dataclasses.replace(SAMPLE, steps=5)))
        cfg, model, _ = model_from_checkpoint(load_checkpoint(str(out)), "cpu")
        _, dense, _ = model_from_checkpoint(ckpt, "cpu")
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([2, 15])
        with torch.no_grad():
            diff = (model(x, t) - dense(x, t)).pow(2).mean().sqrt() / dense(x, t).pow(2).mean().sqrt()
        assert 0 < diff < (0.1 if bits == 8 else 0.5)  # random inputs, partly outside the calibrated ranges
        sample.main(["--ckpt", str(out), "--n", "2", "--out", str(tmp_path / f"g{bits}.png"), "--device", "cpu"])
    assert sizes[4] < sizes[8] < 0.5 * os.path.getsize(weights_only)
    monkeypatch.chdir(tmp_path)
    err = fails_in_process(capsys, train.main, "--resume", tmp_path / "w8.pt", "--name", "x", "train.max_steps=1")
    assert "quantized" in err


@torch.no_grad()
def test_torchao_int8_flow_matches_fp32_in_eager_mode():
    pytest.importorskip("torchao")
    model, diffusion = trained_like(), make_diffusion(timesteps=20)
    calls = quantization.calibration_inputs(model, diffusion, SAMPLE, 2, "cpu")
    assert sorted({int(c[1][0]) for c in calls}) == sorted(sampler_timesteps(diffusion, SAMPLE))
    converted = quantization.int8_reference(model, calls)  # the converted graph in eager mode (no Inductor)
    x, t = calls[2]
    rms = (converted(x, t) - model(x, t)).pow(2).mean().sqrt() / model(x, t).pow(2).mean().sqrt()
    assert rms < 0.05

