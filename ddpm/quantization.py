"""Post-training quantization of the U-Net: integer weights with per-channel scales, activations calibrated over
the sampler's timesteps (Q-Diffusion, Li et al. 2023: the ranges of a diffusion model's activations change with t,
so the calibration data are x_t from every step of the sampler's own trajectory).

Weights: symmetric per output channel, w ~ s_c q with s_c = max_i |w_ci| / q_max, q = clamp(round(w / s_c),
-q_max, q_max), q_max = 2^(b-1) - 1, so |w - s_c q| <= s_c / 2 (Jacob et al. 2018, Nagel et al. 2021 sec. 2).
At 4 bits the first and last convolutions keep 8 (as in Q-Diffusion and BRECQ). Activations: the input of every
convolution and linear layer, affine per tensor over [low, high] observed in calibration, 2^b levels,
x ~ s (q - z) with s = (high - low) / (2^b - 1) and z = round(-low / s) (fake quantization: quantize and
dequantize in float, on any device). Attention's matrix products stay in float.

A quantized checkpoint stores the integers (int8; 4-bit ones packed two to a byte) and, under "quantization", the
scales, the activation ranges and the settings; model_from_checkpoint (ddpm/checkpoint.py) dequantizes the weights
and puts the activation quantizers back. int8_inductor compiles real int8 kernels for the CPU with torchao.
"""
import torch
import torch.nn as nn

from ddpm.samplers import sample_loop
from utils import UserError

