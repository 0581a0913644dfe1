"""The Study tab: open a finished dataset study (no model needed) -- its table, its figure,
and any row's outputs at every depth -- or run a small one on the loaded model. Only studies
under the folder the app was started with (``--study``, default ``studies/``) are opened or
written, and only datasets under ``--datasets`` (default: the shipped ones) are read; the tab
never reads a path typed in the browser.

A study run from the tab is bounded: at most ``MAX_STUDY_ROWS`` rows, and it stops cleanly at
the dashboard's study time limit. Rows are written as they finish (the study engine's files),
so running it again under the same name continues it."""
from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr

from ...errors import InputError
from ...experiments.dataset_study import load_study
from ...experiments.study_files import CONFIG, is_study_dir, list_studies
from ...figures.study import fig_dataset_study
from ...models.loading import REPO_ROOT
from ...tables import Table, fixed, percent, percent1
from ..exports import safe_stem
from ..handler import handler
from ..markup import note
from ..panels import figure
from ..store import check_run_name

MAX_STUDY_ROWS = 200
DATASETS_DIR = REPO_ROOT / "assets" / "datasets"
DATASET_FILES = ("manifest.jsonl", "metadata.jsonl", "manifest.csv", "dataset_info.json")


class StudyStopped(InputError):
    """The study reached the time limit of one request (its finished rows are kept)."""


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

    def dataset_names(self) -> list[str]:
        """Datasets the tab may run: the folders right under ``--datasets`` that hold a manifest."""
        root = getattr(self, "datasets_root", None)
        if root is None or not Path(root).is_dir():
            return []
        return sorted(p.name for p in Path(root).iterdir()
                      if p.is_dir() and not p.is_symlink() and any((p / f).is_file() for f in DATASET_FILES))

    def default_dataset(self) -> str | None:
        """The shapes world's example dataset when it is there (what the built-in models know), else the first."""
        names = self.dataset_names()
        return "shapes-mini" if "shapes-mini" in names else (names[0] if names else None)

    @handler("study_run")
    def study_run(self, dataset, rows, depths, batch_size, max_new_tokens, name, progress=gr.Progress()):
        """Run a truncation study of the loaded model on the first ``rows`` rows of a dataset into
        ``--study``/``name`` (continued when that study exists with the same settings); returns
        the opened study, like Open."""
        from ...data import load_dataset
        from ...experiments.dataset_study import dataset_study

        if dataset not in self.dataset_names():
            raise InputError(f"unknown dataset {dataset!r}; pick one of {self.dataset_names()}")
        name = check_run_name(name)
        rows, batch_size, max_new_tokens = (_whole(rows, "rows", 1, MAX_STUDY_ROWS), _whole(batch_size, "batch size", 1, 32),
                                            _whole(max_new_tokens, "max new tokens", 1, 64))
        root = getattr(self, "studies_root", None)
        if root is None:
            raise InputError("no folder to write studies to: start the app with --study DIR")
        if is_study_dir(root):
            raise InputError(f"--study {root} is itself one study; start the app with a folder of studies to run new ones")
        limit = self.study_time_limit
        t0 = time.monotonic()                # reading the rows counts toward the request's time limit
        data = load_dataset(Path(self.datasets_root) / dataset, limit=rows)   # only the rows it runs are read
        out = Path(root) / name

        def tick(done, total, what):
            progress(done / max(total, 1), desc=f"{done}/{total} rows ({what})")
            if limit is not None and time.monotonic() - t0 > limit and done < total:
                raise StudyStopped(f"the study stopped at the {limit:.0f} s time limit of one request after {done} of"
                                   f" {total} rows; the rows done are kept: Run again with the name {name!r} to continue")

        progress(0.0, desc="waiting for the model")
        with self.holder.use() as lm:
            dataset_study(lm, data, out, depths=(depths or "").strip() or None, max_new_tokens=max_new_tokens,
                          resume=(out / CONFIG).is_file(), progress=tick, batch_size=batch_size)
        names = self.study_names()
        return (gr.update(choices=names, value=name), *self.study_open(name))

    @handler("study_open")
    def study_open(self, name):
        """A study's score table (with 95 % intervals), its figure, the rows to look at, and its study.csv."""
        study, records = load_study(self._study_path(name))
        cfg = study.config
        head = (f"**{html.escape(str(cfg['model']))}** on `{html.escape(str(cfg['data']))}` · {study.n_items} rows"
                f" ({len(study.skipped)} skipped) · depths {cfg['depths']} · mode {cfg['mode']}"
                + (f" · caption tokenizer: {study.caption_tokenizer}" if study.caption_tokenizer else ""))
        table = Table(["task", "what", "n", "score", "kept", "kl", "saving"],
                      headers=["task", "depth / method", "n", "score [95 % CI]", "answer kept", "output KL",
                               "FLOPs saved"], formats={"kept": percent, "kl": fixed(3), "saving": percent1})
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
            table.add([r["task"], what, r["n"], sc, r["answer_kept"], r["output_kl"], r.get("total_saving")])
        ids = [str(r["id"]) for r in records]
        first = ids[0] if ids else None
        csv_file = self.export_dirs.new() / f"{safe_stem(name)}-study.csv"
        csv_file.write_text(study.csv())
        return (head + "\n\n" + table.markdown(), figure(fig_dataset_study, study, title="Study"),
                gr.update(choices=ids, value=first), self._item_html(records, first), str(csv_file))

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


def _whole(v, what: str, lo: int, hi: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number from {lo} to {hi}, got {v!r}") from None
    if not f.is_integer() or not lo <= f <= hi:
        raise InputError(f"{what} must be a whole number from {lo} to {hi}, got {v!r}")
    return int(f)
