import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors of the tests are tiny, and CI has 2 cores that other processes share: two spinning
    # OpenMP threads make them 10-40 times slower than one thread there. (Set for every test, since
    # some of the code under test changes it.)
    torch.set_num_threads(1)
