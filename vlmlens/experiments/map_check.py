"""Does a heatmap predict what the answer depends on? Deletion and insertion curves.

A map (attention to the image, LLaVA-CAM, the patch lens) ranks the image tokens. If it shows
"where the model looks", cutting its top tokens first should hurt the answer sooner than cutting
tokens in a random order, and giving the model only its top tokens should bring the answer back
sooner. Both are measured causally, through the lens (:class:`vlmlens.interventions.PatchKnockout`:
the cut tokens are masked from decoder layer 0, so nothing reads them):

* **measure**: the model's own output scored teacher-forced under the cut, as a probability
  relative to the whole image: ``exp(log p(output | cut) - log p(output | whole image))`` (1 =
  unchanged, 0 = gone; it can exceed 1 when a cut makes the output more likely). ``target="output"``
  (default) scores every generated token; ``"answer"`` only the answer after the separator (a
  reasoning trace's final answer, given the trace, often hardly depends on the image at all);
* **deletion curve**: the measure after cutting the top ``f`` of the tokens in the map's order,
  for ``f = 0, 1/S, ..., 1``; **insertion curve**: the measure when only the top ``f`` are kept;
* **AUC**: the trapezoid area under each curve over ``f`` in [0, 1]. A faithful map has a low
  deletion AUC and a high insertion AUC;
* **baselines**: the same curves in the reverse of the map's order, and in ``n_random`` random
  orders. When no cut on any curve (the whole image included) moves the measure by ``FLAT`` or more,
  the target does not depend on the image and no map can be tested on it: both verdicts say
  *untestable*. Else
  the map is *better than random* on a curve when at most a share ``ALPHA`` of the
  random orders does as well: ``p = (1 + #{random AUC at least as good}) / (1 + n_random) <=
  ALPHA`` (the default 19 random orders make the smallest p 0.05); *worse than random* when the
  same holds the other way round; else *no better than random*. The curves have ``S`` steps, so
  an answer that hangs on a few tokens is located to a ``1/S`` share of them: an order can only
  be told from chance as finely as that.

Cost: ``1 + 2 (S - 1) (2 + n_random)`` teacher-forced forwards for one map (no generation); the
random orders and the whole-cut end are shared by every map of one input (:class:`MapScorer`
caches every cut it has run). ``max_forwards`` bounds it, refused up front when a request needs
more. Forwards run one at a time (each cut changes the image rows from layer 0, so no prefix
is shared; a batched form would stack copies of one input with different masks). The maps
themselves, the pointing game and the report of one input: :mod:`.map_report`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError
from ..interventions import PatchKnockout
from ..metrics import DEFAULT_SEPARATOR
from ..vocabulary import MAP_MAX_FORWARDS, MAP_RANDOM, MAP_STEPS
from .engine import Trial, answer_start

DEFAULT_STEPS, DEFAULT_RANDOM, MAX_FORWARDS = MAP_STEPS, MAP_RANDOM, MAP_MAX_FORWARDS
ALPHA = 0.05
#: the least change of the measure, with the whole image cut, that makes a map testable
FLAT = 0.05
TARGETS = ("output", "answer")


@dataclass
class MapCheck:
    """One map's deletion and insertion curves against the reverse and random orders."""

    name: str                          # e.g. "attention, layer 3"
    fractions: list                    # f of each step
    deletion: dict                     # order ("map", "reverse", "random") -> measure per step ("random": mean)
    insertion: dict
    auc: dict                          # "deletion" / "insertion" -> {"map", "reverse", "random", "random_sd", "p"}
    verdict: dict                      # "deletion" / "insertion" -> "better than random" | "no better..." | "worse..."
    n_image: int
    n_random: int
    answer: str
    measure: str = "probability of the model's output relative to the whole image (teacher-forced)"
    random_curves: dict = field(default_factory=dict)   # "deletion" / "insertion" -> one curve per random order

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def statement(self) -> str:
        d, i = self.auc["deletion"], self.auc["insertion"]
        vd, vi = self.verdict["deletion"], self.verdict["insertion"]
        if vd == "untestable":
            return (f"{self.name}: untestable here -- no cut of image tokens (the whole image included) moves the"
                    f" output's probability by {100 * FLAT:.0f}% or more, so it does not depend on the image")
        if vd == vi == "better than random":
            head = "predicts which patches the answer depends on better than random"
        elif "better than random" in (vd, vi):
            head = "predicts the answer's dependence on patches better than random on one curve only"
        elif "worse than random" in (vd, vi):
            head = "predicts the answer's dependence on patches worse than random"
        else:
            head = "predicts the answer's dependence on patches no better than random"
        return (f"{self.name} {head}: deletion AUC {d['map']:.2f} vs {d['random']:.2f} random (p = {d['p']:.2f};"
                f" {d['reverse']:.2f} reversed; lower is better), insertion AUC {i['map']:.2f} vs {i['random']:.2f}"
                f" random (p = {i['p']:.2f}; {i['reverse']:.2f} reversed; higher is better), {self.n_random} random"
                " orders")


