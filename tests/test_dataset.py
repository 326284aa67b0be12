"""dataset.py: the built-in and folder data sets, the decode cache, the resumable batch stream and the CLI."""
import glob
import io
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import utils
from config import DataConfig
from dataset import ImageDataset, build_dataset, num_classes, preload_wanted
from ddpm.batches import Batches
from ddpm.image_cache import load_uint8
from ddpm.shapes import make_shapes
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def shapes_cfg(**kw):
    return DataConfig(**{"dataset": "shapes", "num_images": 60, "image_size": 16, **kw})


def folder_cfg(root, **kw):
    return DataConfig(**{"dataset": "folder", "root": str(root), "image_size": 8, **kw})


def save(path, color=RED, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def expected_float(images_uint8):
    """[0, 255] -> [-1, 1], written independently of dataset.to_float."""
    return (images_uint8.double() / 255 * 2 - 1).float()


# ----------------------------------------------------------------------------- shapes

def test_shapes_deterministic_for_a_seed_and_different_for_another():
    a, _ = load_uint8(build_dataset(shapes_cfg(seed=1)), shapes_cfg(seed=1))
    b, _ = load_uint8(build_dataset(shapes_cfg(seed=1)), shapes_cfg(seed=1))
    c, _ = load_uint8(build_dataset(shapes_cfg(seed=2)), shapes_cfg(seed=2))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.3


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 3), (48, 1)])
def test_shapes_items_have_the_right_shape_and_range(size, channels):
    ds = build_dataset(shapes_cfg(image_size=size, channels=channels))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert len(ds) == 60 and xs.dtype == torch.float32 and xs.shape == (60, channels, size, size)
    assert xs.min() >= -1 and xs.max() <= 1
    assert xs.min() < -0.5 and xs.max() > 0.5  # a dark background and a bright shape are both there
    u = ds.get_uint8(7)
    assert u.dtype == torch.uint8 and u.shape == (channels, size, size)
    assert torch.allclose(ds[7][0], expected_float(u), atol=1e-6)


def test_shapes_labels_cover_all_classes():
    ds = build_dataset(shapes_cfg(num_images=300))
    labels = [ds[i][1] for i in range(len(ds))]
    assert ds.classes == ["circle", "square", "triangle"] and num_classes(ds) == 3
    assert set(labels) == {0, 1, 2}
    assert all(isinstance(y, int) for y in labels)


def test_shapes_look_like_their_label():
    """The fill ratio of the shape's bounding box tells the shapes apart: circle pi/4, square 1, triangle 1/2."""
    images, labels = make_shapes(300, 32, 3, seed=5)
    expected_fill = torch.tensor([np.pi / 4, 1.0, 0.5])
    right, areas = 0, []
    for x, y in zip(images, labels):
        diff = (x.float() - x[:, :1, :1].float()).abs().sum(0)  # the corner pixel is background
        mask = diff > diff.max() / 2
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fill = mask.sum() / box
        right += int((expected_fill - fill).abs().argmin() == y)
        areas.append(mask.float().mean())
    assert right >= 0.95 * len(labels)
    assert 0.2 < torch.stack(areas).mean() < 0.6


def test_shapes_grayscale_has_one_channel_with_contrast():
    images, _ = make_shapes(50, 16, 1, seed=0)
    assert images.shape == (50, 1, 16, 16)
    contrast = images.flatten(1).max(1).values.float() - images.flatten(1).min(1).values.float()
    assert contrast.min() > 80


# ----------------------------------------------------------------------------- folders

def test_folder_recursive_with_classes(tmp_path):
    save(tmp_path / "cats" / "a.png", RED)
    save(tmp_path / "cats" / "sub" / "deep" / "b.JPG", RED)
    save(tmp_path / "dogs" / "c.webp", BLUE)
    save(tmp_path / "dogs" / "d.bmp", BLUE)
    save(tmp_path / "dogs" / "e.jpeg", BLUE)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    ds = build_dataset(folder_cfg(tmp_path))
    assert len(ds) == 5 and ds.classes == ["cats", "dogs"] and num_classes(ds) == 2
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8)
        is_red = bool((x[0] > 0.5).all() and (x[2] < -0.5).all())
        assert y == (0 if is_red else 1)


