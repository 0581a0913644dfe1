"""Attention flow tab: where each layer reads the image, its heads, the knockout stages."""
from __future__ import annotations

import gradio as gr

from .. import experiment_views, panels, run_views
from ..handler import handler


class AttentionTab:
    @handler("attention")
    def attention(self, sess):
        """Attention tab: flow (stage bands: knockout when measured, else the cosine proxy), heads, stage table,
        and each head's map at the last decoder layer (the layer picker follows the run)."""
        entry = self.entry(sess)
        L = entry.run.n_layers
        return (*run_views.attention_figures(entry), gr.Dropdown(choices=list(range(L)), value=L - 1),
                run_views.head_maps_figure(entry, L - 1), run_views.frames_figure(entry))

    @handler("head_maps")
    def head_maps(self, sess, layer):
        """Each head's attention map over the image at one decoder layer (last prompt token)."""
        entry = self.entry(sess)
        return run_views.head_maps_figure(entry, panels.check_layer(entry, layer))

    @handler("find_stages")
    def find_stages(self, sess, progress=gr.Progress()):
        """The three stages from knockout windows (single layers, prefixes, suffixes) on the current run."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_stages(lm, entry, progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return (*run_views.attention_figures(entry), panels.headline_markdown(entry))
