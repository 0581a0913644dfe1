"""Attention / heatmap / logit-lens figures build from a real capture and carry the run's numbers."""

import numpy as np
import plotly.graph_objects as go
import pytest

import vlmlens as vl
from vlmlens.analysis.attention import attention_cliff, attention_share, stage_bands, three_stages
from vlmlens.analysis.cam import attach_cam, attention_map, llava_cam
from vlmlens.analysis.logit_lens import attach_logit_lens, lens_from_run, patch_lens_from_run
from vlmlens.figures.attention import fig_attention_flow, fig_attention_heads
from vlmlens.figures.heatmaps import fig_cam_grid, fig_cam_layer, fig_logit_lens, fig_patch_lens

from tests._models import random_lm

PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def runs(image):
    lm = random_lm("llava")
    run = vl.capture(lm, image, PROMPT, max_new_tokens=4)
    cut = vl.capture(lm, image, PROMPT, max_new_tokens=4, interventions=[vl.Truncate(from_layer=1)])
    bare = vl.capture(lm, image, PROMPT, max_new_tokens=4, record_contrib=False)
    attach_cam(lm, run)
    attach_logit_lens(lm, run, k=3)
    return lm, run, cut, bare


def test_attention_flow_and_heads(runs):
    lm, run, cut, bare = runs
    L = lm.n_layers
    keys = set(run.arrays)
    fig = fig_attention_flow(run, cut)
    assert isinstance(fig, go.Figure) and set(run.arrays) == keys
    lines = [t for t in fig.data if t.yaxis in (None, "y")]
    sink = [t for t in fig.data if t.name == "first token (the sink), last prompt token"]
    assert len(sink) == 1 and np.allclose(sink[0].y, np.nanmean(run.attention_first_token, axis=1))
    lines = [t for t in lines if t not in sink]
    assert [t.name for t in lines] == ["last prompt token", "text tokens", "generated tokens",
                                       "last prompt token (other)", "text tokens (other)", "generated tokens (other)"]
    assert all(len(t.x) == L for t in lines)
    assert np.allclose(lines[0].y, attention_share(run, query="last").image)
    assert np.allclose(lines[4].y, attention_share(cut, query="text").image)
    assert all(t.line.dash == "dash" for t in lines[3:])
    contrib = [t for t in fig.data if t.yaxis == "y2"]
    assert len(contrib) == 1 and len(contrib[0].y) == L
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(bands) == len(stage_bands(three_stages(run)))
    assert all(f"{b[0]} (proxy)" in [a.text for a in fig.layout.annotations] for b in stage_bands(three_stages(run)))
    cliff = attention_cliff(run)
    vlines = [s for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1]
    assert len(vlines) == (cliff is not None) and all(s.x0 == cliff for s in vlines)
    causal = fig_attention_flow(run, stages=["sink"] * (L - 1) + ["fusion"])   # knockout stages replace the proxy bands
    rects = [s for s in causal.layout.shapes if s.type == "rect"]
    assert [(r.x0, r.x1) for r in rects] == [(-0.5, L - 1.5), (L - 1.5, L - 0.5)]
    assert {"sink (knockout)", "fusion (knockout)"} <= {a.text for a in causal.layout.annotations}
    plain = fig_attention_flow(bare)   # no value contributions: no bands, no contribution line
    assert len(plain.data) == 4 and not [s for s in plain.layout.shapes if s.type == "rect"]   # 3 query spans + the sink
    heads = fig_attention_heads(run)
    assert len(heads.data) == 1 and np.asarray(heads.data[0].z).shape == (L, lm.text_config.num_attention_heads)
    assert np.allclose(heads.data[0].z, attention_share(run, per_head=True).image)
    assert "head" in heads.data[0].hovertemplate and "layer" in heads.data[0].hovertemplate


