"""Shared fixtures: one thread per test, and the tiny random checkpoints that sample.py, the edits and the
robustness tests run on (helpers.TINY_CKPT: 16x16 images, T = 20, 5 DDIM steps, sample.n = 4)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from helpers import tiny_checkpoint  # noqa: E402  (needs ROOT on the path)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors of the tests are tiny, and CI has 2 cores that other processes share: two spinning
    # OpenMP threads make them 10-40 times slower than one thread there. (Set for every test, since
    # some of the code under test changes it.)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An unconditional tiny checkpoint (read only: shared by every test of a worker)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("uncond") / "last.pt")


@pytest.fixture(scope="session")
def cond_ckpt(tmp_path_factory):
    """A tiny checkpoint conditioned on 3 classes (read only)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("cond") / "last.pt", "model.num_classes=3")
