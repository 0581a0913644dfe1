"""Truncation experiments: side-by-side generations and the full depth sweep.

``compare(lm, image, prompt, depths=[0, 4, "all"])`` captures the baseline and one run per
truncation depth; ``sweep(lm, image, prompt)`` does the same for every depth 0..L. Depth
``k`` means the language model stops using the image from decoder layer ``k`` on (``k = 0``:
it never sees it; ``k = L``: the baseline). Modes: ``"drop"`` (attention mask),
``"remove"`` (image tokens leave the sequence and the KV cache; same tokens as drop, less
compute) and ``"freeze"`` (image states stop changing after layer ``k``).

Sweeps reuse the baseline's prefix KV cache (everything up to the last image token is
unchanged by truncation), so a depth costs a few text tokens plus decoding rather than a full
prefill; ``reuse=False`` runs independent captures instead and gives the same numbers.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..metrics import DEFAULT_SEPARATOR, answer_of, is_correct
from .engine import Progress, Trial, truncation
from .variants import parse_variants

CSV_COLUMNS = ("depth", "mode", "first_token_kl", "output_kl", "answer_kl", "answer_logprob_delta", "answer_tokens", "answer_kept",
               "correct", "text_kept", "baseline_logprob", "own_logprob", "first_divergence", "edit_distance", "answer",
               "text")


@dataclass
class DepthSummary:
    """What one truncation depth did to the output, relative to the baseline."""

    depth: int
    text: str
    tokens: list[str]
    token_ids: list[int]
    first_divergence: int | None
    edit_distance: int
    baseline_logprob: float   # teacher-forced sum of log-probs of the baseline's tokens under this depth
    own_logprob: float        # sum of log-probs of this depth's own greedy tokens
    first_token_kl: float     # KL(baseline || truncated) of the first-token distribution, nats
    answer: str
    answer_kept: bool
    text_kept: bool
    divergence_char: int | None = None   # where the first divergent token starts in ``text`` (None: same/unknown)
    answer_kl: float = float("nan")      # summed KL(baseline || truncated) over the answer tokens (engine docstring)
    answer_logprob_delta: float = float("nan")   # truncated minus baseline log-prob of the baseline's answer
    answer_tokens: int = 0               # how many baseline tokens the answer-level metrics cover
    answer_start: int = 0                # index of the first of them among the generated tokens
    correct: bool | None = None          # the answer equals the ground truth (None: no truth known)
    output_kl: float = float("nan")      # summed KL over every generated token (engine docstring)


@dataclass
class TruncationResult:
    """Baseline + per-depth summaries (JSON-serialisable via :meth:`to_json`).

    ``runs`` (depth -> Run) and ``baseline_run`` are kept in memory only (save them with
    ``save_run``); they are not part of the JSON. When depth L is among the depths, the
    baseline *is* the depth-L run (its truncation is a no-op, so it is captured once).
    """

    model: str
    family: str
    prompt: str
    image_sha256: str
    mode: str
    n_layers: int
    max_new_tokens: int
    separator: str
    reuse: bool
    baseline_text: str
    baseline_tokens: list[str]
    baseline_token_ids: list[int]
    baseline_logprob: float
    baseline_answer: str
    depths: list[DepthSummary]
    seconds: float = 0.0
    interventions: list = field(default_factory=list)
    truth: str | None = None              # the ground-truth answer, when the input comes with one
    baseline_correct: bool | None = None
    runs: dict = field(default_factory=dict, repr=False)
    baseline_run: object = field(default=None, repr=False)

    def depth(self, k: int) -> DepthSummary:
        for d in self.depths:
            if d.depth == k:
                return d
        raise KeyError(f"depth {k} not in this result (have {[d.depth for d in self.depths]})")

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("runs", "baseline_run", "depths")}
        out["depths"] = [asdict(d) for d in self.depths]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "TruncationResult":
        """Rebuild from :meth:`to_json` output (unknown keys, e.g. from a newer version, are ignored)."""
        from dataclasses import fields

        keep = {f.name for f in fields(DepthSummary)}
        top = {f.name for f in fields(cls)} - {"runs", "baseline_run"}
        out = {k: v for k, v in d.items() if k in top}
        out["depths"] = [DepthSummary(**{k: v for k, v in x.items() if k in keep}) for x in d["depths"]]
        return cls(**out)

    def marked_text(self, k: int, left: str = "[[", right: str = "]]") -> str:
        """Depth ``k``'s text with everything from the first divergent token wrapped in markers."""
        d = self.depth(k)
        if d.first_divergence is None:
            return d.text
        c = d.divergence_char if d.divergence_char is not None else 0
        return d.text[:c] + left + d.text[c:].lstrip() + right if c < len(d.text) else d.text + left + right

    def rows(self) -> list[dict]:
        """One flat row per depth (the CSV columns in :data:`CSV_COLUMNS`)."""
        return [{c: (self.mode if c == "mode" else getattr(d, c)) for c in CSV_COLUMNS} for d in self.depths]

    def csv(self) -> str:
        from ..tables import Table

        return Table(CSV_COLUMNS, self.rows()).csv()


