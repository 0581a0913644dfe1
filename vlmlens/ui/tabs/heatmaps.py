"""Heatmaps tab: one layer's map (attention, LLaVA-CAM, ...), small multiples, logit and patch lens."""
from __future__ import annotations

import gradio as gr

from ...errors import InputError
from .. import experiment_views, panels, run_views
from ..handler import handler


class HeatmapsTab:
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

    def _check_view(self, entry, layer, query, kind) -> tuple[int, int, str]:
        layer = panels.check_layer(entry, layer)
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

    @handler("map_check")
    def map_check(self, sess, layer, query, kind, progress=gr.Progress()):
        """Check the map shown (attention or LLaVA-CAM at this layer) against causal effects: deletion and
        insertion curves against random orders (needs the run's model; the cuts are cached per run)."""
        entry = self.entry(sess)
        layer, q, kind = self._check_view(entry, layer, query, kind)
        if kind == "attention" and layer >= entry.run.attention_maps.shape[0]:
            raise InputError(f"no attention map at layer {layer}")
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            progress(0.1, desc="cutting image tokens in the map's order and in random orders")
            res = experiment_views.run_map_check(lm, entry, kind, layer, q)
        return experiment_views.map_check_outputs(entry, res["name"])

    @handler("patch_card")
    def patch_card(self, sess, patch, query):
        """One patch's numbers per layer (attention to it and its rank, LLaVA-CAM, what the patch lens reads),
        from the run's stored arrays; a half-typed cell says how to write one instead of failing."""
        from ...analysis.patches import parse_cell, patch_numbers

        entry = self.entry(sess)
        run = entry.run
        if not (patch or "").strip():
            return "_Click a cell of the heatmap (or write `row, col`) to see that patch's numbers layer by layer._"
        try:
            r, c = parse_cell(patch, run.image_grid)
            q = int(query or 0)
            pn = patch_numbers(run, r, c, q)
        except (InputError, ValueError) as e:
            return f"_{e}_"
        import html

        for row in pn.rows:          # tokens such as "</s>" are text here, not markup
            row["lens_token"] = None if row["lens_token"] is None else html.escape(row["lens_token"]) or "␣"
        return (f"**Patch ({r}, {c})** — image token {pn.token}, sequence position {pn.position}; attention of"
                f" {'the last prompt token' if q == 0 else f'generated token {q}'}; the patch lens reads the state"
                f" each layer receives.\n\n" + pn.table().markdown())
