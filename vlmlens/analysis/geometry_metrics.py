"""Single-representation geometry metrics (numpy in, numbers out); use them via ``geometry``.

Conventions: a *representation* is ``X`` [n_tokens, d]; a *stack of layers* is ``H``
[layer, n_tokens, d] (layer 0 = embeddings). Inputs of any float dtype are accepted;
float16/float32 are computed in float32 (with float64 where precision demands it),
float64 in float64.
"""
from __future__ import annotations

import numpy as np

from .dimension import single_thread_blas, work_dtype

_CHUNK_ELEMS = 2_000_000     # elements of a [layer, token-chunk, d] block processed at once


# ---- matrix entropy ------------------------------------------------------------------

def _centred_unit_rows(X: np.ndarray) -> np.ndarray:
    Z = np.asarray(X).astype(work_dtype(X))
    Z -= Z.mean(axis=0)
    norms = np.sqrt(np.einsum("nd,nd->n", Z, Z))
    Z /= np.where(norms > 0, norms, 1.0)[:, None]
    return Z


def spectrum_entropy(eigvals: np.ndarray, *, alpha: float = 1.0) -> float:
    """Rényi entropy of a PSD spectrum normalised to a probability vector (0 if all zero)."""
    lam = np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam / total
    p = p[p > 1e-12]     # below float32 eigen-solver noise; contributes < 1e-9 nats
    if alpha == 0:
        return float(np.log(p.size))
    if np.isinf(alpha):
        return float(-np.log(p.max()))
    if abs(alpha - 1.0) < 1e-9:
        return float(-(p * np.log(p)).sum())
    return float(np.log((p ** alpha).sum()) / (1.0 - alpha))


