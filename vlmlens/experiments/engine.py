"""Shared machinery of the experiments: one baseline, many intervened variants, compared.

A :class:`Trial` holds one (model, image, prompt). Its baseline is captured once; each
:meth:`Trial.evaluate` captures one variant (a list of interventions) and scores the
baseline's generated tokens under it (teacher forcing). With ``reuse=True`` both continue
from a shared prefix KV cache (see :mod:`vlmlens.experiments.prefix`); with ``reuse=False``
every variant is an independent :func:`vlmlens.capture` plus a full teacher-forced forward.
The two give the same numbers (tested).

Comparison of a variant with the baseline (:func:`compare_outputs`):

* ``first_divergence``: index of the first generated token that differs (None: identical);
* ``edit_distance``: Levenshtein distance between the generated token-id sequences;
* ``baseline_logprob``: sum of log-probs of the baseline's generated tokens under the variant
  (teacher-forced; raw logits, as ``Run.token_logprobs``);
* ``first_token_kl``: KL(baseline || variant) of the next-token distribution at the last
  prompt token, in nats (full vocabulary, float64);
* ``answer_kept``: the normalised answer (text after the last ``separator`` when present,
  else the whole text) equals the baseline's; ``text_kept``: identical token ids;
* answer-level metrics, teacher-forced on the baseline's tokens: the *answer tokens* are the
  baseline's generated tokens after the separator when its text has one, else all of them
  (``answer_start`` is the index of the first). ``answer_kl`` is the sum over the answer
  tokens of KL(baseline || variant) of the distribution that predicts each of them (nats);
  ``answer_logprob_delta`` the variant's minus the baseline's summed log-prob of them
  (<= 0 when the variant makes the baseline's answer less likely). A first-token KL only
  sees the first word ("a", "the", "step"), which rarely depends on the image; these see
  the words that do. With nothing generated both fall back to the first-token distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..capture import capture, check_context, check_max_new_tokens, extend_inputs
from ..video import video_slots
from ..errors import InputError
from ..interventions import Freeze, Truncate, decides_every_step, prefix_effect, validate_all
from ..lens import NOTHING, Lens, Plan, Recording
from ..metrics import DEFAULT_SEPARATOR, answer_of, is_correct
from ..run import Run
from ..vocabulary import CUT_MODES
from .prefix import Prefix, accepts_logits_to_keep, prefill, prepare

Progress = Callable[[int, int, str], None]


# ---- text/token comparisons ---------------------------------------------------------------------

def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insert, delete, substitute; cost 1 each) between two sequences."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """edit_distance / max(len a, len b): 0 identical, 1 nothing in common (0 if both empty)."""
    n = max(len(a), len(b))
    return edit_distance(a, b) / n if n else 0.0


def first_divergence(a: Sequence, b: Sequence) -> int | None:
    """First index where the sequences differ (a prefix differs at the shorter length); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats from two log-distributions over the same support (float64, >= 0)."""
    p64, q64 = logp.double(), logq.double()
    kl = float((p64.exp() * (p64 - q64)).sum())
    return max(kl, 0.0)  # rounding can give -1e-16 for identical inputs


# ---- depth / mode arguments ---------------------------------------------------------------------

MODES = CUT_MODES


def check_mode(mode) -> str:
    if mode not in MODES:
        raise InputError(f"unknown truncation mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


DEPTH_SYNTAX = "an integer in 0..L (L: the model's decoder layers) or 'all' (= L), comma-separated"


def _depth_items(depths, n_layers: int | None = None) -> list[str]:
    syntax = DEPTH_SYNTAX if n_layers is None else f"an integer in 0..{n_layers} or 'all' for this model"
    items = depths.split(",") if isinstance(depths, str) else list(depths)
    out = []
    for d in items:
        s = str(d).strip()
        if isinstance(d, bool) or not (s.lower() in ("all", "l", "none") or s.lstrip("-").isdigit()):
            raise InputError(f"depth must be {syntax}; got {d!r}")
        out.append(s)
    return out


def check_depth_syntax(depths) -> None:
    """The form of ``depths`` alone (before a model, and so L, is known)."""
    _depth_items(depths)


def parse_depths(depths, n_layers: int) -> list[int]:
    """Depths as a list of ints in 0..L ("all" or "L" = L, the baseline depth); sorted, unique.

    Accepts a comma-separated string ("0,4,8,all") or a sequence of ints/strings.
    """
    L = int(n_layers)
    out = []
    for s in _depth_items(depths, L):
        k = L if s.lower() in ("all", "l", "none") else int(s)
        if not 0 <= k <= L:
            raise InputError(f"depth {k} is out of range: this model has {L} decoder layers, so depths are 0..{L} ('all' = {L})")
        out.append(k)
    if not out:
        raise InputError(f"no depths given; use integers in 0..{L} or 'all'")
    return sorted(set(out))


def truncation(k: int, mode: str):
    """The intervention that stops the LM's use of the image from decoder layer ``k`` on."""
    check_mode(mode)
    return Freeze(k) if mode == "freeze" else Truncate(k, mode)


