"""The encoder x decoder depth grid: which (m, k) keep the answer (colour: KL summed over the
output, log scale; text: kept / lost, and correct / wrong when a truth is known)."""
from __future__ import annotations

import numpy as np


def fig_encoder_grid(grid):
    import plotly.graph_objects as go

    kl = np.asarray(grid.output_kl, dtype=np.float64)
    z = np.log10(np.maximum(kl, 1e-4))
    text = [[("kept" if grid.kept[i][j] else "lost") + ("" if grid.correct is None else
                                                        (" ✓" if grid.correct[i][j] else " ✗"))
             for j in range(len(grid.decoder_depths))] for i in range(len(grid.encoder_depths))]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(k) for k in grid.decoder_depths], y=[str(m) for m in grid.encoder_depths], text=text,
        texttemplate="%{text}", colorscale="Viridis", colorbar=dict(title="log10 KL"),
        customdata=kl, hovertemplate="encoder layers %{y}, decoder cut at %{x}: KL %{customdata:.3g}, %{text}<extra></extra>"))
    fig.update_xaxes(title_text=f"decoder depth k (image cut from layer k on; {grid.n_layers} = none)", type="category")
    fig.update_yaxes(title_text=f"encoder depth m (vision layers run; {grid.feature_depth} = the model's own)",
                     type="category")
    fig.update_layout(title=f"{grid.model}: encoder x decoder depth · {grid.prompt!r} → {grid.baseline_text!r}",
                      height=120 + 40 * len(grid.encoder_depths), margin=dict(t=60, l=70, r=20, b=60))
    return fig


_PANELS = (("entropy_normalized", "entropy (normalised)"), ("id_twonn", "intrinsic dimension (TwoNN)"),
           ("cosine_distance", "cosine distance to the previous layer"), ("curvature", "curvature"))


def fig_encoder_decoder_dynamics(run, k: int = 20):
    """The image's geometry on one depth axis: the vision tower's layers (its patch states, from
    ``capture(..., record_vision=True)``), then the decoder's layers (the image tokens), with the
    boundary -- the projector -- marked. Each side's curves are computed on its own states
    (different widths; the metrics compare a layer with its own neighbours only)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..analysis.geometry import layer_curves
    from ._style import empty_figure

    if "vision_hidden_states" not in run.arrays:
        return empty_figure("this run holds no vision-tower states: capture it with record_vision=True")
    enc = layer_curves(np.asarray(run.arrays["vision_hidden_states"], np.float32), k=k, with_cka=False)
    img = np.isin(run.hidden_positions, run.spans.positions("image"))
    dec = layer_curves(np.asarray(run.hidden_states[:, img], np.float32), k=k, with_cka=False)
    V = len(enc["entropy"])                       # tower states 0..V-1
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in _PANELS], horizontal_spacing=0.08,
                        vertical_spacing=0.14)
    for i, (key, title) in enumerate(_PANELS):
        r, c = divmod(i, 2)
        e, d = np.asarray(enc[key]), np.asarray(dec[key])
        off_e = (V - len(e)) // 2 + (V - len(e)) % 2      # cosine: between layers; curvature: interior layers
        off_d = (len(dec["entropy"]) - len(d)) // 2 + (len(dec["entropy"]) - len(d)) % 2
        xe = np.arange(len(e)) + off_e
        xd = V + np.arange(len(d)) + off_d
        fig.add_trace(go.Scatter(x=xe, y=e, mode="lines+markers", name="vision tower (patches)", line=dict(color="#ff7f0e"),
                                 legendgroup="enc", showlegend=i == 0,
                                 hovertemplate="tower state %{x}: %{y:.3g}<extra></extra>"), row=r + 1, col=c + 1)
        fig.add_trace(go.Scatter(x=xd, y=d, mode="lines+markers", name="decoder (image tokens)", line=dict(color="#1f77b4"),
                                 legendgroup="dec", showlegend=i == 0,
                                 customdata=xd - V, hovertemplate="decoder h%{customdata}: %{y:.3g}<extra></extra>"),
                      row=r + 1, col=c + 1)
        fig.add_vline(x=V - 0.5, line=dict(color="#888", dash="dash"), row=r + 1, col=c + 1)
        if r == 1:                                   # one axis title per column, under the bottom row
            fig.update_xaxes(title_text="tower | decoder layer", row=r + 1, col=c + 1)
    fig.update_layout(title=f"The image across encoder and decoder depth — {run.meta.get('model')}<br><sup>x: the vision"
                            " tower's layers, then the decoder's; the dashed line is the projector between them</sup>",
                      height=700, margin=dict(t=90, l=60, r=20, b=60))
    return fig
