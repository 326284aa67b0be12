"""The README's editing pictures and the quickstart row of its inversion table, from the quickstart checkpoint.

    python docs/editing/make_pictures.py [--ckpt checkpoints/quickstart/last.pt]

Writes docs/editing/*.png (the grids of sample.py, which show the 16x16 images enlarged 4x with nearest neighbour)
and prints the RMS error of DDIM inversion and reconstruction on 16 training images per number of steps.
Inputs are made here: training images of the shapes set, two drawn 'sketches' and a centre mask.
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import sample  # noqa: E402
from config import config_from_dict  # noqa: E402
from dataset import build_dataset  # noqa: E402
from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.images import save_image, to_uint8  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def training_images(ckpt: str, folder: str, n: int) -> None:
    data = config_from_dict(load_checkpoint(ckpt)["config"]).data
    ds = build_dataset(data)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        save_image(to_uint8(ds[i][0][None])[0].permute(1, 2, 0).numpy(), os.path.join(folder, f"{i:02d}.png"))


def sketches(folder: str) -> None:
    """Two shapes drawn roughly by hand, at 64x64 (sample.py resizes them to the model's size)."""
    os.makedirs(folder, exist_ok=True)
    im = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(im).polygon([(12, 52), (30, 10), (54, 50), (30, 46)], fill=(230, 200, 30))
    im.save(os.path.join(folder, "sketch-triangle.png"))
    im = Image.new("RGB", (64, 64), (60, 50, 70))
    ImageDraw.Draw(im).ellipse((14, 18, 50, 46), fill=(30, 60, 220))
    ImageDraw.Draw(im).rectangle((26, 26, 38, 38), fill=(230, 230, 230))  # a blot the model has never seen
    im.save(os.path.join(folder, "sketch-ellipse.png"))


def centre_mask(path: str, size: int = 16) -> None:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=255)
    mask.save(path)


def keep(src: str, name: str) -> None:
    shutil.copyfile(src, os.path.join(HERE, name))
    print(f"docs/editing/{name}")


def rms_of_inversion(ckpt: str, images: str, work: str, n: int) -> None:
    for steps in (10, 25, 50, 100):
        out = os.path.join(work, f"invert-{steps}")
        sample.main(["--ckpt", ckpt, "--init", images, "--invert", "--steps", str(steps), "--save-dir", out])
        errors = [np.sqrt((((np.asarray(Image.open(os.path.join(out, f"{i:02d}.png")), np.float64)
                             - np.asarray(Image.open(os.path.join(images, f"{i:02d}.png")), np.float64)) / 127.5)
                           ** 2).mean()) for i in range(n)]
        print(f"inversion and reconstruction, {steps} DDIM steps each way: RMS {np.mean(errors):.3f} "
              f"(mean of {n} images; max {np.max(errors):.3f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="checkpoints/quickstart/last.pt")
    ckpt = p.parse_args().ckpt
    with tempfile.TemporaryDirectory() as work:
        train, few, drawn = (os.path.join(work, d) for d in ("train", "few", "drawn"))
        training_images(ckpt, train, 16)
        training_images(ckpt, few, 3)
        sketches(drawn)
        centre_mask(os.path.join(work, "mask.png"))
        run = [("img2img", ["--init", drawn, "--strength", "0.7"]),
               ("inpaint", ["--init", few, "--mask", os.path.join(work, "mask.png")]),
               ("invert", ["--init", few, "--invert"]),
               ("seeds", ["--interpolate", "8", "--seed", "1", "--seed2", "2"]),
               ("morph", ["--interpolate", "8", "--init", os.path.join(few, "00.png"),
                          "--init2", os.path.join(few, "01.png")])]
        for name, argv in run:
            grid = os.path.join(work, f"{name}.png")
            sample.main(["--ckpt", ckpt, *argv, "--out", grid])
            keep(grid, f"{name}.png")
        rms_of_inversion(ckpt, train, work, 16)


if __name__ == "__main__":
    main()
