"""VisiPruner's three stages found causally, by knocking the image out of windows of layers.

VisiPruner (arXiv 2510.17205) describes how a VLM's language model uses the image in three
stages: a *sink* stage whose attention to the image does not inform the answer, a *fusion*
stage where the answer reads it, and a *discard* stage after which the image is no longer
needed. Here the stages are read off interventions, not off attention patterns:

* every window is a :class:`~vlmlens.interventions.Knockout` ``(src="all", dst="image")``:
  in the window's decoder layers no non-image query (prompt text, generated tokens) can
  attend to an image key;
* the windows are each single layer, every prefix ``0..m-1`` and every suffix ``m..L-1``;
* each is scored teacher-forced on the baseline's tokens (one forward each, no generation):
  summed KL and log-prob change over the generated tokens (as the answer-level metrics of
  :mod:`vlmlens.experiments.engine`) and whether greedy decoding would still give the
  baseline's tokens (exact, from the argmax after each baseline prefix);
* a window *keeps the output* when those tokens are unchanged and the KL is at most ``tau``
  nats.

What is scored is the whole output (every generated token), not only a final answer after a
separator: teacher-forced on its own trace, a final answer follows from the trace and would
never need the image.

Rules (:func:`stages_from_windows`): **sink** = the longest prefix ``0..m-1`` whose joint
knockout keeps the output; **discard** = the longest such suffix; **fusion** = the layers in
between. When knocking the image out of every layer keeps the output, it does not need the
image and there is no fusion stage. When the sink and the discard windows meet or overlap,
each can be dropped alone but not both (the output can read the image early
*or* late); that is said in words, and the joint knockout of sink and discard is always
measured and reported (``joint``).

The cosine rule of :func:`vlmlens.analysis.attention.stage_details` (how much the image turns
the last token's attention output) stays available as a *proxy*; the dashboard labels it so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..errors import InputError
from ..interventions import Knockout
from ..metrics import DEFAULT_SEPARATOR
from .engine import Progress, Trial, answer_scores, kl_divergence, teacher_forced_kept

DEFAULT_STAGE_TAU = 0.1
STAGE_RULE = ("a window keeps the output when, with no text or generated token attending to the image in its layers, "
              "every generated token stays the greedy choice (teacher-forced) and their summed KL(baseline || knocked "
              "out) <= tau nats; sink = longest prefix 0..m-1 that keeps the output, discard = longest such suffix, "
              "fusion = the layers in between")


@dataclass
class Window:
    """One knockout window and what it did to the answer."""

    first: int
    last: int
    answer_kl: float
    answer_logprob_delta: float
    first_token_kl: float
    tokens_kept: bool
    kept: bool


@dataclass
class CausalStages:
    """Knockout windows and the stages read off them (JSON via :meth:`to_json`)."""

    model: str
    prompt: str
    n_layers: int
    tau: float
    separator: str
    rule: str
    baseline_text: str
    answer_start: int
    answer_tokens: int
    single: list[Window]                 # layer l alone, l = 0..L-1
    prefix: list[Window]                 # layers 0..m-1, m = 1..L
    suffix: list[Window]                 # layers m..L-1, m = L-1..0 (shortest first)
    labels: list[str]                    # per layer: sink / fusion / discard
    sink: list[int] | None               # [first, last] or None
    fusion: list[int] | None
    discard: list[int] | None
    joint: Window | None                 # sink and discard knocked out together
    statement: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CausalStages":
        out = dict(d)
        for k in ("single", "prefix", "suffix"):
            out[k] = [Window(**w) for w in d[k]]
        out["joint"] = Window(**d["joint"]) if d.get("joint") else None
        return cls(**out)


def _span_text(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}–{b}"


def stages_from_windows(prefix_kept: Sequence[bool], suffix_kept: Sequence[bool], n_layers: int) -> dict:
    """The stage rule on plain lists.

    ``prefix_kept[m-1]``: knocking out layers 0..m-1 keeps the output (m = 1..L);
    ``suffix_kept[i]``: knocking out the last i+1 layers keeps it (layers L-1-i..L-1).
    Returns ``labels`` (per layer), ``sink`` / ``fusion`` / ``discard`` ([first, last] or
    None), ``overlap`` (sink and discard windows meet or overlap), ``needs_image``, and the
    window lengths ``n_sink`` / ``n_discard`` before any overlap is resolved.
    """
    L = int(n_layers)
    if len(prefix_kept) != L or len(suffix_kept) != L:
        raise InputError(f"need {L} prefix and {L} suffix outcomes, got {len(prefix_kept)} and {len(suffix_kept)}")
    n_sink = max((m + 1 for m in range(L) if prefix_kept[m]), default=0)
    n_disc = max((i + 1 for i in range(L) if suffix_kept[i]), default=0)
    if n_sink == L or n_disc == L:          # the whole stack can go: the answer does not need the image
        return {"labels": ["sink"] * L, "sink": [0, L - 1], "fusion": None, "discard": None,
                "overlap": False, "needs_image": False, "n_sink": n_sink, "n_discard": n_disc}
    overlap = n_sink + n_disc >= L
    d0 = max(L - n_disc, n_sink)            # discard starts after the sink when they overlap
    labels = ["sink" if l < n_sink else "discard" if l >= d0 else "fusion" for l in range(L)]
    return {"labels": labels,
            "sink": [0, n_sink - 1] if n_sink else None,
            "fusion": [n_sink, d0 - 1] if d0 > n_sink else None,
            "discard": [d0, L - 1] if d0 < L else None,
            "overlap": overlap, "needs_image": True, "n_sink": n_sink, "n_discard": n_disc}


def describe_stages(r: dict, n_layers: int, *, joint_kept: bool | None, single: Sequence[Window] = ()) -> str:
    """The stages in words, including the degenerate outcomes."""
    L = int(n_layers)
    if not r["needs_image"]:
        return (f"the output does not need the image: knocking it out of all {L} layers leaves every generated token "
                "unchanged (no fusion stage)")
    parts = []
    parts.append(f"sink {_span_text(*r['sink'])}" if r["sink"] else "no sink stage (knocking out layer 0 changes the output)")
    if r["overlap"]:
        parts.append(f"no single fusion window: the first {r['n_sink']} layers can be knocked out, and so can the"
                     f" last {r['n_discard']}, but not all of them (the output can read the image early or late)")
    elif r["fusion"]:
        parts.append(f"fusion {_span_text(*r['fusion'])}")
    if r["discard"] and not r["overlap"]:
        parts.append(f"discard {_span_text(*r['discard'])}")
    elif not r["discard"]:
        read = [w.first for w in single if not w.kept]
        last = f" (layer {L - 1} alone changes it)" if (L - 1) in read else ""
        parts.append(f"no discard stage: the output reads the image at the last layer{last}")
    text = " · ".join(parts)
    if joint_kept is False and r["sink"] and r["discard"]:
        text += " — but knocking sink and discard out together changes the output"
    elif joint_kept is True and r["sink"] and r["discard"]:
        text += " — sink and discard knocked out together keep the output"
    return text


def _window(s: Trial, layers: list[int], start: int, tau: float) -> Window:
    out = s.score([Knockout(src="all", dst="image", layers=layers)])
    sc = answer_scores(s.baseline, out, start)
    tok = teacher_forced_kept(s.baseline, out, start)
    return Window(first=min(layers), last=max(layers), answer_kl=sc["answer_kl"],
                  answer_logprob_delta=sc["answer_logprob_delta"],
                  first_token_kl=kl_divergence(s.baseline.first_logprobs, out.first_logprobs),
                  tokens_kept=tok, kept=bool(tok and sc["answer_kl"] <= tau))


def stages_undefined(lm) -> str | None:
    """Why knockout windows cannot measure the three stages on this model (None: they can): a
    hybrid stack's linear-attention / convolution layers read the image without attention weights,
    so no key mask can knock the image out of a window holding them."""
    cross = lm.arch.cross_layers(lm.model)
    if cross:
        return (f"it reads the image only by cross-attention (decoder layers {list(cross)}): the stages are windows of "
                "layers whose queries read image keys in the sequence, which holds none here")
    without = sorted(set(range(lm.n_layers)) - set(lm.arch.attention_layers(lm.model)))
    if not without:
        return None
    return (f"decoder layers {without} of this model have no softmax attention (a hybrid stack), so a knockout cannot "
            "take the image out of a window holding them: the three stages are not defined here")


def causal_stages(lm, image, prompt: str, *, max_new_tokens: int = 16, tau: float = DEFAULT_STAGE_TAU,
                  separator: str = DEFAULT_SEPARATOR, progress: Progress | None = None) -> CausalStages:
    """Sink / fusion / discard of one input from knockout windows (see the module docstring).

    Costs one capture (the baseline) and 3L + 1 teacher-forced forwards.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise InputError(f"tau must be a positive number of nats, got {tau!r}")
    why = stages_undefined(lm)
    if why:
        raise InputError(why)
    t0 = time.perf_counter()
    L = lm.n_layers
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens, reuse=False)
    base = s.baseline
    start = 0   # the whole output (see the module docstring)
    total, done = 3 * L + 1, 0

    def step(layers, what):
        nonlocal done
        w = _window(s, layers, start, tau)
        done += 1
        if progress:
            progress(done, total, what)
        return w

    single = [step([l], f"knock out layer {l}") for l in range(L)]
    prefix = [step(list(range(m)), f"knock out layers 0-{m - 1}") for m in range(1, L + 1)]
    suffix = [step(list(range(L - 1 - i, L)), f"knock out layers {L - 1 - i}-{L - 1}") for i in range(L)]
    r = stages_from_windows([w.kept for w in prefix], [w.kept for w in suffix], L)
    joint = None
    if r["sink"] and r["discard"]:
        layers = list(range(r["sink"][0], r["sink"][1] + 1)) + list(range(r["discard"][0], r["discard"][1] + 1))
        joint = step(sorted(set(layers)), "knock out sink and discard together")
    notes: list[str] = []
    statement = describe_stages(r, L, joint_kept=None if joint is None else joint.kept, single=single)
    return CausalStages(lm.name, s.prep.prompt, L, float(tau), separator, STAGE_RULE, base.run.generated_text, start,
                        len(base.generated_ids) - start, single, prefix, suffix, r["labels"], r["sink"], r["fusion"],
                        r["discard"], joint, statement, round(time.perf_counter() - t0, 3), notes)
