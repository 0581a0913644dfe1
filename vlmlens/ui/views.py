"""Figures of the Heatmaps, Dynamics and Attention tabs for one Entry (no gradio here).

Heatmaps read the attention maps / CAM stored with the run, so moving the layer slider
redraws from arrays. LLaVA-CAM needs the model once per run (``llava_cam(lm, run)``); the
result is cached in ``entry.derived`` (or read from the run when it was stored with it).
"""
from __future__ import annotations

import base64
import io

import numpy as np

from .panels import Missing, figure, message_figure, real

HEATMAP_KINDS = ("attention", "LLaVA-CAM")
FIG_HEAT = "vlmlens.figures.heatmaps"
FIG_ATT = "vlmlens.figures.attention"
FIG_DYN = "vlmlens.figures.dynamics"


def _image_uri(run) -> str:
    buf = io.BytesIO()
    run.image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def attention_heatmap(run, layer: int, query: int = 0, *, image_uri: str | None = None, title: str | None = None):
    """Head-averaged attention of one query over the image grid at one decoder layer,
    drawn over the image (the dashboard's own view, from ``run.attention_maps``)."""
    import plotly.graph_objects as go

    maps = run.attention_maps
    layer = int(np.clip(layer, 0, maps.shape[0] - 1))
    query = int(np.clip(query, 0, maps.shape[1] - 1))
    grid = run.to_grid(maps[layer, query])
    rows, cols = grid.shape
    idx = run.grid_index
    qpos = int(run.map_positions[query])
    qtok = run.tokens[qpos] if qpos < len(run.tokens) else "?"
    fig = go.Figure(go.Heatmap(
        z=grid, x=np.arange(cols), y=np.arange(rows), customdata=idx, colorscale="Viridis", opacity=0.62,
        zmin=0.0, zmax=float(np.nanmax(maps[:, query])) or 1.0, colorbar=dict(title="attention"),
        hovertemplate=(f"layer {layer} · query «{qtok}» (pos {qpos})<br>row %{{y}}, col %{{x}} · image token "
                       "%{customdata}<br>attention %{z:.4f}<extra></extra>")))
    fig.add_layout_image(dict(source=image_uri or _image_uri(run), xref="x", yref="y", x=-0.5, y=-0.5,
                              sizex=cols, sizey=rows, sizing="stretch", layer="below"))
    fig.update_xaxes(range=[-0.5, cols - 0.5], showgrid=False, title="patch column")
    fig.update_yaxes(range=[rows - 0.5, -0.5], showgrid=False, scaleanchor="x", title="patch row")
    fig.update_layout(title=title or f"Attention to the image — layer {layer}, query «{qtok}»", height=430,
                      margin=dict(l=50, r=20, t=60, b=40), template="plotly_white")
    return fig


