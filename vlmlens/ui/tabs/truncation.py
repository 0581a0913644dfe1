"""Truncation tab: the image cut at chosen depths or at every depth (a sweep), the
encoder x decoder grid."""
from __future__ import annotations

import gradio as gr

from ...experiments.engine import check_mode
from .. import experiment_views, panels
from ..handler import handler


class TruncationTab:
    @handler("truncation_view")
    def truncation_view(self, sess):
        entry = self.entry(sess)
        return (*experiment_views.truncation_views(entry), experiment_views.experiment_figure(entry, "encoder_grid"))

    @handler("encoder_grid")
    def encoder_grid(self, sess, progress=gr.Progress()):
        """Every (vision-tower depth m, decoder depth k) on the current run's input: answer kept or lost."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_experiment(lm, entry, "encoder_grid",
                                  progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return experiment_views.experiment_figure(entry, "encoder_grid")

    @handler("truncate")
    def truncate(self, sess, depths, mode, progress=gr.Progress()):
        """Truncation comparison at the chosen depths (or the full sweep) on the current run."""
        entry = self.entry(sess)
        ks, is_sweep = experiment_views.parse_depth_selection(depths, entry.run.n_layers)
        mode = mode or "drop"
        check_mode(mode)
        progress(0.02, desc="waiting for the model")

        def step(i, n, what):
            progress((i + 1) / (n + 1), desc=f"{what} ({i}/{n})")
        with self.holder.use() as lm:
            experiment_views.run_truncation(lm, entry, ks, mode, sweep=is_sweep, progress=step)
        gens, fig, pfig = experiment_views.truncation_views(entry)
        return gens, fig, pfig, experiment_views.experiment_figure(entry, "encoder_grid"), panels.headline_markdown(entry)

    @handler("sweep")
    def sweep(self, sess, mode, progress=gr.Progress()):
        """The truncation sweep over every depth 0..L (API shortcut for truncate(all))."""
        return self.truncate(sess, [experiment_views.SWEEP_CHOICE], mode, progress=progress)
