"""experiments.explore: the one step that makes a dashboard run (capture + what the views need)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmlens.experiments.explore import AUTO_STAGES_MAX_LAYERS, explore
from vlmlens.ui.inputs import EXAMPLES_DIR


def test_a_shapes_scene_gets_every_analysis(tiny):
    img = Image.open(EXAMPLES_DIR / "shapes_00.png").convert("RGB")
    ex = explore(tiny, img, "What color is the circle?", 3, notes=["converted from RGBA", ""])
    run = ex.run
    assert {"llava_cam", "logit_lens_ids", "vision_hidden_states"} <= set(run.arrays)
    assert tiny.n_layers <= AUTO_STAGES_MAX_LAYERS and set(ex.extras) == {"compute", "stages"}
    assert len(ex.extras["stages"]["single"]) == tiny.n_layers          # a knockout window per layer
    assert ex.notes == ["converted from RGBA"] and run.meta["image_note"] == "converted from RGBA"
    assert ex.warnings == [] and "analysis_failed" not in run.meta and ex.video is None


def test_what_the_user_is_told_and_what_failed(tiny, monkeypatch):
    import vlmlens.analysis.cam as cam

    def broken(*a, **k):
        raise RuntimeError("no backward here")

    monkeypatch.setattr(cam, "attach_cam", broken)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ex = explore(tiny, noise, "What color is the zebra?", 2, stages=False)
    assert any("does not look like the shapes world" in w for w in ex.warnings)
    assert any("does not know: zebra" in w for w in ex.warnings)
    assert ex.run.meta["analysis_failed"] == {"llava_cam": "RuntimeError: no backward here"}
    assert "llava_cam" not in ex.run.arrays and "logit_lens_ids" in ex.run.arrays      # the rest still ran
    assert set(ex.extras) == {"compute"}                                                 # stages=False


@pytest.mark.parametrize("family", ["mllama"])
def test_stages_undefined_are_said_not_failed(family):
    from tests._models import random_lm

    lm = random_lm(family)
    ex = explore(lm, Image.new("RGB", (64, 48), (200, 30, 30)), "What is in the image?", 1, stages=True)
    assert "undefined" in ex.extras["stages"] and "stages" not in ex.run.meta.get("analysis_failed", {})
