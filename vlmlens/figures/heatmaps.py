"""Image heatmaps and logit-lens figures (pure: Run -> plotly Figure; no I/O, no model).

* :func:`fig_cam_layer` -- one layer's attention map or LLaVA-CAM over the picture
  (the image as a ``go.Image`` background, the grid as a semi-transparent heatmap).
* :func:`fig_cam_grid` -- small multiples: the map of every layer.
* :func:`fig_logit_lens` -- layer x position heatmap of the logit lens (top-1 prob).
* :func:`fig_patch_lens` -- the top token of every image patch at a layer.

CAM values come from ``cams`` (a :class:`vlmlens.analysis.cam.Cam`, or an array [layer,
n_image] / [layer, rows, cols]) or from the run (``attach_cam``); logit-lens figures read
what ``attach_logit_lens`` stored. The grid covers ``run.meta["image_box"]`` (top, left,
bottom, right as fractions of the image) when set, else the whole image.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import OrderedDict

import numpy as np
import plotly.graph_objects as go

from ..analysis.cam import overlay as _overlay
from ..analysis.logit_lens import lens_from_run, patch_lens_from_run

from ._style import apply_style

HEAT_SCALE = "Inferno"
KINDS = ("attention", "cam")
_URI_CACHE: OrderedDict = OrderedDict()   # id(image) -> (image, data URI); keeps the image alive
_MAX_SIDE = 640


def tok_label(tok: str) -> str:
    """A token for display: space marks made visible, HTML escaped."""
    t = str(tok).replace("▁", "␣").replace("Ġ", "␣").replace("Ċ", "↵").replace("\n", "↵").replace(" ", "␣")
    return html.escape(t if t.strip() else repr(t))


def image_uri(image) -> str:
    """JPEG data URI of the picture (downscaled to at most 640 px a side; cached per image)."""
    hit = _URI_CACHE.get(id(image))
    if hit is not None and hit[0] is image:
        _URI_CACHE.move_to_end(id(image))
        return hit[1]
    img = image.convert("RGB")
    scale = _MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    _URI_CACHE[id(image)] = (image, uri)
    while len(_URI_CACHE) > 16:
        _URI_CACHE.popitem(last=False)
    return uri


def _box(run) -> tuple[float, float, float, float]:
    b = run.meta.get("image_box")
    return tuple(float(x) for x in b) if b else (0.0, 0.0, 1.0, 1.0)


def layer_values(run, kind: str = "attention", cams=None, query_index: int = 0) -> tuple[list[int], np.ndarray]:
    """(layers, grids [n, rows, cols]) drawn by the heatmaps for ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "attention":
        maps = run.attention_maps
        q = int(np.clip(query_index, 0, maps.shape[1] - 1))
        return list(range(maps.shape[0])), run.to_grid(maps[:, q])
    if cams is None:
        if "llava_cam" not in run.arrays:
            raise KeyError("this run holds no LLaVA-CAM: pass cams=llava_cam(lm, run) or call attach_cam(lm, run)")
        v = np.asarray(run.arrays["llava_cam"])
        return list(range(v.shape[0])), run.to_grid(v)
    layers = list(getattr(cams, "layers", []))
    v = np.asarray(getattr(cams, "maps", cams), dtype=np.float32)
    if v.ndim == 2:
        v = run.to_grid(v)
    return (layers or list(range(v.shape[0]))), v


def _query_text(run, query_index: int) -> str:
    pos = run.map_positions[int(query_index)] if "map_positions" in run.arrays else run.spans.n_prompt - 1
    return f"«{tok_label(run.tokens[int(pos)])}» (pos {int(pos)})"


def _customdata(run) -> np.ndarray:
    """[rows, cols, 4]: image-token index, its sequence position (-1 where no token), row, col."""
    gi = run.grid_index
    pos = np.asarray(run.spans.image_positions, dtype=np.int64)
    seq = np.where(gi >= 0, pos[np.maximum(gi, 0)] if len(pos) else -1, -1)
    rr, cc = np.indices(gi.shape)
    return np.stack([gi, seq, rr, cc], axis=-1)


