"""The conditions of a sampling run: class labels or encoded prompts, repeated over the images, and the
captions of the training grids.
"""
import dataclasses
import hashlib

import torch

from ddpm.text_encoders import NegativePrompt, prompt_encoder


@dataclasses.dataclass
class Conditions:
    """The conditions of a sampling run. labels: class labels (a list or a long tensor) or encoded prompts (a
    tensor), cycled over the n images; None: the unconditional model (or the null condition). nrow: the images per
    grid row when each row has one condition (None: the grid's own rows). prompts: the prompt of each of the n
    images (None without prompts)."""
    labels: object
    n: int
    nrow: int | None = None
    prompts: list[str] | None = None

    def per_row(self):
        """One condition per grid row when each row has one (the labels of a row are alike), else all of them."""
        return self.labels[::self.nrow] if self.nrow else self.labels


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


def prompt_conditions(loaded, prompts: list[str], negative: str | None, say=print):
    """(model, conditions (P, ...) of the P prompts on the device) of a LoadedCheckpoint (ddpm/checkpoint.py): its
    model, wrapped in NegativePrompt when a negative prompt (--negative-prompt) is given."""
    encoder = prompt_encoder(loaded.cfg.model, loaded.text_state, device=loaded.device)
    conds = encoder.encode(prompts + ([negative] if negative is not None else []), say).to(loaded.device)
    if negative is not None:
        return NegativePrompt(loaded.model, conds[-1:]).eval(), conds[:-1]
    return loaded.model, conds


def prompts_tag(prompts, negative) -> str:
    """A short name for a set of prompts (and a negative prompt) in folder names: a hash of them."""
    text = "\n".join(prompts) + ("\0" + negative if negative is not None else "")
    return hashlib.sha256(text.encode()).hexdigest()[:8]
