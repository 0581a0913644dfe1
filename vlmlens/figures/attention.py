"""Attention-flow figures (pure: Run -> plotly Figure; no I/O).

* :func:`fig_attention_flow` -- share of attention on image keys per layer, one line per
  query span (last prompt token, text, generated), with the three stages shaded and the
  attention cliff marked; a second run (``other``) is overlaid dashed.
* :func:`fig_attention_heads` -- layer x head heatmap of the last prompt token's image share.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..analysis.attention import (
    attention_cliff_details, attention_share, image_contribution, nanmean, stage_bands, three_stages,
)

from ._style import OTHER_DASH, SEQUENTIAL_COLORSCALE, apply_style, span_color

LAST_COLOR = "#000000"
STAGE_COLORS = {"sink": "#56B4E9", "fusion": "#E69F00", "discard": "#999999"}
QUERY_LABELS = {"last": "last prompt token", "text": "text tokens", "generated": "generated tokens"}


def _color(query: str) -> str:
    return LAST_COLOR if query == "last" else span_color(query)


def _run_name(run) -> str:
    ivs = run.meta.get("interventions") or []
    if ivs:
        return ", ".join(str(iv.get("kind", iv)) if isinstance(iv, dict) else str(iv) for iv in ivs)
    return str(run.meta.get("model", "run"))


def _stage_labels(run) -> list[str] | None:
    try:
        return three_stages(run)
    except KeyError:  # captured without record_contrib
        return None


def fig_attention_flow(run, other=None, *, normalize_per_key: bool = False, title: str | None = None,
                       stages: list[str] | None = None) -> go.Figure:
    """Share of attention on image keys per decoder layer, per query span.

    Lines: last prompt token (black), text tokens, generated tokens (span colours; empty spans
    are left out); ``other`` (e.g. an intervened run) is drawn dashed with the same colours.
    Shaded bands: the sink / fusion / discard stages -- ``stages`` (per-layer labels from the
    knockout windows of :mod:`vlmlens.experiments.stages`, annotated "knockout") when given,
    else VisiPruner's cosine rule on the run's value contributions, annotated "proxy". The
    image part of the last token's attention output (``|sum_j c_j| / |o|``, what the proxy
    reads) is a dotted grey line. Vertical line: the attention cliff (first layer from which
    the last token's share stays below 25 % of its peak), with that threshold dotted. Dashed
    grey: the last prompt token's attention on the first token (the attention sink of
    pretrained LMs), when the run recorded it.
    """
    fig = go.Figure()
    L = int(run.n_layers)
    layers = np.arange(L)
    for r, dash, suffix in ((run, "solid", ""), (other, OTHER_DASH, " (other)")):
        if r is None:
            continue
        for q in ("last", "text", "generated"):
            s = attention_share(r, query=q, normalize_per_key=normalize_per_key)
            if not np.isfinite(s.image).any():
                continue
            label = f"{QUERY_LABELS[q]}{suffix}"
            fig.add_trace(go.Scatter(
                x=np.arange(len(s.image)), y=s.image, mode="lines+markers", name=label,
                line=dict(color=_color(q), dash=dash, width=2.5 if q == "last" else 1.8), marker=dict(size=5),
                customdata=np.full(len(s.image), len(s.positions)),
                hovertemplate=(f"<b>{label}</b>" + (f" · {_run_name(r)}" if suffix else "")
                               + "<br>layer %{x}<br>image share %{y:.3f} (mean of %{customdata} queries)<extra></extra>")))
    first = getattr(run, "attention_first_token", None)
    if first is not None and not normalize_per_key and np.isfinite(first).any():
        sink = nanmean(first, axis=1)
        fig.add_trace(go.Scatter(
            x=layers, y=sink, mode="lines", name="first token (the sink), last prompt token",
            line=dict(color="#999999", dash="dash", width=1.5),
            hovertemplate="layer %{x}<br>last prompt token's attention on the first token %{y:.3f}<extra></extra>"))
    proxy = _stage_labels(run)
    labels, how = (list(stages), "knockout") if stages is not None else (proxy, "proxy")
    if labels is not None:
        for stage, a, b in stage_bands(labels):    # a band in the right half is labelled from its right edge inwards
            fig.add_vrect(x0=a - 0.5, x1=b + 0.5, fillcolor=STAGE_COLORS[stage], opacity=0.13, line_width=0, layer="below",
                          annotation_text=f"{stage} ({how})", annotation_font_size=11,
                          annotation_position="top right" if a > len(layers) / 2 else "top left")
    if proxy is not None:
        labels = proxy
        ic = image_contribution(run)
        rel, cos = ic["rel_norm"], ic["cos"]
        fig.add_trace(go.Scatter(
            x=layers, y=rel, mode="lines", name="image part of attn output (last token; proxy)", yaxis="y2",
            line=dict(color="#666666", dash="dot", width=1.5), customdata=np.stack([cos, np.array(labels)], 1),
            hovertemplate=("layer %{x}: <b>%{customdata[1]}</b> (cosine proxy)<br>|Σ_j c_j| / |o| = %{y:.3f}"
                           "<br>cos(o − Σ_j c_j, o) = %{customdata[0]:.5f}<extra></extra>")))
        fig.update_layout(yaxis2=dict(title="|Σ image contrib| / |attn out|", overlaying="y", side="right",
                                      rangemode="tozero", showgrid=False))
    c = attention_cliff_details(run)
    if np.isfinite(c.threshold) and not normalize_per_key:
        fig.add_hline(y=c.threshold, line=dict(color="#CC0000", dash="dot", width=1),
                      annotation_text=f"{c.frac:.0%} of the last token's peak", annotation_position="bottom right",
                      annotation_font=dict(color="#CC0000", size=10))
    if c.layer is not None:
        fig.add_vline(x=c.layer, line=dict(color="#CC0000", dash="dash", width=1.5),
                      annotation_text=f"attention cliff: layer {c.layer}", annotation_position="top right",
                      annotation_font=dict(color="#CC0000", size=11))
    what = "per-key density share" if normalize_per_key else "share of attention"
    apply_style(fig, title=title or f"Attention to the image per layer ({what})", height=420)
    fig.update_xaxes(title="decoder layer", range=[-0.5, L - 0.5], dtick=1 if L <= 40 else None)
    fig.update_yaxes(title=f"{what} on image keys", range=[0, 1.02])
    return fig


def fig_attention_heads(run, *, query: str = "last", title: str | None = None) -> go.Figure:
    """Layer x head heatmap of the image share of ``query`` (default: the last prompt token)."""
    s = attention_share(run, query=query, per_head=True).image        # [L, H]
    L, H = s.shape
    fig = go.Figure(go.Heatmap(
        z=s, x=np.arange(H), y=np.arange(L), zmin=0, zmax=1, colorscale=SEQUENTIAL_COLORSCALE,
        colorbar=dict(title="image<br>share"),
        hovertemplate=f"layer %{{y}} · head %{{x}}<br>{QUERY_LABELS.get(query, query)}: "
                      "%{z:.3f} of attention on image keys<extra></extra>"))
    apply_style(fig, title=title or f"Image share per head ({QUERY_LABELS.get(query, query)})",
                height=max(320, min(900, 18 * L + 140)))
    fig.update_xaxes(title="head", dtick=1 if H <= 40 else None)
    fig.update_yaxes(title="decoder layer", autorange="reversed")
    return fig


def fig_frame_attention(run, *, title: str | None = None) -> go.Figure:
    """A video run: layer x temporal slot heatmap of the last prompt token's (head-averaged) attention on
    each slot's tokens (:func:`vlmlens.analysis.attention.frame_attention`); each slot is named by
    its sampled frames and their times in the source."""
    from ..analysis.attention import frame_attention

    s = frame_attention(run)                                           # [L, slots]
    v = run.meta["video"]
    per, idx, times = int(v["frames_per_slot"]), v["indices"], v["times"]
    names = []
    for i in range(s.shape[1]):
        a, b = i * per, min((i + 1) * per, len(idx)) - 1
        names.append(f"frames {idx[a]}–{idx[b]}<br>{times[a]:.1f}–{times[b]:.1f} s" if b > a
                     else f"frame {idx[a]}<br>{times[a]:.1f} s")
    L = s.shape[0]
    fig = go.Figure(go.Heatmap(
        z=s, x=np.arange(s.shape[1]), y=np.arange(L), zmin=0, colorscale=SEQUENTIAL_COLORSCALE,
        customdata=np.array([names] * L), colorbar=dict(title="share"),
        hovertemplate="layer %{y} · slot %{x} (%{customdata})<br>%{z:.3f} of the last prompt token's attention"
                      "<extra></extra>"))
    apply_style(fig, title=title or "Attention on each temporal slot of the video (last prompt token)",
                height=max(320, min(900, 18 * L + 160)))
    fig.update_xaxes(title="temporal slot", tickmode="array", tickvals=list(range(s.shape[1])), ticktext=names)
    fig.update_yaxes(title="decoder layer", autorange="reversed")
    return fig


def cross_attention_grid(run, layer: int, query_index: int = 0) -> tuple[np.ndarray, float]:
    """A cross-attention model's map at decoder ``layer`` laid out over the image: [rows * side, cols * side] of
    the image's tiles (row-major, each its patches row-major), and the mass on the tiles' CLS keys."""
    lay = run.meta["cross_attention"]
    m = np.asarray(run.arrays["cross_attention_maps"][layer, query_index], dtype=np.float64)
    rows, cols = lay["tile_grid"]
    side, per = lay["tile_side"], lay["keys_per_tile"]
    tiles = m.reshape(lay["tiles"], per)
    grid = np.zeros((rows * side, cols * side))
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        grid[r * side:(r + 1) * side, c * side:(c + 1) * side] = tiles[t, 1:].reshape(side, side)
    return grid, float(tiles[: rows * cols, 0].sum())


def fig_cross_attention(run, *, query_index: int = 0, title: str | None = None) -> go.Figure:
    """A cross-attention model (Mllama): each cross-attention layer's head-averaged attention of the last prompt
    token over the image's patches (its tiles laid out as on the image), with the mass on the tiles' CLS keys."""
    from plotly.subplots import make_subplots

    layers = run.meta["cross_attention_layers"]
    grids = [cross_attention_grid(run, l, query_index) for l in layers]
    fig = make_subplots(rows=1, cols=len(layers), horizontal_spacing=0.03,
                        subplot_titles=[f"layer {l} · CLS {cls:.2f}" for l, (_, cls) in zip(layers, grids)])
    for i, (l, (g, _)) in enumerate(zip(layers, grids)):
        fig.add_trace(go.Heatmap(z=g, coloraxis="coloraxis", hovertemplate=f"layer {l} · row %{{y}} col %{{x}}<br>"
                                 "%{z:.4f} of the cross-attention<extra></extra>"), row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=i + 1)
        fig.update_xaxes(showticklabels=False, row=1, col=i + 1)
    fig.update_layout(coloraxis=dict(colorscale=SEQUENTIAL_COLORSCALE, colorbar=dict(title="share")))
    apply_style(fig, title=title or "Cross-attention over the image (last prompt token; the image is read only here)",
                height=360)
    return fig
