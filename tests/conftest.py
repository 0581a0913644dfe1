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


@pytest.fixture(scope="session")
def tiny():
    """The tiny-shapes checkpoint, loaded once for every test that only reads it (a test that trains or
    merges adapters loads its own copy)."""
    import vlmlens as vl

    return vl.load_model("tiny-shapes", device="cpu", dtype="float32")


@pytest.fixture(scope="session", autouse=True)
def _support_matrix_results():
    """With VLMLENS_MATRIX_OUT set (scripts/support_matrix.py), the cells the family tests recorded."""
    yield
    import json
    import os

    from tests._models import MATRIX_RESULTS

    path = os.environ.get("VLMLENS_MATRIX_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(MATRIX_RESULTS, f, indent=1, sort_keys=True)
