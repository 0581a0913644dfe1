"""Substitution / skipping tab: image states substituted across layers, decoder layers skipped."""
from __future__ import annotations

import gradio as gr

from .. import experiment_views
from ..handler import handler


class SubstitutionTab:
    @handler("substitution_view")
    def substitution_view(self, sess):
        entry = self.entry(sess)
        return experiment_views.experiment_figure(entry, "substitution"), experiment_views.experiment_figure(entry, "layer_skip")

    def _experiment(self, sess, key, progress):
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_experiment(lm, entry, key, progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return self.substitution_view(sess)

    @handler("substitution")
    def substitution(self, sess, progress=gr.Progress()):
        """Substitution matrix (layer j reads layer i's image states) on the current run."""
        return self._experiment(sess, "substitution", progress)

    @handler("layer_skip")
    def layer_skip(self, sess, progress=gr.Progress()):
        """Layer-skip scan (skip one layer for image / all tokens) on the current run."""
        return self._experiment(sess, "layer_skip", progress)