def _auc(fractions, values) -> float:
    f, v = np.asarray(fractions, float), np.asarray(values, float)
    return float(np.sum((f[1:] - f[:-1]) * (v[1:] + v[:-1]) / 2))


def _p_value(value: float, nulls, lower_is_better: bool) -> float:
    """The share of random orders at least as good as ``value`` (counting the map itself)."""
    nulls = np.asarray(nulls, float)
    tol = 1e-12
    hits = (nulls <= value + tol) if lower_is_better else (nulls >= value - tol)
    return float((1 + hits.sum()) / (1 + len(nulls)))


def _verdict(value: float, nulls, lower_is_better: bool, alpha: float = ALPHA) -> str:
    if _p_value(value, nulls, lower_is_better) <= alpha:
        return "better than random"
    if _p_value(value, nulls, not lower_is_better) <= alpha:
        return "worse than random"
    return "no better than random"


class CurveScorer:
    """Deletion / insertion curves of orders over ``n_image`` tokens, for any ``measure(knocked)``
    (the answer's relative probability with those tokens cut; ``measure(())`` must be 1). Every
    cut is measured once and cached, so maps of one input share the random orders and the ends."""

    def __init__(self, n_image: int, measure, *, steps: int = DEFAULT_STEPS, n_random: int = DEFAULT_RANDOM,
                 seed: int = 0, max_forwards: int = MAX_FORWARDS, answer: str = ""):
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 64:
            raise InputError(f"steps must be an integer in 2..64 (points on each curve, besides f = 0), got {steps!r}")
        if isinstance(n_random, bool) or not isinstance(n_random, int) or not 1 <= n_random <= 99:
            raise InputError(f"n_random must be an integer in 1..99 (random orders), got {n_random!r}")
        if n_image < 2:
            raise InputError(f"this input has {n_image} image token(s): no order of them to test")
        self.n_image, self._measure, self.answer = int(n_image), measure, answer
        self.steps, self.n_random, self.seed = steps, n_random, int(seed)
        self.max_forwards = int(max_forwards)
        self.fractions = [i / steps for i in range(steps + 1)]
        self.counts = [int(math.floor(f * self.n_image + 0.5)) for f in self.fractions]
        self._cache: dict[tuple, float] = {(): 1.0}
        self.forwards = 0
        self._random = [np.random.default_rng([self.seed, r]).permutation(self.n_image) for r in range(n_random)]
        self._random_curves = None

    def measure(self, knocked) -> float:
        """The answer's probability relative to the whole image with ``knocked`` image tokens cut."""
        key = tuple(sorted({int(i) for i in knocked}))
        if key not in self._cache:
            self._cache[key] = float(self._measure(key))
            self.forwards += 1
        return self._cache[key]

    def _cuts(self, order) -> list[tuple]:
        every = set(range(self.n_image))
        top = [{int(i) for i in order[:c]} for c in self.counts]
        return [tuple(sorted(t)) for t in top] + [tuple(sorted(every - t)) for t in top]

    def needed(self, orders) -> int:
        """Forwards not yet run that the curves of ``orders`` need."""
        return len({k for o in orders for k in self._cuts(o)} - set(self._cache))

    def curves(self, order) -> tuple[list[float], list[float]]:
        """(deletion, insertion) in the given order of image tokens (most important first)."""
        cuts = self._cuts(order)
        n = len(self.counts)
        vals = [self.measure(c) for c in cuts]
        return vals[:n], vals[n:]

    def order_of(self, values) -> np.ndarray:
        """The image tokens from the highest map value to the lowest. Ties (a flat region of a map)
        fall in one fixed random order, never the tokens' raster order, which would favour a corner."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size != self.n_image:
            raise InputError(f"a map of {v.size} values for {self.n_image} image tokens")
        if not np.isfinite(v).all():
            raise InputError("the map has values that are not finite")
        tie = np.random.default_rng([self.seed, 1 << 20]).permutation(self.n_image)
        return np.lexsort((tie, -v))

    def check(self, values, name: str = "map") -> MapCheck:
        """Score one map: its order, the reverse order and the shared random orders."""
        order = self.order_of(values)
        need = self.needed([order, order[::-1], *self._random])
        if self.forwards + need > self.max_forwards:
            raise InputError(f"scoring {name} needs {need} more forwards ({self.forwards} run so far); the limit is"
                             f" {self.max_forwards}: use fewer steps or random orders, or raise max_forwards")
        if self._random_curves is None:
            self._random_curves = [self.curves(r) for r in self._random]
        m_del, m_ins = self.curves(order)
        r_del, r_ins = self.curves(order[::-1])
        rd = np.array([c[0] for c in self._random_curves])
        ri = np.array([c[1] for c in self._random_curves])
        f = self.fractions
        auc, verdict = {}, {}
        for curve, mine, rev, rnd, low in (("deletion", m_del, r_del, rd, True), ("insertion", m_ins, r_ins, ri, False)):
            nulls = [_auc(f, c) for c in rnd]
            a = _auc(f, mine)
            auc[curve] = {"map": a, "reverse": _auc(f, rev), "random": float(np.mean(nulls)),
                          "random_sd": float(np.std(nulls, ddof=1)) if len(nulls) > 1 else 0.0,
                          "p": _p_value(a, nulls, low)}
            verdict[curve] = _verdict(a, nulls, low)
        every = np.concatenate([m_del, m_ins, r_del, r_ins, rd.ravel(), ri.ravel()])
        if float(np.max(np.abs(every - 1.0))) < FLAT:    # no cut moves the target: nothing to rank
            verdict = {"deletion": "untestable", "insertion": "untestable"}
        return MapCheck(name, list(f), {"map": m_del, "reverse": r_del, "random": rd.mean(0).tolist()},
                        {"map": m_ins, "reverse": r_ins, "random": ri.mean(0).tolist()}, auc, verdict, self.n_image,
                        self.n_random, self.answer, random_curves={"deletion": rd.tolist(), "insertion": ri.tolist()})


class MapScorer(CurveScorer):
    """:class:`CurveScorer` on one model input: the baseline is generated once (``max_new_tokens``),
    and every cut is one teacher-forced forward through the lens (:class:`PatchKnockout`)."""

    def __init__(self, lm, image, prompt: str, *, max_new_tokens: int = 16, separator: str = DEFAULT_SEPARATOR,
                 target: str = "output", **kwargs):
        if target not in TARGETS:
            raise InputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.trial = Trial(lm, image, prompt, max_new_tokens=max_new_tokens)
        base = self.trial.baseline
        ids = base.generated_ids
        if not ids:
            raise InputError("the model generated nothing for this input: there is no answer to score")
        tok = getattr(lm.processor, "tokenizer", None)
        start = answer_start(ids, base.run.generated_text, separator, tok, base.run.generated_tokens)
        self.start = start if target == "answer" and start < len(ids) else 0
        self.target = target
        self.full = float(sum(base.target_logprobs[self.start:]))
        super().__init__(len(self.trial.prep.image_pos), self._forward, answer=base.run.generated_text, **kwargs)

    def _forward(self, knocked: tuple) -> float:
        out = self.trial.score([PatchKnockout(knocked)])
        return math.exp(min(sum(out.target_logprobs[self.start:]) - self.full, 50.0))