# ---- sessions -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One variant's capture and its teacher-forced scores."""

    interventions: list
    run: Run
    first_logprobs: torch.Tensor   # [vocab] log-softmax of the next-token logits at the last prompt token
    target_logprobs: list[float]   # log-probs of the baseline's generated tokens under this variant
    step_logprobs: torch.Tensor | None = None   # [T+1, vocab] log-softmax at the last prompt token and
                                                #   after each of the baseline's T generated tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.run.token_ids[self.run.spans.n_prompt:]


class Trial:
    """One model + image + prompt, with its baseline, ready to evaluate variants.

    Args:
        interventions: applied to the baseline and to every variant (a variant's own
            interventions are added after them; conflicts raise InputError).
        reuse: continue variants from a shared prefix cache where the family supports it.
        store, hidden_dtype, record_attention: what each variant's Run records (as in capture).
        baseline: interventions of the baseline itself (after ``interventions``); a sweep uses
            its no-op depth-L truncation, so the baseline doubles as the depth-L run.
    """

    def __init__(self, lm, image, prompt: str, *, max_new_tokens: int = 16, interventions: Sequence = (),
                 reuse: bool = True, store: str = "none", hidden_dtype: str = "float16",
                 record_attention: bool = False, baseline: Sequence = ()):
        self.lm = lm
        self.n_new = check_max_new_tokens(max_new_tokens)
        self.extra = list(interventions)
        validate_all(self.extra, lm.n_layers)
        # what each variant's Run records (contributions as in capture's default)
        self.recording = Recording(store, hidden_dtype, record_attention, contrib=True)
        self.prep = prepare(lm, image, prompt)
        check_context(lm, self.prep.n_prompt, len(self.prep.image_pos), self.n_new)
        self.reuse = bool(reuse) and self.prep.position_ids is not None and not any(
            prefix_effect(iv, lm.n_layers).kind == "independent" for iv in self.extra)
        self._prefix: Prefix | None = None
        self.baseline: Outcome = self.evaluate(list(baseline))

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    def _prefix_for(self, ivs: list) -> Prefix | None:
        """The prefix a variant continues from, as its interventions' ``prefix_effect`` say:
        the shared one (perhaps with the image cut from some layer on), a recomputed one, or
        none (an intervention that needs the whole prompt: an independent capture)."""
        if not self.reuse:
            return None
        effects = [prefix_effect(iv, self.n_layers) for iv in ivs]
        if any(e.kind == "independent" for e in effects):
            return None
        if any(e.kind == "recompute" for e in effects):
            return prefill(self.lm, self.prep, self.extra + ivs, self.recording)
        if self._prefix is None:
            self._prefix = prefill(self.lm, self.prep, self.extra, self.recording)
        return self._prefix.derived(ivs, effects) if ivs else self._prefix

    def evaluate(self, interventions: Sequence) -> Outcome:
        """Capture the variant ``interventions`` and score the baseline's tokens under it."""
        ivs = list(interventions)
        all_ivs = self.extra + ivs
        validate_all(all_ivs, self.n_layers)
        prefix = self._prefix_for(ivs)
        run = capture(self.lm, self.prep.visual, self.prep.prompt, max_new_tokens=self.n_new, interventions=all_ivs,
                      prefix=prefix, **self.recording.capture_kwargs())
        base = getattr(self, "baseline", None)
        target = base.generated_ids if base is not None else run.token_ids[run.spans.n_prompt:]
        steps, lps = self._score(all_ivs, target, prefix)
        return Outcome(ivs, run, steps[0], lps, steps)

    def cell(self, interventions: Sequence = (), *, separator: str = DEFAULT_SEPARATOR,
             truth: str | None = None) -> tuple[dict, Outcome]:
        """One variant against the baseline: its output compared (:func:`compare_outputs`, with the
        model's tokenizer) plus ``correct`` against ``truth`` (None without one), and the variant's
        Outcome. No interventions: the baseline itself, not run again."""
        out = self.baseline if not interventions else self.evaluate(interventions)
        c = compare_outputs(self.baseline, out, separator, getattr(self.lm.processor, "tokenizer", None))
        c["correct"] = is_correct(c["text"], truth, separator)
        return c, out

    def score(self, interventions: Sequence) -> Outcome:
        """Teacher-forced only: the baseline's tokens scored under ``interventions`` (one
        forward, no generation; ``run`` is the baseline's). Whether greedy decoding would
        repeat the baseline is exact from it: :func:`teacher_forced_kept`."""
        ivs = list(interventions)
        all_ivs = self.extra + ivs
        validate_all(all_ivs, self.n_layers)
        steps, lps = self._score(all_ivs, self.baseline.generated_ids, None)
        return Outcome(ivs, self.baseline.run, steps[0], lps, steps)

    def _score(self, ivs: list, target: list[int], prefix: Prefix | None):
        """Teacher-forced forward over prompt + ``target`` under ``ivs``: ([T+1, vocab] log-probs, target log-probs)."""
        lm, prep = self.lm, self.prep
        n_prompt, T = prep.n_prompt, len(target)
        if decides_every_step(ivs):
            return self._score_every_step(ivs, target)
        if prefix is not None:
            inputs = prefix.continuation_inputs(target, for_generate=False)
        else:
            inputs = extend_inputs(prep.inputs, target, lm.arch.generated_token_type)
        plan = Plan.build(prep.image_pos, lm.n_layers, n_prompt, NOTHING, ivs, frames=video_slots(prep.inputs))
        kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(lm) else {}
        start = None if prefix is None else prefix.start
        with torch.no_grad(), Lens.for_model(lm, plan, start=start):
            out = lm.model(**inputs, use_cache=prefix is not None, return_dict=True, **kwargs)
        logits = out.logits[0, -(T + 1):].float()
        logp = torch.log_softmax(logits, -1).cpu()
        lps = [float(logp[i, t]) for i, t in enumerate(target)]
        return logp, lps

    def _score_every_step(self, ivs: list, target: list[int]):
        """Teacher forcing when the interventions decide at every step: the distribution of step t
        comes from its own whole forward over prompt + ``target[:t]`` (T + 1 forwards)."""
        lm, prep = self.lm, self.prep
        plan = Plan.build(prep.image_pos, lm.n_layers, prep.n_prompt, NOTHING, ivs, whole_forwards=True,
                          frames=video_slots(prep.inputs))
        kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(lm) else {}
        rows = []
        with torch.no_grad(), Lens.for_model(lm, plan):
            for t in range(len(target) + 1):
                step = extend_inputs(prep.inputs, target[:t], lm.arch.generated_token_type)
                out = lm.model(**step, use_cache=False, return_dict=True, **kwargs)
                rows.append(out.logits[0, -1].float())
        logp = torch.log_softmax(torch.stack(rows), -1).cpu()
        return logp, [float(logp[i, t]) for i, t in enumerate(target)]




