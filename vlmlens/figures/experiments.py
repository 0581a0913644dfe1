"""Figures of the truncation experiments (pure: results -> plotly Figure, no I/O).

* :func:`fig_truncation_sweep` — answer-level KL (first-token KL dotted), answer kept and
  correct vs the truth, and the change in the baseline answer's log-prob against truncation
  depth, the sweep cliff marked;
* :func:`fig_sweep_modes` — a run's drop / remove / freeze sweeps on one figure;
* :func:`fig_side_by_side` — table of each depth's text with the divergence highlighted
  (:func:`side_by_side_html` renders the same as an HTML table);
* :func:`fig_reasoning_perturbation` — trace edit distance and final-answer change per depth;
* :func:`fig_task_necessity` — accuracy against depth per task family;
* the substitution matrix, the layer-skip scan and the compute trade-off are in ``matrices.py``.

Every function takes result objects (``TruncationResult``, ``TracePerturbation``, ``StudyResult``);
what a figure states (the sweep cliff, the freeze depth) comes in as findings the caller computed
(:func:`vlmlens.findings.sweep_statements`): a figure draws, it never decides.
"""
from __future__ import annotations

import html

import plotly.graph_objects as go

from ..metrics import NOISE_FLOOR
from ._style import SPAN_COLORS, empty_figure, legend_below, new_figure

KL_COLOR = SPAN_COLORS["image"]
KEPT_COLOR = SPAN_COLORS["generated"]
LOST_COLOR = SPAN_COLORS["text"]
LOGP_COLOR = "#E69F00"
FAMILY_COLORS = {"single": "#0072B2", "caption": "#D55E00", "reasoning": "#009E73"}
CLIFF_COLOR = "#CC79A7"


def _truncation(result):
    if isinstance(result, dict):
        raise TypeError("give the result object (TruncationResult.from_json(d) reads a saved one)")
    return result


def _depth_label(d: int, L: int) -> str:
    return f"{d} (all)" if d == L else str(d)


def _mark(fig, x0: float, text: str, color: str, n_layers: int, i: int = 0) -> None:
    """A depth's label inside the top of the first panel, on the side of its line with more room (above the
    panel it would run into the panel's title)."""
    right = x0 <= n_layers / 2
    fig.add_annotation(x=x0, y=1.0 - 0.035 * i, xref="x", yref="paper", text=text, showarrow=False,
                       font=dict(color=color, size=12), yanchor="top", xanchor="left" if right else "right",
                       xshift=4 if right else -4, bgcolor="rgba(255,255,255,0.85)")


def _cliff_text(cliff: int, n_layers: int, mode: str | None = None) -> str:
    """The sweep cliff as the figure says it: at depth L no cut kept the answer (not "cut at L")."""
    where = "none: no cut keeps the answer" if cliff >= n_layers else str(cliff)
    return f"sweep cliff {where}" + (f" ({mode})" if mode else "")


def _akl(d) -> float:
    """Output-level KL of a depth (older results: answer-level, then first-token)."""
    for v in (d.output_kl, d.answer_kl):
        if v is not None and v == v:
            return v
    return d.first_token_kl


