"""The task-necessity figure of a dataset study: score against truncation depth, one line per
task with its bootstrap 95 % interval as a band (and answer kept, dashed)."""
from __future__ import annotations

from ._style import empty_figure

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def fig_dataset_study(study):
    """Score (task metric; CIDEr-D for captions, on its own axis) and answer kept vs depth."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = sorted({r["task"] for r in study.rows})
    if not tasks:
        return empty_figure("this study holds no rows")
    if study.config.get("methods"):             # a pruning study: score against compute saved
        from .pruning import fig_pruning_pareto

        return fig_pruning_pareto(study.as_pruning_study())
    cap = "caption" in tasks
    fig = make_subplots(specs=[[{"secondary_y": cap}]])
    ems = study.config.get("encoder_depths") or [None]
    groups = [(t, m) for t in tasks for m in ems]
    for i, (t, m) in enumerate(groups):
        rows = sorted((r for r in study.rows if r["task"] == t and r.get("encoder_depth") == m), key=lambda r: r["depth"])
        c = _COLORS[i % len(_COLORS)]
        x = [r["depth"] for r in rows]
        scale = 1.0 if t == "caption" else 100.0
        y = [None if r["score"] is None else scale * r["score"] for r in rows]
        lo = [None if r["ci_low"] is None else scale * r["ci_low"] for r in rows]
        hi = [None if r["ci_high"] is None else scale * r["ci_high"] for r in rows]
        sec = {"secondary_y": t == "caption"} if cap else {}
        name = f"{t} ({'CIDEr-D' if t == 'caption' else 'score %'}, n={rows[0]['n']})"
        if m is not None:
            name = f"{t}, encoder {m} ({'CIDEr-D' if t == 'caption' else 'score %'})"
        if all(v is not None for v in lo + hi):
            fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor=c, opacity=0.15,
                                     line=dict(width=0), hoverinfo="skip", showlegend=False), **sec)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line=dict(color=c), name=name,
                                 hovertemplate="depth %{x}: %{y:.1f}<extra>" + t + "</extra>"), **sec)
        fig.add_trace(go.Scatter(x=x, y=[100 * r["answer_kept"] for r in rows], mode="lines",
                                 name=f"{t}{'' if m is None else f', encoder {m}'}: answer kept %",
                                 line=dict(color=c, dash="dot"), hovertemplate="depth %{x}: %{y:.0f}% kept<extra></extra>"),
                      **({"secondary_y": False} if cap else {}))
    fig.update_xaxes(title_text="depth k (image cut from decoder layer k on; k = L: untouched)", dtick=1)
    fig.update_yaxes(title_text="score / answer kept (%)", range=[-3, 103], **({"secondary_y": False} if cap else {}))
    if cap:
        fig.update_yaxes(title_text="CIDEr-D", secondary_y=True, rangemode="tozero")
    cfg = study.config
    fig.update_layout(title=f"{cfg['model']} on {cfg['data']} ({study.n_items} rows, mode {cfg['mode']})", height=440,
                      margin=dict(t=60, l=60, r=60, b=50))
    return fig