def fig_cam_layer(run, layer: int, kind: str = "attention", *, cams=None, query_index: int = 0,
                  alpha: float = 0.6, title: str | None = None) -> go.Figure:
    """One layer's map over the picture: ``go.Image`` background + translucent heatmap.

    ``kind="attention"``: head-averaged attention of query ``query_index`` (0 = last prompt
    token, then each generated token) over the image tokens; ``kind="cam"``: LLaVA-CAM.
    Colour scale 0..max of this layer. Hover: layer, cell, image token and its position.
    """
    layers, grids = layer_values(run, kind, cams, query_index)
    if layer not in layers:
        raise ValueError(f"layer {layer} not available; have {layers[0]}..{layers[-1]}")
    g = grids[layers.index(layer)]
    rows, cols = g.shape
    W, H = run.image.size
    top, left, bottom, right = _box(run)
    xs = (left + (np.arange(cols) + 0.5) / cols * (right - left)) * W
    ys = (top + (np.arange(rows) + 0.5) / rows * (bottom - top)) * H
    zmax = float(np.nanmax(g)) if np.isfinite(g).any() and np.nanmax(g) > 0 else 1.0
    what = "attention" if kind == "attention" else "CAM"
    who = f"query {_query_text(run, query_index)}" if kind == "attention" else "answer tokens"
    fig = go.Figure()
    dx, dy = W / _shown_width(run.image), H / _shown_height(run.image)   # pixel size; x0/y0: first pixel centre
    fig.add_trace(go.Image(source=image_uri(run.image), x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip", name="image"))
    fig.add_trace(go.Heatmap(
        z=g, x=xs, y=ys, zmin=0, zmax=zmax, opacity=alpha, colorscale=HEAT_SCALE, customdata=_customdata(run),
        colorbar=dict(title=what, thickness=14), name=what,
        hovertemplate=(f"layer {layer} · {who}<br>row %{{customdata[2]}}, col %{{customdata[3]}} · image token "
                       f"%{{customdata[0]}} (pos %{{customdata[1]}})<br>{what} %{{z:.4f}}<extra></extra>")))
    t = title or (f"Attention to the image — layer {layer}, query {_query_text(run, query_index)}" if kind == "attention"
                  else f"LLaVA-CAM — layer {layer}")
    apply_style(fig, title=t, height=460)
    fig.update_xaxes(range=[0, W], visible=False)
    fig.update_yaxes(range=[H, 0], visible=False, scaleanchor="x")
    return fig


def _shown_width(image) -> int:
    s = min(1.0, _MAX_SIDE / max(image.size))
    return max(1, round(image.width * s)) if s < 1 else image.width


def _shown_height(image) -> int:
    s = min(1.0, _MAX_SIDE / max(image.size))
    return max(1, round(image.height * s)) if s < 1 else image.height


def fig_cam_grid(run, cams=None, kind: str = "attention", *, query_index: int = 0, overlay: bool = False,
                 max_cols: int = 8, per_layer: bool = True, title: str | None = None) -> go.Figure:
    """Small multiples: the map of every layer, one subplot each (one trace per layer).

    ``per_layer=True`` (default): each subplot on its own scale 0..its max, written in its title
    (one layer with 20x the attention of the others would otherwise leave them black);
    ``per_layer=False``: one shared scale 0..max over layers with a colour bar. With
    ``overlay=True`` each subplot is the picture with that layer's map blended on it
    (:func:`vlmlens.analysis.cam.overlay`, scaled per layer). ``fig_cam_grid(run, "cam")``
    is accepted too (a string in place of ``cams`` is the kind).
    """
    from plotly.subplots import make_subplots

    if isinstance(cams, str):
        kind, cams = cams, None
    layers, grids = layer_values(run, kind, cams, query_index)
    n = len(layers)
    nc = min(max_cols, n)
    nr = math.ceil(n / nc)
    last = int(run.n_layers) - 1

    def name(l, g):
        top = float(np.nanmax(g)) if np.isfinite(g).any() else 0.0
        if kind == "attention" or top > 0:
            return f"L{l} · max {top:.3g}" if per_layer and not overlay else f"L{l}"
        return f"L{l} · 0 by construction" if l == last else f"L{l} · all 0 (ReLU)"
    names = [name(l, g) for l, g in zip(layers, grids)]
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=names, horizontal_spacing=0.012, vertical_spacing=0.05)
    zmax = float(np.nanmax(grids)) if np.isfinite(grids).any() and np.nanmax(grids) > 0 else 1.0
    what = "attention" if kind == "attention" else "CAM"
    cd = _customdata(run)
    for i, (l, g) in enumerate(zip(layers, grids)):
        r, c = i // nc + 1, i % nc + 1
        if overlay:
            im = _overlay(run.image, g, alpha=0.6, box=_box(run))
            fig.add_trace(go.Image(source=image_uri(im), name=f"layer {l}", hoverinfo="skip"), row=r, col=c)
        else:
            scale = (dict(colorscale=HEAT_SCALE, zmin=0, zmax=float(np.nanmax(g)) if np.isfinite(g).any()
                          and np.nanmax(g) > 0 else 1.0, showscale=False) if per_layer else dict(coloraxis="coloraxis"))
            fig.add_trace(go.Heatmap(
                z=g, customdata=cd, name=f"layer {l}", **scale,
                hovertemplate=(f"layer {l}<br>row %{{y}}, col %{{x}} · image token %{{customdata[0]}} "
                               f"(pos %{{customdata[1]}})<br>{what} %{{z:.4f}}<extra></extra>")), row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    if not overlay:
        fig.update_yaxes(scaleanchor="x")  # square cells
    who = f", query {_query_text(run, query_index)}" if kind == "attention" else ""
    t = title or (f"Attention to the image across layers{who}" if kind == "attention" else "LLaVA-CAM across layers")
    if per_layer and not overlay:
        t += "<br><sup>each layer on its own scale, 0 .. the max in its title</sup>"
    apply_style(fig, title=t, height=int(150 * nr + 110))
    fig.update_layout(margin=dict(l=10, r=10, t=90, b=10))
    if not per_layer and not overlay:
        fig.update_layout(coloraxis=dict(colorscale=HEAT_SCALE, cmin=0, cmax=zmax,
                                         colorbar=dict(title=what, thickness=12)))
    for a in fig.layout.annotations:
        a.font = dict(size=10)
    return fig


def fig_head_maps(run, layer: int, *, max_cols: int = 8, title: str | None = None) -> go.Figure:
    """Each head's attention over the image at one decoder layer, for the last prompt token
    (``run.attention_head_maps``): one subplot per head on its own scale (its image share and
    max in the title). The head-averaged map hides heads that look at different places."""
    from plotly.subplots import make_subplots

    if "attention_head_maps" not in run.arrays:
        raise KeyError("this run holds no per-head maps (captured before they were recorded); capture it again")
    hm = np.asarray(run.attention_head_maps, dtype=np.float64)
    L, H = hm.shape[:2]
    from ..errors import check_layer

    maps = hm[check_layer("layer", layer, 0, L - 1)]
    nc = min(max_cols, H)
    nr = math.ceil(H / nc)
    names = [f"head {h} · share {maps[h].sum():.2f}" for h in range(H)]
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=names, horizontal_spacing=0.012, vertical_spacing=0.06)
    cd = _customdata(run)
    for h in range(H):
        g = run.to_grid(maps[h])
        top = float(np.nanmax(g)) if np.isfinite(g).any() and np.nanmax(g) > 0 else 1.0
        fig.add_trace(go.Heatmap(
            z=g, customdata=cd, name=f"head {h}", colorscale=HEAT_SCALE, zmin=0, zmax=top, showscale=False,
            hovertemplate=(f"layer {int(layer)} · head {h}<br>row %{{y}}, col %{{x}} · image token %{{customdata[0]}}"
                           "<br>attention %{z:.4f}<extra></extra>")), row=h // nc + 1, col=h % nc + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    t = title or (f"Each head's attention to the image — decoder layer {int(layer)}, last prompt token "
                  f"{_query_text(run, 0)}<br><sup>each head on its own scale; share = its attention mass on "
                  "the image</sup>")
    apply_style(fig, title=t, height=int(170 * nr + 110))
    fig.update_layout(margin=dict(l=10, r=10, t=90, b=10))
    for a in fig.layout.annotations:
        a.font = dict(size=10)
    return fig


def fig_logit_lens(run, *, value: str = "top1", title: str | None = None) -> go.Figure:
    """Layer (0 = embeddings .. L) x position heatmap of the logit lens stored by
    ``attach_logit_lens``: colour = top-1 probability (``value="target"``: probability of the
    token the last layer predicts), cell text = the top-1 token; hover lists the top-k."""
    ll = lens_from_run(run)
    L1, P, k = ll.ids.shape
    z = ll.probs[:, :, 0] if value == "top1" else ll.target_probs
    text = np.vectorize(tok_label, otypes=[object])(ll.tokens[:, :, 0]) if ll.tokens.size else ll.tokens[:, :, 0]
    topk = np.empty((L1, P), dtype=object)
    for l in range(L1):
        for p in range(P):
            topk[l, p] = "<br>".join(f"{tok_label(ll.tokens[l, p, j])} {ll.probs[l, p, j]:.3f}" for j in range(k))
    target = [tok_label(ll.tokens[-1, p, 0]) for p in range(P)]
    cd = np.stack([topk, np.broadcast_to(np.array(target, dtype=object), (L1, P)),
                   np.round(ll.target_probs, 4).astype(object)], axis=-1)
    xlab = [f"{int(p)}:{tok_label(run.tokens[int(p)])}" for p in ll.positions]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(P)), y=list(range(L1)), zmin=0, zmax=1, colorscale="Blues", text=text,
        texttemplate="%{text}" if P * L1 <= 600 else None, textfont=dict(size=9), customdata=cd,
        colorbar=dict(title="top-1 p" if value == "top1" else "p(final)"),
        hovertemplate=("layer %{y} · after token %{x}<br><b>top tokens</b><br>%{customdata[0]}"
                       "<br>final prediction %{customdata[1]}: p=%{customdata[2]}<extra></extra>")))
    apply_style(fig, title=title or "Logit lens: what each layer would say next", height=max(360, min(900, 22 * L1 + 160)),
                width=max(700, 46 * P + 220) if P > 16 else None)   # long outputs: wider, the plot scrolls
    fig.update_xaxes(title="position (input token; the lens predicts the next one)", tickvals=list(range(P)), ticktext=xlab,
                     tickangle=-45)
    fig.update_yaxes(title="h<sub>ℓ</sub> (0 = embeddings)")
    return fig


