"""Figures of representation dynamics across layers (pure: Run(s) -> plotly Figure).

* :func:`fig_dynamics` — entropy, intrinsic dimension, curvature and adjacent-layer cosine
  distance per layer, one curve per span (image / text / generated), stabilisation layers
  marked; a second run (e.g. truncated) overlays dashed curves.
* :func:`fig_layer_similarity` — layer x layer linear-CKA heatmap of one span.
* :func:`fig_token_umap` — 2-D UMAP (or PCA) of token states from all layers, coloured
  by layer, marker symbol by span. :func:`token_embedding` computes (and caches) the
  embedding alone, so a UI can run it as a step with a progress indicator first.

Expensive results (the geometry table, CKA matrices, embeddings) are cached per run,
keyed by the identity of the run's ``hidden_states`` array (the entry is dropped when that
array is garbage-collected). Arrays are assumed not to be modified in place.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict

import numpy as np
import plotly.graph_objects as go

from ..analysis import geometry as geo
from ..analysis.stability import MIN_POINTS, image_vs_text
from ._style import (LAYER_COLORSCALE, OTHER_DASH, SEQUENTIAL_COLORSCALE, SPAN_ORDER, STAB_DASH,
                     empty_figure, legend_below, mark_injections, new_figure, span_color, span_symbol)

#: (metric of ``geometry.dynamics``, panel title, y-axis label) of the four panels.
PANELS = (
    ("entropy_normalized", "Matrix entropy", "entropy / log rank bound"),
    ("id_twonn", "Intrinsic dimension (TwoNN)", "dimension"),
    ("curvature", "Trajectory curvature", "angle (rad)"),
    ("cosine_distance", "Adjacent-layer cosine distance", "1 − cos(h<sub>l−1</sub>, h<sub>l</sub>)"),
)
DEFAULT_SPANS = ("image", "text", "generated")

# ---- per-run cache ------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, tuple[weakref.ref, object]]" = OrderedDict()
_CACHE_MAX = 32
_LOCK = threading.Lock()


def _states_ref(run) -> np.ndarray:
    return run.arrays["hidden_states"]


def _cached(run, key: tuple, compute):
    """compute() once per (hidden-states array, key); thread-safe, bounded LRU."""
    arr = _states_ref(run)
    full = (id(arr),) + key
    with _LOCK:
        hit = _CACHE.get(full)
        if hit is not None and hit[0]() is arr:
            _CACHE.move_to_end(full)
            return hit[1]
    value = compute()
    with _LOCK:
        _CACHE[full] = (weakref.ref(arr, lambda _r, f=full: _forget(f)), value)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return value


def _forget(full):
    with _LOCK:
        _CACHE.pop(full, None)


def clear_cache() -> None:
    """Drop every cached table, matrix and embedding."""
    with _LOCK:
        _CACHE.clear()


def run_dynamics(run, *, spans=DEFAULT_SPANS, k: int = 20, eps: float = 0.05):
    """``geometry.dynamics(run)`` cached per run (the DataFrame is shared: do not modify)."""
    return _cached(run, ("dynamics", tuple(spans), int(k), float(eps)),
                   lambda: geo.dynamics(run, spans=tuple(spans), k=k, eps=eps))


# ---- fig_dynamics ------------------------------------------------------------------------

def _label(run, fallback: str) -> str:
    return str(run.meta.get("label") or run.meta.get("model") or fallback)


UNRELIABLE = "#BBBBBB"


def _add_run_traces(fig, df, *, suffix: str, dash: str | None, mark_stab: bool, first: bool) -> None:
    stab = {(r["metric"], r["span"]): r["layer"] for r in df.attrs.get("stabilization", [])}
    n_tokens = df.attrs.get("n_tokens", {})
    for i, (metric, _title, ylabel) in enumerate(PANELS):
        row, col = divmod(i, 2)
        for span in [s for s in SPAN_ORDER if s in set(df["span"])]:
            sub = df[(df["metric"] == metric) & (df["span"] == span)].sort_values("layer")
            if sub.empty:
                continue
            name = span + suffix
            n = n_tokens.get(span, 0)
            need = MIN_POINTS.get(metric, 0)
            weak = n < need
            color = UNRELIABLE if weak else span_color(span)
            why = f"<br><i>unreliable: {metric} needs ≥ {need} tokens, {span} has {n}</i>" if weak else ""
            fig.add_trace(go.Scatter(
                x=sub["layer"].to_numpy(), y=sub["value"].to_numpy(), name=name, legendgroup=name,
                showlegend=first and i == 0, mode="lines+markers",
                line=dict(color=color, width=2, dash="dot" if weak and dash is None else dash), marker=dict(size=5, color=color),
                hovertemplate=f"<b>{name}</b> (n={n})<br>layer %{{x}}<br>{ylabel}: %{{y:.4g}}{why}<extra></extra>",
            ), row=row + 1, col=col + 1)
            layer = stab.get((metric, span))
            if layer is None or not np.isfinite(layer):
                continue
            y = float(sub.loc[sub["layer"] == layer, "value"].iloc[0])
            fig.add_trace(go.Scatter(
                x=[layer], y=[y], name=f"{name} stabilises", legendgroup=name, showlegend=False,
                mode="markers", marker=dict(symbol="diamond-open" if dash else "diamond", size=11,
                                            color=color, line=dict(width=2, color=color)),
                hovertemplate=(f"<b>{name}</b>: the {metric} curve settles at layer %{{x}}"
                               "<br>(within 5% of its range around its final plateau; the curve, not the tokens:"
                               "<br>whether the tokens stop moving is the token-movement headline)<extra></extra>"),
            ), row=row + 1, col=col + 1)
            if mark_stab:
                fig.add_vline(x=layer, line=dict(color=color, dash=STAB_DASH, width=1.2),
                              opacity=0.8, row=row + 1, col=col + 1)


def fig_dynamics(run, other=None, *, spans=DEFAULT_SPANS, eps: float = 0.05, k: int = 20,
                 other_label: str = "other") -> go.Figure:
    """2 x 2 panels of geometry across layers: entropy, intrinsic dimension, curvature, cosine
    distance. One curve per span (trace names "image", "text", "generated", coloured as
    everywhere else); the layer where each curve stabilises (within ``eps`` of its plateau,
    see ``geometry.stabilization_layer``) is marked by a dotted vertical line and a diamond.
    ``other`` (a second run, e.g. with truncated image tokens) adds dashed curves named
    ``"image (other)"`` etc. Hover shows span, layer and value.
    """
    df = run_dynamics(run, spans=spans, k=k, eps=eps)
    if df.empty:
        return empty_figure("No tokens in the requested spans.", title="Representation geometry")
    counts = ", ".join(f"{s} n={n}" for s, n in df.attrs.get("n_tokens", {}).items())
    title = f"Representation geometry across layers — {_label(run, 'run')}"
    title += (f"<br><sup>tokens: {counts}; ◆ / dotted line: layer where the curve settles (±{eps:.0%} of its range);"
              " grey: too few tokens for the estimator; band: image subsampled to the text's n</sup>")
    fig = new_figure(2, 2, titles=[p[1] for p in PANELS], title=title, height=720)
    _add_run_traces(fig, df, suffix="", dash=None, mark_stab=True, first=True)
    _add_matched_bands(fig, run, df)
    if other is not None:
        odf = run_dynamics(other, spans=spans, k=k, eps=eps)
        _add_run_traces(fig, odf, suffix=f" ({other_label})", dash=OTHER_DASH, mark_stab=False, first=True)
    mark_injections(fig, run, shift=1, subplots=True)     # h_(l+1) holds what was added to layer l's output
    for i, (_m, _t, ylabel) in enumerate(PANELS):
        row, col = divmod(i, 2)
        fig.update_xaxes(title_text="h<sub>ℓ</sub>: input of decoder layer ℓ (0 = embeddings)", row=row + 1, col=col + 1,
                         rangemode="tozero")
        fig.update_yaxes(title_text=ylabel, row=row + 1, col=col + 1)
    fig.update_layout(margin=dict(t=120, b=90))
    legend_below(fig, y=-0.09)
    return fig


def matched_image_curves(run):
    """``stability.image_vs_text(run)`` cached per run (None when the text span is not smaller)."""
    def compute():
        n = run.spans.positions("text").size
        if n < 3 or n >= run.spans.n_image:
            return None
        return image_vs_text(run, metrics=MATCHED_METRICS)
    return _cached(run, ("matched",), compute)


MATCHED_METRICS = ("entropy_normalized", "id_twonn")


def _add_matched_bands(fig, run, df) -> None:
    """Image curves recomputed on random subsets of the text span's size (10th–90th percentile
    band, median dashed): the image-vs-text comparison at equal n."""
    m = matched_image_curves(run)
    if m is None:
        return
    n = m["n"]
    color = span_color("image")
    for i, (metric, _t, ylabel) in enumerate(PANELS):
        if metric not in MATCHED_METRICS:
            continue
        row, col = divmod(i, 2)
        c = m["image"][metric]
        x = np.arange(len(c.median))
        if c.reason is not None or not np.isfinite(c.median).any():
            fig.add_annotation(text=f"image at n={n}: {c.reason or 'undefined'}", x=0.02, y=0.98, xref="x domain",
                               yref="y domain", showarrow=False, font=dict(size=10, color="#777777"),
                               row=row + 1, col=col + 1)
            continue
        name = f"image at text's n={n}"
        fig.add_trace(go.Scatter(
            x=np.concatenate([x, x[::-1]]), y=np.concatenate([c.hi, c.lo[::-1]]), fill="toself", mode="lines",
            line=dict(width=0), fillcolor=color, opacity=0.18, name=name, legendgroup=name, showlegend=i == 0,
            hoverinfo="skip"), row=row + 1, col=col + 1)
        fig.add_trace(go.Scatter(
            x=x, y=c.median, mode="lines", line=dict(color=color, dash="dash", width=1.5), name=name,
            legendgroup=name, showlegend=False,
            hovertemplate=(f"<b>{name}</b> (median of {20} subsets of the {c.n_total} image tokens)"
                           f"<br>layer %{{x}}<br>{ylabel}: %{{y:.4g}}<extra></extra>")), row=row + 1, col=col + 1)


# ---- fig_layer_similarity ---------------------------------------------------------------

def layer_similarity_matrix(run, span: str = "image") -> np.ndarray:
    """[L+1, L+1] linear CKA between the layers' states of ``span`` (cached per run)."""
    return _cached(run, ("cka", span), lambda: geo.layer_similarity(run.span_states(span)))


