"""The dashboard opens a capture of every family: the capture button's path on the family's tiny
random model, then every figure the dashboard draws of a run, LLaVA-CAM included (a backward pass
through the family's model). One column of docs/support.md."""
from __future__ import annotations

import plotly.graph_objects as go
import pytest

from vlmlens.models.tiny_random import FAMILIES

from tests._models import random_lm

PROMPT = "What is in the image?"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_dashboard_opens_a_capture_of_every_family(family, image, tmp_path):
    from vlmlens.ui import run_views
    from vlmlens.ui.callbacks import Dashboard, new_session

    lm = random_lm(family)
    dash = Dashboard(model=f"random:{family}", runs_dir=tmp_path, loader=lambda *a, **k: lm)
    dash.holder.wait(30)
    sess, info, gen, _strip, headline = dash.capture(image, PROMPT, 2, new_session())
    entry = dash.entry(sess)
    run = entry.run
    assert run.meta["family"] == family and info["n_image_tokens"] == run.spans.n_image > 0
    assert gen and headline
    cross = run.meta.get("cross_attention_layers")
    if cross:       # Mllama: every statistic read off image rows of the stream is not defined, and said so
        assert headline.count("not defined for this model") == 3 and "cross-attention" in headline
    elif "attention_layers" in run.meta:     # a hybrid stack: what knockouts and attention cannot define, said so
        assert headline.count("not defined for this model") == 2
    figs = [f for f in dash._all_figures(entry) if isinstance(f, go.Figure)]    # (a text view is a str)
    assert len(figs) >= 8
    assert all(len(f.data) or f.layout.annotations for f in figs)          # a plot, or a reason
    cam = run_views.heatmap_layer(entry, 0, 0, "LLaVA-CAM", lm)
    grid = [t for t in cam.data if t.type == "heatmap"]
    why = " ".join(a.text or "" for a in cam.layout.annotations)
    assert grid or "LLaVA-CAM is zero" in why or (cross and "reads the image by cross-attention" in why), why
    if grid:
        z = grid[0].z
        assert (len(z), len(z[0])) == tuple(run.image_grid)
    for layer in range(run.n_layers):        # a hybrid's linear layers: "not defined", never an empty map
        fig = run_views.heatmap_layer(entry, layer, 0, "attention", lm)
        said = " ".join(a.text or "" for a in fig.layout.annotations)
        defined = layer in run.meta.get("attention_layers", range(run.n_layers)) and not cross
        assert ("no softmax attention" in said or (cross and "only by cross-attention" in said)) != defined and bool([t for t in fig.data if t.type == "heatmap"]) == defined
