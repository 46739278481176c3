import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Parity tests compare float32 results; keep them deterministic and off any GPU.
os.environ.setdefault("SDLEARN_DEVICE", "cpu")
torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _float32_default():
    assert torch.get_default_dtype() == torch.float32
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from a second thread, and on a busy shared 2-core machine OpenMP's
    spinning threads stall each step for seconds (2 min for test_pipeline.py instead of 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