# ---- comparison with the baseline -----------------------------------------------------------------

def divergence_char(text: str, ids: list[int], at: int | None, tokenizer) -> int | None:
    """Character offset in ``text`` where the token at index ``at`` starts (None: no divergence
    or the decoded prefix is not a prefix of the text)."""
    if at is None or tokenizer is None:
        return None
    head = tokenizer.decode(ids[:at], skip_special_tokens=True).strip()
    return len(head) if text.startswith(head) else None


def answer_start(ids: Sequence[int], text: str, separator: str = DEFAULT_SEPARATOR, tokenizer=None,
                 tokens: Sequence[str] | None = None) -> int:
    """Index of the first answer token of a generation: the first token after the last
    ``separator`` when ``text`` contains it, else 0. Located by decoding growing prefixes of
    ``ids`` with ``tokenizer`` (without one: joining ``tokens`` with spaces)."""
    sep = (separator or "").lower()
    if not sep or sep not in text.lower():
        return 0
    want = text.lower().count(sep)
    for i in range(1, len(ids) + 1):
        head = (tokenizer.decode(list(ids[:i]), skip_special_tokens=True) if tokenizer is not None
                else " ".join((tokens or [])[:i]))
        if head.lower().count(sep) >= want:
            return i
    return len(ids)


def answer_scores(base: Outcome, var: Outcome, start: int) -> dict:
    """Answer-level KL and log-prob change of ``var`` on the baseline's tokens from ``start``
    (see the module docstring); ``answer_tokens`` is how many tokens that covers."""
    T = len(base.generated_ids)
    if base.step_logprobs is None or var.step_logprobs is None or T == 0 or start >= T:
        kl = kl_divergence(base.first_logprobs, var.first_logprobs)
        out = kl if T == 0 or base.step_logprobs is None or var.step_logprobs is None else _summed_kl(base, var, 0, T)
        return {"answer_kl": kl, "answer_logprob_delta": 0.0, "answer_tokens": 0, "answer_start": int(min(start, T)),
                "output_kl": out}
    kl = _summed_kl(base, var, start, T)
    delta = float(sum(var.target_logprobs[start:T]) - sum(base.target_logprobs[start:T]))
    return {"answer_kl": kl, "answer_logprob_delta": delta, "answer_tokens": T - start, "answer_start": int(start),
            "output_kl": kl if start == 0 else _summed_kl(base, var, 0, T)}