INSTALL = "pip install -r requirements-compress.txt"
FORMAT = "ddpm-quantization-v1"


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): symmetric per-output-channel integers (int8 tensor, values in [-q_max, q_max]) and scales (C_out,)
    with w ~ s_c q_c; an all-zero channel gets s = 1 (q = 0 is then exact)."""
    flat = w.detach().float().flatten(1)  # (C_out, fan_in)
    scale = flat.abs().amax(dim=1) / qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale[:, None]), -qmax(bits), qmax(bits))
    return q.to(torch.int8).reshape(w.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().flatten(1) * scale[:, None]).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit integers in [-8, 7] a byte (uint8, the first of each pair in the low nibble), flattened."""
    flat = q.flatten().to(torch.int16) & 0xF
    if len(flat) % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int16)
    signed = torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)
    return signed[:torch.Size(shape).numel()].reshape(shape)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The convolutions and linear layers of the U-Net by name (a learned text encoder's stay in float)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("text_encoder.")}


def weight_bits(name: str, bits: int) -> int:
    return 8 if name in ("conv_in", "conv_out") else bits


def quantize_state(state: dict, model: nn.Module, bits: int) -> tuple[dict, dict]:
    """(state with every quantized layer's weight as integers, {weight name: (scale, shape, bits)})."""
    state, info = dict(state), {}
    for name in quantized_layers(model):
        key, b = f"{name}.weight", weight_bits(name, bits)
        q, scale = quantize_weight(state[key], b)
        state[key] = pack_int4(q) if b == 4 else q
        info[key] = {"scale": scale, "shape": list(q.shape), "bits": b}
    return state, info


def dequantize_state(state: dict, quant: dict) -> dict:
    """The float state dict of a quantized checkpoint's weights: w = s_c q for every quantized weight."""
    state = dict(state)
    for key, w in quant["weights"].items():
        q = unpack_int4(state[key], w["shape"]) if w["bits"] == 4 else state[key]
        state[key] = dequantize_weight(q, w["scale"])
    return state


def fake_quantize(x: torch.Tensor, low: float, high: float, bits: int) -> torch.Tensor:
    """Affine quantize-dequantize of x over [low, high] (widened to hold 0) with 2^bits levels."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / (2 ** bits - 1)
    zero = round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def add_activation_quantizers(model: nn.Module, ranges: dict, bits: int) -> list:
    """Fake-quantize the input of every calibrated layer (forward pre-hooks); returns the hooks' handles."""
    handles = []
    for name, layer in quantized_layers(model).items():
        low, high = ranges[name]

        def hook(module, args, low=low, high=high):
            return (fake_quantize(args[0], low, high, bits), *args[1:])
        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def calibration_samples(model, diffusion, sample_cfg, n: int, device) -> torch.Tensor:
    """n samples of the float model with the sampler of sample_cfg, from x_T (and noise) of a generator seeded with
    sample_cfg.seed: the run whose network inputs calibration observes."""
    generator = torch.Generator(device).manual_seed(sample_cfg.seed)
    x_T = torch.randn((n, model.image_channels, model.image_size, model.image_size), generator=generator,
                      device=device)
    with torch.no_grad():
        return sample_loop(diffusion, diffusion.denoiser(model), x_T, sample_cfg, generator)


@torch.no_grad()
def calibrate(model, diffusion, sample_cfg, n: int, device) -> tuple[dict, list[int]]:
    """Activation ranges {layer: (low, high)} over the inputs every layer sees while the float model samples n
    images with the sampler of sample_cfg (so x_t at every step of its grid), and the timesteps the network saw."""
    ranges, seen = {}, []

    def observe(name):
        def hook(module, args):
            low, high = args[0].min().item(), args[0].max().item()
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
        return hook

    handles = [layer.register_forward_pre_hook(observe(name)) for name, layer in quantized_layers(model).items()]
    handles.append(model.register_forward_pre_hook(lambda module, args: seen.extend(args[1].unique().tolist())))
    try:
        calibration_samples(model, diffusion, sample_cfg, n, device)
    finally:
        for h in handles:
            h.remove()
    return ranges, sorted(set(seen))


def quantize_checkpoint(ckpt: dict, model, diffusion, sample_cfg, bits: int, n: int) -> dict:
    """The quantized checkpoint of a float one: integer weights (of the EMA, shared as model and EMA), the
    scales, and activation ranges calibrated on `model` (the float network of those weights) over the sampler."""
    if bits not in (4, 8):
        raise UserError(f"--bits must be 8 or 4 (the weights' bits; activations are 8), got {bits}")
    ranges, timesteps = calibrate(model, diffusion, sample_cfg, n, torch.device("cpu"))
    state, weights = quantize_state(ckpt["ema"], model, bits)
    quant = {"format": FORMAT, "weight_bits": bits, "act_bits": 8, "weights": weights,
             "activations": {k: list(v) for k, v in ranges.items()},
             "calibration": {"images": n, "sampler": sample_cfg.sampler, "steps": sample_cfg.steps,
                             "timesteps": timesteps}}
    kept = {k: v for k, v in ckpt.items() if k in ("step", "config", "text")}
    return {**kept, "model": state, "ema": state, "quantization": quant}


def apply_quantization(model: nn.Module, quant: dict) -> None:
    """Put a loaded quantized checkpoint's activation quantizers on `model` (its weights already dequantized)."""
    if quant.get("format") != FORMAT:
        raise UserError(f"unknown quantization format {quant.get('format')!r}; expected {FORMAT}")
    add_activation_quantizers(model, {k: tuple(v) for k, v in quant["activations"].items()}, quant["act_bits"])


def int8_reference(model: nn.Module, calibration: list[tuple]) -> nn.Module:
    """torchao's PT2E flow on the CPU: torch.export, the X86InductorQuantizer (int8 symmetric per-channel weights,
    uint8 affine per-tensor activations) observing the calibration inputs [(x_t, t), ...], then convert: a graph of
    float operations between quantize/dequantize pairs, which runs as it is (in float) or compiled (int8_inductor)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise UserError(f"int8 kernels need torchao: {INSTALL}") from None
    # the samplers run in inference mode; export traces with autograd, so it takes plain copies
    calibration = [tuple(a.clone() for a in inputs) for inputs in calibration]
    exported = torch.export.export(model.eval(), calibration[0]).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for inputs in calibration:
            prepared(*inputs)
    return convert_pt2e(prepared)


def int8_inductor(model: nn.Module, calibration: list[tuple]) -> nn.Module:
    """Real int8 kernels on an x86 CPU: int8_reference compiled by Inductor, which fuses the quantize/dequantize
    pairs around each convolution and linear layer into oneDNN int8 kernels."""
    return torch.compile(int8_reference(model, calibration))


def calibration_inputs(model, diffusion, sample_cfg, n: int, device) -> list[tuple]:
    """(x_t, t) of every network call while the float model samples n images: the inputs int8_inductor observes."""
    calls = []
    handle = model.register_forward_pre_hook(  # (x_t, t, and the condition where there is one)
        lambda module, args: calls.append(tuple(a.clone() for a in args if a is not None)))
    try:
        with torch.no_grad():
            calibration_samples(model, diffusion, sample_cfg, n, device)
    finally:
        handle.remove()
    return calls
