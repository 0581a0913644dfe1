"""Studies on the user's own data: truncation depth x a dataset, resumable, sharded with torchrun.

For every item of a :class:`vlmlens.data.Dataset` and every depth, the image is cut from that
depth on (``mode``: drop / remove / freeze, as in the sweep) and the output is scored with the
item's task metric (:mod:`vlmlens.metrics`), next to whether the untruncated answer is kept and
the KL summed over the untruncated output (teacher-forced). The untruncated run is the depth-L
row.

Files in ``out`` (a study directory):

* ``config.json`` -- what the study is (model, dataset + its sha256, task, depths, mode, tokens):
  ``resume`` refuses a directory made with other arguments and names what differs;
* ``results.rank{R}.jsonl`` -- one line per finished item, appended and flushed as it finishes (a
  crash loses at most the item in flight; a torn last line is dropped on resume);
* ``results.jsonl``, ``study.json``, ``study.csv`` -- the merge (rank 0, after every rank is done):
  items in dataset order, and per task x depth the mean score with a bootstrap 95 % interval
  (1000 resamples, fixed seed), answer kept, output KL; captions add corpus CIDEr-D / BLEU-4.

Sharding: with ``world > 1`` (``torchrun``), the items not yet done are dealt out rank-strided
(``remaining[rank::world]``), each rank runs its own model replica, and rank 0 merges. The merge
is the same, item for item, whatever the number of ranks (tested with 2 CPU processes, gloo).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from ..data import Dataset
from ..errors import InputError
from ..metrics import VQA_NORMALIZATIONS, caption_scores
from ..run import RunFormatError
from ..run_files import read_json
from ..metrics import DEFAULT_SEPARATOR
from ..metrics import caption_tokenizer as resolve_caption_tokenizer
from ..tables import Table, fixed, percent, percent1
from .engine import Progress, check_mode
from .study_files import (CONFIG, StudyLock, _atomic_write, _clean_rank_file, _read_lines, check_out, done_items,
                          is_study_dir, job_id)
from .study_runner import DATA_TASKS, item_task, run_items  # noqa: F401  (DATA_TASKS: the CLI's)
from .variants import parse_variants

CSV_COLUMNS = ("task", "encoder_depth", "depth", "method", "n", "score", "ci_low", "ci_high", "answer_kept", "output_kl", "cider_d",
               "bleu_4", "total_saving", "kv_saving")
N_BOOTSTRAP = 1000


def study_config(lm, dataset: Dataset, *, task: str | None, depths: list[int], mode: str, max_new_tokens: int,
                 separator: str, methods: list[str] | None = None, encoder_depths: list[int] | None = None,
                 vqa_normalization: str = "official", caption_tokenizer: str | None = None) -> dict:
    cfg = {"kind": "vlmlens dataset study", "model": lm.name, "n_layers": lm.n_layers, "data": dataset.source,
           "data_sha256": dataset.fingerprint, "n_items": len(dataset), "task": task, "depths": depths, "mode": mode,
           "max_new_tokens": max_new_tokens, "separator": separator, "vqa_normalization": vqa_normalization}
    if caption_tokenizer:
        cfg["caption_tokenizer"] = caption_tokenizer
    if methods:
        cfg["methods"] = list(methods)
    if encoder_depths:
        cfg["encoder_depths"] = list(encoder_depths)
        cfg["feature_depth"] = lm.arch.vision_feature_depth(lm.model)
    return cfg


def variants(config: dict) -> list[tuple[str, dict]]:
    """(key of a row's cell, the row's identifying fields) of each variant a study compares:
    its depths, or -- a pruning study -- the untouched baseline and each method."""
    if config.get("methods"):
        return [(m, {"method": m, "depth": None}) for m in ["baseline", *config["methods"]]]
    if config.get("encoder_depths"):
        return [(f"{m},{d}", {"encoder_depth": m, "depth": d, "method": None})
                for m in config["encoder_depths"] for d in config["depths"]]
    return [(str(d), {"depth": d, "method": None}) for d in config["depths"]]


def _cells(rec: dict) -> dict:
    for key in ("methods", "grid"):
        if key in rec:
            return rec[key]
    return rec["depths"]


def _bootstrap(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(N_BOOTSTRAP, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class DatasetStudy:
    config: dict
    rows: list[dict]                  # one per (task, depth): CSV_COLUMNS
    n_items: int
    skipped: list[dict]
    caption_tokenizer: str | None
    seconds: float = 0.0
    vlmlens_version: str = __version__
    execution: dict | None = None     # this run's batching (rank 0): batch size, items batched / not, why
    failed: list = field(default_factory=list)   # rows that could not run: {"row", "id", "reason"}

    def to_json(self) -> dict:
        return asdict(self)

    def csv(self) -> str:
        return Table(CSV_COLUMNS, self.rows).csv()

    def _format(self, metric: str):
        """How a ``metric`` cell of task ``t`` reads: rates as percents, captions' score (CIDEr-D) as a number."""
        return lambda t: percent if metric == "answer_kept" or (metric == "score" and t != "caption") else fixed(3)

    def _task_label(self, metric: str):
        return lambda t: t + (" (CIDEr-D)" if t == "caption" and metric == "score" else "")

    def markdown(self, metric: str = "score") -> str:
        if self.config.get("methods"):
            return self._methods_markdown(metric)
        if self.config.get("encoder_depths"):
            return self._grid_markdown(metric)
        depths = self.config["depths"]
        return Table.pivot(self.rows, row="task", col="depth", value=metric, row_keys=sorted({r["task"] for r in self.rows}),
                           col_keys=depths, corner="task", row_label=self._task_label(metric),
                           col_label=lambda d: f"k={d}", fmt_for=self._format(metric)).markdown()

    def _grid_markdown(self, metric: str) -> str:
        """Per task, encoder depth m (rows) x decoder depth k (columns)."""
        depths, out = self.config["depths"], []
        for t in sorted({r["task"] for r in self.rows}):
            grid = Table.pivot(self.rows, row="encoder_depth", col="depth", value=metric,
                               row_keys=self.config["encoder_depths"], col_keys=depths, corner="m \\ k",
                               fmt=self._format(metric)(t), where=lambda r, t=t: r["task"] == t)
            out += [f"{t}:", grid.markdown(), ""]
        return "\n".join(out).rstrip()

    def _methods_markdown(self, metric: str) -> str:
        tasks = sorted({r["task"] for r in self.rows})
        from .methods import describe_method, parse_methods

        try:
            what = {k: describe_method(v) for k, v in parse_methods(",".join(self.config["methods"]),
                                                                    self.config["n_layers"]).items()}
        except InputError:               # e.g. stages:R, which needs each input's stages
            what = {}
        what["baseline"] = "no pruning"
        fmt = self._format(metric)
        t = Table(["method", "keeps", *tasks, "saving"],
                  headers=["method", "what it keeps", *map(self._task_label(metric), tasks), "decoder FLOPs saved"],
                  formats={"saving": percent1, **{task: fmt(task) for task in tasks}})
        for m in ["baseline", *self.config["methods"]]:
            rs = {r["task"]: r for r in self.rows if r["method"] == m}
            t.add({"method": m, "keeps": what.get(m, "—"), **{task: rs[task].get(metric) for task in tasks},
                   "saving": float(np.mean([r.get("total_saving", 0.0) for r in rs.values()]))})
        return t.markdown()

    def as_pruning_study(self):
        """The method rows in the form of :class:`vlmlens.experiments.pruning.PruningStudy` (for its
        Pareto figure; captions, scored with CIDEr-D, are left out of that figure's % axis)."""
        from .pruning import PruningStudy

        rows = [{"family": r["task"], "method": r["method"], "accuracy": r["score"] or 0.0,
                 "answer_kept": r["answer_kept"], "total_saving": r.get("total_saving", 0.0),
                 "kv_saving": r.get("kv_saving", 0.0), "mean_depth": float("nan")}
                for r in self.rows if r["method"] and r["task"] != "caption"]
        tasks = sorted({r["family"] for r in rows})
        return PruningStudy(self.config["model"], self.config["data"], self.config["n_layers"], self.n_items, tasks,
                            ["baseline", *self.config["methods"]], rows)


