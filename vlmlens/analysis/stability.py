"""Do the image tokens stop changing? Measured on the tokens themselves, not on cloud statistics.

Entropy, intrinsic dimension, CKA and sequence curvature are invariant to rotating and
shifting the whole token cloud: a layer that moves every token completely (a fresh random
rotation + shift) leaves them flat. So they never decide "stabilised" here. What does:

* per token and per decoder layer ``l`` (the change layer ``l`` makes, hidden-state index
  ``l`` to ``l + 1``): the *relative step* ``‖h_{l+1} − h_l‖ / ‖h_l‖`` and the adjacent-layer
  cosine distance ``1 − cos(h_l, h_{l+1})``, summarised over the span's tokens by quantiles;
* the rule (:func:`stabilised_from`): the image tokens are *stable from decoder layer m* when
  every layer ``l >= m`` moves the ``q``-quantile token (default: 90 % of the tokens) by at
  most ``tol`` of its norm (default 5 %). The answer is m in 0..L-1, or None ("not
  stabilised": the last layer still moves them by more than the tolerance). m = 0 means no
  decoder layer changes them by more than the tolerance at all, which is stated as such;
* the drift that remains: ``‖h_L − h_m‖ / ‖h_m‖`` (the median token), since small steps can add up.

Functional interchangeability (does a later layer *need* its own image states?) is causal and
comes from the substitution matrix (:mod:`vlmlens.experiments.substitution`); see
:func:`vlmlens.findings.functional_stabilisation`.

Sample size. Image and text spans have different token counts (64 vs 8 on tiny-shapes), and the
estimators are biased by n (normalised entropy is bounded by ``log(n − 1)``; TwoNN on 8 points
scatters by a factor of 3). :func:`matched_curves` compares them at equal n: the larger span is
subsampled to the smaller one's size ``repeats`` times and the spread is kept as a band.
Estimators on fewer than :data:`MIN_POINTS` points are NaN with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TOL = 0.05
DEFAULT_QUANTILE = 0.9
#: fewest points each geometry estimator is shown for (fewer: NaN, greyed, with the reason)
MIN_POINTS = {"entropy_normalized": 3, "id_twonn": 10, "id_mle": 10, "entropy": 3}


@dataclass
class Movement:
    """Per-token movement of one span across decoder layers ([L, n] arrays)."""

    span: str
    rel_step: np.ndarray        # ‖h_{l+1} − h_l‖ / ‖h_l‖
    cos_dist: np.ndarray        # 1 − cos(h_l, h_{l+1})
    drift: np.ndarray           # [L, n]: ‖h_L − h_l‖ / ‖h_l‖ (how far each token still goes from layer l)

    @property
    def n_tokens(self) -> int:
        return int(self.rel_step.shape[1])

    def quantile(self, q: float, what: str = "rel_step") -> np.ndarray:
        """[L] the q-quantile over tokens of ``rel_step`` / ``cos_dist`` / ``drift``."""
        a = getattr(self, what)
        return np.quantile(a, q, axis=1) if a.shape[1] else np.full(a.shape[0], np.nan)


def token_movement(H: np.ndarray, span: str = "image") -> Movement:
    """:class:`Movement` of the states ``H`` [L+1, n, d] (index 0 = embeddings)."""
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 3 or H.shape[0] < 2:
        raise ValueError(f"need states [layers >= 2, n, d], got shape {H.shape}")
    a, b = H[:-1], H[1:]
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(na > 0, np.linalg.norm(b - a, axis=-1) / na, np.nan)
        cos = np.where((na > 0) & (nb > 0), (a * b).sum(-1) / (na * nb), np.nan)
        drift = np.where(na > 0, np.linalg.norm(H[-1][None] - a, axis=-1) / na, np.nan)
    return Movement(span, rel, 1.0 - np.clip(cos, -1.0, 1.0), drift)


def run_movement(run, span: str = "image") -> Movement:
    """:func:`token_movement` of a run's span (needs hidden states)."""
    return token_movement(run.span_states(span), span)


def stabilised_from(rel_step_quantile, tol: float = DEFAULT_TOL) -> int | None:
    """Smallest decoder layer m such that every layer l >= m has step <= ``tol`` (see the
    module docstring); None when the last layer's step is above it (or is NaN)."""
    s = np.asarray(rel_step_quantile, dtype=np.float64)
    ok = np.isfinite(s) & (s <= tol)
    if not ok.size or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if bad.size else 0


