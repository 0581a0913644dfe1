"""Handlers of the dashboard's tabs (heatmaps, dynamics, attention, truncation, substitution,
compute): a mixin of :class:`vlmlens.ui.callbacks.Dashboard`, which provides ``entry``,
``holder``, ``lm_for``, ``timings`` and the prefetch pool."""
from __future__ import annotations

import gradio as gr

from ..errors import InputError
from ..experiments.engine import check_mode
from . import experiment_views, panels, run_views
from .handler import handler


class TabHandlers:
    def _cam_model(self, entry, kind):
        """For LLaVA-CAM of a run that does not hold it: compute it once, under the model lock,
        into the entry's cache. Returns None (views then read the stored / cached CAM)."""
        if kind != "LLaVA-CAM" or "llava_cam" in entry.run.arrays or entry.derived.peek("llava_cam") is not None:
            return None
        lm = self.lm_for(entry)
        if lm is not None:
            with self.holder.use() as lm:
                panels.safe(lambda: run_views.cam_array(entry, lm))
        return None

    @staticmethod
    def _check_layer(entry, layer) -> int:
        L = entry.run.n_layers
        try:
            layer = int(layer or 0)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"layer must be an integer 0..{L - 1}, got {layer!r}") from None
        if not 0 <= layer <= L - 1:
            raise InputError(f"layer {layer} is out of range: this run has decoder layers 0..{L - 1}")
        return layer

    def _check_view(self, entry, layer, query, kind) -> tuple[int, int, str]:
        layer = self._check_layer(entry, layer)
        nq = len(panels.query_choices(entry.run))
        try:
            q = int(query or 0)
            exact = float(query or 0) == q
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"token must be an index 0..{nq - 1}, got {query!r}") from None
        if not exact:                   # 1.5 is not a token (no silent rounding)
            raise InputError(f"token must be a whole index 0..{nq - 1}, got {query!r}")
        if not 0 <= q < nq:
            raise InputError(f"token {q} is out of range: 0 = last prompt token, 1..{nq - 1} = generated tokens")
        kind = kind or "attention"
        if kind not in run_views.HEATMAP_KINDS:
            raise InputError(f"map must be one of {', '.join(run_views.HEATMAP_KINDS)}, got {kind!r}")
        return layer, q, kind

    @handler("heatmaps")
    def heatmaps(self, sess, layer, query, kind):
        """Heatmaps tab: single-layer map, small multiples, logit lens, patch lens."""
        entry = self.entry(sess)
        layer, q, kind = self._check_view(entry, layer, query, kind)
        self._cam_model(entry, kind)
        single = run_views.heatmap_layer(entry, layer, q, kind)
        self._prefetch.submit(panels.safe, lambda: self._prefetch_layers(entry, q, kind))
        grid = run_views.heatmap_grid(entry, q, kind)
        ll, pl = run_views.logit_lens_figures(entry)
        return single, grid, ll, pl

    @handler("heatmap_layer")
    def heatmap_layer(self, sess, layer, query, kind):
        """One layer's heatmap, drawn from stored arrays (never runs the model)."""
        entry = self.entry(sess)
        return run_views.heatmap_layer(entry, *self._check_view(entry, layer, query, kind))

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
        return run_views.head_maps_figure(entry, self._check_layer(entry, layer))

    @handler("find_stages")
    def find_stages(self, sess, progress=gr.Progress()):
        """The three stages from knockout windows (single layers, prefixes, suffixes) on the current run."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            experiment_views.run_stages(lm, entry, progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return (*run_views.attention_figures(entry), panels.headline_markdown(entry))

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
        from ..experiments.methods import parse_methods

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