def merge(out: Path, dataset: Dataset, config: dict, seconds: float = 0.0, execution: dict | None = None) -> DatasetStudy:
    """The study from the rank files: results.jsonl in dataset order, study.json, study.csv."""
    got = done_items(out)
    order = [it.id for it in dataset.items if it.id in got]
    failed = [{"row": got[i]["row"], "id": i, "reason": got[i]["failed"]} for i in order if "failed" in got[i]]
    records = [got[i] for i in order if "failed" not in got[i]]
    _atomic_write(out / "results.jsonl", "".join(json.dumps(d) + "\n" for d in records))
    rows, tok = [], None
    for t in sorted({r["task"] for r in records}):
        recs = [r for r in records if r["task"] == t]
        for key, ident in variants(config):
            cells = [_cells(r)[key] for r in recs]
            row = {"task": t, **ident, "n": len(recs),
                   "answer_kept": float(np.mean([c["answer_kept"] for c in cells])),
                   "output_kl": float(np.mean([c["output_kl"] for c in cells])), "score": None, "ci_low": None,
                   "ci_high": None, "cider_d": None, "bleu_4": None}
            if "total_saving" in cells[0]:
                row["total_saving"] = float(np.mean([c["total_saving"] for c in cells]))
                row["kv_saving"] = float(np.mean([c["kv_saving"] for c in cells]))
            if t == "caption":
                scored = [r for r in recs if r["answers"]]
                if scored:
                    cs = caption_scores({r["id"]: _cells(r)[key]["text"] for r in scored},
                                        {r["id"]: r["answers"] for r in scored},
                                        tokenizer=config.get("caption_tokenizer", "auto"))
                    tok = cs["tokenizer"]
                    per = np.array([cs["per_item"][r["id"]] for r in scored])
                    row.update(score=cs["cider_d"], cider_d=cs["cider_d"], bleu_4=cs["bleu_4"])
                    row["ci_low"], row["ci_high"] = _bootstrap(per)
            else:
                vals = np.array([c["score"] for c in cells if c["score"] is not None], dtype=np.float64)
                if len(vals):
                    row["score"] = float(vals.mean())
                    row["ci_low"], row["ci_high"] = _bootstrap(vals)
            rows.append(row)
    res = DatasetStudy(config, rows, len(records), dataset.skipped, tok, round(seconds, 1), execution=execution,
                       failed=failed)
    _atomic_write(out / "study.json", json.dumps(res.to_json(), indent=1))
    _atomic_write(out / "study.csv", res.csv())
    return res


