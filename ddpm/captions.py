"""Captions of the training images, for text-conditional models (dataset.build_dataset(cfg, captions=True)).

    folder       a sidecar text file beside each image (001.txt for 001.png), or a metadata.jsonl with one
                 {"file_name": ..., "text": ...} per line (the convention of diffusers' ImageFolder and the Hub);
                 the sidecar wins where both give one
    cifar10, fashion_mnist, mnist   from the labels: "a photo of an airplane", "a handwritten digit seven"
    shapes       the colour and the kind: "a red triangle" (RGB; "a triangle" in grayscale)

An image without a caption, or with an empty one, has the empty caption: the null condition, so it is trained as
an unconditional sample. Whitespace in a caption is collapsed to single spaces.
"""
import json
import os
import warnings

import torch

from utils import UserError, read_text

# The shapes' colour names: six hue sectors of 60 degrees, named by their centre (red at 0 degrees). Hues are in
# degrees [0, 360); a shape's colour is the sector its foreground hue falls in, so a sample's colour can be
# checked from its pixels.
SHAPE_COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
SECTOR = 360 / len(SHAPE_COLOURS)
LABEL_CAPTIONS = {"cifar10": "a photo of {}", "fashion_mnist": "a photo of {}", "mnist": "a handwritten digit {}"}


def colour_name(hue_degrees: float) -> str:
    """The name of the sector that a hue (degrees) falls in."""
    return SHAPE_COLOURS[int(((hue_degrees + SECTOR / 2) % 360) // SECTOR)]


def colour_hue_range(name: str) -> tuple[float, float]:
    """The hues (degrees) named `name`: [low, high) going round from low, e.g. red (330, 30)."""
    centre = SHAPE_COLOURS.index(name) * SECTOR
    return (centre - SECTOR / 2) % 360, centre + SECTOR / 2


def clean(text: str) -> str:
    return " ".join(text.split())


def with_article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def shape_captions(kinds, hues, channels: int, names) -> list[str]:
    """'a red triangle' from the kind index (into `names`) and foreground hue in [0, 1) of each shape."""
    if channels != 3:
        return [with_article(names[k]) for k in kinds.tolist()]
    return [with_article(f"{colour_name(360 * h)} {names[k]}") for k, h in zip(kinds.tolist(), hues.tolist())]


def label_captions(dataset: str, classes, labels) -> list[str]:
    """Captions of a torchvision set from its class names (MNIST's '7 - seven' gives 'seven')."""
    names = [c.split(" - ")[-1].lower() for c in classes]
    template = LABEL_CAPTIONS[dataset]
    phrases = [template.format(n if dataset == "mnist" else with_article(n)) for n in names]
    return [phrases[y] for y in labels.tolist()]


def folder_captions(files, root: str) -> list[str]:
    """The caption of each image file: its sidecar .txt, else its text in a metadata.jsonl, else ''."""
    listed = _metadata_captions(files, root)
    out = []
    for f in files:
        sidecar = os.path.splitext(f)[0] + ".txt"
        out.append(clean(read_text(sidecar, "caption file")) if os.path.isfile(sidecar)
                   else listed.get(os.path.normpath(f), ""))
    return out


def _metadata_captions(files, root: str) -> dict:
    """{image path: caption} from every metadata.jsonl in root or in a folder of the images up to root; each one
    names files relative to its own folder, and a deeper one wins over one above it."""
    folders, root = set(), os.path.normpath(root)
    for f in files:
        folder = os.path.dirname(os.path.normpath(f))
        while folder not in folders and len(folder) >= len(root):
            folders.add(folder)
            folder = os.path.dirname(folder)
    found = {}
    for folder in sorted(folders, key=lambda d: d.count(os.sep)):
        path = os.path.join(folder, "metadata.jsonl")
        if os.path.isfile(path):
            found.update(_read_metadata(path))
    unmatched = set(found) - {os.path.normpath(f) for f in files}
    if unmatched:
        warnings.warn(f"{len(unmatched)} metadata.jsonl entries name no image under '{root}' "
                      f"(e.g. '{os.path.relpath(min(unmatched), root)}'); they are ignored")
    return found


def _read_metadata(path: str) -> dict:
    """{image path: caption} of one metadata.jsonl; a line that is not such an entry is a one-line error."""
    folder, found = os.path.dirname(path), {}
    example = 'each line is like {"file_name": "001.png", "text": "a red triangle"}'
    for k, line in enumerate(read_text(path, "metadata file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise UserError(f"'{path}' line {k} is not JSON ({e.msg}); {example}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise UserError(f"'{path}' line {k} has no \"file_name\" string; {example}")
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            raise UserError(f"'{path}' line {k}: \"text\" must be a string, got {type(text).__name__}; {example}")
        found[os.path.normpath(os.path.join(folder, entry["file_name"]))] = clean(text or "")
    return found


def caption_index(captions) -> tuple[list[str], torch.Tensor]:
    """(the distinct captions, the empty one first; the index of each image's caption among them)."""
    distinct = list(dict.fromkeys(["", *captions]))
    index = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([index[c] for c in captions], dtype=torch.int64)


def caption_summary(ds) -> str:
    """One line on how many images of a captioned data set have a caption; a UserError when none has."""
    n, empty = len(ds), int((ds.labels == 0).sum())
    if empty == n:
        where = ("put a caption file beside each image (001.txt for 001.png) or a metadata.jsonl with file_name "
                 "and text" if ds.cfg.dataset == "folder" else "")
        raise UserError(f"model.text_encoder needs captions, but none of the {n} images of data.dataset="
                        f"{ds.cfg.dataset} has one{'; ' + where if where else ''}")
    rest = f"; the other {empty} have none and are trained as unconditional (the empty caption)" if empty else ""
    return f"captions: {n - empty} of {n} images, {len(ds.captions) - 1} distinct{rest}"
