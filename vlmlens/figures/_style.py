"""Shared look of every vlmlens figure: span colours and symbols, and a figure factory.

Colours are the Okabe-Ito colour-blind-safe palette, so a span has the same colour in
every figure (curves, scatter plots, token strips, legends).
"""
from __future__ import annotations

import plotly.graph_objects as go

SPAN_COLORS = {
    "system": "#999999",      # grey
    "image": "#0072B2",       # blue
    "text": "#D55E00",        # vermillion
    "generated": "#009E73",   # bluish green
    "other": "#CC79A7",       # reddish purple: separators between image blocks
}
SPAN_SYMBOLS = {
    "system": "square",
    "image": "circle",
    "text": "diamond",
    "generated": "star",
    "other": "x",
}
SPAN_ORDER = ("system", "image", "text", "generated", "other")
LAYER_COLORSCALE = "Viridis"          # continuous scale for "layer" colouring
SEQUENTIAL_COLORSCALE = "Viridis"     # similarity / attention heatmaps in [0, 1]
OTHER_DASH = "dash"                   # line style of the overlaid second run
STAB_DASH = "dot"                     # stabilisation markers
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)


def span_color(span: str) -> str:
    """Colour of a span name (grey-purple for unknown names)."""
    return SPAN_COLORS.get(span, SPAN_COLORS["other"])


def span_symbol(span: str) -> str:
    return SPAN_SYMBOLS.get(span, SPAN_SYMBOLS["other"])


def new_figure(rows: int = 1, cols: int = 1, *, titles=None, title: str | None = None,
               height: int | None = None, width: int | None = None, **subplot_kw) -> go.Figure:
    """An empty figure in the vlmlens style: a grid of subplots when rows*cols > 1.

    Args:
        titles: subplot titles (row-major).
        title: figure title.
        height/width: pixels (height defaults to 320 per row + 80).
        subplot_kw: passed to ``plotly.subplots.make_subplots`` (shared_xaxes, ...).
    """
    if rows * cols > 1 or titles:
        from plotly.subplots import make_subplots

        subplot_kw.setdefault("horizontal_spacing", 0.1)
        subplot_kw.setdefault("vertical_spacing", 0.14 if rows > 1 else 0.1)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles) if titles else None, **subplot_kw)
    else:
        fig = go.Figure()
    apply_style(fig, title=title, height=height or (320 * rows + 80), width=width)
    return fig


def apply_style(fig: go.Figure, *, title: str | None = None, height: int | None = None,
                width: int | None = None) -> go.Figure:
    """Apply the common layout (template, font, margins, legend) to ``fig`` in place."""
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        margin=dict(l=60, r=30, t=90 if title else 50, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0, title_text=""),
        hovermode="closest",
        hoverlabel=dict(namelength=-1),
    )
    if title:
        fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"))
    if height:
        fig.update_layout(height=height)
    if width:
        fig.update_layout(width=width)
    return fig


def legend_below(fig: go.Figure, *, y: float = -0.1) -> go.Figure:
    """Move the legend under the plot area (for figures whose top holds titles)."""
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=y, xanchor="left", x=0))
    return fig


def empty_figure(message: str, *, title: str | None = None, height: int = 300) -> go.Figure:
    """A figure that says why there is nothing to show (instead of raising in the UI)."""
    fig = new_figure(title=title, height=height)
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color="#666666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


INJECTION_COLOR = "#9467bd"            # layers where a family adds vision features (DeepStack)


def mark_injections(fig: go.Figure, run, *, shift: int, subplots: bool = False) -> go.Figure:
    """Shade the layers where the model added vision features to the image rows (Qwen3-VL's
    DeepStack; ``run.meta["injection_layers"]``, the decoder layers whose output received them,
    without those an intervention stopped). ``shift``: the x of decoder layer ``l``'s output on
    this figure's axis minus ``l`` (1 where x is a hidden state h_l, the input of layer l; 0 where
    x is the layer itself)."""
    stopped = set(run.meta.get("injections_stopped") or ())
    layers = [l for l in run.meta.get("injection_layers") or () if l not in stopped]
    where = dict(row="all", col="all") if subplots else {}
    for i, l in enumerate(layers):
        fig.add_vrect(x0=l + shift - 0.45, x1=l + shift + 0.45, fillcolor=INJECTION_COLOR, opacity=0.12,
                      line_width=0, layer="below", **where,
                      annotation_text="vision features added (DeepStack)" if i == 0 else None,
                      annotation_position="bottom left", annotation_font=dict(size=10, color=INJECTION_COLOR))
    return fig