def dataset_study(lm, dataset: Dataset, out, *, task: str | None = None, depths=None, mode: str = "drop",
                  max_new_tokens: int = 16, separator: str = DEFAULT_SEPARATOR, resume: bool = False,
                  rank: int = 0, world: int = 1, barrier=None, progress: Progress | None = None,
                  methods: str | None = None, encoder_depths=None, batch_size: int = 1,
                  vqa_normalization: str = "official", caption_tokenizer: str = "auto", job: str | None = None,
                  log=None, on_bad_row: str = "skip") -> DatasetStudy | None:
    """Run (or continue) the study in ``out``; rank 0 returns the merged result, others None.

    ``methods`` (token pruning, written as for ``python -m vlmlens prune --methods``) makes it a
    pruning study: the baseline and each method per row, with the decoder FLOPs and KV bytes each
    saves, instead of the depths. ``encoder_depths`` (vision-tower layers run, 0..F) makes it a
    grid: every (encoder depth m, decoder depth k) per row. ``batch_size`` items run per forward
    (the same result as one at a time; what cannot batch runs one at a time, and the result's
    ``execution`` says why).

    ``barrier`` (torch.distributed.barrier under torchrun) is called where every rank must
    have arrived: after the directory is ready, and before the merge.

    The directory is owned by this call (or torchrun job, ``job``) while it runs: a study already
    running there is refused with its holder named; a lock left by a process that is gone is
    taken over and ``log`` (default: stderr) says so (:class:`.study_files.StudyLock`).
    """
    check_mode(mode)
    if vqa_normalization not in VQA_NORMALIZATIONS:
        raise InputError(f"unknown VQA normalization {vqa_normalization!r}; expected one of"
                         f" {', '.join(VQA_NORMALIZATIONS)} (official: as the VQA evaluation scores)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if task is not None and task not in DATA_TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(DATA_TASKS)}")
    tasks = {item_task(it, task) for it in dataset.items}
    # captions are scored at the merge: a missing Java runtime is refused now, not after the run
    cap_tok = resolve_caption_tokenizer(caption_tokenizer) if "caption" in tasks else None
    plan = parse_variants(lm, depths=depths, mode=mode, encoder_depths=encoder_depths, methods=methods or None,
                          include_full=True)   # the untruncated row is always there
    if dataset.items and any(getattr(iv, "transforms_input", False) for v in plan.variants for iv in v.interventions):
        from .downsample import downsample_to      # a model whose processor fixes the size: said once, up front

        downsample_to(lm, dataset.items[0].image, dataset.items[0].prompt, 0.5)
    out = Path(out)
    config = study_config(lm, dataset, task=task, depths=plan.depths, mode=mode, max_new_tokens=max_new_tokens,
                          separator=separator, methods=plan.method_names, encoder_depths=plan.encoder_depths,
                          vqa_normalization=vqa_normalization, caption_tokenizer=cap_tok)
    wait = barrier or (lambda: None)
    lock = StudyLock(out, job or job_id(world))
    lock.check()                         # one process (or torchrun job) per study directory: said first
    check_out(out, config, resume)       # every rank, before anyone writes: all refuse alike
    wait()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        note = lock.acquire()
        if note:
            (log or _stderr)(note)
    try:
        if rank == 0 and not resume:
            _atomic_write(out / CONFIG, json.dumps(config, indent=1))
        wait()
        lock.check()                     # every rank: the lock is this job's (no other start slipped in)
        t0 = time.perf_counter()
        rank_file = out / f"results.rank{rank}.jsonl"
        _clean_rank_file(rank_file)
        done = done_items(out)
        wait()                           # every rank has read what is done before anyone appends
        remaining = [it for it in dataset.items if it.id not in done]
        ex = run_items(lm, remaining[rank::world], plan, task=task, max_new_tokens=max_new_tokens,
                       separator=separator, rank_file=rank_file, progress=progress, batch_size=batch_size,
                       vqa_normalization=vqa_normalization, on_bad_row=on_bad_row)
        wait()
        if rank != 0:
            return None
        return merge(out, dataset, config, time.perf_counter() - t0, asdict(ex))
    finally:
        lock.release()


def _stderr(msg: str) -> None:
    import sys

    print(f"note: {msg}", file=sys.stderr)


def load_study(path):
    """A study directory's merged result (a DatasetStudy) and its per-row records (bounded reads;
    InputError when the directory is not a readable study)."""
    p = Path(path)
    if not is_study_dir(p):
        raise InputError(f"{p} is not a study directory (study.json and {CONFIG} expected)")
    try:
        d = read_json(p / "study.json", f"{p.name}/study.json")
        res = DatasetStudy(**d)
    except (RunFormatError, TypeError) as e:
        raise InputError(f"{p.name}/study.json is not a vlmlens study ({e})") from None
    return res, _read_lines(p / "results.jsonl")
