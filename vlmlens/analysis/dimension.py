"""Intrinsic-dimension estimators (TwoNN and Levina-Bickel MLE) on one point cloud.

Both estimators read the same sorted nearest-neighbour distances, so a caller that wants
both asks :func:`intrinsic_dimensions` once and gets both from one neighbour query.

Neighbour search. For up to ``_BRUTE_MAX`` points the squared distances come from the
Gram matrix of the centred points, ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` (so one Gram matrix
per layer serves entropy, CKA and both dimensions). In float32 this loses precision for
pairs much closer than the points' norms, so rows with a distance within a safety margin
of the rounding error are recomputed in float64 (and exactly, by differences, when tiny).
Exact duplicate rows (repeated image tokens are common) are then counted once: an
estimator never sees a zero distance. Larger clouds use scikit-learn's ``NearestNeighbors``
on the distinct rows.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

_BRUTE_MAX = 6000          # points up to which the Gram (brute force) path is used
_SAFETY = 100.0            # refine a row when its nearest squared distance < _SAFETY * error bound


_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"depth": 0, "limiter": None, "controller": None}
_SMALL_WORK = 2e7          # flops below which BLAS does not thread anyway: skip the limiter


@contextlib.contextmanager
def single_thread_blas(work: float = float("inf")):
    """Limit BLAS (OpenBLAS/MKL of numpy and scipy) to one thread for the ``with`` block.

    The matrices here are small (n x n with n ~ hundreds): threading them gains little on
    an idle machine and loses up to 4x when other processes share the cores (OpenBLAS
    threads spin while waiting). Callers that want parallelism run independent layers in
    threads instead. Re-entrant and thread-safe: the first entrant sets the limit, the last
    one out restores the original. A no-op when ``work`` (flops) is tiny.
    """
    if work < _SMALL_WORK:
        yield
        return
    with _BLAS_LOCK:
        if _BLAS_STATE["depth"] == 0:
            if _BLAS_STATE["controller"] is None:
                from threadpoolctl import ThreadpoolController

                _BLAS_STATE["controller"] = ThreadpoolController()
            _BLAS_STATE["limiter"] = _BLAS_STATE["controller"].limit(limits=1, user_api="blas")
        _BLAS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["depth"] -= 1
            if _BLAS_STATE["depth"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def work_dtype(x: np.ndarray) -> type:
    """float64 for float64 input, float32 for everything else (float16 states included)."""
    return np.float64 if np.asarray(x).dtype == np.float64 else np.float32


def unique_rows(X: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of every distinct row of ``X`` (bytewise,
    with -0.0 folded into +0.0)."""
    Xc = np.ascontiguousarray(X) + X.dtype.type(0)   # -0.0 + 0.0 == +0.0
    if Xc.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    rows = Xc.view(np.dtype((np.void, Xc.dtype.itemsize * Xc.shape[1]))).ravel()
    _, first = np.unique(rows, return_index=True)
    return np.sort(first)


def _sq_dists_from_gram(K: np.ndarray) -> np.ndarray:
    sq = np.diag(K).astype(np.float64)
    D2 = sq[:, None] + sq[None, :] - 2.0 * K.astype(np.float64)
    np.fill_diagonal(D2, np.inf)
    return D2


def _refine(D2: np.ndarray, X: np.ndarray, K: np.ndarray) -> None:
    """Make ``D2`` (from the Gram matrix ``K`` of the points ``X``) exact where it matters.

    The rounding error of a Gram entry is about eps * sqrt(d) * |x_i| |x_j|. Rows with an
    entry below ``_SAFETY`` times that bound are recomputed, in place, from a float64 Gram;
    entries still tiny in float64 are recomputed as ||x_i - x_j||^2 directly, so exact
    duplicates get exactly 0.
    """
    sq = np.clip(np.diag(K).astype(np.float64), 0.0, None)
    root_d = np.sqrt(X.shape[1])
    pair = sq[:, None] + sq[None, :]
    rows = np.flatnonzero((D2 < _SAFETY * 4.0 * np.finfo(K.dtype).eps * root_d * pair).any(axis=1))
    if rows.size == 0:
        return
    X64 = X.astype(np.float64)
    X64 -= X64.mean(axis=0)
    sq64 = np.einsum("nd,nd->n", X64, X64)
    exact = sq64[rows, None] + sq64[None, :] - 2.0 * (X64[rows] @ X64.T)
    exact[np.arange(rows.size), rows] = np.inf
    tiny_i, tiny_j = np.nonzero(exact < _SAFETY * 4.0 * np.finfo(np.float64).eps * root_d * pair[rows])
    if tiny_i.size:
        diff = X64[rows[tiny_i]] - X64[tiny_j]
        exact[tiny_i, tiny_j] = np.einsum("nd,nd->n", diff, diff)
    D2[rows] = exact
    D2[:, rows] = exact.T


