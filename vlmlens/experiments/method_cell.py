"""One pruning method on one trial's input: its cell (:class:`MethodResult`) -- the output against the
baseline, whether it is correct, the image rows each layer read and the decoder compute and KV cache the
method's schedule saves. Every comparison and study of methods makes its cells here
(:func:`.pruning.compare_pruning`, :func:`.pruning.pruning_study`, a dataset study's method cells)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis.compute import LayerShape, schedule_savings
from ..errors import InputError
from .engine import Trial
from .methods import describe_method
from .variants import Variant


def image_rows(run, n_layers: int) -> list[int]:
    """Image rows each decoder layer processed in ``run`` (a pruner's schedule, else all of them
    -- also for masks, which compute every row)."""
    if "image_rows" in run.arrays:
        return [int(x) for x in run.arrays["image_rows"]]
    return [run.spans.n_image] * n_layers


@dataclass
class MethodResult:
    name: str
    interventions: list
    text: str
    answer: str
    answer_kept: bool
    output_kl: float
    correct: bool | None
    image_rows: list[int]
    image_kept: list            # [L][n_image] 0/1
    savings: dict               # total / prefill / decode / kv saving (fractions)
    depth: int | None           # first layer with no image row (None: the image stays)
    description: str = ""       # what it keeps, unambiguously (keep / drop, rerank)
    latency: dict | None = None  # measured: prefill_s, total_s and their savings vs the baseline (when asked)


def time_note(m: MethodResult) -> str | None:
    """Said of a method that saves decoder FLOPs (10 % or more) but not half as much measured time."""
    flops, lat = m.savings["total_saving"], m.latency or {}
    if flops >= 0.1 and lat.get("total_saving") is not None and lat["total_saving"] < flops / 2:
        text = (f"{m.name} saves {100 * flops:.0f}% of the decoder FLOPs but {100 * lat['total_saving']:.0f}% of the"
                " measured end-to-end time on this machine: the FLOPs it removes are not where the time goes here.")
        if lat.get("prefill_time_share") is not None and lat.get("time_weighted_saving") is not None:
            text += (f" The baseline spends {100 * (1 - lat['prefill_time_share']):.0f}% of its time decoding, where a"
                     " step costs reading every weight for one token, far more than its FLOPs; with each phase's FLOP"
                     f" saving weighted by its measured time the expected saving is {100 * lat['time_weighted_saving']:.0f}%.")
        return text
    return None


def _counts(s: Trial) -> tuple[int, int, int]:
    img = s.prep.image_pos
    n_sys = int(img[0])
    return n_sys, len(img), s.prep.n_prompt - n_sys - len(img)


def method_result(s: Trial, shape: LayerShape, v: Variant, separator: str, truth: str | None) -> MethodResult:
    """One method (a method variant) on the trial's input: its output against the baseline and the compute it saves."""
    name, ivs = v.key, list(v.interventions)
    if any(getattr(iv, "transforms_input", False) for iv in ivs):
        return _downsample_result(s, shape, v, separator, truth)
    c, out = s.cell(ivs, separator=separator, truth=truth)
    L = s.n_layers
    rows = image_rows(out.run, L)
    n_sys, n_img, n_text = _counts(s)
    rerank = {name: min(iv.layers) for iv in ivs if getattr(iv, "every_step", False)}   # re-ranked every step
    sav = schedule_savings(shape, n_img, n_text, n_sys, max(1, len(s.baseline.generated_ids)), {name: rows},
                           rerank_from=rerank)
    kept = out.run.arrays.get("image_kept")
    kept = np.ones((L, n_img), np.uint8) if kept is None else np.asarray(kept)
    depth = next((l for l in range(L) if rows[l] == 0), None)
    return MethodResult(name, [iv.to_json() for iv in ivs], c["text"], c["answer"], bool(c["answer_kept"]),
                        float(c["output_kl"]), c["correct"],
                        rows, kept.tolist(), {k: float(sav[k][0]) for k in ("total_saving", "prefill_saving",
                                                                             "decode_saving", "kv_saving")}, depth,
                        describe_method(ivs) if ivs else "no pruning (the baseline)")


def _downsample_result(s: Trial, shape: LayerShape, v: Variant, separator: str, truth: str | None) -> MethodResult:
    """A smaller input with the method's token budget (:mod:`.downsample`): every layer reads ``m``
    image tokens instead of ``n``; no subset of the original tokens is kept (``image_kept`` empty)."""
    from ..metrics import is_correct
    from .downsample import downsampled
    from .engine import compare_outputs

    if len(v.interventions) != 1:
        raise InputError(f"{v.key}: downsampling runs alone, without other interventions")
    out, small, m = downsampled(s, v.interventions[0].keep)
    c = compare_outputs(s.baseline, out, separator, getattr(s.lm.processor, "tokenizer", None))
    L = s.n_layers
    n_sys, n_img, n_text = _counts(s)
    sav = schedule_savings(shape, n_img, n_text, n_sys, max(1, len(s.baseline.generated_ids)), {v.key: [m] * L})
    return MethodResult(v.key, [iv.to_json() for iv in v.interventions], c["text"], c["answer"], bool(c["answer_kept"]),
                        float(c["output_kl"]), is_correct(c["text"], truth, separator), [m] * L, [],
                        {k: float(sav[k][0]) for k in ("total_saving", "prefill_saving", "decode_saving", "kv_saving")},
                        None, f"the image downsampled to {small.size[0]}x{small.size[1]} px: {m} image tokens instead"
                              f" of {n_img}")