@dataclass
class Stabilisation:
    """The outcome of the token-movement rule on one span."""

    span: str
    layer: int | None           # stable from this decoder layer on; None = not stabilised
    tol: float
    quantile: float
    step_q: list[float]         # [L] the q-quantile relative step per decoder layer
    step_median: list[float]    # [L] the median relative step
    cos_median: list[float]     # [L] the median adjacent-layer cosine distance
    drift_median: float | None  # median ‖h_L − h_m‖ / ‖h_m‖ from the stable layer (None if not stabilised)
    n_tokens: int
    statement: str

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def stabilisation(run, span: str = "image", *, tol: float = DEFAULT_TOL, quantile: float = DEFAULT_QUANTILE) -> Stabilisation:
    """The token-movement stabilisation of ``span`` with its statement in words."""
    if not 0 < tol < 10:
        raise ValueError(f"tol must be a positive fraction, got {tol!r}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    m = run_movement(run, span)
    q = m.quantile(quantile)
    med = m.quantile(0.5)
    L = len(q)
    layer = stabilised_from(q, tol)
    pct = f"{quantile:.0%} of the {m.n_tokens} {span} tokens"
    if layer is None:
        last = q[-1]
        worst = int(np.nanargmax(med)) if np.isfinite(med).any() else None
        text = (f"not stabilised: decoder layer {L - 1} still moves {pct} by up to {last:.0%} of their norm "
                f"(tolerance {tol:.0%}; largest median step {np.nanmax(med):.0%} at layer {worst})")
        drift = None
    else:
        drift = float(np.median(m.drift[layer])) if m.n_tokens else None
        if layer == 0:
            text = (f"no decoder layer moves {pct} by more than {tol:.0%} of their norm: the {span} states stay "
                    f"close to the embeddings (drift to the last layer {drift:.0%})")
        else:
            text = (f"stable from decoder layer {layer}: layers {layer}–{L - 1} each move {pct} by at most {tol:.0%} "
                    f"of their norm (drift from layer {layer} to the last: {drift:.0%} for the median token)")
    as_list = lambda a: [None if not np.isfinite(x) else float(x) for x in a]  # noqa: E731
    return Stabilisation(span, layer, float(tol), float(quantile), as_list(q), as_list(med),
                         as_list(m.quantile(0.5, "cos_dist")), drift, m.n_tokens, text)


# ---- image vs text at matched sample size --------------------------------------------------------

@dataclass
class MatchedCurve:
    """A span's curve recomputed on ``n`` of its tokens, ``repeats`` random subsets."""

    metric: str
    span: str
    n: int                     # tokens per subsample
    n_total: int               # tokens in the span
    median: np.ndarray         # [layers]
    lo: np.ndarray             # [layers] 10th percentile
    hi: np.ndarray             # [layers] 90th percentile
    reason: str | None = None  # why it is NaN (too few points), else None


def curves_of(H: np.ndarray, metrics=("entropy_normalized", "id_twonn", "id_mle")) -> dict[str, np.ndarray]:
    """The n-dependent geometry curves of states ``H`` [L+1, n, d] (NaN below MIN_POINTS)."""
    from .geometry import layer_curves

    n = H.shape[1]
    c = layer_curves(H, with_cka=False, workers=1)
    return {m: (c[m] if n >= MIN_POINTS.get(m, 2) else np.full(H.shape[0], np.nan)) for m in metrics}


def matched_curves(H: np.ndarray, n: int, *, span: str = "image", repeats: int = 20, seed: int = 0,
                   metrics=("entropy_normalized", "id_twonn", "id_mle")) -> dict[str, MatchedCurve]:
    """Each metric of ``H`` [L+1, N, d] on ``repeats`` random subsets of ``n`` of its N tokens
    (without replacement; ``n >= N`` uses all tokens once). Metrics whose estimator needs more
    than ``n`` points are NaN with ``reason`` set."""
    H = np.asarray(H, dtype=np.float32)
    N = H.shape[1]
    n = int(min(n, N))
    rng = np.random.default_rng(seed)
    draws = [np.arange(N)] if n >= N else [np.sort(rng.choice(N, size=n, replace=False)) for _ in range(repeats)]
    vals = {m: [] for m in metrics}
    for idx in draws:
        for m, v in curves_of(H[:, idx], metrics).items():
            vals[m].append(v)
    out = {}
    for m in metrics:
        V = np.asarray(vals[m], dtype=np.float64)
        need = MIN_POINTS.get(m, 2)
        reason = f"{m} needs at least {need} tokens; {n} here" if n < need else None
        with np.errstate(all="ignore"):
            if np.isfinite(V).any():
                med, lo, hi = np.nanmedian(V, 0), np.nanpercentile(V, 10, 0), np.nanpercentile(V, 90, 0)
            else:
                med = lo = hi = np.full(H.shape[0], np.nan)
        out[m] = MatchedCurve(m, span, n, N, med, lo, hi, reason)
    return out


def image_vs_text(run, *, repeats: int = 20, seed: int = 0, metrics=("entropy_normalized", "id_twonn", "id_mle"),
                  big: str = "image", small: str = "text") -> dict:
    """Image and text curves at equal sample size: ``small`` on all its tokens, ``big``
    subsampled to the same n. Returns {"n": n, small: {metric: MatchedCurve}, big: {...}}."""
    Hs, Hb = run.span_states(small), run.span_states(big)
    n = min(Hs.shape[1], Hb.shape[1])
    return {"n": n, small: matched_curves(Hs, n, span=small, repeats=1, seed=seed, metrics=metrics),
            big: matched_curves(Hb, n, span=big, repeats=repeats, seed=seed, metrics=metrics)}