def _state_label(l: int, L: int) -> str:
    """Hidden state ``l`` (0..L) in the dashboard's one reading: what decoder layer ``l`` reads; L: the output."""
    return f"the state entering decoder layer {l}" if l < L else f"the output (after layer {L - 1})"


def _lens_title(l: int, L: int) -> str:
    return f"Patch lens — {_state_label(l, L)}"


def fig_patch_lens(run, layer: int | None = None, *, title: str | None = None) -> go.Figure:
    """Top token of every image patch at ``layer`` (0..L) stored by ``attach_logit_lens``:
    colour = its probability, cell text = the token. ``layer=None``: every layer, with a
    slider (one trace per layer, the last one shown first)."""
    if "patch_lens_ids" not in run.arrays:
        raise KeyError("this run has no patch lens; call attach_logit_lens(lm, run, patch=True)")
    L1 = run.arrays["patch_lens_ids"].shape[0]
    layers = list(range(L1)) if layer is None else [int(layer)]
    cd = _customdata(run)
    fig = go.Figure()
    for l in layers:
        pl = patch_lens_from_run(run, l)
        text = np.vectorize(tok_label, otypes=[object])(pl.tokens)
        fig.add_trace(go.Heatmap(
            z=pl.probs, text=text, texttemplate="%{text}" if pl.probs.size <= 900 else None, textfont=dict(size=9),
            zmin=0, zmax=1, colorscale="Blues", customdata=cd, name=f"layer {l}", visible=(l == layers[-1]),
            colorbar=dict(title="p"),
            hovertemplate=(f"layer {l}<br>row %{{y}}, col %{{x}} · image token %{{customdata[0]}} (pos %{{customdata[1]}})"
                           "<br>says %{text} (p=%{z:.3f})<extra></extra>")))
    if layer is None:
        steps = [dict(method="update", label=_state_label(l, L1 - 1),
                      args=[{"visible": [j == i for j in range(len(layers))]}, {"title.text": _lens_title(l, L1 - 1)}])
                 for i, l in enumerate(layers)]
        # one reading of "layer" everywhere: decoder layer l reads the state shown at step l; the last is the output
        fig.update_layout(sliders=[dict(active=len(layers) - 1, steps=steps, currentvalue=dict(prefix=""),
                                        font=dict(color="rgba(0,0,0,0)"), pad=dict(t=30))])
    apply_style(fig, title=title or _lens_title(layers[-1], L1 - 1), height=520)
    rows, cols = run.image_grid
    # fixed ranges: the grid fills the plot whatever the width (autorange drifted to -2..10 when narrow)
    fig.update_yaxes(range=[rows - 0.5, -0.5], scaleanchor="x", constrain="domain", title="patch row")
    fig.update_xaxes(range=[-0.5, cols - 0.5], constrain="domain", title="patch column")
    return fig