def attention_grid(run, query: int = 0):
    """Small multiples: the attention heatmap of one query at every decoder layer."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    maps = run.attention_maps
    L = maps.shape[0]
    cols_n = min(8, L)
    rows_n = -(-L // cols_n)
    fig = make_subplots(rows=rows_n, cols=cols_n, subplot_titles=[f"layer {l}" for l in range(L)],
                        horizontal_spacing=0.01, vertical_spacing=0.06)
    zmax = float(np.nanmax(maps[:, query])) or 1.0
    for l in range(L):
        g = run.to_grid(maps[l, query])
        fig.add_trace(go.Heatmap(z=g, coloraxis="coloraxis", customdata=run.grid_index,
                                 hovertemplate=f"layer {l}<br>row %{{y}}, col %{{x}} · image token %{{customdata}}"
                                               "<br>attention %{z:.4f}<extra></extra>"),
                      row=l // cols_n + 1, col=l % cols_n + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=zmax), height=150 * rows_n + 80,
                      title="Attention to the image across layers", margin=dict(l=10, r=10, t=60, b=10),
                      template="plotly_white")
    return fig


# ---- heatmaps tab --------------------------------------------------------------------------

def cam_array(entry, lm=None):
    """[layer, n_image] LLaVA-CAM of the run: stored with it, cached, or computed once with
    ``lm`` (Missing when there is no way to get it)."""
    run = entry.run
    if "llava_cam" in run.arrays:
        return run.arrays["llava_cam"]
    hit = entry.derived.peek("llava_cam")
    if hit is not None:
        return hit
    if lm is None:
        raise Missing("LLaVA-CAM of this run needs the model (it was not stored with the run)")
    if lm.name != run.meta.get("model"):
        raise Missing(f"LLaVA-CAM needs the run's own model ({run.meta.get('model')}); the loaded model is {lm.name}")
    fn = real("vlmlens.analysis.cam", "llava_cam")
    return entry.derived.get("llava_cam", lambda: np.asarray(fn(lm, run)))


def heatmap_layer(entry, layer: int, query: int, kind: str, lm=None):
    """The single-layer heatmap (cached per layer / query / kind)."""
    run = entry.run
    if "attention_maps" not in run.arrays:
        return message_figure("This run recorded no attention maps.")
    key = ("heatmap", int(layer), int(query), kind)
    hit = entry.derived.peek(key)
    if hit is not None:
        return hit
    if kind == "LLaVA-CAM":
        try:
            cam = cam_array(entry, lm)
        except Missing as e:
            return message_figure(str(e), "LLaVA-CAM")
        fig = figure(FIG_HEAT, "fig_cam_layer", run, int(layer), "cam", cam=cam, title="LLaVA-CAM")
    else:
        try:
            fn = real(FIG_HEAT, "fig_cam_layer")
            fig = fn(run, int(layer), "attention", query=int(query))
        except Missing:
            uri = entry.derived.get("image_uri", lambda: _image_uri(run))
            fig = attention_heatmap(run, layer, query, image_uri=uri)
        except Exception:
            uri = entry.derived.get("image_uri", lambda: _image_uri(run))
            fig = attention_heatmap(run, layer, query, image_uri=uri)
    entry.derived.put(key, fig)
    return fig


def heatmap_grid(entry, query: int, kind: str, lm=None):
    run = entry.run
    if "attention_maps" not in run.arrays:
        return message_figure("This run recorded no attention maps.")
    def compute():
        if kind == "LLaVA-CAM":
            try:
                cam = cam_array(entry, lm)
            except Missing as e:
                return message_figure(str(e), "LLaVA-CAM")
            return figure(FIG_HEAT, "fig_cam_grid", run, "cam", cam=cam)
        try:
            return real(FIG_HEAT, "fig_cam_grid")(run, "attention", query=int(query))
        except Exception:
            return attention_grid(run, int(query))
    return entry.derived.get(("grid", int(query), kind), compute)


def logit_lens_figures(entry):
    run = entry.run
    return (entry.derived.get("fig_logit_lens", lambda: figure(FIG_HEAT, "fig_logit_lens", run, title="Logit lens")),
            entry.derived.get("fig_patch_lens", lambda: figure(FIG_HEAT, "fig_patch_lens", run, title="Patch lens")))


# ---- dynamics / attention tabs ------------------------------------------------------------------

def dynamics_figures(entry, span: str = "image"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        m = message_figure("This run stored no hidden states (captured with store='none').")
        return m, m
    dyn = entry.derived.get("fig_dynamics", lambda: figure(FIG_DYN, "fig_dynamics", run, title="Dynamics"))
    cka = entry.derived.get(("fig_cka", span), lambda: figure(FIG_DYN, "fig_layer_similarity", run, span, title="CKA"))
    return dyn, cka


def embedding_figure(entry, method: str = "pca"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        return message_figure("This run stored no hidden states.")
    return entry.derived.get(("fig_embed", method),
                             lambda: figure(FIG_DYN, "fig_token_umap", run, method=method, title="Token map"))


def attention_figures(entry):
    run = entry.run
    flow = entry.derived.get("fig_attention_flow", lambda: figure(FIG_ATT, "fig_attention_flow", run, title="Attention flow"))
    heads = entry.derived.get("fig_attention_heads", lambda: figure(FIG_ATT, "fig_attention_heads", run, title="Heads"))
    return flow, heads