def eigvalsh(K: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix (LAPACK syevd, in K's precision; K is not kept)."""
    from scipy.linalg import eigh

    return eigh(K, eigvals_only=True, driver="evd", check_finite=False, overwrite_a=True)


def entropy_bound(n: int, d: int) -> float:
    """log of the rank bound min(n-1, d) of a centred [n, d] matrix (normaliser of entropy)."""
    return float(np.log(max(min(n - 1, d), 1)))


def entropy(X: np.ndarray, *, alpha: float = 1.0, normalize: bool = False) -> float:
    """Matrix (Rényi) entropy of the representation ``X`` [n, d].

    Rows are centred (minus the mean token) and scaled to unit L2 norm: Z. The eigenvalues
    of K = Z Zᵀ (or of Zᵀ Z when d < n — same non-zero spectrum, cheaper) are normalised to
    a probability vector p (they sum to the number of non-zero rows), and

        S_alpha = log(sum_i p_i^alpha) / (1 - alpha),     S_1 = -sum_i p_i log p_i (von Neumann).

    Range: [0, log min(n-1, d)] nats; 0 when all rows are equal, log r for tokens spread
    isotropically over r dimensions. ``normalize=True`` divides by log min(n-1, d) so the
    value lies in [0, 1] (0 when that bound is 1). NaN for n < 2 or non-finite input.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, d], got shape {X.shape}")
    n, d = X.shape
    if n < 2 or d < 1:
        return float("nan")
    with single_thread_blas(float(n) * d * min(n, d)):
        Z = _centred_unit_rows(X)
        K = gram(Z, columns=d < n)
        if not np.isfinite(K).all():
            return float("nan")
        s = spectrum_entropy(eigvalsh(K), alpha=alpha)
    if normalize:
        b = entropy_bound(n, d)
        return s / b if b > 0 else 0.0
    return s


# ---- angles and distances between vectors ---------------------------------------------

def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of paired vectors, as float64."""
    return np.einsum("...d,...d->...", a, b).astype(np.float64)


def _unit64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x /= np.sqrt(np.einsum("nd,nd->n", x, x))[:, None]
    return x


def _valid(ab, aa, bb) -> np.ndarray:
    """Pairs with two non-zero, finite vectors."""
    return (aa > 0) & (bb > 0) & np.isfinite(aa) & np.isfinite(bb) & np.isfinite(ab)


def _angles_from_dots(ab, aa, bb, a, b) -> np.ndarray:
    ok = _valid(ab, aa, bb)
    cos = np.divide(ab, np.sqrt(aa * bb), out=np.zeros_like(ab), where=ok)
    out = np.arccos(np.clip(cos, -1.0, 1.0))
    fix = ok & (np.abs(cos) > 0.99)
    if fix.any():
        ua, ub = _unit64(a[fix]), _unit64(b[fix])
        out[fix] = 2.0 * np.arctan2(np.linalg.norm(ua - ub, axis=1), np.linalg.norm(ua + ub, axis=1))
    out[~ok] = np.nan
    return out


def _cosdist_from_dots(ab, aa, bb, a, b) -> np.ndarray:
    ok = _valid(ab, aa, bb)
    dist = 1.0 - np.divide(ab, np.sqrt(aa * bb), out=np.zeros_like(ab), where=ok)
    fix = ok & (dist < 1e-2)
    if fix.any():
        diff = _unit64(a[fix]) - _unit64(b[fix])
        dist[fix] = 0.5 * np.einsum("nd,nd->n", diff, diff)
    dist = np.clip(dist, 0.0, 2.0)
    dist[~ok] = np.nan
    return dist


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in radians between paired vectors a[..., d] and b[..., d] (NaN if one is zero).

    arccos(cos) in the working precision, except where |cos| > 0.99 (arccos is
    ill-conditioned there): those pairs are recomputed in float64 with Kahan's formula
    2 atan2(|â - b̂|, |â + b̂|), so a straight continuation gives ~1e-8, not ~1e-3.
    """
    return _angles_from_dots(_dots(a, b), _dots(a, a), _dots(b, b), a, b)


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a, b) for paired vectors (NaN if one is zero). Range [0, 2]. Near-parallel
    pairs (distance < 1e-2) are recomputed in float64 as |â - b̂|^2 / 2 (exactly 0 for equal
    vectors)."""
    return _cosdist_from_dots(_dots(a, b), _dots(a, a), _dots(b, b), a, b)


def _as_stack(H: np.ndarray) -> np.ndarray:
    H = np.asarray(H)
    if H.ndim == 2:              # a single trajectory [layer, d]
        H = H[:, None, :]
    if H.ndim != 3:
        raise ValueError(f"expected layers as [layer, n_tokens, d], got shape {H.shape}")
    return H


def _nanmean_rows(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def depth_profiles(H: np.ndarray, *, want_curvature: bool = True,
                   want_cosine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(curvature [layer-2], cosine_distance [layer-1]) of H [layer, n_tokens, d] in one pass
    over token chunks (each chunk converted once, squared norms shared)."""
    H = _as_stack(H)
    L, n, d = H.shape
    wd = work_dtype(H)
    c_sum, c_cnt = np.zeros(max(L - 2, 0)), np.zeros(max(L - 2, 0))
    k_sum, k_cnt = np.zeros(max(L - 1, 0)), np.zeros(max(L - 1, 0))
    step = max(1, _CHUNK_ELEMS // max(L * d, 1))
    for s in range(0, n, step):
        with np.errstate(invalid="ignore", over="ignore"):    # non-finite tokens are skipped
            Hc = np.asarray(H[:, s:s + step], dtype=wd)
            _depth_chunk(Hc, L, want_cosine, want_curvature, c_sum, c_cnt, k_sum, k_cnt)
    return _nanmean_rows(c_sum, c_cnt), _nanmean_rows(k_sum, k_cnt)


def _depth_chunk(Hc, L, want_cosine, want_curvature, c_sum, c_cnt, k_sum, k_cnt) -> None:
    """Accumulate the sums and counts of one token chunk Hc [L, c, d] (in place)."""
    if want_cosine and L >= 2:
        hh = _dots(Hc, Hc)
        dist = _cosdist_from_dots(_dots(Hc[:-1], Hc[1:]), hh[:-1], hh[1:], Hc[:-1], Hc[1:])
        good = np.isfinite(dist)
        k_sum += np.where(good, dist, 0.0).sum(axis=1)
        k_cnt += good.sum(axis=1)
    if want_curvature and L >= 3:
        v = np.diff(Hc, axis=0)
        vv = _dots(v, v)
        ang = _angles_from_dots(_dots(v[:-1], v[1:]), vv[:-1], vv[1:], v[:-1], v[1:])
        good = np.isfinite(ang)
        c_sum += np.where(good, ang, 0.0).sum(axis=1)
        c_cnt += good.sum(axis=1)


def curvature(H: np.ndarray) -> np.ndarray:
    """Trajectory curvature of every token across depth.

    H: [layer, n_tokens, d] (or one trajectory [layer, d]). With v_l = h_{l+1} - h_l,
    c_l = arccos(cos(v_l, v_{l+1})) is the turning angle at layer l+1; the result is its
    mean over tokens (tokens whose step is zero are skipped) -> [layer - 2] radians, each
    in [0, pi]: 0 for a straight path, pi for a reversal.
    """
    return depth_profiles(H, want_cosine=False)[0]


def sequence_curvature(X: np.ndarray) -> float:
    """Within-layer curvature along the token sequence of X [n_tokens, d].

    With v_i = x_{i+1} - x_i, the mean over i of arccos(cos(v_i, v_{i+1})) (steps of length
    zero skipped). Range [0, pi] radians; 0 for tokens on a straight, evenly ordered line.
    NaN for fewer than 3 tokens.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, d], got shape {X.shape}")
    if X.shape[0] < 3:
        return float("nan")
    with np.errstate(invalid="ignore", over="ignore"):        # non-finite steps are skipped
        v = np.diff(np.asarray(X, dtype=work_dtype(X)), axis=0)
        vv = _dots(v, v)
        a = _angles_from_dots(_dots(v[:-1], v[1:]), vv[:-1], vv[1:], v[:-1], v[1:])
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def cosine_distance(H: np.ndarray) -> np.ndarray:
    """Adjacent-layer cosine distance: for each pair (l, l+1), the mean over tokens of
    1 - cos(h_l, h_{l+1}) (zero vectors skipped). H: [layer, n_tokens, d] -> [layer - 1],
    each in [0, 2]; 0 when a layer leaves every token's direction unchanged."""
    return depth_profiles(H, want_curvature=False)[1]


# ---- CKA -------------------------------------------------------------------------------

def _centred(X: np.ndarray, dtype=None) -> np.ndarray:
    Xc = np.asarray(X).astype(dtype or work_dtype(X))
    Xc -= Xc.mean(axis=0)
    return Xc


def cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between X [n, dx] and Y [n, dy] (same tokens).

    With column-centred X, Y: CKA = ||Yᵀ X||_F^2 / (||Xᵀ X||_F ||Yᵀ Y||_F)
    = <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F) with K = X Xᵀ. Range [0, 1]; 1 for
    representations equal up to an orthogonal transform and isotropic scaling. Computed
    in float64 via Gram matrices or feature-space products, whichever is cheaper.
    NaN if either side has no variance.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"cka needs [n, dx] and [n, dy] with the same n, got {X.shape} and {Y.shape}")
    n, dx, dy = X.shape[0], X.shape[1], Y.shape[1]
    with single_thread_blas(float(n) * min(n * (dx + dy), dx * dy + dx * dx + dy * dy)):
        return _cka(X, Y, n, dx, dy)


def _cka(X, Y, n, dx, dy) -> float:
    Xc, Yc = _centred(X, np.float64), _centred(Y, np.float64)
    if n * n * (dx + dy) <= n * (dx * dy + dx * dx + dy * dy):
        Kx, Ky = Xc @ Xc.T, Yc @ Yc.T
        num, nx, ny = (Kx * Ky).sum(), np.linalg.norm(Kx), np.linalg.norm(Ky)
    else:
        num = np.linalg.norm(Yc.T @ Xc) ** 2
        nx, ny = np.linalg.norm(Xc.T @ Xc), np.linalg.norm(Yc.T @ Yc)
    if nx <= 0 or ny <= 0:
        return float("nan")
    return float(np.clip(num / (nx * ny), 0.0, 1.0))


def _cka_normalise(G: np.ndarray) -> np.ndarray:
    """CKA matrix from the matrix of Gram inner products G_ab = <K_a, K_b>_F."""
    G = np.asarray(G, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(G), 0.0, None))
    bad = ~(norms > 0)
    safe = np.where(bad, 1.0, norms)
    S = np.clip(G / np.outer(safe, safe), 0.0, 1.0)
    np.fill_diagonal(S, 1.0)
    S[bad, :] = np.nan
    S[:, bad] = np.nan
    return S