def _summed_kl(base: Outcome, var: Outcome, a: int, b: int) -> float:
    p = base.step_logprobs[a:b].double()
    q = var.step_logprobs[a:b].double()
    return float(max(float((p.exp() * (p - q)).sum()), 0.0))


def teacher_forced_kept(base: Outcome, var: Outcome, start: int = 0) -> bool:
    """Would greedy decoding under ``var`` repeat the baseline's tokens from ``start`` on?
    Exact: the variant's argmax after each baseline prefix equals the baseline's next token
    (and, when the baseline stopped early, its stop token stays the argmax)."""
    ids = base.generated_ids
    if var.step_logprobs is None:
        raise ValueError("the variant was scored without per-step log-probs")
    arg = var.step_logprobs.argmax(-1).tolist()
    if any(arg[i] != ids[i] for i in range(start, len(ids))):
        return False
    stop = (base.run.meta.get("generation") or {}).get("stop_reason")
    if stop == "eos" and base.step_logprobs is not None:
        return arg[len(ids)] == int(base.step_logprobs[len(ids)].argmax())
    return True


def compare_outputs(base: Outcome, var: Outcome, separator: str = DEFAULT_SEPARATOR, tokenizer=None) -> dict:
    """How a variant's output differs from the baseline's (see the module docstring).

    ``tokenizer`` (optional) locates the first divergent token in the text (``divergence_char``)
    and the first answer token after the separator.
    """
    b_ids, v_ids = base.generated_ids, var.generated_ids
    start = answer_start(b_ids, base.run.generated_text, separator, tokenizer, base.run.generated_tokens)
    ans_b, ans_v = answer_of(base.run.generated_text, separator), answer_of(var.run.generated_text, separator)
    fd = first_divergence(b_ids, v_ids)
    return {
        "text": var.run.generated_text,
        "divergence_char": divergence_char(var.run.generated_text, v_ids, fd, tokenizer),
        "tokens": var.run.generated_tokens,
        "token_ids": v_ids,
        "first_divergence": fd,
        "edit_distance": edit_distance(b_ids, v_ids),
        "baseline_logprob": float(sum(var.target_logprobs)),
        "own_logprob": float(sum(var.run.token_logprobs)),
        "first_token_kl": kl_divergence(base.first_logprobs, var.first_logprobs),
        "answer": ans_v,
        "answer_kept": ans_v == ans_b,
        "text_kept": v_ids == b_ids,
        **answer_scores(base, var, start),
    }
