"""The conditions of a sampling run: class labels or encoded prompts, repeated over the images, and the
captions of the training grids.
"""
import hashlib

import torch

from ddpm.text_encoders import NegativePrompt, prompt_encoder


def repeat_to(labels, n: int):
    """Conditions repeated over n images: labels (a list, as a long tensor) or a tensor of them or of encoded
    captions (the first dimension cycled); None stays None."""
    if labels is None:
        return None
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, dtype=torch.long)
    return labels[torch.arange(n, device=labels.device) % len(labels)]


def grid_captions(captions, k: int = 8) -> list[str]:
    """Up to k distinct non-empty captions, evenly spread over `captions`: the fixed rows of training grids."""
    distinct = list(dict.fromkeys(c for c in captions if c.strip()))
    k = min(k, len(distinct))
    return [distinct[i * len(distinct) // k] for i in range(k)]


def prompt_conditions(args, m, state, model, prompts, device, say=print):
    """(model, conditions (P, ...) of the P prompts on `device`): the model wrapped in NegativePrompt when
    --negative-prompt is given."""
    encoder = prompt_encoder(m, state, device=device)
    conds = encoder.encode(prompts + ([args.negative_prompt] if args.negative_prompt is not None else []), say)
    conds = conds.to(device)
    if args.negative_prompt is not None:
        model, conds = NegativePrompt(model, conds[-1:]).eval(), conds[:-1]
    return model, conds


def prompts_tag(prompts, negative) -> str:
    """A short name for a set of prompts (and a negative prompt) in folder names: a hash of them."""
    text = "\n".join(prompts) + ("\0" + negative if negative is not None else "")
    return hashlib.sha256(text.encode()).hexdigest()[:8]
