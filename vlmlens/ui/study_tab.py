"""The Study tab: open a finished dataset study (no model needed) -- its table, its figure,
and any row's outputs at every depth. Only studies under the folder the app was started with
(``--study``) can be opened; the tab never reads a path typed in the browser."""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from ..errors import InputError
from ..experiments.study_files import list_studies, load_study
from ..figures.study import fig_dataset_study
from .handler import handler
from .html import note
from .panels import figure, message_figure


class StudyTab:
    """A mixin of the Dashboard; ``self.studies_root`` is the folder given with ``--study`` (or None)."""

    def study_names(self) -> list[str]:
        root = getattr(self, "studies_root", None)
        return [p.name for p in list_studies(root)] if root else []

    def _study_path(self, name) -> Path:
        names = self.study_names()
        if not names:
            raise InputError("no studies to open: start the app with --study DIR (a study directory, or a folder of them)")
        if name not in names:
            raise InputError(f"unknown study {name!r}; pick one of {names}")
        return next(p for p in list_studies(self.studies_root) if p.name == name)

    @handler("study_list")
    def study_list(self):
        names = self.study_names()
        return gr.update(choices=names, value=names[0] if names else None)

    @handler("study_open")
    def study_open(self, name):
        """A study's score table (with 95 % intervals), its figure, and the rows to look at."""
        study, records = load_study(self._study_path(name))
        cfg = study.config
        lines = [f"**{html.escape(str(cfg['model']))}** on `{html.escape(str(cfg['data']))}` · {study.n_items} rows"
                 f" ({len(study.skipped)} skipped) · depths {cfg['depths']} · mode {cfg['mode']}"
                 + (f" · caption tokenizer: {study.caption_tokenizer}" if study.caption_tokenizer else ""),
                 "", "| task | depth / method | n | score [95 % CI] | answer kept | output KL | FLOPs saved |",
                 "|---|---|---|---|---|---|---|"]
        for r in study.rows:
            if r["score"] is None:
                sc = "–"
            elif r["task"] == "caption":
                sc = f"CIDEr-D {r['score']:.3f}" + ("" if r["ci_low"] is None else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            else:
                sc = f"{100 * r['score']:.1f}%" + ("" if r["ci_low"] is None or r["ci_low"] != r["ci_low"]
                                                   else f" [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]")
            what = r["depth"] if r.get("method") is None else html.escape(str(r["method"]))
            if r.get("encoder_depth") is not None:
                what = f"encoder {r['encoder_depth']}, decoder {r['depth']}"
            sav = "–" if r.get("total_saving") is None else f"{100 * r['total_saving']:.1f}%"
            lines.append(f"| {r['task']} | {what} | {r['n']} | {sc} | {100 * r['answer_kept']:.0f}% |"
                         f" {r['output_kl']:.3f} | {sav} |")
        ids = [str(r["id"]) for r in records]
        first = ids[0] if ids else None
        return ("\n".join(lines), figure(fig_dataset_study, study, title="Study"),
                gr.update(choices=ids, value=first), self._item_html(records, first))

    @handler("study_item")
    def study_item(self, name, item_id):
        """One row of a study: its prompt, references and output at every depth."""
        _, records = load_study(self._study_path(name))
        if item_id not in {str(r["id"]) for r in records}:
            raise InputError(f"no row {item_id!r} in study {name!r}")
        return self._item_html(records, item_id)

    @staticmethod
    def _item_html(records, item_id) -> str:
        rec = next((r for r in records if str(r["id"]) == str(item_id)), None)
        if rec is None:
            return note("This study has no rows yet.")
        e = html.escape
        cells = []
        cells_of = rec.get("methods") or rec.get("grid") or rec["depths"]
        items = sorted(cells_of.items(), key=lambda kv: int(kv[0])) if "depths" in rec else cells_of.items()
        for k, v in items:
            score = "–" if v["score"] is None else f"{v['score']:.2f}"
            kept = "yes" if v["answer_kept"] else "<b>no</b>"
            cells.append(f"<tr><td>{e(k)}</td><td>{e(v['text'])}</td><td>{score}</td><td>{kept}</td>"
                         f"<td>{v['output_kl']:.3f}</td></tr>")
        rows = "".join(cells)
        return (f"<p><b>{e(str(rec['id']))}</b> ({e(rec['task'])}) · {e(rec['prompt'])} · reference:"
                f" <code>{e(' | '.join(rec['answers']))}</code></p><table class='vl-gens'><tr>"
                f"<th>{'method' if 'methods' in rec else ('encoder, decoder depth' if 'grid' in rec else 'depth')}</th>"
                f"<th>output</th>"
                f"<th>score</th><th>answer kept</th><th>output KL</th></tr>{rows}</table>")


def study_message_figure():
    return message_figure("Open a study (start the app with --study DIR).", "Study")