def gram(A: np.ndarray, *, columns: bool = False) -> np.ndarray:
    """A @ A.T (or A.T @ A with ``columns=True``) of a 2-D array, symmetric, in A's float
    dtype (float64 for other dtypes). numpy's matmul (which uses syrk for A @ A.T) for the
    usual tall/square cases; BLAS syrk directly for a short, very wide A, where numpy's
    matmul is pathologically slow (seconds for a 33 x 360000 matrix)."""
    A = np.asarray(A)
    if A.dtype not in (np.float32, np.float64):
        A = A.astype(np.float64)
    if columns:
        A = A.T
    if A.shape[0] >= 128 or A.shape[1] <= 64 * max(A.shape[0], 1):
        return A @ A.T
    from scipy.linalg import blas

    A = np.ascontiguousarray(A)
    syrk = blas.ssyrk if A.dtype == np.float32 else blas.dsyrk
    U = syrk(1.0, A.T, trans=1)                 # A.T is Fortran-ordered: no copy
    iu = np.triu_indices_from(U, 1)
    U[iu[1], iu[0]] = U[iu]
    return U


def cka_from_grams(grams) -> np.ndarray:
    """CKA matrix [layer, layer] from centred n x n Gram matrices (a sequence or [L, n, n])."""
    F = grams.reshape(len(grams), -1) if isinstance(grams, np.ndarray) else \
        np.stack([np.asarray(K).ravel() for K in grams])
    return _cka_normalise(gram(F))