def fig_layer_similarity(run, span: str = "image") -> go.Figure:
    """Heatmap of linear CKA between every pair of layers (0 = embeddings .. L) for the
    tokens of ``span``. Blocks of high similarity show where the representation stops
    changing."""
    n = len(run.spans.positions(span))
    title = f"Layer × layer similarity (linear CKA) of {span} tokens — {_label(run, 'run')}"
    if n < 2:
        return empty_figure(f"Need at least 2 {span} tokens for CKA (this run has {n}).", title=title)
    S = layer_similarity_matrix(run, span)
    layers = np.arange(S.shape[0])
    fig = new_figure(title=title, height=560, width=640)
    fig.add_trace(go.Heatmap(
        z=S, x=layers, y=layers, zmin=0.0, zmax=1.0, colorscale=SEQUENTIAL_COLORSCALE,
        colorbar=dict(title="CKA"), name=span,
        hovertemplate="layer %{y} vs layer %{x}<br>CKA %{z:.3f}<extra></extra>",
    ))
    fig.update_xaxes(title_text="h<sub>ℓ</sub> (0 = embeddings)", constrain="domain")
    fig.update_yaxes(title_text="h<sub>ℓ</sub> (0 = embeddings)", scaleanchor="x", autorange="reversed")
    return fig


