import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Reference kernels computed by neural-tangents; a copy lives in the repository
# (tests/fixtures/neural_tangents, see its README), NTKCOMPILE_REFERENCE_DIR overrides it.
REFERENCE_DIR = os.environ.get("NTKCOMPILE_REFERENCE_DIR") or os.path.join(
    os.path.dirname(__file__), "fixtures", "neural_tangents")
# Where the reference tests compute (benchmarks/gpu_check.sh sets "cuda").
DEVICE = os.environ.get("NTKCOMPILE_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
