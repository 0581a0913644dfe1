"""The shapes-world check: every scene of the world passes, pictures from elsewhere do not."""
import numpy as np
from PIL import Image

from vlmlens.tiny.scenes import blank_image, make_scene
from vlmlens.tiny.world_check import shapes_world_check
from vlmlens.ui.inputs import load_examples


def test_every_shapes_scene_passes():
    for seed in list(range(0, 300_000, 1000)) + [e["seed"] for e in load_examples() if e.get("seed") is not None]:
        assert shapes_world_check(make_scene(seed).image) is None, seed
    assert shapes_world_check(blank_image()) is None


def test_pictures_from_elsewhere_fail():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    photo = np.stack([x / 320 * 255, y / 240 * 200 + 30, 120 + 60 * np.sin(x / 20)], -1).astype(np.uint8)
    cases = {
        "noise": Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)),
        "dark": Image.new("RGB", (64, 64), (20, 20, 30)),
        "white page": Image.new("RGB", (200, 200), (255, 255, 255)),
        "coloured": Image.new("RGB", (64, 64), (230, 190, 190)),
        "gradient photo": Image.fromarray(photo),
    }
    for name, im in cases.items():
        assert shapes_world_check(im) is not None, name