# ---- token embedding (UMAP / PCA) ---------------------------------------------------------

def _span_labels(run, positions: np.ndarray) -> np.ndarray:
    labels = np.full(len(positions), "other", dtype=object)
    for name in ("system", "image", "text", "generated"):
        labels[np.isin(positions, run.spans.positions(name))] = name
    return labels


def _select_positions(run, max_tokens: int | None) -> np.ndarray:
    """Indices into ``hidden_positions``: all, or at most ``max_tokens`` of them (every
    non-image token first, image tokens evenly subsampled to fill the rest)."""
    pos = np.asarray(run.hidden_positions)
    idx = np.arange(len(pos))
    if max_tokens is None or len(pos) <= max_tokens:
        return idx
    is_img = np.isin(pos, run.spans.positions("image"))
    rest, img = idx[~is_img], idx[is_img]
    if len(rest) >= max_tokens:
        return rest[np.unique(np.linspace(0, len(rest) - 1, max_tokens).round().astype(int))]
    take = img[np.unique(np.linspace(0, len(img) - 1, max_tokens - len(rest)).round().astype(int))]
    return np.sort(np.concatenate([rest, take]))


def embedding_index(run, *, layers=None, max_tokens: int | None = 128) -> tuple[np.ndarray, np.ndarray]:
    """(layer, position) of every row of :func:`token_embedding`, layer-major."""
    L1 = _states_ref(run).shape[0]
    lay = np.arange(L1) if layers is None else np.asarray(list(layers), dtype=int)
    if lay.size and (lay.min() < 0 or lay.max() >= L1):
        raise ValueError(f"layers must lie in 0..{L1 - 1}")
    sel = _select_positions(run, max_tokens)
    pos = np.asarray(run.hidden_positions)[sel]
    return np.repeat(lay, len(sel)), np.tile(pos, len(lay))


