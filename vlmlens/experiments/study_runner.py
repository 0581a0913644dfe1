"""Running a dataset study's items: one line per finished item, appended and fsync'd.

Two paths give the same lines (texts identical, KL within float noise; tested):

* one item at a time -- a :class:`Trial` per item, variants continued from its shared prefix;
* batched (``batch_size`` > 1) -- a :class:`BatchTrial` per ``batch_size`` items, every
  variant one batched generate + one batched teacher-forced forward; the lines of a batch are
  written when it finishes (a crash loses at most the batch in flight).

Variants that cannot batch (token-pruning methods, ``mode="remove"``) run one item at a time,
and a batch whose inputs cannot be stacked falls back item by item; :class:`Execution` says
what ran how, and why.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..interventions import batch_conflict
from ..metrics import TASKS, answer_of, item_score
from .batch import BatchError, BatchTrial, output_kl
from .engine import Trial, truncation

DATA_TASKS = TASKS
#: what one row can raise when it is run (its image, its text): recorded for that row, never the study's end
ROW_ERRORS = (ValueError, TypeError, UnicodeError, OSError, Image.DecompressionBombError, OverflowError, IndexError)


def row_failure(item, t, e: BaseException) -> dict:
    """The result line of a row that could not run: its row number and the reason (it counts as
    done, so a resumed study goes past it)."""
    reason = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
    return {"id": item.id, "row": item.row, "task": t, "failed": reason[:500]}


def item_task(item, task: str | None) -> str:
    t = item.task or task
    if t not in DATA_TASKS:
        raise InputError(f"row {item.row}: unknown task {t!r}; expected one of {', '.join(DATA_TASKS)} (set --task)")
    return t


@dataclass
class Execution:
    """How a rank ran its items: batch size asked, items run batched / one at a time, and why not batched."""

    batch_size: int = 1
    batched_items: int = 0
    single_items: int = 0
    reasons: list = field(default_factory=list)
    failed_rows: int = 0          # rows that could not run (recorded with their reason)

    def note(self, why: str) -> None:
        if why not in self.reasons:
            self.reasons.append(why)


def _cell(t, item, text, kept, kl, separator, vqa_normalization) -> dict:
    score = item_score(t, text, item.answers, item.choices, separator, vqa_normalization) if item.answers else None
    return {"text": text, "answer_kept": bool(kept), "output_kl": float(kl), "score": score}


def _record(item, t, baseline_text, kind, per) -> dict:
    return {"id": item.id, "row": item.row, "task": t, "prompt": item.prompt, "answers": list(item.answers),
            "baseline": baseline_text, kind: per}


def data_cell(s, v, item, t, *, shape, separator, vqa_normalization) -> dict:
    """A dataset study's cell of one variant on one item's trial: the output scored with the item's
    task metric; a pruning method's cell adds the compute its schedule saves."""
    from .method_cell import method_result

    if v.method is not None:
        r = method_result(s, shape, v, separator, None)
        return {**_cell(t, item, r.text, r.answer_kept, r.output_kl, separator, vqa_normalization),
                "image_rows": r.image_rows, "total_saving": r.savings["total_saving"],
                "kv_saving": r.savings["kv_saving"]}
    c = s.cell(v.interventions, separator=separator)[0]
    return _cell(t, item, c["text"], c["answer_kept"], c["output_kl"], separator, vqa_normalization)


def _batched(lm, items, tasks, *, variants, mode, max_new_tokens, separator,
             vqa_normalization) -> list[tuple[dict, str]]:
    bs = BatchTrial(lm, [(it.image, it.prompt) for it in items], max_new_tokens=max_new_tokens,
                      baseline=[truncation(lm.n_layers, mode)])
    base = bs.baseline
    pers = [{} for _ in items]
    for v in variants:
        key, var = v.key, (bs.evaluate(list(v.interventions)) if v.interventions else base)
        for b, (item, t) in enumerate(zip(items, tasks)):
            kept = answer_of(var.texts[b], separator) == answer_of(base.texts[b], separator)
            kl = output_kl(base.step_logprobs[b], var.step_logprobs[b], len(base.generated_ids[b]))
            pers[b][key] = _cell(t, item, var.texts[b], kept, kl, separator, vqa_normalization)
    return list(zip(pers, base.texts))


