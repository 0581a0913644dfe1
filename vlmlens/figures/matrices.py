"""Figures of the layer-wise experiments (pure): substitution matrix, layer-skip scan, compute.

Re-exported by :mod:`vlmlens.figures.experiments`.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..metrics import NOISE_FLOOR
from ._style import SEQUENTIAL_COLORSCALE, SPAN_COLORS, empty_figure, legend_below, new_figure

TOKEN_COLORS = {"image": SPAN_COLORS["image"], "all": SPAN_COLORS["system"]}


def _get(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _answer_kl(result):
    """The output-level KL of a result (summed over every generated token; a teacher-forced
    final answer after a trace hides what the image did to the trace), else its answer-level
    KL, else (older results) the first-token KL."""
    for key, label in (("output_kl", "output KL (nats)"), ("answer_kl", "answer KL (nats)")):
        try:
            v = _get(result, key)
        except (KeyError, AttributeError):
            v = None
        if v is not None:
            return v, label
    return _get(result, "kl"), "first-token KL (nats)"


def fig_substitution_matrix(result, *, metric: str = "answer_kl", floor: float = NOISE_FLOOR,
                            title: str | None = None) -> go.Figure:
    """Heatmap over (from_layer i, at_layer j): output-level KL (``metric="answer_kl"``: summed
    over the generated tokens, see :func:`_answer_kl`), first-token KL (``"kl"``) or
    answer kept (``"answer_kept"``) when layer j reads layer i's image states. Empty above the
    diagonal. KL cells below ``floor`` nats are numerical noise: drawn blank and written
    "no change" (the colour scale starts at the floor)."""
    layers = list(_get(result, "layers"))
    if not layers:
        return empty_figure("no layers in this result", title=title)
    if metric not in ("answer_kl", "kl", "answer_kept"):
        raise ValueError(f"metric must be 'answer_kl', 'kl' or 'answer_kept', got {metric!r}")
    if metric == "answer_kl":
        raw, label = _answer_kl(result)
    else:
        raw, label = _get(result, metric), "first-token KL (nats)" if metric == "kl" else "answer kept"
    z = np.array([[np.nan if v is None else float(v) for v in row] for row in raw], dtype=float)
    texts = _get(result, "text")
    is_kl = metric != "answer_kept"
    quiet = np.isfinite(z) & (z < floor) if is_kl else np.zeros(z.shape, bool)
    cell = [["" if not np.isfinite(z[r][c]) else "no change" if quiet[r][c] else
             (f"{z[r][c]:.2g}" if is_kl else ("kept" if z[r][c] else "lost")) for c in range(len(layers))]
            for r in range(len(layers))]
    hover = [[f"from layer {layers[c]} → layer {layers[r]}: {cell[r][c]}<br>"
              f"{'' if texts[r][c] is None else texts[r][c][:60]}" for c in range(len(layers))] for r in range(len(layers))]
    shown = np.where(quiet, np.nan, z)
    fig = new_figure(title=title or f"Substitution matrix — {label}" + (f" (below {floor:g}: no change)" if is_kl else ""),
                     height=520)
    cats = [str(l) for l in layers]       # categorical axes: equal cells however the grid is spaced
    fig.add_trace(go.Heatmap(x=cats, y=cats, z=shown, hovertext=hover, hoverinfo="text", text=cell,
                             texttemplate="%{text}", colorscale=SEQUENTIAL_COLORSCALE,
                             reversescale=not is_kl, colorbar=dict(title=label),
                             zmin=floor if is_kl else 0, zmax=1 if not is_kl else None))
    fig.update_xaxes(title_text="image states taken from layer i (input of i)", type="category")
    fig.update_yaxes(title_text="substituted into layer j", type="category")
    return fig


def fig_layer_skip(result, *, floor: float = NOISE_FLOOR, title: str | None = None) -> go.Figure:
    """Top: output-level KL when each layer is skipped (image tokens / all tokens; see
    :func:`_answer_kl`), crosses where the answer changed; the band below ``floor`` nats is
    "no change". Bottom: adjacent-layer cosine distance of the image tokens."""
    layers = list(_get(result, "layers"))
    if not layers:
        return empty_figure("no layers in this result", title=title)
    (kl, label), kept = _answer_kl(result), _get(result, "answer_kept")
    fig = new_figure(2, 1, shared_xaxes=True, height=620, title=title or "Layer-skip scan (Skip-It)",
                     titles=("Output change when layer l is skipped", "How much layer l turns the image tokens"))
    for t in _get(result, "tokens"):
        color = TOKEN_COLORS.get(t, "#666666")
        fig.add_trace(go.Scatter(x=layers, y=kl[t], mode="lines+markers", name=f"skip for {t} tokens: {label}",
                                 line=dict(color=color),
                                 hovertext=["no change" if v is not None and v < floor else f"{v:.3g} nats"
                                            for v in kl[t]]), row=1, col=1)
        lost = [l for l, k in zip(layers, kept[t]) if not k]
        fig.add_trace(go.Scatter(x=lost, y=[kl[t][layers.index(l)] for l in lost], mode="markers",
                                 name=f"answer changed ({t})", marker=dict(symbol="x", size=12, color=color)),
                      row=1, col=1)
    cos = _get(result, "cosine_distance")
    if cos is not None:
        fig.add_trace(go.Bar(x=layers, y=[np.nan if v is None else v for v in cos], name="image-token cosine distance",
                             marker_color=SPAN_COLORS["image"], opacity=0.6), row=2, col=1)
    fig.add_hrect(y0=0, y1=floor, fillcolor="#dddddd", opacity=0.5, line_width=0, row=1, col=1,
                  annotation_text=f"no change (< {floor:g} nats)", annotation_position="top left")
    legend_below(fig, y=-0.15)
    fig.update_yaxes(title_text=label, row=1, col=1)
    fig.update_yaxes(title_text="1 − cos(h_l, h_l+1)", row=2, col=1)
    fig.update_xaxes(title_text="decoder layer l", tickvals=layers, row=2, col=1)
    return fig


def fig_compute_tradeoff(tradeoff: dict, *, title: str | None = None) -> go.Figure:
    """Saving (fraction of the baseline) per truncation depth: theoretical decoder FLOPs
    (prefill, whole generation) and KV-cache bytes, with measured latency savings when present (and the
    FLOP savings weighted by the measured time of each phase, which a decoding step's weight reads set)."""
    ks = tradeoff["depths"]
    if not ks:
        return empty_figure("no depths", title=title)
    fig = new_figure(title=title or "What truncation saves (mode='remove')")
    lines = [("prefill_saving", "prefill FLOPs (theory)", SPAN_COLORS["image"], None),
             ("total_saving", "prefill + decode FLOPs (theory)", SPAN_COLORS["generated"], None),
             ("kv_saving", "KV-cache bytes (theory)", SPAN_COLORS["system"], None),
             ("measured_prefill_saving", "prefill latency (measured)", SPAN_COLORS["image"], "dash"),
             ("measured_total_saving", "prefill + decode latency (measured)", SPAN_COLORS["generated"], "dash"),
             ("time_weighted_saving", "prefill + decode FLOPs, each phase weighted by its measured time",
              SPAN_COLORS["generated"], "dot")]
    for key, name, color, dash in lines:
        if key in tradeoff:
            fig.add_trace(go.Scatter(x=ks, y=tradeoff[key], mode="lines+markers", name=name,
                                     line=dict(color=color, dash=dash)))
    fig.update_xaxes(title_text="truncation depth k (image tokens removed from layers ≥ k)", tickvals=ks)
    fig.update_yaxes(title_text="saving vs baseline", tickformat=".0%")
    return fig