@pytest.mark.parametrize("layout", [["a.png", "b.png"], ["only/a.png", "only/b.png"], ["a.png", "x/b.png", "y/c.png"]])
def test_folder_unlabelled_unless_all_images_in_two_or_more_subfolders(tmp_path, layout):
    for name in layout:
        save(tmp_path / name)
    ds = build_dataset(folder_cfg(tmp_path))
    assert len(ds) == len(layout) and ds.classes == []
    assert all(ds[i][1] == -1 for i in range(len(ds)))
    with pytest.raises(UserError, match="no labels"):
        num_classes(ds)


def test_folder_rgb_and_grayscale(tmp_path):
    save(tmp_path / "red.png", RED)
    rgb = build_dataset(folder_cfg(tmp_path, channels=3)).get_uint8(0)
    gray = build_dataset(folder_cfg(tmp_path, channels=1)).get_uint8(0)
    assert rgb.shape == (3, 8, 8) and gray.shape == (1, 8, 8)
    assert (rgb[0] == 255).all() and (rgb[1:] == 0).all()
    assert (gray == 76).all()  # luma of pure red: 0.299 * 255


def test_folder_resizes_shorter_side_and_crops_the_centre(tmp_path):
    image = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high: left and right quarters green
    image[:, :10], image[:, 10:30], image[:, 30:] = GREEN, RED, GREEN
    Image.fromarray(image).save(tmp_path / "wide.png")
    for size in (8, 16):
        x = build_dataset(folder_cfg(tmp_path, image_size=size)).get_uint8(0)
        assert x.shape == (3, size, size)
        assert (x[0] > 200).all() and (x[1] < 40).all()  # only the red centre is left


def test_folder_corrupt_files_are_skipped_with_a_warning(tmp_path):
    save(tmp_path / "a.png", RED)
    (tmp_path / "b.png").write_bytes(b"this is not an image")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "c.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # truncated
    save(tmp_path / "d.png", BLUE)
    ds = build_dataset(folder_cfg(tmp_path))
    assert len(ds) == 4
    with pytest.warns(UserWarning) as record:
        x = ds.get_uint8(1)
    assert (x[2] == 255).all()  # b.png and c.jpg are skipped for the next readable image, d.png
    with pytest.warns(UserWarning) as record_all:
        images, _ = load_uint8(ds, folder_cfg(tmp_path))
    for warned in (record, record_all):
        named = " ".join(str(w.message) for w in warned)
        assert "b.png" in named and "c.jpg" in named and "a.png" not in named and "d.png" not in named
    assert {tuple(im[:, 0, 0].tolist()) for im in images} == {RED, BLUE}


def test_folder_missing_or_empty_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        build_dataset(folder_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images.*empty"):
        build_dataset(folder_cfg(tmp_path / "empty"))


def test_folder_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch, capsys):
    for name, colour in [("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)]:
        save(tmp_path / name, colour)
    cfg = folder_cfg(tmp_path)
    first, labels = load_uint8(build_dataset(cfg), cfg)
    assert "cached" in capsys.readouterr().out
    assert len(glob.glob(str(tmp_path / ".ddpm-cache-*.npz"))) == 1

    decoded = []
    real_decode = dataset.decode_image
    monkeypatch.setattr(dataset, "decode_image", lambda *a: decoded.append(a) or real_decode(*a))
    again, again_labels = load_uint8(build_dataset(cfg), cfg)
    assert decoded == [] and "reusing" in capsys.readouterr().out
    assert torch.equal(first, again) and torch.equal(labels, again_labels)

    save(tmp_path / "a.png", GREEN)
    mtime = os.stat(tmp_path / "a.png").st_mtime_ns + 10 ** 9
    os.utime(tmp_path / "a.png", ns=(mtime, mtime))
    changed, _ = load_uint8(build_dataset(cfg), cfg)
    assert len(decoded) == 3 and "cached" in capsys.readouterr().out
    assert tuple(changed[0, :, 0, 0].tolist()) == GREEN
    assert len(glob.glob(str(tmp_path / ".ddpm-cache-*.npz"))) == 1  # the stale cache is gone


def test_folder_cache_skipped_when_the_folder_is_read_only(tmp_path, monkeypatch, capsys):
    save(tmp_path / "a.png", RED)

    def refuse(*args, **kwargs):  # what the OS says in a folder without write permission
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(utils.tempfile, "mkstemp", refuse)
    images, _ = load_uint8(build_dataset(folder_cfg(tmp_path)), folder_cfg(tmp_path))
    assert images.shape == (1, 3, 8, 8) and "not caching" in capsys.readouterr().out
    assert glob.glob(str(tmp_path / ".ddpm-cache-*")) == []


# ----------------------------------------------------------------------------- torchvision sets (no network)

def test_cifar10_offline_without_files_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "data")))
    message = str(e.value)
    assert "\n" not in message and "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "data") in message and "data.dataset=folder" in message


