"""Read a truncation sweep: the cliff layer, and how truncation perturbs reasoning traces.

Cliff layer (after "From Redundancy to Relevance"): the shallowest depth from which the image
may be cut without changing the output. Formally, over the depths of a sweep (and depth L,
the baseline, which satisfies the rule by definition),

    cliff = min { k : for every measured k' >= k, answer_kept(k') and first_token_kl(k') < tau }

with ``tau`` in nats (default 0.1). A model that needs the image until its last layer has
cliff L; one that never needs it has cliff 0. Depths missing from a partial result are not
checked.

The attention-side cliff comes from ``vlmlens.analysis.attention.attention_cliff(run)`` on the
baseline run (the layer after the sharpest drop of attention to the image), when that module
is importable and the run has the arrays it needs; the two agree when they differ by <= 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError
from ..metrics import normalize, split_answer
from ..vocabulary import DEFAULT_TAU
from .engine import normalized_edit_distance

CLIFF_RULE = ("smallest depth k such that every measured depth k' >= k keeps the baseline answer "
              "and has first-token KL(baseline || truncated) < tau nats")


@dataclass
class CliffReport:
    cliff: int
    tau: float
    rule: str
    depths: list[int]
    ok: list[bool]                 # per depth: answer kept and KL < tau
    attention_cliff: int | None
    attention_note: str            # why the attention cliff is missing, or what it is
    agree: bool | None             # |cliff - attention_cliff| <= 1 (None without an attention cliff)

    def to_json(self) -> dict:
        return asdict(self)


def cliff_from(depths, kept, kl, n_layers: int, tau: float = DEFAULT_TAU) -> tuple[int, list[bool]]:
    """The cliff rule on plain lists (depths ascending or not). Returns (cliff, ok per depth).

    ``kl=None`` drops the KL condition: the cliff is then the shallowest depth from which
    every deeper measured depth keeps the answer (what the dashboard's headline states)."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise InputError(f"tau must be a positive number of nats, got {tau!r}")
    kl = [0.0] * len(list(depths)) if kl is None else kl
    rows = sorted(zip(depths, kept, kl), key=lambda r: r[0])
    ok = {int(d): bool(k) and float(x) < tau for d, k, x in rows}
    cliff = int(n_layers)
    for d in sorted(ok, reverse=True):
        if d > n_layers:
            continue
        if not ok[d]:
            break
        cliff = min(cliff, d)
    return cliff, [ok[int(d)] for d in depths]


def _attention_side(run) -> tuple[int | None, str]:
    from ..analysis.attention import attention_cliff

    if run is None:
        return None, "no baseline run kept (keep_runs=False)"
    try:
        value = attention_cliff(run)
    except Exception as e:  # noqa: BLE001 -- optional analysis: report, do not fail the sweep
        return None, f"attention cliff unavailable ({type(e).__name__}: {e})"
    if value is None:
        return None, "the last prompt token still looks at the image at the last layer"
    return int(value), "first layer from which the last prompt token's image share stays below 25% of its peak"


def cliff_layer(result, tau: float = DEFAULT_TAU, *, attention_run=None) -> CliffReport:
    """The cliff layer of a :class:`~vlmlens.experiments.compare.TruncationResult`.

    ``attention_run`` (default: the result's baseline run) is handed to ``attention_cliff``.
    """
    ds = result.depths
    cliff, ok = cliff_from([d.depth for d in ds], [d.answer_kept for d in ds], [d.first_token_kl for d in ds],
                           result.n_layers, tau)
    att, note = _attention_side(attention_run if attention_run is not None else result.baseline_run)
    agree = None if att is None else abs(att - cliff) <= 1
    return CliffReport(cliff, float(tau), CLIFF_RULE, [d.depth for d in ds], ok, att, note, agree)


# ---- reasoning traces -----------------------------------------------------------------------------

@dataclass
class TracePerturbation:
    """Per depth: how far the trace moved, and whether the final answer changed."""

    separator: str
    baseline_trace: str
    baseline_answer: str | None
    depths: list[int]
    trace_distance: list[float]      # word-level edit distance / max length, vs the baseline trace
    answer_changed: list[bool]
    has_answer: list[bool]           # the output contains the separator

    def to_json(self) -> dict:
        return asdict(self)


def trace_distance(a: str, b: str) -> float:
    """Normalised word-level edit distance between two traces (case-insensitive)."""
    return normalized_edit_distance(normalize(a).split(), normalize(b).split())


def reasoning_perturbation(result, separator: str | None = None) -> TracePerturbation:
    """Trace edit distance and final-answer change per depth of a truncation result.

    A missing final answer (no separator) counts as changed unless the baseline has none either.
    """
    sep = result.separator if separator is None else separator
    if not sep:
        raise InputError("separator must be a non-empty string such as 'answer:'")
    b_trace, b_ans = split_answer(result.baseline_text, sep)
    dists, changed, has = [], [], []
    for d in result.depths:
        trace, ans = split_answer(d.text, sep)
        dists.append(trace_distance(b_trace, trace))
        same = (ans is None and b_ans is None) or (ans is not None and b_ans is not None and normalize(ans) == normalize(b_ans))
        changed.append(not same)
        has.append(ans is not None)
    return TracePerturbation(sep, b_trace, b_ans, [d.depth for d in result.depths], dists, changed, has)
