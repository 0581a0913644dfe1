"""Cached runs of several models in one folder: each model rebuilds only its own runs, the index
keeps the others', and the dashboard opens a run of the loaded model first."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cached_runs"


@pytest.fixture(scope="module")
def lm():
    from tests._models import random_lm

    return random_lm("llava")


def _other_models_run(d: Path, name: str = "smol-single-color", model: str = "smol-shapes") -> dict:
    """A run folder standing for another model's cached run (a copy of a shipped run)."""
    shutil.copytree(SHIPPED / "single-color", d / name)
    return {"name": name, "model": model, "prompt": "p", "family": "single", "kind": "color", "truth": "red",
            "generated": "red", "image": "shapes_00.png", "bytes": 1}


def test_a_model_rebuilds_its_runs_and_keeps_the_others(lm, tmp_path):
    from vlmlens.cached import make_cached_runs

    other = _other_models_run(tmp_path)
    stale = tmp_path / "an-old-spec"
    shutil.copytree(SHIPPED / "single-count", stale)
    (tmp_path / "index.json").write_text(json.dumps({"models": ["smol-shapes"], "runs": [other]}))
    make_cached_runs(lm, tmp_path, only=["single-exist"], sweep=False, extras=False, log=lambda *_: None)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [r["name"] for r in index["runs"]] == ["single-exist", "smol-single-color"]    # spec order, both models
    assert index["models"] == sorted({lm.name, "smol-shapes"})
    assert stale.is_dir()                                   # `only`: nothing else is touched
    readme = (tmp_path / "README.md").read_text()
    assert f"--model {lm.name}" in readme and "--model smol-shapes" in readme and "| smol-single-color | smol-shapes |" in readme


def test_the_dashboard_opens_a_run_of_the_loaded_model_first(tmp_path):
    from vlmlens.ui.store import RunsDir

    for name in ("single-color", "single-count"):
        shutil.copytree(SHIPPED / name, tmp_path / name)
    runs = [{"name": "single-color", "model": "tiny-shapes"}, {"name": "single-count", "model": "smol-shapes"}]
    (tmp_path / "index.json").write_text(json.dumps({"runs": runs}))
    d = RunsDir(tmp_path)
    assert d.preferred_order() == ["single-color", "single-count"]
    assert d.preferred_order(model="smol-shapes") == ["single-count", "single-color"]
    assert d.preferred_order(model="tiny-shapes") == ["single-color", "single-count"]


def test_photo_specs_resolve_to_real_photos():
    from vlmlens.cached import SMOL_SPECS, photo
    from vlmlens.errors import InputError

    photos = [s for s in SMOL_SPECS if s[1].startswith("photo:")]
    assert photos and all(s[2] == "photo" for s in photos)
    img = photo("coffee")                                   # scikit-image's bundled data: always here
    assert img.size == (600, 400) and img.mode == "RGB"
    with pytest.raises(InputError, match="not available"):
        photo("no-such-photo")


def test_the_shipped_tiny_shapes_runs_draw_the_encoder_panel():
    """#27: the Encoder and decoder panel was empty on every shipped run; tiny-shapes' runs now hold the
    vision tower's states, so the panel draws (the tower's layers, then the decoder's, on one axis)."""
    from vlmlens.models.loading import REPO_ROOT
    from vlmlens.run_files import load_run
    from vlmlens.ui import run_views
    from vlmlens.ui.store import Derived, Entry

    index = json.loads((REPO_ROOT / "cached_runs" / "index.json").read_text())["runs"]
    tiny = [r["name"] for r in index if r["model"] == "tiny-shapes"]
    assert len(tiny) >= 9
    for name in tiny:
        run = load_run(REPO_ROOT / "cached_runs" / name)
        v = run.arrays["vision_hidden_states"]
        assert v.shape[0] >= 2 and v.shape[1] >= 64                        # tower layers + 1, patches (+ CLS)
        fig = run_views.encoder_decoder_figure(Entry(name, run, name, "saved", Derived(), {}))
        assert len(fig.data) > 0, name                                       # a plot, not the "no states" message


def test_the_shipped_smol_runs_lens_reads_as_text():
    """#27: smol-shapes' logit / patch lens showed byte-level tokens ("Ġat", "Ċ"); the shipped runs hold
    the tokens as text (what attach_logit_lens stores now)."""
    from vlmlens.models.loading import REPO_ROOT

    index = json.loads((REPO_ROOT / "cached_runs" / "index.json").read_text())["runs"]
    smol = [r["name"] for r in index if r["model"] == "smol-shapes"]
    assert len(smol) >= 5
    for name in smol:
        vocab = json.loads((REPO_ROOT / "cached_runs" / name / "run.json").read_text())["meta"]["lens_vocab"]
        words = list(vocab.values())
        assert not [w for w in words if "Ġ" in w or "Ċ" in w], name
        assert any(w.startswith(" ") and w.strip().isalpha() for w in words), name      # " the", " a", ...
