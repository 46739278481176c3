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
