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