_GRAM_BUDGET = 64_000_000    # float32 elements of Gram matrices held at once (256 MB)


def layer_similarity(H: np.ndarray) -> np.ndarray:
    """Linear CKA between every pair of layers of H [layer, n_tokens, d] -> [layer, layer]
    symmetric, values in [0, 1], 1 on the diagonal (NaN rows/columns for a layer with no
    variance).

    Each layer is centred once. With n <= d, CKA is the normalised inner product of the
    layers' n x n Gram matrices (formed in row blocks when all of them would not fit in
    256 MB); with n > d the d x d cross products ||X_aᵀ X_b||_F^2 are used instead.
    """
    H = _as_stack(H)
    L, n, d = H.shape
    with single_thread_blas(float(L) * n * d * min(n, d)):
        return _layer_similarity(H, L, n, d)


def _layer_similarity(H, L, n, d) -> np.ndarray:
    wd = work_dtype(H)
    mu = H.mean(axis=1, dtype=np.float64).astype(wd)
    if n > d:
        Xc = [H[l].astype(wd) - mu[l] for l in range(L)]
        G = np.zeros((L, L))
        for a in range(L):
            for b in range(a, L):
                G[a, b] = G[b, a] = float(np.linalg.norm((Xc[a].T @ Xc[b]).astype(np.float64)) ** 2)
        return _cka_normalise(G)
    if L * n * n <= _GRAM_BUDGET:
        grams = np.empty((L, n, n), dtype=wd)
        for l in range(L):
            Xc = H[l].astype(wd) - mu[l]
            grams[l] = gram(Xc)
        return cka_from_grams(grams)
    block = max(1, _GRAM_BUDGET // (L * n))
    G = np.zeros((L, L))
    for s in range(0, n, block):
        rows = []
        for l in range(L):
            Xc = H[l].astype(wd) - mu[l]
            rows.append((Xc[s:s + block] @ Xc.T).ravel())
        F = np.stack(rows)
        G += gram(F)
    return _cka_normalise(G)


# ---- stabilisation ---------------------------------------------------------------------

def stabilization_layer(curve, *, eps: float = 0.05, tail: int = 3) -> int | None:
    """First index after which ``curve`` stays within a band around its final plateau.

    The plateau is the mean of the last ``tail`` finite values. The band is ``eps`` times the
    curve's *range* (max − min of its finite values), not of its level: a curve that moves by
    1 % of a large level is not thereby "stable", and a flat curve is flat from index 0 (which
    says nothing about the tokens themselves for rotation-invariant statistics; see
    :mod:`vlmlens.analysis.stability`). The result is the
    smallest i such that every value at index >= i lies within the band (a NaN breaks the
    band). None when no such stretch of at least ``tail`` values ends the curve (the curve
    has not settled: a last value inside the band by chance does not count), or the curve
    has at most ``tail`` finite values (too short to tell). Indices are positions in
    ``curve``; map them to layers yourself.
    """
    c = np.asarray(curve, dtype=np.float64).ravel()
    fin = c[np.isfinite(c)]
    tail = max(int(tail), 1)
    if fin.size <= tail:
        return None
    plateau = float(fin[-tail:].mean())
    band = eps * float(fin.max() - fin.min())
    inside = np.isfinite(c) & (np.abs(c - plateau) <= band + 1e-12 * max(1.0, abs(plateau)))
    outside = np.flatnonzero(~inside)
    first = int(outside[-1] + 1) if outside.size else 0
    return first if c.size - first >= tail else None