def fig_truncation_sweep(result, *, cliff=None, floor: float = NOISE_FLOOR,
                         title: str | None = None) -> go.Figure:
    """Three panels over depth, one point per depth of the result (L+1 for a sweep):

    1. KL(baseline ‖ truncated) summed over the generated tokens (teacher-forced), the KL over
       the final answer after a separator dashed (when the output has one), the first-token KL
       dotted; the band below ``floor`` nats is "no change";
    2. the answer kept vs the baseline and, when the result has a ground truth, correct vs the
       truth (a depth that fixes the baseline's mistake shows as lost + correct);
    3. the change in log-prob of the baseline's answer tokens.

    ``cliff``: the sweep-cliff finding (:func:`vlmlens.findings.sweep_statements`): its statement is the
    subtitle and its depth (shallowest from which every deeper depth keeps the answer) a vertical line.
    """
    r = _truncation(result)
    if not r.depths:
        return empty_figure("no depths in this result", title=title)
    found, cliff = cliff, (None if cliff is None else cliff.value)
    x = [d.depth for d in r.depths]
    fig = new_figure(3, 1, shared_xaxes=True, height=760, titles=(
        "KL(baseline ‖ truncated), summed over the generated tokens", "Answer kept / correct",
        "Change in log-prob of the baseline's answer"),
        title=title or f"Truncation sweep ({r.mode}) — {r.prompt}" + (f"<br><sup>{found.text}</sup>" if found else ""))
    hover = [f"depth {d.depth}<br>{html.escape(d.text[:80])}" for d in r.depths]
    fig.add_hrect(y0=0, y1=floor, fillcolor="#dddddd", opacity=0.5, line_width=0, row=1, col=1,
                  annotation_text=f"no change (< {floor:g})", annotation_position="top left")
    fig.add_trace(go.Scatter(x=x, y=[_akl(d) for d in r.depths], mode="lines+markers", name="output KL (nats)",
                             line=dict(color=KL_COLOR), hovertext=hover), row=1, col=1)
    if any(d.answer_start for d in r.depths):
        fig.add_trace(go.Scatter(x=x, y=[d.answer_kl for d in r.depths], mode="lines", name="final-answer KL",
                                 line=dict(color=KL_COLOR, dash="dash", width=1.5), hovertext=hover), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[d.first_token_kl for d in r.depths], mode="lines", name="first-token KL",
                             line=dict(color=KL_COLOR, dash="dot", width=1), hovertext=hover), row=1, col=1)
    kept = [1 if d.answer_kept else 0 for d in r.depths]
    fig.add_trace(go.Scatter(x=x, y=[1] * len(x), mode="markers", name="answer kept (vs baseline)",
                             marker=dict(size=12, symbol=["circle" if k else "x" for k in kept],
                                         color=[KEPT_COLOR if k else LOST_COLOR for k in kept]),
                             hovertext=hover), row=2, col=1)
    has_truth = any(d.correct is not None for d in r.depths)
    if has_truth:
        corr = [d.correct for d in r.depths]
        fig.add_trace(go.Scatter(x=x, y=[0] * len(x), mode="markers", name=f"correct (truth: {r.truth})"[:80],
                                 marker=dict(size=12, symbol=["circle" if c else "x" for c in corr],
                                             color=[KEPT_COLOR if c else LOST_COLOR for c in corr]),
                                 hovertext=hover), row=2, col=1)
    fig.add_trace(go.Scatter(x=x, y=[d.answer_logprob_delta for d in r.depths], mode="lines+markers",
                             name="Δ log p(baseline answer)", line=dict(color=LOGP_COLOR), hovertext=hover), row=3, col=1)
    fig.add_hline(y=0, line=dict(color="#999999", dash="dot"), annotation_text="baseline", row=3, col=1)
    if cliff is not None:
        for row in (1, 2, 3):
            fig.add_vline(x=cliff, line=dict(color=CLIFF_COLOR, dash="dash"), row=row, col=1)
        _mark(fig, cliff, _cliff_text(cliff, r.n_layers), CLIFF_COLOR, r.n_layers)
    legend_below(fig, y=-0.12)
    fig.update_yaxes(tickvals=[0, 1] if has_truth else [1], ticktext=["vs truth", "vs baseline"] if has_truth
                     else ["vs baseline"], range=[-0.5, 1.5], row=2, col=1)
    fig.update_xaxes(title_text="truncation depth k (image unused from decoder layer k on; L = baseline)", row=3, col=1,
                     tickvals=x, ticktext=[_depth_label(d, r.n_layers) for d in x])
    return fig


MODE_COLORS = {"drop": "#0072B2", "remove": "#56B4E9", "freeze": "#E69F00"}
MODE_DASH = {"drop": "solid", "remove": "dash", "freeze": "dot"}


