"""Dynamics tab: how image and text representations evolve with depth, the token map."""
from __future__ import annotations

import gradio as gr

from ...errors import InputError
from .. import run_views
from ..handler import handler


class DynamicsTab:
    @handler("dynamics")
    def dynamics(self, sess, span):
        entry = self.entry(sess)
        dyn, cka, move = run_views.dynamics_figures(entry, span or "image")
        return move, dyn, cka, run_views.embedding_figure(entry, "pca"), run_views.encoder_decoder_figure(entry)

    @handler("token_map")
    def token_map(self, sess, method, progress=gr.Progress()):
        method = method or "pca"
        if method not in ("pca", "umap"):
            raise InputError(f"token map method must be 'pca' or 'umap', got {method!r}")
        progress(0.1, desc=f"{method.upper()} of the token states (the first UMAP call compiles, ~10 s)")
        return run_views.embedding_figure(self.entry(sess), method)
