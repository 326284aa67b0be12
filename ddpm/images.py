"""Image files and pictures: reading any image file as a viewer shows it, the float range the model sees,
the image files of a folder, and writing images, grids and PNGs atomically.
"""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from utils import UserError, atomic_write, replace_via

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] to float32 in [-1, 1], the range the model sees."""
    return x.float() / 127.5 - 1


def open_image(path: str, channels: int, size: int | None = None) -> Image.Image:
    """An image file as a PIL image of mode RGB (channels 3) or L (channels 1), with the values a viewer shows:
    upright by its EXIF orientation; 16- and 32-bit integer images scaled from 0..65535 (Pillow's own
    conversion would clip them at 255); float images from [0, 1]; transparent pixels (RGBA, LA, palette
    transparency) composited over white; CMYK and palettes converted to RGB. With `size`, a JPEG is decoded
    at a reduced scale that still covers size x size (much faster for photos)."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        if size:
            img.draft(mode, (size, size))
        img = ImageOps.exif_transpose(img)  # photos are often stored rotated plus an EXIF tag
        if img.mode.startswith("I") or img.mode == "F":
            img = Image.fromarray(_high_depth_to_uint8(np.asarray(img)))
        if img.mode == "P" or "A" in img.mode or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        return img.convert(mode)


def _high_depth_to_uint8(a: np.ndarray) -> np.ndarray:
    """16/32-bit integer pixels (0..65535) or float pixels (0..1) as uint8, rounded."""
    if np.issubdtype(a.dtype, np.floating):
        return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    return np.round(np.clip(a.astype(np.float64), 0, 65535) / 257).astype(np.uint8)


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """An image file as uint8 C x size x size: shorter side resized to size (bicubic, antialiased), centre crop."""
    img = ImageOps.fit(open_image(path, channels, size), (size, size), Image.Resampling.BICUBIC)  # resize, centre crop
    return torch.from_numpy(np.asarray(img).reshape(size, size, channels).copy()).permute(2, 0, 1)


def list_images(root: str) -> list[str]:
    """The image files under root, sorted, each real file once. Symbolic links are followed (class folders
    often are links), but a folder is entered only once (a link to a parent would loop forever) and a file
    reached by two paths counts once, under the first path in sorted order. Hidden files and folders
    (.ipynb_checkpoints, .git, macOS ._x.jpg) are skipped."""
    seen_dirs, found = set(), []
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, n) for n in names if not n.startswith(".")
                  and n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    seen_files, files = set(), []
    for path in sorted(found):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) not in seen_files:
            seen_files.add((st.st_dev, st.st_ino))
            files.append(path)
    return files


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B x C x H x W) to uint8 in [0, 255], on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# Pictures (grids, process pictures, GIFs, training and editing grids) enlarge small images by an integer factor,
# with nearest neighbour so that pixels stay pixels: a 16x16 sample would be a speck on a screen. The PNGs of
# a --save-dir folder stay at the model's resolution.
MIN_TILE = 64


def tile_scale(size: int, min_tile: int = MIN_TILE) -> int:
    """The least integer factor that makes an image of `size` pixels (its larger side) at least min_tile pixels in a
    picture: 4 for 16 pixels, 2 for 32, 3 for 28, 1 from 64 on."""
    return max(1, math.ceil(min_tile / size))


def enlarge(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(..., H, W) -> (..., scale H, scale W), each pixel repeated as a scale x scale block (nearest neighbour)."""
    return images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255,
              scale: int | None = None):
    """uint8 images B x C x H x W as one uint8 H' x W' x C array, nrow = ceil(sqrt(B)) by default, each image
    enlarged `scale` times (default tile_scale: tiles of at least MIN_TILE pixels), `padding` pixels apart."""
    images = enlarge(images, scale or tile_scale(max(images.shape[-2:])))  # (B, C, H, W)
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding),
                      pad_value, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def to_pil(array):
    """An H x W x C uint8 array (C = 1 or 3) as a PIL image (mode L or RGB)."""
    from PIL import Image
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def image_format(path: str, formats: dict = IMAGE_FORMATS) -> str:
    """The file format that `path`'s extension names; an extension we do not write is a one-line UserError."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise UserError(f"cannot write '{path}': give a file name ending in {', '.join(formats)}")
    return formats[ext]


def save_image(array, path: str) -> None:
    """Save an H x W x C uint8 array (C = 1 or 3) atomically, in the format its extension names (JPEG at quality
    95; PNG where lossless matters)."""
    img, fmt = to_pil(array), image_format(path)
    atomic_write(path, lambda f: img.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """Save images in [-1, 1] as one grid picture (make_grid: enlarged to tiles of at least MIN_TILE pixels)."""
    save_image(make_grid(to_uint8(x), nrow=nrow), path)


def save_png(image: torch.Tensor, path: str) -> None:
    """Save one uint8 C x H x W image. It is written under a temporary name and renamed, so a killed run
    never leaves a truncated PNG that the next run would count as done. (No fsync, unlike
    utils.atomic_write: that would cost more than the sampling for tens of thousands of small files.)"""
    replace_via(path, path + ".tmp", lambda tmp: to_pil(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