def fig_sweep_modes(sweeps: dict, *, cliff=None, cliff_mode: str | None = None, freeze=None,
                    floor: float = NOISE_FLOOR, title: str | None = None) -> go.Figure:
    """Every mode's sweep of one run side by side (``sweeps``: mode -> result): output KL and the
    answer kept against depth, one colour per mode. ``cliff`` (read from the ``cliff_mode`` sweep: drop,
    else remove) and ``freeze`` ("frozen image states suffice") are the findings of
    :func:`vlmlens.findings.sweep_statements`, each marked as its own statement. One sweep alone is
    :func:`fig_truncation_sweep`."""
    res = {m: _truncation(r) for m, r in sweeps.items() if r is not None}
    res = {m: res[m] for m in sorted(res, key=lambda m: (list(MODE_COLORS).index(m) if m in MODE_COLORS else 9, m))}
    if not res:
        return empty_figure("no sweep for this run yet", title=title)
    if len(res) == 1:
        return fig_truncation_sweep(next(iter(res.values())), cliff=cliff, floor=floor, title=title)
    fz = freeze
    sub = " · ".join(t for t in [f"sweep cliff: {cliff.text}" if cliff else "no drop/remove sweep",
                                 f"frozen image states: {fz.text}" if fz else ""] if t)
    any_r = next(iter(res.values()))
    fig = new_figure(2, 1, shared_xaxes=True, height=620, titles=(
        "KL(baseline ‖ cut), summed over the generated tokens", "Answer kept (vs baseline), per mode"),
        title=title or f"Truncation sweeps ({', '.join(res)}) — {any_r.prompt}<br><sup>{html.escape(sub)}</sup>")
    fig.add_hrect(y0=0, y1=floor, fillcolor="#dddddd", opacity=0.5, line_width=0, row=1, col=1,
                  annotation_text=f"no change (< {floor:g})", annotation_position="top left")
    for m, r in res.items():
        x = [d.depth for d in r.depths]
        hover = [f"{m}, depth {d.depth}<br>{html.escape(d.text[:80])}" for d in r.depths]
        color = MODE_COLORS.get(m, "#555555")
        fig.add_trace(go.Scatter(x=x, y=[_akl(d) for d in r.depths], mode="lines+markers", name=f"{m}: output KL",
                                 line=dict(color=color, dash=MODE_DASH.get(m, "solid")), hovertext=hover),
                      row=1, col=1)
        kept = [bool(d.answer_kept) for d in r.depths]
        fig.add_trace(go.Scatter(x=x, y=[m] * len(x), mode="markers", name=f"{m}: answer kept",
                                 marker=dict(size=12, symbol=["circle" if k else "x" for k in kept],
                                             color=[KEPT_COLOR if k else LOST_COLOR for k in kept]),
                                 hovertext=hover, showlegend=False), row=2, col=1)
    marks = []
    L = any_r.n_layers
    if cliff is not None and cliff.value is not None:
        marks.append((cliff.value, _cliff_text(cliff.value, L, cliff_mode), CLIFF_COLOR))
    if fz is not None and fz.value is not None:
        marks.append((fz.value, f"freeze {fz.value}", MODE_COLORS["freeze"]))
    for i, (x0, text, color) in enumerate(marks):
        for row in (1, 2):
            fig.add_vline(x=x0, line=dict(color=color, dash="dash"), row=row, col=1)
        _mark(fig, x0, text, color, L, i)
    legend_below(fig, y=-0.14)
    xs = sorted({d.depth for r in res.values() for d in r.depths})
    fig.update_yaxes(categoryorder="array", categoryarray=list(res)[::-1], row=2, col=1)
    fig.update_xaxes(title_text="depth k (drop/remove: image unused from layer k on; freeze: image states frozen"
                     " from layer k on)", row=2, col=1, tickvals=xs, ticktext=[_depth_label(d, L) for d in xs])
    return fig


# ---- side by side -----------------------------------------------------------------------------------

def _kl_cell(v: float, floor: float = NOISE_FLOOR) -> str:
    return "no change" if v == v and v < floor else f"{v:.3g}"


def _correct_cell(c) -> str:
    return "" if c is None else ("✓" if c else "✗")


def _split(d) -> tuple[str, str]:
    """(same part, divergent part) of one depth's text."""
    if d.first_divergence is None:
        return d.text, ""
    c = d.divergence_char if d.divergence_char is not None else 0
    return d.text[:c], d.text[c:]


def side_by_side_html(result, *, mark: str = "mark") -> str:
    """An HTML table: depth, KL, answer kept, text with the divergent part in ``<mark>``."""
    r = _truncation(result)
    rows = [f"<tr><td>baseline</td><td></td><td></td><td>{_correct_cell(r.baseline_correct)}</td>"
            f"<td>{html.escape(r.baseline_text)}</td></tr>"]
    for d in r.depths:
        same, diff = _split(d)
        text = html.escape(same) + (f"<{mark}>{html.escape(diff) or '∅'}</{mark}>" if d.first_divergence is not None else "")
        rows.append(f"<tr><td>{_depth_label(d.depth, r.n_layers)}</td><td>{_kl_cell(_akl(d))}</td>"
                    f"<td>{'yes' if d.answer_kept else 'no'}</td><td>{_correct_cell(d.correct)}</td><td>{text}</td></tr>")
    head = ("<tr><th>depth</th><th>output KL</th><th>kept</th><th>correct</th>"
            "<th>generated text (divergence marked)</th></tr>")
    return f"<table class='vlmlens-side-by-side'>{head}{''.join(rows)}</table>"