def _embed(run, method: str, layers, max_tokens, seed: int) -> np.ndarray:
    L1 = _states_ref(run).shape[0]
    lay = np.arange(L1) if layers is None else np.asarray(list(layers), dtype=int)
    sel = _select_positions(run, max_tokens)
    X = _states_ref(run)[lay][:, sel].astype(np.float32).reshape(len(lay) * len(sel), -1)
    if X.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X /= np.where(norms > 0, norms, 1.0)            # directions: removes the growth of norms with depth
    X -= X.mean(axis=0)
    n_comp = int(min(50 if method == "umap" else 2, X.shape[0], X.shape[1]))
    from sklearn.utils.extmath import randomized_svd

    U, sv, _ = randomized_svd(X, n_comp, random_state=seed)     # PCA; signs made deterministic
    P = U * sv
    if method == "pca" or X.shape[0] < 5:
        out = np.zeros((X.shape[0], 2))
        out[:, :P.shape[1]] = P[:, :2]
        return out.astype(np.float32)
    import umap  # noqa: PLC0415 - heavy import (numba), only when asked for
    from sklearn.neighbors import NearestNeighbors

    nn = int(min(15, X.shape[0] - 1))
    # exact neighbours in the 50-d PCA space: faster than UMAP's approximate NN-descent here
    dist, ind = NearestNeighbors(n_neighbors=nn).fit(P).kneighbors(P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=2, n_neighbors=nn, min_dist=0.1, n_epochs=200,
                            random_state=seed, n_jobs=1, precomputed_knn=(ind, dist, None),
                            init="spectral" if X.shape[0] > 10 else "random")
        return reducer.fit_transform(P).astype(np.float32)


def _embedding_key(method, layers, max_tokens, seed) -> tuple:
    return ("embed", method, None if layers is None else tuple(int(x) for x in layers), max_tokens, int(seed))


def token_embedding(run, method: str = "umap", *, layers=None, max_tokens: int | None = 128,
                    seed: int = 0) -> np.ndarray:
    """2-D embedding [n_layers_used * n_tokens_used, 2] of token states (rows layer-major;
    :func:`embedding_index` gives each row's layer and position).

    States are scaled to unit norm (depth changes norms a lot; the directions are what is
    compared), centred, reduced by PCA (2 components for ``"pca"``, 50 before ``"umap"``).
    ``max_tokens`` caps the positions used (non-image tokens kept first; None = all).
    Cached per run and options: the first UMAP call JIT-compiles (~10 s), later calls are free.
    """
    if method not in ("umap", "pca"):
        raise ValueError(f"unknown method {method!r}; expected 'umap' or 'pca'")
    return _cached(run, _embedding_key(method, layers, max_tokens, seed),
                   lambda: _embed(run, method, layers, max_tokens, seed))


def fig_token_umap(run, *, method: str = "umap", layers=None, max_tokens: int | None = 128,
                   seed: int = 0) -> go.Figure:
    """Scatter of :func:`token_embedding`: colour = layer, marker symbol = span (one trace per
    span, named after it); hover shows the token text, position, span and layer."""
    coords = token_embedding(run, method, layers=layers, max_tokens=max_tokens, seed=seed)
    lay, pos = embedding_index(run, layers=layers, max_tokens=max_tokens)
    what = "UMAP" if method == "umap" else "PCA"
    title = f"Token states of all layers ({what}) — {_label(run, 'run')}"
    if len(coords) == 0:
        return empty_figure("No token states to embed.", title=title)
    spans = _span_labels(run, pos)
    tokens = np.asarray([repr(run.tokens[p])[1:-1] if p < len(run.tokens) else "" for p in pos], dtype=object)
    fig = new_figure(title=title + "<br><sup>colour: layer · symbol: span · states scaled to unit norm</sup>",
                     height=640)
    cmax = int(_states_ref(run).shape[0] - 1)
    first = True
    for span in [s for s in SPAN_ORDER if s in set(spans)]:
        m = spans == span
        fig.add_trace(go.Scattergl(
            x=coords[m, 0], y=coords[m, 1], mode="markers", name=span,
            marker=dict(symbol=span_symbol(span), size=7 if span != "image" else 5, color=lay[m],
                        colorscale=LAYER_COLORSCALE, cmin=0, cmax=cmax, showscale=first,
                        colorbar=dict(title="layer") if first else None,
                        line=dict(width=0.5, color=span_color(span))),
            customdata=np.column_stack([tokens[m], pos[m], lay[m]]),
            hovertemplate=(f"<b>%{{customdata[0]}}</b><br>{span} token at position %{{customdata[1]}}"
                           "<br>layer %{customdata[2]}<extra></extra>"),
        ))
        first = False
    fig.update_xaxes(title_text=f"{what} 1", showticklabels=False, zeroline=False)
    fig.update_yaxes(title_text=f"{what} 2", showticklabels=False, zeroline=False)
    legend_below(fig, y=-0.08)
    fig.update_layout(legend=dict(itemsizing="constant"), margin=dict(t=90, b=80))
    return fig