def run_inputs(lm, items, variants, cell, *, tasks, trial_kwargs, ex: Execution, batched=None, progress=None,
               on_bad_row: str = "skip", label=lambda it: f"item {it.id}"):
    """The one loop of every study: inputs x variants -> cells.

    For each chunk of ``items`` (``ex.batch_size`` at a time when ``batched`` is given, else one), yields
    ``[(item, task, result)]`` with ``result`` = ``({variant key: cell}, baseline text)``, or -- a row
    that could not run, ``on_bad_row="skip"`` -- its :func:`row_failure` dict. One at a time, each item
    is a :class:`Trial` (``trial_kwargs(item, task)``) and ``cell(trial, variant, item, task)`` makes each
    cell; ``batched(chunk, tasks)`` runs a chunk at once, falling back to one at a time on a
    :class:`BatchError` or a row that cannot run. ``on_bad_row``: "skip", "fail" (an InputError naming
    the row) or "raise" (the error itself: generated inputs, where a failure is a bug).
    ``progress(done, total, label(last item))`` after each chunk."""
    B = ex.batch_size if batched is not None else 1
    done = 0
    for start in range(0, len(items), B):
        chunk, ts = items[start:start + B], tasks[start:start + B]
        results = None
        if B > 1:
            try:
                results = batched(chunk, ts)
                ex.batched_items += len(chunk)
            except BatchError as e:
                ex.note(f"a batch ran one item at a time: {e}")
            except ROW_ERRORS:                   # a bad row in the batch: one at a time finds it
                ex.note("a batch with a row that could not run ran one item at a time")
        if results is None:
            results = []
            for it, t in zip(chunk, ts):
                try:
                    s = Trial(lm, it.image, it.prompt, **trial_kwargs(it, t))
                    results.append(({v.key: cell(s, v, it, t) for v in variants}, s.baseline.run.generated_text))
                except ROW_ERRORS as e:
                    if on_bad_row == "raise":
                        raise
                    bad = row_failure(it, t, e)
                    if on_bad_row == "fail":
                        raise InputError(f"row {it.row} (id {it.id!r}) could not run: {bad['failed']}"
                                         " (--on-bad-row skip records it and goes on)") from None
                    results.append(bad)
            ex.single_items += len(chunk)
        yield list(zip(chunk, ts, results))
        done += len(chunk)
        if progress:
            progress(done, len(items), label(chunk[-1]))


def run_items(lm, items, plan, *, task, max_new_tokens, separator, rank_file: Path, progress=None,
              batch_size: int = 1, vqa_normalization: str = "official", on_bad_row: str = "skip") -> Execution:
    """Run and append every item of this rank, every variant of ``plan`` (:func:`.variants.parse_variants`)
    on each (:func:`run_inputs`). In a pruning study (``plan.kind == "methods"``) each item runs the
    baseline and every method, and each cell adds the compute the method's schedule saves."""
    from ..analysis.compute import LayerShape

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    ex = Execution(batch_size)
    methods, mode, variants = plan.methods, plan.mode, plan.variants
    shape = LayerShape.from_model(lm) if methods else None
    kind = plan.kind
    batched = None
    if batch_size > 1:
        why = ("token-pruning methods rank tokens per example" if methods
               else batch_conflict([iv for v in variants for iv in v.interventions]))
        if why:
            ex.note(f"one item at a time: {why}")
        else:
            # items of one task together: a batch decodes until its longest output ends, so short
            # answers should not wait for captions (the merge puts items back in dataset order)
            items = sorted(items, key=lambda it: DATA_TASKS.index(item_task(it, task)))
            batched = lambda chunk, ts: _batched(lm, chunk, ts, variants=variants, mode=mode,  # noqa: E731
                                                 max_new_tokens=max_new_tokens, separator=separator,
                                                 vqa_normalization=vqa_normalization)
    tasks = [item_task(it, task) for it in items]
    cell = lambda s, v, it, t: data_cell(s, v, it, t, shape=shape, separator=separator,  # noqa: E731
                                         vqa_normalization=vqa_normalization)
    trial_kwargs = lambda it, t: {"max_new_tokens": max_new_tokens,  # noqa: E731
                                  "baseline": [truncation(lm.n_layers, mode)]}
    with open(rank_file, "a", encoding="utf-8") as f:
        for chunk in run_inputs(lm, items, variants, cell, tasks=tasks, trial_kwargs=trial_kwargs, ex=ex,
                                batched=batched, progress=progress, on_bad_row=on_bad_row):
            for item, t, res in chunk:
                if isinstance(res, dict):        # a row that could not run: recorded as such
                    ex.failed_rows += 1
                    f.write(json.dumps(res) + "\n")
                    continue
                per, base_text = res
                f.write(json.dumps(_record(item, t, base_text, kind, per)) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return ex