def fig_side_by_side(result, *, title: str | None = None) -> go.Figure:
    """The side-by-side table as a figure; the text from the first divergent token is bold and coloured."""
    r = _truncation(result)
    cells = [["baseline"], [""], [""], [_correct_cell(r.baseline_correct)], [html.escape(r.baseline_text)]]
    for d in r.depths:
        same, diff = _split(d)
        text = html.escape(same)
        if d.first_divergence is not None:
            text += f"<b><span style='color:{LOST_COLOR}'>{html.escape(diff) or '∅'}</span></b>"
        cells[0].append(_depth_label(d.depth, r.n_layers))
        cells[1].append(_kl_cell(_akl(d)))
        cells[2].append("yes" if d.answer_kept else "no")
        cells[3].append(_correct_cell(d.correct))
        cells[4].append(text)
    # rows wrap: about 95 characters per line of the text column at the default width
    lines = sum(1 + len(t.replace("<b>", "")) // 95 for t in [r.baseline_text] + [d.text for d in r.depths])
    fig = new_figure(title=title or f"Generations by truncation depth ({r.mode})",
                     height=150 + 22 * lines + 10 * (len(r.depths) + 2))
    fig.add_trace(go.Table(columnwidth=[60, 70, 50, 55, 600],
                           header=dict(values=["depth", "output KL", "kept", "correct",
                                               "generated text (divergence marked)"],
                                       align="left", fill_color="#eeeeee"),
                           cells=dict(values=cells, align="left", height=28)))
    return fig


# ---- reasoning traces --------------------------------------------------------------------------------

def fig_reasoning_perturbation(perturbation, *, title: str | None = None) -> go.Figure:
    """Bars: normalised trace edit distance per depth; markers on top: final answer changed / kept.
    ``perturbation``: a TracePerturbation (``experiments.cliff.reasoning_perturbation`` of a sweep)."""
    p = perturbation
    if not hasattr(p, "trace_distance"):
        raise TypeError("give the TracePerturbation (experiments.cliff.reasoning_perturbation(result))")
    fig = new_figure(title=title or "Reasoning trace under truncation")
    fig.add_trace(go.Bar(x=p.depths, y=p.trace_distance, name="trace edit distance (normalised)",
                         marker_color=KL_COLOR))
    for changed, name, symbol, color in ((True, "final answer changed", "x", LOST_COLOR),
                                         (False, "final answer kept", "circle", KEPT_COLOR)):
        xs = [d for d, c in zip(p.depths, p.answer_changed) if c == changed]
        fig.add_trace(go.Scatter(x=xs, y=[1.08] * len(xs), mode="markers", name=name,
                                 marker=dict(size=12, symbol=symbol, color=color)))
    fig.update_yaxes(title_text="trace edit distance", range=[0, 1.15], tickvals=[0, 0.25, 0.5, 0.75, 1])
    fig.update_xaxes(title_text="truncation depth k", tickvals=p.depths)
    return fig


# ---- task study --------------------------------------------------------------------------------------

def fig_task_necessity(study, *, metric: str = "accuracy", title: str | None = None) -> go.Figure:
    """``metric`` against depth, one line per task family; dashed: token F1 (captions) and trace
    exactness (reasoning), the multi-token views."""
    d = study if isinstance(study, dict) else study.to_json()
    depths, rows = d["depths"], d["rows"]
    if not rows:
        return empty_figure("no study rows", title=title)
    fig = new_figure(title=title or f"Does the task need the image? ({d['model']}, n={d['n_per_family']}/family)")
    extra = {"caption": ("token_f1", "token F1"), "reasoning": ("exact_match", "trace exact")}
    for fam in d["families"]:
        by = {r["depth"]: r for r in rows if r["family"] == fam}
        color = FAMILY_COLORS.get(fam, "#666666")
        fig.add_trace(go.Scatter(x=depths, y=[by[k][metric] if k in by else None for k in depths], mode="lines+markers",
                                 name=f"{fam} {metric.replace('_', ' ')}", line=dict(color=color)))
        if metric == "accuracy" and fam in extra:
            key, label = extra[fam]
            fig.add_trace(go.Scatter(x=depths, y=[by[k][key] if k in by else None for k in depths], mode="lines+markers",
                                     name=f"{fam} {label}", line=dict(color=color, dash="dash")))
    fig.update_xaxes(title_text="truncation depth k (L = no truncation)", tickvals=depths)
    if metric not in ("first_token_kl", "output_kl"):
        fig.update_yaxes(title_text=metric.replace("_", " "), range=[0, 1.05], tickformat=".0%")
    return fig