class FakeTorchvisionSet:
    """Stands in for a torchvision set: records its arguments, holds .data / .targets / .classes."""
    calls = []

    def __init__(self, root, train, download):
        self.calls.append((root, train, download))


def test_cifar10_uses_the_arrays_converts_and_resizes(monkeypatch):
    class FakeCIFAR(FakeTorchvisionSet):
        data = np.tile(np.array(RED, dtype=np.uint8), (4, 32, 32, 1))  # N x 32 x 32 x 3, all red
        targets = [3, 1, 4, 1]
        classes = [f"c{i}" for i in range(10)]
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR)
    rgb = build_dataset(DataConfig(dataset="cifar10", root="somewhere"))
    assert FakeCIFAR.calls[-1] == ("somewhere", True, True)
    assert len(rgb) == 4 and rgb.classes == FakeCIFAR.classes and [rgb[i][1] for i in range(4)] == [3, 1, 4, 1]
    assert rgb.get_uint8(0).shape == (3, 32, 32) and (rgb.get_uint8(0)[0] == 255).all()
    gray = build_dataset(DataConfig(dataset="cifar10", image_size=16, channels=1))
    assert gray.get_uint8(2).shape == (1, 16, 16) and (gray.get_uint8(2) == 76).all()


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_sets_to_rgb_and_32_pixels(monkeypatch, name, cls):
    class FakeMNIST(FakeTorchvisionSet):
        data = torch.zeros(3, 28, 28, dtype=torch.uint8)
        data[:, 4:24, 4:24] = 200
        targets = torch.tensor([7, 0, 2])
        classes = [str(i) for i in range(10)]
    monkeypatch.setattr(f"torchvision.datasets.{cls}", FakeMNIST)
    ds = build_dataset(DataConfig(dataset=name, image_size=32, channels=3))
    x = ds.get_uint8(0)
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x[0, 16, 16] == 200 and x[0, 0, 0] == 0
    assert [ds[i][1] for i in range(3)] == [7, 0, 2] and num_classes(ds) == 10


# ----------------------------------------------------------------------------- Batches

def indexed_dataset(n=50, size=6, channels=3):
    """n random (so distinct and left-right asymmetric) images whose label is their index."""
    images = torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    cfg = DataConfig(dataset="shapes", image_size=size, channels=channels)
    return ImageDataset(cfg, torch.arange(n), [str(i) for i in range(n)], images=images)


def stream(ds, batch_size=8, preload=True, **kw):
    return Batches(ds, batch_size, **{"seed": 3, "device": "cpu", "hflip": True, "preload": preload, **kw})


