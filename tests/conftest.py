import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; more threads than that only slows the small tensors in the tests down
    torch.set_num_threads(2)