def test_cam_layer_and_grid(runs):
    lm, run, _, bare = runs
    L = lm.n_layers
    rows, cols = run.image_grid
    fig = fig_cam_layer(run, 1, "attention", query_index=2)
    assert [type(t).__name__ for t in fig.data] == ["Image", "Heatmap"]
    assert np.allclose(np.asarray(fig.data[1].z, float), attention_map(run, layer=1, query_index=2))
    assert "layer 1" in fig.data[1].hovertemplate and run.tokens[int(run.map_positions[2])].replace("▁", "␣") in fig.layout.title.text
    assert len(fig.data[1].x) == cols and len(fig.data[1].y) == rows
    assert fig.data[1].x[-1] < run.image.size[0] and fig.data[1].y[-1] < run.image.size[1]
    cam = fig_cam_layer(run, 0, kind="cam")
    assert np.allclose(np.asarray(cam.data[1].z, float), run.to_grid(run.arrays["llava_cam"][0]))
    for layer in range(L):                                      # every layer draws (its speed: BENCHMARKS.md)
        assert "layer %d" % layer in fig_cam_layer(run, layer, "attention").data[1].hovertemplate

    grid = fig_cam_grid(run, "attention", query_index=1)        # the dashboard's positional call
    assert len(grid.data) == L and all(isinstance(t, go.Heatmap) for t in grid.data)
    assert np.allclose(np.asarray(grid.data[1].z, float), attention_map(run, layer=1, query_index=1))
    for t in grid.data:                                         # per-layer scales by default: 0..that layer's max
        assert t.zmin == 0 and t.zmax == pytest.approx(float(np.nanmax(np.asarray(t.z, float))))
    shared = fig_cam_grid(run, "attention", query_index=1, per_layer=False)
    assert all(t.coloraxis == "coloraxis" for t in shared.data) and shared.layout.coloraxis.cmax > 0
    c = llava_cam(lm, bare, layers=[1])
    one = fig_cam_grid(bare, cams=c, kind="cam")
    assert len(one.data) == 1 and one.layout.annotations[0].text.startswith("L1")
    ov = fig_cam_grid(run, kind="cam", overlay=True)
    assert len(ov.data) == L and all(isinstance(t, go.Image) for t in ov.data)
    with pytest.raises(KeyError, match="attach_cam"):
        fig_cam_layer(bare, 0, kind="cam")


def test_logit_and_patch_lens_figures(runs):
    lm, run, _, bare = runs
    L1 = lm.n_layers + 1
    ll = lens_from_run(run)
    fig = fig_logit_lens(run)
    assert len(fig.data) == 1 and np.asarray(fig.data[0].z).shape == (L1, len(run.map_positions))
    assert np.allclose(fig.data[0].z, ll.probs[:, :, 0])
    assert "layer" in fig.data[0].hovertemplate and len(fig.layout.xaxis.ticktext) == len(run.map_positions)
    every = fig_patch_lens(run)
    assert len(every.data) == L1 and [t.visible for t in every.data] == [False] * (L1 - 1) + [True]
    assert len(every.layout.sliders[0].steps) == L1
    one = fig_patch_lens(run, 1)
    assert len(one.data) == 1 and np.allclose(np.asarray(one.data[0].z, float), patch_lens_from_run(run, 1).probs)
    with pytest.raises(KeyError):
        fig_logit_lens(bare)
    with pytest.raises(KeyError):
        fig_patch_lens(bare)


def test_head_maps_are_each_heads_own_map(runs):
    from vlmlens.figures.heatmaps import fig_head_maps

    lm, run, _cut, _bare = runs
    H = lm.text_config.num_attention_heads
    fig = fig_head_maps(run, 1)
    assert len(fig.data) == H
    for h, t in enumerate(fig.data):
        assert np.allclose(np.asarray(t.z, float), run.to_grid(run.attention_head_maps[1, h]), equal_nan=True)
    assert np.allclose(run.attention_head_maps.mean(1), run.attention_maps[:, 0], atol=1e-6)   # their mean is the map
    with pytest.raises(ValueError, match=r"layer must be an integer in 0\.\.1"):
        fig_head_maps(run, 99)
