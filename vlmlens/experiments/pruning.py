"""Token pruning compared: methods x budgets on one input or over the shapes suite.

Every method is a list of interventions (``vlmlens.interventions.pruning``) evaluated in one
:class:`~vlmlens.experiments.engine.Session`, so all of them run under the same lens against
the same baseline. Per method:

* what it did to the output: ``answer_kept``, ``output_kl`` (summed over the baseline's
  generated tokens, teacher-forced), and ``correct`` against a ground truth when one is given;
* which image tokens it kept per layer (``image_kept`` [L, n_image], drawn over the image) and
  how many image rows each layer processed (``image_rows`` [L]: the compute schedule);
* the decoder FLOPs and KV bytes that schedule saves (:func:`vlmlens.analysis.compute.
  schedule_savings`; masks save nothing, only removed rows do).

:func:`find_vtw_layer` calibrates VTW's K (the first layer whose withdrawal keeps the mean
KL <= eta on calibration examples); :func:`pruning_study` runs methods over the shapes suite's
test split per task family; :func:`adaptive_vs_fixed` compares an adaptive-depth method with
the fixed depths at the same average compute.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..analysis.compute import LayerShape
from ..errors import InputError
from ..interventions import VTW, StagePruner
from ..metrics import DEFAULT_SEPARATOR
from ..tables import Table, fixed, percent, percent1
from ..vocabulary import VTW_ETA
from .engine import Progress, Trial, answer_scores
from .method_cell import MethodResult, method_result, time_note
from .methods import default_methods
from .variants import parse_variants

STUDY_COLUMNS = ("family", "method", "n", "accuracy", "token_f1", "answer_kept", "output_kl", "total_saving",
                 "prefill_saving", "decode_saving", "kv_saving", "image_rows", "mean_depth")


@dataclass
class PruningComparison:
    model: str
    prompt: str
    baseline_text: str
    n_layers: int
    n_image: int
    truth: str | None
    methods: list[MethodResult]
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def markdown(self) -> str:
        timed = any(m.latency for m in self.methods)
        cols = ["method", "keeps", "output", "kept", "output_kl", "total_saving", "kv_saving"]
        heads = ["method", "what it keeps", "output", "answer kept", "output KL", "decoder FLOPs saved", "KV saved"]
        if timed:
            cols += ["prefill_time", "total_time", "weighted"]
            heads += ["prefill time saved (measured)", "end-to-end time saved (measured)",
                      "FLOPs saved, each phase weighted by its measured time"]
        t = Table(cols, headers=heads, formats={"output_kl": fixed(3), "total_saving": percent1, "kv_saving": percent1,
                                                "prefill_time": percent1, "total_time": percent1, "weighted": percent1})
        for m in self.methods:
            ok = "yes" if m.answer_kept else "**no**"
            if m.correct is not None:
                ok += " (correct)" if m.correct else " (wrong)"
            row = [m.name, m.description or "—", m.text[:60], ok, m.output_kl, m.savings["total_saving"],
                   m.savings["kv_saving"]]
            lat = m.latency or {}
            t.add(row + ([lat.get("prefill_saving"), lat.get("total_saving"), lat.get("time_weighted_saving")]
                         if timed else []))
        notes = [time_note(m) for m in self.methods if m.latency]
        return t.markdown() + "".join(f"\n\n{n}" for n in notes if n)


def compare_pruning(lm, image, prompt: str, methods: dict | None = None, *, max_new_tokens: int = 16,
                    truth: str | None = None, separator: str = DEFAULT_SEPARATOR, latency: bool = False,
                    repeats: int = 3, progress: Progress | None = None) -> PruningComparison:
    """Every method on one input, next to the untouched baseline (:func:`default_methods` if none).
    ``latency``: also each method's measured prefill and end-to-end time (plain generation of
    ``max_new_tokens`` through the lens, no recording; the median of ``repeats``, the methods
    interleaved in one run) and the share of the baseline's time it saves."""
    t0 = time.perf_counter()
    plan = parse_variants(lm, methods=default_methods(lm.n_layers) if methods is None else methods)
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens)
    shape = LayerShape.from_model(lm)
    res = []
    for i, v in enumerate(plan.variants):
        res.append(method_result(s, shape, v, separator, truth))
        if progress and i:
            progress(i, len(plan.methods), v.key)
    if latency:
        from ..analysis.compute import measure_methods_latency, time_weighted

        from .downsample import downsample_to

        small = {v.key: downsample_to(lm, s.prep.rgb, s.prep.prompt, v.interventions[0].keep)[0]
                 for v in plan.variants if any(getattr(iv, "transforms_input", False) for iv in v.interventions)}
        m = measure_methods_latency(lm, image, prompt, {v.key: ([] if v.key in small else list(v.interventions))
                                                        for v in plan.variants},
                                    n_steps=max(1, max_new_tokens - 1), repeats=repeats, images=small)
        p0, t0_ = m["prefill_s"][0], m["total_s"][0]
        share = p0 / t0_ if t0_ > 0 else 1.0          # the baseline's time in its prefill (the rest: decoding)
        for r, p, t in zip(res, m["prefill_s"], m["total_s"]):
            r.latency = {"prefill_s": p, "total_s": t, "prefill_saving": 1 - p / p0 if p0 > 0 else 0.0,
                         "total_saving": 1 - t / t0_ if t0_ > 0 else 0.0, "repeats": repeats,
                         "prefill_time_share": share,
                         "time_weighted_saving": time_weighted(share, r.savings["prefill_saving"],
                                                               r.savings["decode_saving"])}
    return PruningComparison(lm.name, s.prep.prompt, s.baseline.run.generated_text, lm.n_layers, len(s.prep.image_pos),
                             truth, res, round(time.perf_counter() - t0, 3))


