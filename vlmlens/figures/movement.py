"""How far the tokens move per layer (pure: Run -> plotly Figure): the figure the visual
stabilisation headline reads (:mod:`vlmlens.analysis.stability`)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ._style import STAB_DASH, legend_below, mark_injections, new_figure, span_color


def _label(run) -> str:
    return str(run.meta.get("label") or run.meta.get("model") or "run")


def fig_token_movement(run, *, spans=("image", "text"), tol: float | None = None, quantile: float | None = None,
                       title: str | None = None) -> go.Figure:
    """How far each token moves per decoder layer: the relative step ``‖h_{l+1} − h_l‖ / ‖h_l‖``
    of every token of a span, drawn as its median (line) and 10th–90th percentile (band), with
    the tolerance of the stabilisation rule dotted and the image span's stable layer (if any)
    marked. Unlike entropy or intrinsic dimension this moves when a layer rotates the tokens."""
    from ..analysis.stability import DEFAULT_QUANTILE, DEFAULT_TOL, run_movement, stabilisation

    tol = DEFAULT_TOL if tol is None else tol
    quantile = DEFAULT_QUANTILE if quantile is None else quantile
    s = stabilisation(run, "image", tol=tol, quantile=quantile) if run.spans.n_image else None
    head = title or f"How far the tokens move per layer — {_label(run)}"
    fig = new_figure(title=head + (f"<br><sup>image tokens: {s.statement}</sup>" if s else ""), height=420)
    for span in spans:
        if run.spans.positions(span).size == 0:
            continue
        m = run_movement(run, span)
        x = np.arange(m.rel_step.shape[0])
        lo, med, hi = m.quantile(0.1), m.quantile(0.5), m.quantile(0.9)
        color = span_color(span)
        name = f"{span} (n={m.n_tokens})"
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                 mode="lines", line=dict(width=0), fillcolor=color, opacity=0.18, name=name,
                                 legendgroup=name, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=med, mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=color, width=2), marker=dict(size=5, color=color),
                                 customdata=np.stack([lo, hi], 1),
                                 hovertemplate=(f"<b>{name}</b><br>decoder layer %{{x}}<br>median step %{{y:.1%}}"
                                                "<br>10–90%: %{customdata[0]:.1%} – %{customdata[1]:.1%}<extra></extra>")))
    fig.add_hline(y=tol, line=dict(color="#777777", dash="dot"), annotation_text=f"tolerance {tol:.0%}",
                  annotation_position="top right")
    if s is not None and s.layer is not None:
        fig.add_vline(x=s.layer, line=dict(color=span_color("image"), dash=STAB_DASH),
                      annotation_text=f"image stable from layer {s.layer}", annotation_position="top left")
    mark_injections(fig, run, shift=0)      # a layer's step includes what was added to its output
    fig.update_xaxes(title_text="decoder layer l (step from its input to its output)", dtick=1)
    fig.update_yaxes(title_text="‖h<sub>l+1</sub> − h<sub>l</sub>‖ / ‖h<sub>l</sub>‖", tickformat=".0%",
                     rangemode="tozero")
    legend_below(fig, y=-0.2)
    return fig