def neighbour_distances(X: np.ndarray, *, k: int, gram: np.ndarray | None = None) -> np.ndarray | None:
    """Distances to the ``k`` nearest distinct neighbours of every distinct row of ``X``.

    Args:
        X: [n, d] points.
        k: neighbours wanted; fewer (``n_distinct - 1``) when the cloud is small.
        gram: optional centred Gram matrix ``Xc @ Xc.T`` of the n rows (reused, not recomputed).

    Returns:
        [n_distinct, k'] ascending distances, all > 0, or None when fewer than 3 distinct
        points exist (or the input is not finite). Of a group of equal rows only the first
        is kept.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected points as a 2-D array [n, d], got shape {X.shape}")
    n = X.shape[0]
    if n < 3:
        return None
    if gram is None and n > _BRUTE_MAX:
        from sklearn.neighbors import NearestNeighbors

        Xu = X[unique_rows(X)].astype(np.float64)
        if Xu.shape[0] < 3:
            return None
        nn = NearestNeighbors(n_neighbors=int(min(k, Xu.shape[0] - 1))).fit(Xu)
        r, _ = nn.kneighbors()
        return r
    with single_thread_blas(float(n) * n * X.shape[1]):
        if gram is None:
            Xc = X.astype(work_dtype(X))
            Xc -= Xc.mean(axis=0)
            gram = Xc @ Xc.T
        K = np.asarray(gram)
        if not np.isfinite(K).all():
            return None
        D2 = _sq_dists_from_gram(K)
        _refine(D2, X, K)
    zi, zj = np.nonzero(D2 <= 0)
    if zi.size:                                    # duplicates: keep the first of each group
        keep = np.ones(n, dtype=bool)
        keep[np.maximum(zi, zj)] = False
        D2 = D2[np.ix_(keep, keep)]
    m = D2.shape[0]
    if m < 3:
        return None
    kk = int(min(k, m - 1))
    part = np.partition(D2, kk - 1, axis=1)[:, :kk]
    part.sort(axis=1)
    return np.sqrt(part)


def twonn_from_distances(r: np.ndarray | None, *, discard_fraction: float = 0.1) -> float:
    """TwoNN (Facco et al. 2017) from sorted neighbour distances ``r`` [n, >=2].

    mu_i = r2_i / r1_i follows a Pareto law with CDF F(mu) = 1 - mu^-d, so
    -log(1 - F(mu)) = d log mu. The largest ``discard_fraction`` of the mu are dropped
    (noise/outliers), F is the empirical CDF i/N of the sorted mu, and d is the
    least-squares slope through the origin. Range: (0, inf); NaN when undefined.
    """
    if r is None or r.shape[1] < 2:
        return float("nan")
    r1, r2 = r[:, 0], r[:, 1]
    ok = np.isfinite(r2) & (r1 > 0)
    mu = np.sort(r2[ok] / r1[ok])
    n = mu.size
    n_keep = int(np.floor(n * (1.0 - discard_fraction)))
    if n_keep < 2:
        return float("nan")
    x = np.log(mu[:n_keep])
    y = -np.log1p(-np.arange(1, n_keep + 1) / n)
    sxx = float(x @ x)
    return float(x @ y / sxx) if sxx > 0 else float("nan")


def mle_from_distances(r: np.ndarray | None) -> float:
    """Levina-Bickel maximum-likelihood dimension with MacKay-Ghahramani averaging.

    For each point with neighbour distances T_1..T_k: 1/m_i = (1/(k-1)) sum_{j<k} log(T_k/T_j);
    the estimate is 1 / mean_i(1/m_i) (averaging the inverses is what makes the pooled
    estimate unbiased for 1/m). Range: (0, inf); NaN when undefined (k < 2).
    """
    if r is None or r.shape[1] < 2:
        return float("nan")
    ok = np.all(np.isfinite(r), axis=1)
    if not ok.any():
        return float("nan")
    r = r[ok]
    k = r.shape[1]
    inv = np.log(r[:, -1:] / r[:, :-1]).sum(axis=1) / (k - 1)
    mean_inv = float(inv.mean())
    return 1.0 / mean_inv if mean_inv > 0 else float("nan")


def intrinsic_dimensions(X: np.ndarray, *, k: int = 20, discard_fraction: float = 0.1,
                         gram: np.ndarray | None = None) -> dict[str, float]:
    """Both estimates from one neighbour query: ``{"twonn": ..., "mle": ...}`` (NaN for
    fewer than 3 distinct points). ``gram``: optional precomputed centred Gram of ``X``."""
    r = neighbour_distances(X, k=max(int(k), 2), gram=gram)
    return {"twonn": twonn_from_distances(r, discard_fraction=discard_fraction),
            "mle": mle_from_distances(r)}


def intrinsic_dimension(X: np.ndarray, *, method: str = "twonn", k: int = 20,
                        discard_fraction: float = 0.1) -> float:
    """Intrinsic dimension of the point cloud ``X`` [n, d].

    Args:
        method: ``"twonn"`` (Facco et al. 2017; uses the two nearest neighbours, drops the
            top ``discard_fraction`` of r2/r1 ratios, fits -log(1-F) = d log(r2/r1) through the
            origin) or ``"mle"`` (Levina & Bickel 2004 with ``k`` neighbours, per-point
            inverse estimates averaged as proposed by MacKay & Ghahramani).
        k: neighbours for the MLE (capped at n_distinct - 1).

    Exact duplicate rows are counted once. Range: (0, inf) — typically between 1 and the
    ambient dimension; local estimators underestimate when n is small for the dimension
    (e.g. ~16 for a 20-d Gaussian with n=1000). Returns NaN for fewer than 3 distinct points.
    """
    if method == "twonn":
        r = neighbour_distances(X, k=2)
        return twonn_from_distances(r, discard_fraction=discard_fraction)
    if method == "mle":
        return mle_from_distances(neighbour_distances(X, k=max(int(k), 2)))
    raise ValueError(f"unknown method {method!r}; expected 'twonn' or 'mle'")
