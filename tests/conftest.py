"""Shared fixtures (model builders and reference helpers live in tests/_models.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
