"""A cross-attention VLM (Mllama, #26): the image never enters the self-attention stream; its gated
cross-attention layers read the vision tower's patches as keys. What the lens does there, each with a
known answer (the exactness against eager references is in test_capture and test_family_matrix):

* the cross-attention maps are laid out over the image's tiles as the processor cut them;
* Truncate(k) (mode drop) skips the cross-attention layers >= k; k = 0 is the model's own path without
  an image; sweeps and comparisons run on it;
* what acts on image rows of the stream is refused with the reason (remove, Freeze, Substitute, FastV,
  a Knockout whose layers hold no cross-attention, CAM), never faked.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vlmlens as vl
from vlmlens.errors import InputError
from vlmlens.figures.attention import cross_attention_grid, fig_cross_attention
from vlmlens.interventions import FastV, Knockout, Truncate

from tests._models import random_lm

PROMPT = "What is in the image?"


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, grid", [((64, 48), [1, 2]), ((40, 80), [2, 1]), ((32, 32), [1, 1])])
def test_the_maps_are_laid_out_over_the_tiles(size, grid):
    lm = random_lm("mllama")
    run = vl.capture(lm, _image(*size), PROMPT, max_new_tokens=1)
    lay = run.meta["cross_attention"]
    assert lay["tile_grid"] == grid and lay["tile_side"] == 4 and lay["keys_per_tile"] == 17
    maps = run.arrays["cross_attention_maps"]
    for layer in run.meta["cross_attention_layers"]:
        g, cls = cross_attention_grid(run, layer)
        rows, cols = grid
        assert g.shape == (4 * rows, 4 * cols)
        for t in range(rows * cols):              # tile t, patch (i, j): key t * 17 + 1 + 4 i + j
            r, c = divmod(t, cols)
            for i, j in ((0, 0), (1, 2), (3, 3)):
                assert g[4 * r + i, 4 * c + j] == pytest.approx(float(maps[layer, 0, t * 17 + 1 + 4 * i + j]))
        assert cls == pytest.approx(float(sum(maps[layer, 0, t * 17] for t in range(rows * cols))))
        # the tiles the image does not use are masked by the model: no attention lands there
        assert g.sum() + cls == pytest.approx(1.0, abs=1e-5)
    fig = fig_cross_attention(run)
    assert [t.type for t in fig.data] == ["heatmap"] * len(run.meta["cross_attention_layers"])


def test_truncation_skips_the_cross_attention_layers_and_sweeps_run():
    from vlmlens.experiments.compare import sweep

    lm = random_lm("mllama")
    img = _image(64, 48)
    base = vl.capture(lm, img, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    cut = vl.capture(lm, img, PROMPT, max_new_tokens=3, hidden_dtype="float32", interventions=[Truncate(2)])
    # layers 0..2 read what they read in the baseline (the first cross layer, 1, still runs); layer 3 (cross) is
    # skipped: its output is its input
    hb, hc = base.hidden_states, cut.hidden_states
    n = base.spans.n_prompt
    assert np.abs(hb[:3, :n] - hc[:3, :n]).max() <= 1e-5
    assert np.abs(hc[4, :n] - hc[3, :n]).max() <= 1e-6 and np.abs(hb[4, :n] - hb[3, :n]).max() > 1e-3
    res = sweep(lm, img, PROMPT, max_new_tokens=2, store="none", record_attention=False)
    assert [d["depth"] for d in res.to_json()["depths"]] == list(range(lm.n_layers + 1))
    with pytest.raises(InputError, match="mode 'remove'"):
        sweep(lm, img, PROMPT, mode="remove", max_new_tokens=2, store="none", record_attention=False)


def test_what_has_no_meaning_is_refused_with_the_reason():
    lm = random_lm("mllama")
    img = _image(64, 48)
    with pytest.raises(InputError, match=r"layers \[0, 2\] hold no cross-attention"):
        vl.capture(lm, img, PROMPT, max_new_tokens=1, interventions=[Knockout("last", "image", [0, 2])])
    with pytest.raises(InputError, match="acts on image tokens in the sequence"):
        vl.capture(lm, img, PROMPT, max_new_tokens=1, interventions=[FastV(1, 0.5)])
    with pytest.raises(InputError, match="the input has no video"):
        vl.capture(lm, img, PROMPT, max_new_tokens=1, interventions=[Truncate(1, frames=[0])])
    run = vl.capture(lm, img, PROMPT, max_new_tokens=1)
    from vlmlens.analysis.cam import llava_cam

    with pytest.raises(InputError, match="reads the image by cross-attention"):
        llava_cam(lm, run)
    # a knockout at a cross-attention layer is one: the last row skips it, the others do not
    ko = vl.capture(lm, img, PROMPT, max_new_tokens=0, hidden_dtype="float32",
                    interventions=[Knockout("last", "image", [1])])
    base = vl.capture(lm, img, PROMPT, max_new_tokens=0, hidden_dtype="float32")
    h, b = ko.hidden_states, base.hidden_states
    assert np.abs(h[2, -1] - h[1, -1]).max() <= 1e-6 and np.abs(b[2, -1] - b[1, -1]).max() > 1e-3
    assert np.abs(h[2, :-1] - b[2, :-1]).max() <= 1e-5


def test_the_attention_tab_draws_the_cross_attention(tmp_path):
    from vlmlens.ui import run_views
    from vlmlens.ui.callbacks import Dashboard, new_session

    lm = random_lm("mllama")
    dash = Dashboard(model="random:mllama", runs_dir=tmp_path, loader=lambda *a, **k: lm)
    dash.holder.wait(30)
    sess = dash.capture(_image(64, 48), PROMPT, 1, new_session())[0]
    entry = dash.entry(sess)
    flow, heads, _ = run_views.attention_figures(entry)
    assert [t.type for t in flow.data] == ["heatmap", "heatmap"]
    said = " ".join(a.text or "" for a in heads.layout.annotations)
    assert "only by cross-attention" in said
    vl.save_run(entry.run, tmp_path / "r")
    back = vl.load_run(tmp_path / "r")
    assert back.meta["cross_attention"] == entry.run.meta["cross_attention"]
    assert np.array_equal(back.arrays["cross_attention_maps"], entry.run.arrays["cross_attention_maps"], equal_nan=True)
