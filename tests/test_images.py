"""Reading image files: every mode Pillow opens decodes to the values a viewer shows (checked pixel by pixel
against values worked out by hand), a folder scan counts each image once whatever links it holds, and pictures
show small images enlarged by nearest neighbour."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import DataConfig
from dataset import build_dataset
from ddpm.images import list_images, make_grid, open_image

WHITE = 255


def over_white(c, a):
    """A colour c with alpha a (0..255) composited over white, as 8-bit: c a/255 + 255 (1 - a/255)."""
    return round(c * a / 255 + WHITE * (1 - a / 255))


def luma(r, g, b):
    """ITU-R 601 luma, the grey of an RGB colour (Pillow's L conversion): (299 R + 587 G + 114 B) / 1000."""
    return round((299 * r + 587 * g + 114 * b) / 1000)


def sixteen_bit():
    # 0, 10 * 257, 65535 and 32896 are 0, 10, 255 and 128 in 8 bits (x / 257)
    return Image.fromarray(np.array([[0, 2570], [65535, 32896]], dtype=np.uint16)), [[0, 10], [255, 128]]


def palette():
    img = Image.new("P", (2, 1))
    img.putpalette([200, 10, 30, 5, 250, 60] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    return img, [[[200, 10, 30], [5, 250, 60]]]


def palette_with_transparency():
    img, _ = palette()
    img.info["transparency"] = 1  # index 1 is transparent: white over the white background
    return img, [[[200, 10, 30], [WHITE] * 3]]


def rgba():
    a = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    expected = [[[10, 20, 30], [WHITE] * 3, [over_white(200, 128), over_white(100, 128), over_white(50, 128)]]]
    return Image.fromarray(a, "RGBA"), expected


def gray_alpha():
    a = np.array([[[40, 255], [40, 64]]], dtype=np.uint8)
    return Image.fromarray(a, "LA"), [[[40] * 3, [over_white(40, 64)] * 3]]


def cmyk():
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))    # full cyan: no red
    img.putpixel((1, 0), (0, 0, 0, 255))    # full black
    return img, [[[0, 255, 255], [0, 0, 0]]]


def float32():
    return Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.2]], dtype=np.float32), "F"), [[0, 128], [255, 51]]


def int32():
    return Image.fromarray(np.array([[0, 65535], [257, 70000]], dtype=np.int32), "I"), [[0, 255], [1, 255]]


def one_bit():
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    return img, [[0, 255]]


@pytest.mark.parametrize("make, suffix", [
    (sixteen_bit, ".png"), (palette, ".png"), (palette_with_transparency, ".png"), (rgba, ".png"),
    (gray_alpha, ".png"), (cmyk, ".jpg"), (float32, ".tiff"), (int32, ".tiff"), (one_bit, ".png"),
])
def test_every_mode_decodes_to_its_values(tmp_path, make, suffix):
    img, expected = make()
    path = str(tmp_path / f"x{suffix}")
    if suffix == ".jpg":  # lossy: the file's own pixels are the reference, read back as CMYK
        img.save(path, quality=100)
        stored = np.asarray(Image.open(path), dtype=np.int64)
        expected = [[[255 - min(255, c + k), 255 - min(255, m + k), 255 - min(255, y + k)]
                     for c, m, y, k in row] for row in stored]
    else:
        img.save(path)
    rgb = np.asarray(open_image(path, 3), dtype=np.int64)
    expected = np.asarray(expected)
    if expected.ndim == 2:  # one channel: repeated to RGB
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert np.abs(rgb - expected).max() <= (1 if suffix == ".jpg" else 0), (rgb, expected)
    gray = np.asarray(open_image(path, 1), dtype=np.int64)
    expected_gray = [[luma(*px) for px in row] for row in expected]
    assert np.abs(gray - np.asarray(expected_gray)).max() <= 1, (gray, expected_gray)


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 means 'rotate 90 degrees clockwise to view': a 3 x 2 image with a red top-left pixel is
    seen as 2 x 3 with that pixel at the top right."""
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    seen = np.asarray(open_image(str(tmp_path / "r.png"), 3))
    assert seen.shape == (3, 2, 3)
    assert tuple(seen[0, 1]) == (255, 0, 0) and seen.sum() == 255


def test_a_sixteen_bit_folder_trains_on_the_right_values(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(root / "a.png")
    ds = build_dataset(DataConfig(dataset="folder", root=str(root), image_size=4, channels=1))
    assert torch.equal(ds.get_uint8(0), torch.full((1, 4, 4), 128, dtype=torch.uint8))


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_folder_scan_terminates_and_counts_each_image_once(tmp_path):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for name in ("cats/a.png", "cats/b.png", "dogs/c.png"):
        Image.new("RGB", (4, 4)).save(root / name)
    os.symlink(root, root / "cats" / "loop")             # a link to a parent: would loop forever
    os.symlink(root / "dogs", root / "more-dogs")          # the same folder twice
    os.symlink(root / "cats" / "a.png", root / "dogs" / "a-again.png")  # the same file twice
    os.link(root / "cats" / "b.png", root / "dogs" / "b-hard.png")       # a hard link
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "d.png")
    os.symlink(outside, root / "linked")                   # a linked folder outside the root is followed
    files = list_images(str(root))
    assert [os.path.relpath(f, root) for f in files] == ["cats/a.png", "cats/b.png", "dogs/c.png", "linked/d.png"]


@pytest.mark.parametrize("size, tile", [(8, 64), (16, 64), (28, 84), (32, 64), (48, 96), (64, 64), (100, 100)])
def test_pictures_enlarge_small_images_to_tiles_of_64_pixels_or_more(size, tile):
    """The README's rule: each image of a grid is enlarged by the least integer factor that makes it at least 64
    pixels (8 -> 64, 28 -> 84, 48 -> 96, 100 stays), each pixel a block of that factor squared, with 2 white
    pixels around each tile."""
    images = torch.from_numpy(np.random.default_rng(size).integers(0, 255, (3, 3, size, size), dtype=np.uint8))
    grid = make_grid(images, nrow=2)  # (H, W, C)
    assert grid.shape == (2 + 2 * (tile + 2), 2 + 2 * (tile + 2), 3)
    k = tile // size
    for i in range(3):
        top, left = 2 + (i // 2) * (tile + 2), 2 + (i % 2) * (tile + 2)
        expected = images[i].permute(1, 2, 0).numpy().repeat(k, axis=0).repeat(k, axis=1)
        assert np.array_equal(grid[top:top + tile, left:left + tile], expected)
    assert (grid[:2] == 255).all() and (grid[2 + tile + 2:, 2 + tile + 2:] == 255).all()  # padding, the empty 4th
