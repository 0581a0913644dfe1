"""Attention flow to the image, per layer: shares, concentration, three stages, the cliff.

Everything here reads arrays a Run already holds (recorded by the lens during capture);
nothing recomputes attention. Layers are decoder layers 0..L-1.

* :func:`attention_share` -- how much of the chosen queries' attention lands on image keys
  (``attention_to_image``), optionally normalised per visible key.
* :func:`image_concentration` -- how the image part of the attention is spread over the
  image tokens (``attention_maps``): normalised entropy and the share of the top 1% tokens.
  A *sink* pattern is a few tokens soaking up the mass (low entropy, high top share), a
  *fusion* pattern reads from the tokens that carry content.
* :func:`frame_attention` -- a video run's attention on each temporal slot, per layer.
* :func:`three_stages` / :func:`stage_details` -- VisiPruner's (arXiv 2510.17205) sink /
  fusion / discard segmentation, from the value contributions the lens records at the last
  prompt token (``attn_out``, ``image_contrib``, ``image_contrib_norm``).
* :func:`attention_cliff` -- the first layer from which the last token's image share stays
  below a fraction of its peak to the end of the stack (the attention-side "cliff" of
  arXiv 2406.06579, defined so that it matches its name); :func:`sharpest_drop` is the layer
  after the largest single drop, which a later rise can contradict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

QUERIES = ("last", "text", "generated", "all")
STAGES = ("sink", "fusion", "discard")


# ---- shares --------------------------------------------------------------------------------

#: query sets of the attention functions, in the span vocabulary (vlmlens.run.SPAN_VOCABULARY)
QUERY_SPANS = {"last": "last", "text": "text", "generated": "generated", "all": "reads_image"}


def query_positions(run, query: str = "last") -> np.ndarray:
    """Positions of the queries named by ``query``.

    ``last``: the last prompt token; ``text``: the text after the image (to the end of the
    prompt); ``generated``: the generated tokens (may be empty); ``all``: every non-image
    position after the first image token (the queries that can see the image; the span
    vocabulary's ``reads_image``). One definition: :func:`vlmlens.run.span_mask`.
    """
    if query not in QUERY_SPANS:
        raise ValueError(f"unknown query set {query!r}; expected one of {QUERIES}")
    return run.spans.positions(QUERY_SPANS[query])


@dataclass
class Share:
    """Attention share per layer ([L]) or per layer and head ([L, H])."""

    image: np.ndarray        # share on image keys, in [0, 1]
    rest: np.ndarray         # share on every other key (system, text, generated): 1 - image
    positions: np.ndarray    # the query positions averaged over
    query: str
    normalized: bool = False


def attention_share(run, *, query: str = "last", per_head: bool = False, normalize_per_key: bool = False) -> Share:
    """Share of the chosen queries' attention on image keys vs the rest, per layer.

    Reads ``run.attention_to_image`` [layer, head, pos] (recorded by the lens; never eager
    attention). Without ``per_head`` the heads are averaged first (per query), then the
    queries. With ``normalize_per_key`` each query's share ``s`` becomes a per-key density
    share ``(s / n_img) / (s / n_img + (1 - s) / n_other)``, where ``n_img`` / ``n_other`` are
    the image / non-image keys the query can see under the causal mask (sliding windows and
    intervention key masks are not accounted for). Returns NaN arrays when ``query`` selects
    no positions (e.g. ``generated`` with nothing generated).
    """
    pos = query_positions(run, query)
    at = np.asarray(run.attention_to_image, dtype=np.float64)   # [L, H, n]
    L, H = at.shape[:2]
    shape = (L, H) if per_head else (L,)
    if len(pos) == 0:
        nan = np.full(shape, np.nan)
        return Share(nan, nan.copy(), pos, query, normalize_per_key)
    x = at[:, :, pos]                                           # [L, H, P]
    if not per_head:
        x = x.mean(axis=1)                                      # [L, P]
    if normalize_per_key:
        img = run.spans.positions("image")
        n_img = np.array([(img < p).sum() for p in pos], dtype=np.float64)
        n_other = pos + 1 - n_img
        a, b = x / np.maximum(n_img, 1), (1 - x) / n_other
        x = np.where(a + b > 0, a / np.where(a + b > 0, a + b, 1), 0.0)
    share = np.clip(nanmean(x, axis=-1), 0.0, 1.0)
    return Share(share, 1.0 - share, pos, query, normalize_per_key)


def nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the values that are not NaN; NaN (without numpy's warning) where there are none,
    as in a hybrid model's linear-attention layers, which have no attention weights to record."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    return np.divide(np.where(ok, x, 0.0).sum(axis=axis), n, out=np.full(n.shape, np.nan), where=n > 0)


# ---- concentration over image keys --------------------------------------------------------

def image_concentration(run, *, query_index: int = 0, top_frac: float = 0.01) -> dict[str, np.ndarray]:
    """How the image part of the attention is spread over image tokens, per layer.

    From ``run.attention_maps[:, query_index]`` (head-averaged attention of one query --
    index 0 is the last prompt token -- over the image keys), normalised per layer to a
    distribution ``p`` over the image tokens. Returns arrays [L]:

    * ``mass``: total attention on image keys (the head-averaged share),
    * ``entropy``: ``-sum p log p / log n_image`` in [0, 1] (1 = uniform),
    * ``top_share``: mass of the top ``k = max(1, ceil(top_frac * n_image))`` tokens in p,
    * ``top_tokens`` [L, k]: their image-token indices (most attended first).

    A sink layer has low entropy / high top share on the same few tokens in many layers; a
    fusion layer spreads over (or focuses on) content tokens -- compare ``top_tokens`` across
    layers and with ``image_contrib_norm``.
    """
    m = np.asarray(run.attention_maps[:, query_index], dtype=np.float64)   # [L, n_img]
    n = m.shape[1]
    k = max(1, int(math.ceil(top_frac * n)))
    mass = m.sum(axis=1)
    p = m / np.where(mass > 0, mass, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    ent = ent / math.log(n) if n > 1 else np.zeros_like(ent)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(p, order, axis=1).sum(axis=1)
    return {"mass": mass, "entropy": np.clip(ent, 0, 1), "top_share": top, "top_tokens": order, "k": k}


def frame_attention(run, *, query_index: int = 0) -> np.ndarray:
    """A video run's attention per temporal slot: [L, slots], the head-averaged attention of one query
    (index 0: the last prompt token) on each slot's tokens (``attention_maps`` summed over the slot, the
    slots being equal consecutive runs of the video tokens). Rows sum to that query's share of
    attention on the whole video; NaN on layers without softmax attention."""
    from ..errors import InputError

    video = run.meta.get("video")
    if not video:
        raise InputError("not a video run: per-frame attention needs a capture of a vlmlens.video.Video")
    m = np.asarray(run.attention_maps[:, query_index], dtype=np.float64)    # [L, n_img]
    return m.reshape(m.shape[0], int(video["slots"]), -1).sum(axis=2)


# ---- three stages -------------------------------------------------------------------------

def _require_contrib(run) -> tuple[np.ndarray, np.ndarray]:
    if "attn_out" not in run.arrays or "image_contrib" not in run.arrays:
        raise KeyError("this run has no value contributions; capture it with record_contrib=True")
    return np.asarray(run.arrays["attn_out"], np.float64), np.asarray(run.arrays["image_contrib"], np.float64)


def image_contribution(run) -> dict[str, np.ndarray]:
    """Per layer, at the last prompt token: ``cos`` = cos(o - sum_j c_j, o) (1: the image
    changes nothing in the attention output's direction) and ``rel_norm`` = |sum_j c_j| / |o|.
    NaN where the layer recorded nothing (or o = 0)."""
    o, c = _require_contrib(run)
    r = o - c
    no, nr = np.linalg.norm(o, axis=1), np.linalg.norm(r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where((no > 0) & (nr > 0), (r * o).sum(1) / (no * nr), np.nan)
        rel = np.where(no > 0, np.linalg.norm(c, axis=1) / no, np.nan)
    return {"cos": cos, "rel_norm": rel}


@dataclass
class Stages:
    """Result of :func:`stage_details` (the numbers behind :func:`three_stages`)."""

    labels: list[str]
    cos: np.ndarray                 # [L] cos(o - sum_j c_j, o)
    rel_norm: np.ndarray            # [L] |sum_j c_j| / |o|
    fusion_layers: list[int]        # layers with cos < fusion_cos
    first_fusion: int | None
    discard_from: int               # first discard layer (L if none)
    critical: dict[int, list[int]] = field(default_factory=dict)  # fusion layer -> top image tokens by |c_j|
    fusion_cos: float = 0.995
    discard_cos: float = 0.999


def stage_details(run, *, fusion_cos: float = 0.995, discard_cos: float = 0.999, n_critical: int = 5) -> Stages:
    """Sink / fusion / discard segmentation of the decoder layers (VisiPruner's rules).

    With ``o`` the attention block's output at the last prompt token (the o_proj output) and
    ``c_j = W_O concat_h(a_hj v_hj)`` image token j's part of it (see
    :class:`vlmlens.recorder.Recorder`), let ``cos_l = cos(o - sum_j c_j, o)`` at layer l.

    * a layer is a *fusion* layer when removing every image contribution turns its output by
      more than the threshold: ``cos_l < fusion_cos``;
    * *discard* starts at the first layer from which every layer stays above ``discard_cos``
      (``cos >= discard_cos`` from there to the last layer);
    * *sink*: every layer before the first fusion layer;
    * the layers from the first fusion layer up to the discard start are labelled *fusion*
      (a stage: some of them may have ``fusion_cos <= cos < discard_cos``).

    Without any fusion layer, layers before the discard start are labelled sink. NaN cos
    (nothing recorded) counts as neither fusion nor a break of the discard run. ``critical``
    lists, for each fusion layer, the ``n_critical`` image tokens with the largest |c_j|.
    """
    if not 0 < fusion_cos <= discard_cos <= 1:
        raise ValueError(f"need 0 < fusion_cos <= discard_cos <= 1, got {fusion_cos}, {discard_cos}")
    ic = image_contribution(run)
    cos = ic["cos"]
    L = len(cos)
    fusion = [l for l in range(L) if cos[l] < fusion_cos]
    below = [l for l in range(L) if cos[l] < discard_cos]
    discard_from = below[-1] + 1 if below else 0
    first = fusion[0] if fusion else None
    start = first if first is not None else discard_from
    labels = ["sink" if l < start else "fusion" if l < discard_from else "discard" for l in range(L)]
    critical = {}
    norms = run.arrays.get("image_contrib_norm")
    if norms is not None:
        for l in fusion:
            row = np.nan_to_num(np.asarray(norms[l], np.float64), nan=-np.inf)
            critical[l] = [int(i) for i in np.argsort(-row, kind="stable")[:n_critical]]
    return Stages(labels, cos, ic["rel_norm"], fusion, first, discard_from, critical, fusion_cos, discard_cos)


def three_stages(run, *, fusion_cos: float = 0.995, discard_cos: float = 0.999) -> list[str]:
    """One of ``sink`` / ``fusion`` / ``discard`` per decoder layer; rules in :func:`stage_details`."""
    return stage_details(run, fusion_cos=fusion_cos, discard_cos=discard_cos).labels


def stage_bands(labels: list[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of equal labels as ``(label, first_layer, last_layer)``."""
    out: list[tuple[str, int, int]] = []
    for l, lab in enumerate(labels):
        if out and out[-1][0] == lab:
            out[-1] = (lab, out[-1][1], l)
        else:
            out.append((lab, l, l))
    return out


# ---- the cliff ----------------------------------------------------------------------------

DEFAULT_CLIFF_FRAC = 0.25


def sharpest_drop(run, *, query: str = "last", relative: bool = False, min_drop: float = 0.0) -> int | None:
    """The decoder layer right after the sharpest drop of the image share.

    With ``s = attention_share(run, query=query).image`` ([L], heads averaged), the drop
    after layer l is ``d_l = s[l] - s[l+1]`` (``relative=True``: ``d_l / s[l]``). Returns
    ``argmax_l d_l + 1``, or None when there are fewer than two layers or the largest drop is
    not above ``min_drop``. Ties go to the shallowest layer. A drop can be followed by a rise
    (the answer looks back at the image later): this is not a cliff, see :func:`attention_cliff`.
    """
    s = attention_share(run, query=query).image
    if len(s) < 2 or not np.isfinite(s).any():
        return None
    d = s[:-1] - s[1:]
    if relative:
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(s[:-1] > 0, d / s[:-1], 0.0)
    d = np.nan_to_num(d, nan=-np.inf)
    l = int(np.argmax(d))
    return l + 1 if d[l] > min_drop else None


@dataclass
class AttentionCliff:
    """:func:`attention_cliff_details`: the cliff and the numbers behind it."""

    layer: int | None          # first layer from which the share stays below the threshold; None: never
    share: np.ndarray          # [L] image share of the query set (heads averaged)
    peak: float
    peak_layer: int | None
    threshold: float           # frac * peak
    frac: float
    query: str
    statement: str


def attention_cliff_details(run, *, query: str = "last", frac: float = DEFAULT_CLIFF_FRAC) -> AttentionCliff:
    """The layer after which the answer stops looking at the image, as the name says.

    With ``s`` the image share of ``query`` per decoder layer and ``p = max s`` its peak, the
    cliff is the first layer ``l`` after the peak such that ``s[l'] < frac * p`` for every
    ``l' >= l`` (to the last layer). None when the last layer's share is still at or above
    the threshold: the answer looks at the image until the end.
    """
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac!r}")
    s = np.asarray(attention_share(run, query=query).image, dtype=np.float64)
    L = len(s)
    who = "the last prompt token" if query == "last" else f"the {query} tokens"
    if not L or not np.isfinite(s).any():
        return AttentionCliff(None, s, float("nan"), None, float("nan"), frac, query,
                              f"no attention share recorded for {who}")
    pk = int(np.nanargmax(s))
    peak = float(s[pk])
    thr = frac * peak
    below = np.isfinite(s) & (s < thr)
    layer = None
    if below[-1]:
        bad = np.flatnonzero(~below)
        layer = int(bad[-1] + 1) if bad.size else 0
    if layer is None:
        text = (f"none: {who} still puts {s[-1]:.0%} of its attention on the image at the last layer "
                f"(peak {peak:.0%} at layer {pk}; threshold {frac:.0%} of the peak)")
    else:
        text = (f"layer {layer}: from there to the last layer {who} puts less than {thr:.0%} of its attention on "
                f"the image ({frac:.0%} of its peak {peak:.0%} at layer {pk})")
    return AttentionCliff(layer, s, peak, pk, thr, frac, query, text)


def attention_cliff(run, *, query: str = "last", frac: float = DEFAULT_CLIFF_FRAC) -> int | None:
    """The first decoder layer from which the image share of ``query`` stays below ``frac``
    of its peak for the rest of the stack (None: it never does); see
    :func:`attention_cliff_details`."""
    return attention_cliff_details(run, query=query, frac=frac).layer
