"""Task-dependent necessity of the image: accuracy against truncation depth, per task family.

On the shapes world (``vlmlens.tiny``: exact ground truth), for ``n`` test-split examples of
each task family (``single``: one-word VQA, ``caption``: describe every object, ``reasoning``:
a short trace ending in ``answer: X``), run the truncation sweep (depths 0..L) and score every
depth's output against the ground truth with the shapes world's own scorers
(``vlmlens.tiny.eval``):

* ``accuracy``: single -> exact answer; caption -> exact caption; reasoning -> final answer;
* ``token_f1``: word-level F1 against the reference text (the caption metric);
* ``exact_match``: whole output equals the reference (reasoning: the trace is exact);
* ``answer_kept``: the output's answer equals the model's own untruncated answer;
* ``first_token_kl``: mean KL(baseline || truncated) of the first-token distribution (nats);
* ``output_kl``: mean KL(baseline || truncated) summed over the baseline's generated tokens
  (teacher-forced; see :mod:`vlmlens.experiments.engine`): the first token of a caption or a
  trace ("a", "the") rarely depends on the image, the rest does.

The question it answers (Ghosh et al.): single-token answers should survive early truncation,
multi-token outputs (captions, traces) should need the image for longer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..tables import Table, fixed, percent
from .engine import Progress, check_mode, truncation
from .variants import parse_variants

SUITES = ("shapes",)
CSV_COLUMNS = ("family", "depth", "n", "accuracy", "token_f1", "exact_match", "answer_kept", "first_token_kl",
               "output_kl")


@dataclass
class StudyResult:
    model: str
    suite: str
    mode: str
    n_layers: int
    n_per_family: int
    families: list[str]
    depths: list[int]
    rows: list[dict]                  # one per (family, depth), columns CSV_COLUMNS
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)   # per example: seed, prompt, reference, output per depth

    def to_json(self) -> dict:
        return asdict(self)

    def table(self, metric: str = "accuracy") -> dict:
        """{family: [metric per depth]} in depth order."""
        out = {f: [None] * len(self.depths) for f in self.families}
        for r in self.rows:
            out[r["family"]][self.depths.index(r["depth"])] = r[metric]
        return out

    def markdown(self, metric: str = "accuracy") -> str:
        """A family x depth table of ``metric`` (percent for rates)."""
        pct = metric not in ("first_token_kl", "output_kl")
        return Table.pivot(self.rows, row="family", col="depth", value=metric, row_keys=self.families,
                           col_keys=self.depths, corner="family", col_label=lambda d: f"k={d}",
                           fmt=percent if pct else fixed(3)).markdown()

    def csv(self) -> str:
        return Table(CSV_COLUMNS, self.rows).csv()


def suite_examples(suite: str, family: str, n: int, offset: int = 0):
    """Test-split examples of one task family (ground truth included)."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    from ..tiny.tasks import FAMILIES, split_examples

    if family not in FAMILIES:
        raise InputError(f"unknown task family {family!r}; expected one of {', '.join(FAMILIES)}")
    return split_examples(family, n, offset)


def suite_cells(lm, suite: str, families, n: int, offset: int, progress: Progress | None, trial_kwargs, variants,
                cell, on_example=None):
    """The suite's inputs x variants through the studies' one loop (:func:`.study_runner.run_inputs`):
    each family's ``n`` test examples (checked before any model work), family by family, one at a time;
    ``cell(trial, variant, example)`` for every pair, gathered as ``({family: [example]}, {family:
    {variant key: [cell per example]}})``; ``on_example(family, example, baseline text, {variant key:
    cell})`` sees each example's cells as they finish. Progress counts examples done."""
    from ..data import Item
    from .study_runner import Execution, run_inputs

    per_family = {f: suite_examples(suite, f, n, offset) for f in families}
    items, of = [], {}
    for f, exs in per_family.items():
        for e in exs:
            it = Item(f"{f} seed {e.seed}", len(items), e.scene.image, e.prompt, (e.answer,), task=f)
            items.append(it)
            of[it.id] = e
    exs = {f: [] for f in families}
    cells = {f: {v.key: [] for v in variants} for f in families}
    for chunk in run_inputs(lm, items, variants, lambda s, v, it, f: cell(s, v, of[it.id]),
                            tasks=[it.task for it in items], trial_kwargs=lambda it, f: trial_kwargs(f),
                            ex=Execution(), progress=progress, on_bad_row="raise", label=lambda it: it.id):
        for it, f, (got, baseline_text) in chunk:
            e = of[it.id]
            exs[f].append(e)
            for key, c in got.items():
                cells[f][key].append(c)
            if on_example:
                on_example(f, e, baseline_text, got)
    return exs, cells


def _metrics(family: str, examples, preds: list[str]) -> dict:
    from ..tiny.eval import score, token_f1

    s = score(family, examples, preds)
    acc = {"single": "accuracy", "caption": "exact_match", "reasoning": "final_answer_accuracy"}[family]
    exact = s["exact_match"] if family == "caption" else s.get("trace_exact_match", s.get("accuracy"))
    f1 = float(np.mean([token_f1(p, e.answer) for e, p in zip(examples, preds)])) if preds else float("nan")
    return {"accuracy": float(s[acc]), "token_f1": f1, "exact_match": float(exact)}


def task_study(lm, *, suite: str = "shapes", n: int = 100, families: Sequence[str] | None = None, mode: str = "drop",
               depths=None, offset: int = 0, max_new_tokens: dict | None = None, reuse: bool = True,
               progress: Progress | None = None) -> StudyResult:
    """Sweep truncation depth over ``n`` examples per task family and score against ground truth."""
    from ..tiny.eval import MAX_NEW_TOKENS
    from ..tiny.tasks import FAMILIES

    check_mode(mode)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer (examples per family), got {n!r}")
    fams = list(FAMILIES if families is None else families)
    plan = parse_variants(lm, depths=depths, mode=mode)
    budget = dict(MAX_NEW_TOKENS, **(max_new_tokens or {}))
    L = lm.n_layers  # the untruncated run doubles as depth L (a no-op truncation)
    details = []

    def note(f, e, baseline_text, got):
        details.append({"family": f, "seed": e.seed, "kind": e.kind, "prompt": e.prompt, "reference": e.answer,
                        "baseline": baseline_text, "outputs": {k: c["text"] for k, c in got.items()}})

    t0 = time.perf_counter()
    exs, cells = suite_cells(lm, suite, fams, n, offset, progress,
                             lambda f: {"max_new_tokens": budget[f], "reuse": reuse, "baseline": [truncation(L, mode)]},
                             plan.variants, lambda s, v, e: s.cell(v.interventions)[0], on_example=note)
    ks = plan.depths
    rows = []
    for f in fams:
        for k in ks:
            cs = cells[f][str(k)]
            rows.append({"family": f, "depth": k, "n": len(exs[f]), **_metrics(f, exs[f], [c["text"] for c in cs]),
                         "answer_kept": float(np.mean([c["answer_kept"] for c in cs])),
                         "first_token_kl": float(np.mean([c["first_token_kl"] for c in cs])),
                         "output_kl": float(np.mean([c["output_kl"] for c in cs]))})
    return StudyResult(lm.name, suite, mode, lm.n_layers, n, fams, ks, rows, round(time.perf_counter() - t0, 1), details)
