"""Geometry of representations across layers (vision vs text tokens).

Public names (notebooks and the app import them from here): :func:`entropy`,
:func:`intrinsic_dimension`, :func:`curvature`, :func:`sequence_curvature`,
:func:`cosine_distance`, :func:`cka`, :func:`layer_similarity`, :func:`stabilization_layer`
(pure metrics on arrays, in ``geometry_metrics`` and ``dimension``), and the run-level
:func:`per_layer`, :func:`dynamics`, :func:`stabilization_table`, :func:`layer_curves`.

:func:`layer_curves` computes every curve of one span in one pass: each layer is centred
and its Gram matrix formed once, and that one matrix serves the entropy (after scaling
rows to unit norm), both intrinsic-dimension estimates (squared distances), and the CKA
matrix (inner products of Grams). :func:`dynamics` turns the curves of a Run's spans into
a tidy table.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from . import geometry_metrics as G
from .dimension import intrinsic_dimension, intrinsic_dimensions, single_thread_blas, work_dtype
from .geometry_metrics import (angles, cka, cosine_distance, cosine_distances, curvature, entropy,
                               layer_similarity, sequence_curvature, stabilization_layer)

__all__ = [
    "entropy", "intrinsic_dimension", "intrinsic_dimensions", "curvature", "sequence_curvature",
    "cosine_distance", "cka", "layer_similarity", "stabilization_layer", "per_layer", "dynamics",
    "stabilization_table", "layer_curves", "angles", "cosine_distances", "METRICS",
]

DEFAULT_SPANS = ("image", "text", "generated")

#: metric -> (layer of its first value, description). A curve over layers 0..L starts at 0;
#: ``cosine_distance`` between layers l-1 and l is placed at layer l; ``curvature`` (the
#: turning angle at the vertex h_l) at layer l.
METRICS = {
    "entropy": (0, "von Neumann matrix entropy (nats)"),
    "entropy_normalized": (0, "matrix entropy / log min(n-1, d), in [0, 1]"),
    "id_twonn": (0, "intrinsic dimension, TwoNN"),
    "id_mle": (0, "intrinsic dimension, Levina-Bickel MLE"),
    "curvature": (1, "depth-trajectory curvature (rad), vertex layer"),
    "cosine_distance": (1, "1 - cos(h_{l-1}, h_l), placed at layer l"),
    "sequence_curvature": (0, "curvature along the token sequence (rad)"),
}


def _workers(requested: int | None, n_tasks: int) -> int:
    if requested is not None:
        return max(1, min(int(requested), n_tasks))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8, n_tasks))


def _layer_stats(X: np.ndarray, *, k: int, discard_fraction: float, bound: float,
                 gram_out: np.ndarray | None):
    """(entropy, entropy_normalized, id_twonn, id_mle, sequence_curvature) of one layer, or
    the mask of its finite tokens when some are not finite."""
    n, d = X.shape
    X = X.astype(work_dtype(X))            # a copy: centred in place below
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        return finite
    seq = G.sequence_curvature(X) if n >= 3 else np.nan
    if n < 2:
        return np.nan, np.nan, np.nan, np.nan, seq
    if n <= d:
        X -= X.mean(axis=0)                # distances, differences and duplicates are unchanged
        K = G.gram(X)
        if gram_out is not None:
            gram_out[...] = K
        ids = intrinsic_dimensions(X, k=k, discard_fraction=discard_fraction, gram=K)
        dn = np.diag(K)
        s = np.where(dn > 0, 1.0 / np.sqrt(np.where(dn > 0, dn, 1.0)), 0.0).astype(K.dtype)
        normed = K * s[:, None]
        normed *= s[None, :]
    else:
        normed = G.gram(G._centred_unit_rows(X), columns=True)
        ids = intrinsic_dimensions(X, k=k, discard_fraction=discard_fraction)
    ent = G.spectrum_entropy(G.eigvalsh(normed))
    return ent, (ent / bound if bound > 0 else 0.0), ids["twonn"], ids["mle"], seq


class _InPlace:
    """The pool's interface, run in the calling thread: while the interpreter shuts down a thread pool
    takes no new work, and a drawing still running then (a dashboard's background view) finishes in place."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn(*args))
        return f

    def map(self, fn, items):
        return [fn(x) for x in items]


def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pool.submit(int).result()
    except RuntimeError:                  # "cannot schedule new futures after interpreter shutdown"
        pool.shutdown()
        return _InPlace()
    return pool


def layer_curves(H: np.ndarray, *, k: int = 20, discard_fraction: float = 0.1,
                 with_cka: bool = True, workers: int | None = None) -> dict[str, np.ndarray]:
    """Every geometry curve of one span across layers.

    Args:
        H: [layer, n_tokens, d] states (any float dtype; float16 is computed in float32).
        k: neighbours of the MLE intrinsic dimension.
        with_cka: also return the [layer, layer] linear-CKA matrix under ``"cka"``.
        workers: threads (default: the CPUs this process may use, at most 8). Layers are
            processed in parallel, each with single-threaded BLAS (BLAS is limited to one
            thread for the duration of the call): small eigen-problems scale poorly across
            BLAS threads, and badly when other processes share the cores.

    Returns:
        dict of arrays: ``entropy``, ``entropy_normalized``, ``id_twonn``, ``id_mle``,
        ``sequence_curvature`` (each [layer]), ``curvature`` [layer-2], ``cosine_distance``
        [layer-1] and ``cka`` [layer, layer]. Values are NaN where a metric is undefined
        for so few tokens (entropy: n < 2; intrinsic dimension: < 3 distinct tokens;
        sequence curvature: n < 3). Tokens whose state is not finite at some layer (float16
        overflow) are left out of every curve. Equal to the single-metric functions of
        ``geometry`` up to float32 rounding.
    """
    H = G._as_stack(H)
    L, n, d = H.shape
    grams = np.empty((L, n, n), dtype=work_dtype(H)) if with_cka and 2 <= n <= d else None
    bound = G.entropy_bound(n, d)
    names = ("entropy", "entropy_normalized", "id_twonn", "id_mle", "sequence_curvature")
    with single_thread_blas(), _pool(_workers(workers, L)) as pool:
        depth = pool.submit(G.depth_profiles, H)
        per = list(pool.map(lambda l: _layer_stats(
            H[l], k=k, discard_fraction=discard_fraction, bound=bound,
            gram_out=None if grams is None else grams[l]), range(L)))
        masks = [m for m in per if isinstance(m, np.ndarray)]
        if masks:
            depth.cancel()
        else:
            out = {name: np.array([row[i] for row in per], dtype=np.float64) for i, name in enumerate(names)}
            out["curvature"], out["cosine_distance"] = depth.result()
            if with_cka:
                if n < 2:
                    out["cka"] = np.full((L, L), np.nan)
                elif grams is not None:
                    out["cka"] = G.cka_from_grams(grams)
                else:
                    out["cka"] = G.layer_similarity(H)
    if masks:                               # rare: drop tokens with non-finite states, redo
        keep = np.logical_and.reduce(masks)
        return layer_curves(H[:, keep], k=k, discard_fraction=discard_fraction,
                            with_cka=with_cka, workers=workers)
    return out


def per_layer(run, fn: Callable[[np.ndarray], float], span: str = "image") -> np.ndarray:
    """``fn`` applied to the states of ``span`` at every layer -> float array [L+1].

    ``fn`` receives [n_tokens, d] float32 (e.g. ``geometry.entropy``). All-NaN when the
    span has no tokens.
    """
    S = run.span_states(span)
    if S.shape[1] == 0:
        return np.full(S.shape[0], np.nan)
    return np.asarray([float(fn(S[l])) for l in range(S.shape[0])], dtype=np.float64)


def dynamics(run, *, spans=DEFAULT_SPANS, k: int = 20, eps: float = 0.05):
    """Tidy table of every geometry curve of every non-empty span of ``run``.

    Returns a pandas DataFrame with columns ``metric`` (see ``METRICS``), ``span``,
    ``layer`` (int; where each metric's first value sits is given in ``METRICS``) and
    ``value`` (float, NaN where undefined). ``df.attrs["stabilization"]`` holds
    :func:`stabilization_table` (with ``eps``) as a list of records and
    ``df.attrs["n_tokens"]`` the token count of each span. ``df.to_csv(path)`` exports it.
    """
    import pandas as pd

    rows = []
    n_tokens = {}
    for span in spans:
        S = run.span_states(span)
        if S.shape[1] == 0:
            continue
        n_tokens[span] = int(S.shape[1])
        curves = layer_curves(S, k=k, with_cka=False)
        del S
        for metric, (first, _) in METRICS.items():
            vals = curves[metric]
            for i, v in enumerate(vals):
                rows.append((metric, span, first + i, float(v)))
    df = pd.DataFrame(rows, columns=["metric", "span", "layer", "value"])
    df = df.astype({"metric": str, "span": str, "layer": np.int64, "value": np.float64})
    df.attrs["n_tokens"] = n_tokens
    df.attrs["stabilization"] = stabilization_table(df, eps=eps).to_dict("records")
    return df


def stabilization_table(df, *, eps: float = 0.05, tail: int = 3):
    """Stabilisation layer of every (metric, span) curve of a :func:`dynamics` table.

    Columns ``metric``, ``span``, ``layer`` (the first layer from which the curve stays
    within ``eps`` of its plateau, see ``geometry.stabilization_layer``; NaN if never) and
    ``plateau`` (mean of the last ``tail`` finite values).
    """
    import pandas as pd

    out = []
    for (metric, span), g in df.groupby(["metric", "span"], sort=False):
        g = g.sort_values("layer")
        vals = g["value"].to_numpy(dtype=np.float64)
        idx = G.stabilization_layer(vals, eps=eps, tail=tail)
        fin = vals[np.isfinite(vals)]
        plateau = float(fin[-tail:].mean()) if fin.size else float("nan")
        layer = float(g["layer"].to_numpy()[idx]) if idx is not None else float("nan")
        out.append({"metric": metric, "span": span, "layer": layer, "plateau": plateau})
    return pd.DataFrame(out, columns=["metric", "span", "layer", "plateau"])