# ---- VTW's calibration ------------------------------------------------------------------------------

@dataclass
class VTWCalibration:
    layer: int | None            # VTW's rule: the first K with mean KL <= eta (None: none)
    stable_layer: int | None     # the first K from which every deeper K' also stays <= eta
    eta: float
    depths: list[int]
    mean_kl: list[float]         # per depth, mean over examples of the summed answer KL (nats)
    per_example: list[list[float]]
    rule: str = ("VTW: K = the first layer whose withdrawal of every visual token keeps the mean KL(baseline || "
                 "withdrawn) of the answer <= eta on the calibration examples")

    def to_json(self) -> dict:
        return asdict(self)


def find_vtw_layer(lm, examples: Sequence, eta: float = VTW_ETA, *, max_new_tokens: int = 16,
                   separator: str = DEFAULT_SEPARATOR, progress: Progress | None = None) -> VTWCalibration:
    """VTW's K for ``lm`` from calibration ``examples`` ((image, prompt) pairs): teacher-forced
    answer KL of ``VTW(k)`` for every k, averaged over the examples."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
        raise InputError(f"eta must be a positive number of nats, got {eta!r}")
    examples = list(examples)
    if not examples:
        raise InputError("find_vtw_layer needs at least one calibration example (image, prompt)")
    L = lm.n_layers
    tok = lm.processor.tokenizer
    per = []
    for i, (image, prompt) in enumerate(examples):
        s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens, reuse=False)
        base = s.baseline
        from .engine import answer_start

        start = answer_start(base.generated_ids, base.run.generated_text, separator, tok)
        row = [answer_scores(base, s.score([VTW(k)]), start)["answer_kl"] for k in range(L)] + [0.0]
        per.append(row)
        if progress:
            progress(i + 1, len(examples), "calibrating VTW")
    mean = np.mean(np.asarray(per), axis=0)
    ok = [bool(m <= eta) for m in mean]
    first = next((k for k in range(L) if ok[k]), None)
    stable = next((k for k in range(L) if all(ok[k:])), None)
    return VTWCalibration(first, stable, float(eta), list(range(L + 1)), [float(m) for m in mean],
                          [[float(x) for x in r] for r in per])


def calibrated_stages(lm, examples: Sequence, *, max_new_tokens: int = 16, treatments: dict | None = None,
                      top: float = 0.1) -> tuple[StagePruner, list[str]]:
    """A StagePruner from the causal three stages of calibration examples: per layer the most
    common label (ties: the later stage), treated as VisiPruner reads them by default."""
    from .stages import causal_stages

    labels = [causal_stages(lm, image, prompt, max_new_tokens=max_new_tokens).labels for image, prompt in examples]
    if not labels:
        raise InputError("calibrated_stages needs at least one calibration example (image, prompt)")
    order = {"sink": 0, "fusion": 1, "discard": 2}
    vote = []
    for l in range(lm.n_layers):
        c = Counter(x[l] for x in labels)
        vote.append(max(c, key=lambda k: (c[k], order.get(k, 0))))
    # a removed token never comes back: once a discard layer is voted, deeper layers discard too
    if "discard" in vote:
        d = vote.index("discard")
        vote = vote[:d] + ["discard"] * (lm.n_layers - d)
    return StagePruner.from_stages(vote, treatments, top), vote


# ---- over a dataset --------------------------------------------------------------------------------

@dataclass
class PruningStudy:
    model: str
    suite: str
    n_layers: int
    n_per_family: int
    families: list[str]
    methods: list[str]
    rows: list[dict]                  # one per (family, method), columns STUDY_COLUMNS
    seconds: float = 0.0
    per_example: list[dict] = field(default_factory=list)   # family, seed, method, correct, depth

    def to_json(self) -> dict:
        return asdict(self)

    def row(self, family: str, method: str) -> dict:
        for r in self.rows:
            if r["family"] == family and r["method"] == method:
                return r
        raise KeyError((family, method))

    def csv(self) -> str:
        return Table(STUDY_COLUMNS, self.rows).csv()

    def markdown(self, family: str) -> str:
        return Table(["method", "accuracy", "answer_kept", "total_saving", "kv_saving", "mean_depth"],
                     [r for r in self.rows if r["family"] == family],
                     headers=["method", "accuracy", "answer kept", "decoder FLOPs saved", "KV saved", "mean depth"],
                     formats={"accuracy": percent, "answer_kept": percent, "total_saving": percent1,
                              "kv_saving": percent1, "mean_depth": fixed(1)}).markdown()


def pruning_study(lm, methods: dict | None = None, *, n: int = 20, families: Sequence[str] | None = None,
                  offset: int = 0, suite: str = "shapes", progress: Progress | None = None) -> PruningStudy:
    """Methods x the shapes suite's test split: accuracy against ground truth and compute saved,
    per task family (the "baseline" row is the untouched model)."""
    from ..tiny.eval import MAX_NEW_TOKENS
    from ..tiny.tasks import FAMILIES
    from .study import _metrics, suite_cells

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer (examples per family), got {n!r}")
    plan = parse_variants(lm, methods=default_methods(lm.n_layers) if methods is None else methods)
    fams = list(FAMILIES if families is None else families)
    names = [v.key for v in plan.variants]
    shape = LayerShape.from_model(lm)
    per = []

    def note(f, e, baseline_text, got):
        per.extend({"family": f, "seed": e.seed, "method": key, "correct": r.correct, "depth": r.depth,
                    "total_saving": r.savings["total_saving"]} for key, r in got.items())

    t0 = time.perf_counter()
    exs, got = suite_cells(lm, suite, fams, n, offset, progress, lambda f: {"max_new_tokens": MAX_NEW_TOKENS[f]},
                           plan.variants, lambda s, v, e: method_result(s, shape, v, DEFAULT_SEPARATOR, e.answer),
                           on_example=note)
    rows = []
    for f in fams:
        for m in names:
            rs = got[f][m]
            met = _metrics(f, exs[f], [r.text for r in rs])
            depths = [r.depth if r.depth is not None else lm.n_layers for r in rs]
            rows.append({"family": f, "method": m, "n": len(rs), "accuracy": met["accuracy"], "token_f1": met["token_f1"],
                         "answer_kept": float(np.mean([r.answer_kept for r in rs])),
                         "output_kl": float(np.mean([r.output_kl for r in rs])),
                         **{k: float(np.mean([r.savings[k] for r in rs])) for k in
                            ("total_saving", "prefill_saving", "decode_saving", "kv_saving")},
                         "image_rows": float(np.mean([np.mean(r.image_rows) for r in rs])),
                         "mean_depth": float(np.mean(depths))})
    return PruningStudy(lm.name, suite, lm.n_layers, n, fams, names, rows, round(time.perf_counter() - t0, 1), per)


def adaptive_vs_fixed(study: PruningStudy, adaptive: str, fixed_prefix: str = "VTW k=") -> dict:
    """Per family: the adaptive method's accuracy and saving next to the fixed depths' curve at
    the same average saving (linear between the two fixed depths that bracket it; the baseline
    counts as the fixed depth L), and the best fixed depth that saves at least as much."""
    out = {}
    for f in study.families:
        a = study.row(f, adaptive)
        fixed = [study.row(f, m) for m in study.methods if m.startswith(fixed_prefix)] + [study.row(f, "baseline")]
        pts = sorted((r["total_saving"], r["accuracy"], r["method"]) for r in fixed)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        at = float(np.interp(a["total_saving"], xs, ys)) if xs else None
        cheaper = [p for p in pts if p[0] >= a["total_saving"] - 1e-12]
        best = max(cheaper, key=lambda p: (p[1], -p[0])) if cheaper else None
        out[f] = {"adaptive_accuracy": a["accuracy"], "adaptive_saving": a["total_saving"],
                  "adaptive_mean_depth": a["mean_depth"], "fixed_accuracy_at_same_saving": at,
                  "best_fixed_at_least_as_cheap": None if best is None else {"method": best[2], "saving": best[0],
                                                                              "accuracy": best[1]}}
    return out


# ---- methods written on a command line ---------------------------------------------------------------