def _truncation(lm, image, prompt, depths, *, mode, max_new_tokens, interventions, reuse, store, hidden_dtype,
                record_attention, separator, progress: Progress | None, keep_runs: bool,
                truth: str | None = None) -> TruncationResult:
    plan = parse_variants(lm, depths=depths, mode=mode)
    ks = plan.depths
    t0 = time.perf_counter()
    L = lm.n_layers
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens, interventions=interventions, reuse=reuse,
                store=store, hidden_dtype=hidden_dtype, record_attention=record_attention,
                baseline=[truncation(L, mode)] if L in ks else [])
    base = s.baseline
    if progress:
        progress(0, len(ks), "baseline")
    summaries, runs = [], {}
    for i, v in enumerate(plan.variants):
        cmp, out = s.cell(v.interventions, separator=separator, truth=truth)
        summaries.append(DepthSummary(depth=v.depth, **cmp))
        if keep_runs:
            runs[v.depth] = out.run
        if progress:
            progress(i + 1, len(ks), f"depth {v.depth}")
    r = base.run
    return TruncationResult(
        model=lm.name, family=lm.family, prompt=s.prep.prompt, image_sha256=s.prep.image_sha, mode=mode,
        n_layers=lm.n_layers, max_new_tokens=s.n_new, separator=separator, reuse=s.reuse,
        baseline_text=r.generated_text, baseline_tokens=r.generated_tokens, baseline_token_ids=base.generated_ids,
        baseline_logprob=float(sum(r.token_logprobs)), baseline_answer=answer_of(r.generated_text, separator),
        depths=summaries, seconds=round(time.perf_counter() - t0, 3),
        interventions=[iv.to_json() for iv in s.extra if hasattr(iv, "to_json")],
        truth=truth, baseline_correct=is_correct(r.generated_text, truth, separator), runs=runs, baseline_run=r if keep_runs else None,
    )


def compare(lm, image, prompt: str, depths: Sequence = (0, "all"), *, mode: str = "drop", max_new_tokens: int = 16,
            interventions: Sequence = (), reuse: bool = True, store: str = "all", hidden_dtype: str = "float16",
            record_attention: bool = True, separator: str = DEFAULT_SEPARATOR, progress: Progress | None = None,
            keep_runs: bool = True, truth: str | None = None) -> TruncationResult:
    """Baseline + one run per truncation depth, side by side.

    Args:
        depths: ints in 0..L, or "all" (= L, the baseline depth); a "0,4,all" string works too.
        mode: "drop", "remove" or "freeze".
        interventions: extra interventions applied to the baseline and every depth.
        reuse: continue from the baseline's prefix cache (same result, much faster).
        store, hidden_dtype, record_attention: what each Run records (as in ``capture``).
        separator: where a reasoning trace ends and the final answer starts (``answer_kept``
            compares the text after it; without it, the whole text).
        truth: the ground-truth answer (e.g. of a shapes-world scene): every depth is then
            also marked correct / wrong (``correct``), so a cut that fixes a mistake shows.
    """
    return _truncation(lm, image, prompt, depths, mode=mode, max_new_tokens=max_new_tokens, interventions=interventions,
                       reuse=reuse, store=store, hidden_dtype=hidden_dtype, record_attention=record_attention,
                       separator=separator, progress=progress, keep_runs=keep_runs, truth=truth)


def sweep(lm, image, prompt: str, *, mode: str = "drop", max_new_tokens: int = 16, interventions: Sequence = (),
          reuse: bool = True, store: str = "all", hidden_dtype: str = "float16", record_attention: bool = True,
          separator: str = DEFAULT_SEPARATOR, progress: Progress | None = None, keep_runs: bool = True,
          truth: str | None = None) -> TruncationResult:
    """The truncation sweep: :func:`compare` at every depth 0..L."""
    return _truncation(lm, image, prompt, list(range(lm.n_layers + 1)), mode=mode, max_new_tokens=max_new_tokens,
                       interventions=interventions, reuse=reuse, store=store, hidden_dtype=hidden_dtype,
                       record_attention=record_attention, separator=separator, progress=progress, keep_runs=keep_runs,
                       truth=truth)
