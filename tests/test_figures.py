import pytest
import torch
from PIL import Image

from sdlearn import figures
from sdlearn.sources import TINY_PATH


@pytest.mark.skipif(not TINY_PATH.exists(), reason="the tiny model is not in this checkout")
def test_make_figures_writes_every_png_and_leaves_autograd_alone(tmp_path):
    assert figures.main([str(tmp_path)]) == 0
    for name in ("schedules", "tiny_samples", "attention", "filmstrip"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.width > 300 and im.height > 100
    assert torch.is_grad_enabled()
