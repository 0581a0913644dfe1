"""Figure of heatmaps checked against causal effects (pure: MapCheck results -> plotly Figure).

:func:`fig_map_check` draws, for each map, its deletion curve (left: the answer's probability
as the map's top tokens are cut, lower is better) and insertion curve (right: as only its top
tokens are kept, higher is better), next to the mean of the random orders (a band of one standard
deviation) and the reversed order. The verdicts come in the results (:mod:`vlmlens.experiments.map_check`).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ._style import empty_figure, new_figure

MAP_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
RANDOM_COLOR = "#888888"


def fig_map_check(checks, *, title: str | None = None) -> go.Figure:
    """Deletion and insertion curves of each map in ``checks`` (MapCheck objects of one input)."""
    checks = list(checks)
    if not checks:
        return empty_figure("no maps were scored")
    fig = new_figure(1, 2, titles=["deletion: cut the map's top tokens (lower is better)",
                                   "insertion: keep only the map's top tokens (higher is better)"],
                     title=title or f"Do the maps predict what the answer depends on? ({checks[0].n_random} random"
                                    f" orders; answer {checks[0].answer.strip()!r})", height=440)
    f = checks[0].fractions
    for col, curve in ((1, "deletion"), (2, "insertion")):
        rnd = np.asarray(checks[0].random_curves[curve], dtype=float)
        mean, sd = rnd.mean(0), (rnd.std(0, ddof=1) if len(rnd) > 1 else np.zeros(rnd.shape[1]))
        fig.add_trace(go.Scatter(x=list(f) + list(f)[::-1], y=list(mean + sd) + list(mean - sd)[::-1],
                                 fill="toself", fillcolor="rgba(136,136,136,0.18)", line=dict(width=0),
                                 hoverinfo="skip", showlegend=False), row=1, col=col)
        fig.add_trace(go.Scatter(x=f, y=mean, mode="lines", line=dict(color=RANDOM_COLOR, dash="dot"),
                                 name="random orders (mean ± sd)", legendgroup="random", showlegend=col == 1,
                                 hovertemplate="random: f=%{x:.2f}, %{y:.3f}<extra></extra>"), row=1, col=col)
        for i, c in enumerate(checks):
            color = MAP_COLORS[i % len(MAP_COLORS)]
            a = c.auc[curve]
            fig.add_trace(go.Scatter(x=f, y=getattr(c, curve)["map"], mode="lines+markers", line=dict(color=color),
                                     name=f"{c.name}", legendgroup=c.name, showlegend=col == 1,
                                     hovertemplate=(f"{c.name}: f=%{{x:.2f}}, %{{y:.3f}}<br>AUC {a['map']:.2f} vs"
                                                    f" {a['random']:.2f} random, p = {a['p']:.2f}: {c.verdict[curve]}"
                                                    "<extra></extra>")), row=1, col=col)
            fig.add_trace(go.Scatter(x=f, y=getattr(c, curve)["reverse"], mode="lines",
                                     line=dict(color=color, dash="dash", width=1), name=f"{c.name} reversed",
                                     legendgroup=c.name, showlegend=False,
                                     hovertemplate=f"{c.name} reversed: AUC {a['reverse']:.2f}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="share of image tokens " + ("cut" if curve == "deletion" else "kept"),
                         range=[0, 1], row=1, col=col)
    fig.update_yaxes(title_text="answer probability / whole image", row=1, col=1)
    return fig
