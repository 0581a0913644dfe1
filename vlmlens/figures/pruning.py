"""Figures of token pruning: accuracy against compute saved (one point per method, per task
family), and which image tokens a pruned run kept, drawn over the image per layer."""
from __future__ import annotations

import math

import numpy as np

from ..analysis.cam import overlay
from ._style import empty_figure
from .heatmaps import _box, image_uri

#: the method family a point belongs to (one colour and marker each), by its name's first word
_FAMILIES = {"baseline": ("baseline", "black", "star"), "FastV": ("FastV", "#1f77b4", "circle"),
             "random": ("random (baseline)", "#7f7f7f", "x"), "L2": ("L2 norm (baseline)", "#bcbd22", "diamond"),
             "PyramidDrop": ("PyramidDrop", "#2ca02c", "square"), "VTW": ("VTW (fixed depth)", "#d62728", "triangle-up"),
             "adaptive": ("adaptive VTW", "#9467bd", "triangle-down"), "StagePruner": ("StagePruner", "#ff7f0e", "pentagon")}


#: the written method forms (``prune --methods``) by their kind
_SPEC_KINDS = {"fastv": "FastV", "random": "random", "l2": "L2", "pdrop": "PyramidDrop", "vtw": "VTW",
               "adaptive": "adaptive", "stages": "StagePruner"}


def _family(name: str) -> tuple[str, str, str]:
    first = name.split()[0] if name.split() else name
    first = _SPEC_KINDS.get(first.split(":")[0].lower(), first) if ":" in first else first
    return _FAMILIES.get(first, ("other", "#17becf", "cross"))


def fig_pruning_pareto(study, metric: str = "accuracy"):
    """Accuracy (or ``answer_kept``) against the decoder FLOPs saved, one panel per task family,
    one point per method (hover: name, KV saved, mean depth)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fams = list(study.families)
    if not fams:
        return empty_figure("no task families in this study")
    fig = make_subplots(rows=1, cols=len(fams), subplot_titles=fams, shared_yaxes=True)
    shown = set()
    for c, f in enumerate(fams, 1):
        groups: dict[str, list] = {}
        for r in study.rows:
            if r["family"] == f:
                groups.setdefault(_family(r["method"])[0], []).append(r)
        for label, rows in groups.items():
            _, color, symbol = _family(rows[0]["method"])
            rows = sorted(rows, key=lambda r: r["total_saving"])
            fig.add_trace(go.Scatter(
                x=[100 * r["total_saving"] for r in rows], y=[100 * r[metric] for r in rows],
                mode="markers+lines" if len(rows) > 1 and label.startswith("VTW") else "markers",
                marker=dict(color=color, symbol=symbol, size=9), line=dict(color=color, width=1, dash="dot"),
                name=label, legendgroup=label, showlegend=label not in shown,
                text=[f"{r['method']}<br>KV saved {100 * r['kv_saving']:.1f}%<br>mean depth {r['mean_depth']:.1f}"
                      for r in rows],
                hovertemplate="%{text}<br>FLOPs saved %{x:.1f}%<br>" + metric + " %{y:.0f}%<extra></extra>"),
                row=1, col=c)
            shown.add(label)
        fig.update_xaxes(title_text="decoder FLOPs saved (%)", row=1, col=c)
    fig.update_yaxes(title_text=f"{metric.replace('_', ' ')} (%)", range=[-3, 103], row=1, col=1)
    fig.update_layout(title=f"{study.model}: {metric.replace('_', ' ')} vs compute, {study.n_per_family} examples per family",
                      height=420, margin=dict(t=70, l=60, r=20, b=50))
    return fig


def fig_kept_tokens(run, layers=None, max_cols: int = 4, *, kept=None, name: str | None = None):
    """Which image tokens each decoder layer still reads (1 = kept), on the run's image grid:
    the run's own ``image_kept`` (a pruned run), or ``kept`` [L, n_image] given for it (e.g. a
    method of a pruning comparison made on the run's input, named ``name``). ``layers``
    default: the first layer and every layer where the kept set changes."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if kept is None and "image_kept" not in run.arrays:
        return empty_figure("this run was not pruned (no token pruner among its interventions)")
    kept = np.asarray(run.arrays["image_kept"] if kept is None else kept, dtype=np.float64)
    if kept.ndim != 2 or kept.shape[1] != run.spans.n_image:
        return empty_figure(f"kept-token mask of shape {kept.shape} does not fit this run's {run.spans.n_image} image tokens")
    L = kept.shape[0]
    if layers is None:
        layers = [0] + [l for l in range(1, L) if not np.array_equal(kept[l], kept[l - 1])]
    layers = [int(l) for l in layers]
    nc = min(max_cols, len(layers))
    nr = math.ceil(len(layers) / nc)
    titles = [f"layer {l}: {int(kept[l].sum())}/{kept.shape[1]} kept" for l in layers]
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=titles, horizontal_spacing=0.03, vertical_spacing=0.12)
    for i, l in enumerate(layers):
        g = run.to_grid(kept[l])
        # over the picture (video frames / tiles as the run lays them out): what is no longer read goes dark
        dark = np.where(g < 0.5, 0.0, np.nan)
        pic = overlay(run.image, dark, alpha=0.78, cmap="gray", vmin=0, vmax=1, box=_box(run), smooth=False)
        fig.add_trace(go.Image(source=image_uri(pic), hoverinfo="skip", name=f"layer {l}"),
                      row=i // nc + 1, col=i % nc + 1)
    fig.update_yaxes(showticklabels=False, scaleanchor="x")
    fig.update_xaxes(showticklabels=False)
    if name is None:
        name = ", ".join(d.get("kind", "?") if isinstance(d, dict) else str(d) for d in run.meta.get("interventions", []))
    fig.update_layout(title=f"image tokens kept ({name}); dark = no longer read", height=260 * nr + 60,
                      margin=dict(t=80, l=20, r=20, b=20))
    return fig
