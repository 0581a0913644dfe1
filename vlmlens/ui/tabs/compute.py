"""Compute tab: FLOP / KV-cache savings per depth, token-pruning methods compared, measured
latency."""
from __future__ import annotations

import gradio as gr

from ...errors import InputError
from .. import experiment_views, panels
from ..handler import handler


class ComputeTab:
    @handler("compute_view")
    def compute_view(self, sess):
        """Compute tab: FLOPs / KV / latency per depth, and the token-pruning comparison."""
        entry = self.entry(sess)
        return (experiment_views.experiment_figure(entry, "compute"), *self._pruning_outputs(entry, None))

    @staticmethod
    def _pruning_outputs(entry, method):
        names = experiment_views.pruning_methods(entry)
        pick = method if method in names else (names[0] if names else None)
        return (experiment_views.pruning_markdown(entry), gr.update(choices=names, value=pick),
                experiment_views.pruning_figure(entry, pick))

    @handler("prune_compare")
    def prune_compare(self, sess, methods, progress=gr.Progress()):
        """Token-pruning methods (FastV, PyramidDrop, VTW, baselines, adaptive) on the current run's input."""
        entry = self.entry(sess)
        from ...experiments.methods import parse_methods

        parse_methods(methods or "default", entry.run.n_layers, experiment_views.stage_labels(entry))   # fail before the queue
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_pruning(lm, entry, methods or "default",
                               progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return self._pruning_outputs(entry, None)

    @handler("prune_view")
    def prune_view(self, sess, method):
        """Which image tokens one method of the stored comparison keeps, per layer."""
        entry = self.entry(sess)
        names = experiment_views.pruning_methods(entry)
        if method and method not in names:
            raise InputError(f"no method {method!r} in this run's pruning comparison; pick one of {names}")
        return experiment_views.pruning_figure(entry, method)

    @handler("measure_compute")
    def measure_compute(self, sess, progress=gr.Progress()):
        """FLOPs / KV bytes per depth with measured prefill and decode latency (needs the model)."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_experiment(lm, entry, "compute", progress=lambda i, n, what: progress(0.5, desc=what))
        return experiment_views.experiment_figure(entry, "compute"), panels.headline_markdown(entry)
