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


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after it.  Small ops (SGD steps,
    simulate, the recurrent Monte Carlo's thin SVDs) with two OpenMP threads on a busy
    2-core machine spin and run up to 100x slower; one thread also makes results
    bit-reproducible.  Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
