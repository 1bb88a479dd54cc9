import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "neural_tangents")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