def take(batches, k):
    return [next(batches) for _ in range(k)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_follow_a_new_permutation_each_epoch():
    ds = indexed_dataset()  # 50 images, batches of 8: 6 per epoch, 2 images dropped
    batches = stream(ds)
    epochs = [torch.cat([y for _, y in take(batches, 6)]) for _ in range(3)]
    for order in epochs:
        assert order.dtype == torch.int64 and len(set(order.tolist())) == 48
    assert not torch.equal(epochs[0], epochs[1])
    assert batches.state_dict() == {"epoch": 3, "batch": 0} and batches.epoch == 3


@pytest.mark.parametrize("preload", [True, False])
def test_batches_resume_exactly(preload):
    ds = indexed_dataset()
    full = take(stream(ds, preload=preload), 20)
    for k, state in [(3, {"epoch": 0, "batch": 3}), (6, {"epoch": 1, "batch": 0}), (13, {"epoch": 2, "batch": 1})]:
        first = stream(ds, preload=preload)
        take(first, k)
        assert first.state_dict() == state
        resumed = stream(ds, preload=preload)
        resumed.load_state_dict(state)
        assert_same(take(resumed, 20 - k), full[k:])
    rewound = stream(ds, preload=preload)  # a running (prefetching) stream moved back
    take(rewound, 10)
    rewound.load_state_dict({"epoch": 0, "batch": 4})
    assert_same(take(rewound, 5), full[4:9])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_preload_and_dataloader_give_the_same_batches(num_workers):
    ds = indexed_dataset()
    assert_same(take(stream(ds, preload=False, num_workers=num_workers), 14), take(stream(ds, preload=True), 14))


def test_folder_preload_and_lazy_decoding_agree(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lazy = take(stream(build_dataset(folder_cfg(tmp_path)), 4, preload=False), 7)
    preloaded = take(stream(build_dataset(folder_cfg(tmp_path)), 4, preload=True), 7)
    assert_same(lazy, preloaded)
    assert lazy[0][0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("preload", [True, False])
def test_rank_slices_make_up_the_global_batch(preload):
    ds = indexed_dataset()
    whole = take(stream(ds, preload=preload), 10)
    ranks = [take(stream(ds, preload=preload, rank=r, world_size=2), 10) for r in range(2)]
    for k, (x, y) in enumerate(whole):
        assert ranks[0][k][0].shape == (4, 3, 6, 6)
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), x)
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), y)


@pytest.mark.parametrize("hflip", [True, False])
def test_flips_mirror_about_half_of_the_images(hflip):
    ds = indexed_dataset(n=200)
    flipped = []
    for x, y in take(stream(ds, batch_size=50, hflip=hflip), 40):
        original = expected_float(ds.images[y])
        assert x.min() >= -1 and x.max() <= 1
        same = (x - original).abs().amax((1, 2, 3)) < 1e-6
        mirrored = (x - original.flip(-1)).abs().amax((1, 2, 3)) < 1e-6
        assert torch.equal(same, ~mirrored)  # each image is exactly one of the two
        flipped += mirrored.tolist()
    rate, n = np.mean(flipped), len(flipped)
    if hflip:
        assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / n)
    else:
        assert rate == 0


def test_batches_reject_bad_sizes():
    ds = indexed_dataset(n=50)
    with pytest.raises(UserError, match="50 images.*batch_size=64"):
        stream(ds, batch_size=64)


def test_preload_wanted():
    ds = indexed_dataset(n=50, size=6)  # 50 * 3 * 6 * 6 = 5400 bytes
    assert preload_wanted(DataConfig(preload=True, preload_max_gib=0.0), ds) is True
    assert preload_wanted(DataConfig(preload=False), ds) is False
    assert preload_wanted(DataConfig(preload="auto", preload_max_gib=5401 / 2 ** 30), ds) is True
    assert preload_wanted(DataConfig(preload="auto", preload_max_gib=5400 / 2 ** 30), ds) is False


# ----------------------------------------------------------------------------- python dataset.py

def run_cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dataset.py"),
                           "--config", os.path.join(ROOT, "configs", "cifar10.yaml"), *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_writes_a_preview(tmp_path):
    result = run_cli(tmp_path, "data.dataset=shapes", "data.num_images=100")
    assert result.returncode == 0, result.stderr
    assert "100 images" in result.stdout and "circle" in result.stdout
    with Image.open(tmp_path / "results" / "data_preview.png") as preview:
        assert preview.size == (8 * 66 + 2, 8 * 66 + 2)  # 8 x 8 images of 32 pixels shown 2x, 2 pixels apart


def test_cli_reports_a_missing_folder_in_one_line(tmp_path):
    result = run_cli(tmp_path, "data.dataset=folder", "data.root=/nonexistent")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "/nonexistent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
