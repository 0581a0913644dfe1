"""Geometry metrics on data with known answers (vlmlens.analysis.geometry)."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial.distance import cdist

from vlmlens.analysis import dimension, geometry_metrics
from vlmlens.analysis import geometry as g
from vlmlens.run import Run, TokenSpans


# ---- data with known geometry ------------------------------------------------------------

def _embed(C, ambient, seed):
    """Rows of C [n, k] mapped isometrically into R^ambient (random orthonormal frame)."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((ambient, C.shape[1])))
    return C @ Q.T


def linear_subspace(dim, n=1000, ambient=512, seed=0):
    return _embed(np.random.default_rng(seed).standard_normal((n, dim)), ambient, seed + 100)


def swiss_roll(n=1000, ambient=256, seed=0):
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    h = 21 * rng.random(n)
    return _embed(np.column_stack([t * np.cos(t), h, t * np.sin(t)]), ambient, seed + 100)


def brute_reference(X, k):
    """TwoNN and MLE from scipy cdist on the distinct rows: an independent neighbour search."""
    Xu = np.unique(X, axis=0)
    D = cdist(Xu, Xu)
    np.fill_diagonal(D, np.inf)
    r = np.sort(D, axis=1)[:, :k]
    mu = np.sort(r[:, 1] / r[:, 0])
    keep = int(len(mu) * 0.9)
    x, y = np.log(mu[:keep]), -np.log(1 - np.arange(1, keep + 1) / len(mu))
    inv = np.mean([np.mean(np.log(ri[-1] / ri[:-1])) for ri in r])
    return x @ y / (x @ x), 1 / inv


# ---- intrinsic dimension ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["twonn", "mle"])
def test_id_of_5d_subspace_and_swiss_roll_within_10_percent(method):
    assert intrinsic(linear_subspace(5), method) == pytest.approx(5, rel=0.10)
    assert intrinsic(swiss_roll(), method) == pytest.approx(2, rel=0.10)


def intrinsic(X, method):
    return g.intrinsic_dimension(X, method=method, k=20)


def test_id_of_20d_subspace_shows_the_known_small_sample_bias():
    # n=1000 points cannot resolve 20 dimensions: local estimators are biased low here
    # (scikit-dimension gives the same 16.66 / 14.61 on this data). We pin the measured
    # values, and that they separate 20-d clearly from 5-d.
    X = linear_subspace(20)
    two, mle = intrinsic(X, "twonn"), intrinsic(X, "mle")
    assert 0.78 * 20 <= two <= 1.1 * 20, two
    assert 0.68 * 20 <= mle <= 1.1 * 20, mle
    assert two > 3 * intrinsic(linear_subspace(5), "twonn")


@pytest.mark.parametrize("make", [lambda: linear_subspace(5, n=400), lambda: swiss_roll(n=400)])
def test_id_equals_brute_force_reference(make):
    X = make()
    two_ref, mle_ref = brute_reference(X, 20)
    both = g.intrinsic_dimensions(X, k=20)
    assert both["twonn"] == pytest.approx(two_ref, rel=1e-9)
    assert both["mle"] == pytest.approx(mle_ref, rel=1e-9)
    assert g.intrinsic_dimension(X, method="twonn") == both["twonn"]


def test_id_sklearn_path_agrees_with_gram_path(monkeypatch):
    X = linear_subspace(6, n=500)
    both = g.intrinsic_dimensions(X, k=15)
    monkeypatch.setattr(dimension, "_BRUTE_MAX", 100)
    other = g.intrinsic_dimensions(X, k=15)
    assert other["twonn"] == pytest.approx(both["twonn"], rel=1e-9)
    assert other["mle"] == pytest.approx(both["mle"], rel=1e-9)


def test_id_with_20_percent_duplicates_is_finite_and_counts_each_point_once():
    X = linear_subspace(5, n=800).astype(np.float32)
    rng = np.random.default_rng(1)
    Xd = np.concatenate([X, X[rng.integers(0, 800, 200)]])[rng.permutation(1000)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("twonn", "mle"):
            est = intrinsic(Xd, method)
            assert np.isfinite(est) and est == pytest.approx(intrinsic(X, method), rel=1e-4)
        curves = g.layer_curves(np.stack([Xd, Xd * 2]), k=20)
    assert np.all(np.isfinite(curves["id_twonn"])) and np.all(np.isfinite(curves["id_mle"]))
    assert curves["id_twonn"][0] == pytest.approx(intrinsic(X, "twonn"), rel=1e-4)


def test_id_float32_near_duplicates_match_float64_reference():
    # pairs 1e-4 apart on points of norm ~30: the float32 Gram alone would be wrong here
    base = linear_subspace(4, n=300, ambient=256) + 30.0 / np.sqrt(256)
    near = base + 1e-4 * np.random.default_rng(2).standard_normal(base.shape)
    X = np.concatenate([base, near])
    ref = g.intrinsic_dimensions(X, k=10)                      # float64 path
    got = g.intrinsic_dimensions(X.astype(np.float32), k=10)   # float32 Gram + refinement
    ref32 = brute_reference(X.astype(np.float32).astype(np.float64), 10)
    assert got["twonn"] == pytest.approx(ref32[0], rel=1e-3)
    assert got["mle"] == pytest.approx(ref32[1], rel=1e-3)
    assert got["mle"] == pytest.approx(ref["mle"], rel=2e-2)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_id_of_too_few_points_is_nan(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(intrinsic(np.ones((n, 8)), "twonn"))
        assert math.isnan(intrinsic(np.ones((n, 8)), "mle"))
        assert math.isnan(intrinsic(np.ones((50, 8)), "twonn"))   # one distinct point


def test_id_rejects_unknown_method():
    with pytest.raises(ValueError, match="twonn"):
        g.intrinsic_dimension(np.zeros((5, 2)), method="pca")


# ---- entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 8, 32])
def test_entropy_of_isotropic_r_dim_cloud_is_log_r(r):
    X = linear_subspace(r, n=3000, ambient=128)
    assert g.entropy(X) == pytest.approx(math.log(r), abs=0.02 * max(math.log(r), 1))


def test_entropy_of_repeated_point_is_zero_and_normalised_in_unit_interval():
    assert g.entropy(np.tile(np.arange(6.0), (40, 1))) == 0.0
    rng = np.random.default_rng(0)
    for shape in [(30, 200), (200, 30), (5, 5), (3, 1000)]:
        v = g.entropy(rng.standard_normal(shape), normalize=True)
        assert 0.0 <= v <= 1.0
    iso = g.entropy(rng.standard_normal((4000, 16)), normalize=True)
    assert iso == pytest.approx(1.0, abs=0.01)          # full rank, flat spectrum
    assert math.isnan(g.entropy(np.ones((1, 4))))


def test_entropy_matches_explicit_spectrum_for_both_gram_orientations():
    rng = np.random.default_rng(3)
    for shape in [(40, 12), (12, 40)]:
        X = rng.standard_normal(shape) * np.linspace(0.1, 3, shape[1])
        Z = X - X.mean(0)
        Z /= np.linalg.norm(Z, axis=1, keepdims=True)
        lam = np.clip(np.linalg.eigvalsh(Z @ Z.T), 0, None)
        p = lam[lam > 1e-12] / lam.sum()
        assert g.entropy(X) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
        assert g.entropy(X, alpha=2) == pytest.approx(-np.log((p ** 2).sum()), rel=1e-9)
        assert g.entropy(X, alpha=0) == pytest.approx(np.log(len(p)), rel=1e-9)
        assert g.entropy(X, alpha=0.999999) == pytest.approx(g.entropy(X), rel=1e-4)
        assert g.entropy(X, normalize=True) == pytest.approx(g.entropy(X) / np.log(min(shape[0] - 1, shape[1])))


# ---- curvature and cosine distance ------------------------------------------------------

def turning_path(theta, steps=12, d=300, seed=0):
    """A path in a random 2-D plane of R^d that turns by theta at every step."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, 2)))
    heads = np.arange(steps) * theta
    pts = np.cumsum(np.column_stack([np.cos(heads), np.sin(heads)]), axis=0)
    return pts @ Q.T + 5.0


def test_curvature_of_straight_line_is_zero():
    t = np.arange(10.0)[:, None]
    H = 3.0 + t * np.random.default_rng(0).standard_normal(64)        # [layer, d]
    assert np.abs(g.curvature(H)).max() < 1e-7
    H16 = np.stack([H, 2 * H], axis=1).astype(np.float32)             # [layer, 2 tokens, d]
    assert np.abs(g.curvature(H16)).max() < 1e-5
    assert g.curvature(H).shape == (8,)


@pytest.mark.parametrize("theta", [0.01, 0.3, 1.0, 2.5])
def test_curvature_of_constant_turn_is_theta(theta):
    c = g.curvature(turning_path(theta))
    np.testing.assert_allclose(c, theta, atol=1e-7)
    two = np.stack([turning_path(theta), turning_path(0.2, seed=1)], axis=1)
    np.testing.assert_allclose(g.curvature(two), (theta + 0.2) / 2, atol=1e-7)


def test_sequence_curvature_of_regular_polygon():
    N = 24
    a = 2 * np.pi * np.arange(N) / N
    X = _embed(np.column_stack([np.cos(a), np.sin(a)]), 100, 0)
    assert g.sequence_curvature(X) == pytest.approx(2 * np.pi / N, abs=1e-9)
    assert g.sequence_curvature(turning_path(0.7)) == pytest.approx(0.7, abs=1e-9)
    assert math.isnan(g.sequence_curvature(X[:2]))


def test_cosine_distance_identical_layers_zero_and_known_angle():
    rng = np.random.default_rng(0)
    layer = rng.standard_normal((7, 50)).astype(np.float16)
    assert np.array_equal(g.cosine_distance(np.stack([layer, layer, 4 * layer])), [0.0, 0.0])
    P = turning_path(0.4, steps=4)                         # consecutive *points* of a path
    want = [1 - P[i] @ P[i + 1] / np.linalg.norm(P[i]) / np.linalg.norm(P[i + 1]) for i in range(3)]
    np.testing.assert_allclose(g.cosine_distance(P), want, rtol=1e-9, atol=1e-12)
    flip = np.stack([layer, -layer]).astype(np.float32)
    np.testing.assert_allclose(g.cosine_distance(flip), [2.0], atol=1e-6)


# ---- CKA ---------------------------------------------------------------------------------

def test_cka_identity_rotation_scaling_and_independence():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    assert g.cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert g.cka(X, 7.5 * X @ Q + 3.0) == pytest.approx(1.0, abs=1e-10)
    wide = rng.standard_normal((20, 500))                   # n < d: Gram path
    assert g.cka(wide, -2 * wide) == pytest.approx(1.0, abs=1e-12)
    Y = rng.standard_normal((300, 40))
    assert g.cka(X, Y) < 0.2
    assert g.cka(rng.standard_normal((2000, 10)), rng.standard_normal((2000, 10))) < 0.02
    partial = g.cka(X, np.column_stack([X[:, :20], Y[:, :20]]))
    assert 0.2 < partial < 0.95
    assert math.isnan(g.cka(np.ones((10, 3)), X[:10]))


@pytest.mark.parametrize("n,d", [(30, 80), (80, 30)])
def test_layer_similarity_equals_pairwise_cka(n, d, monkeypatch):
    rng = np.random.default_rng(1)
    H = np.cumsum(rng.standard_normal((6, n, d)), axis=0).astype(np.float32)
    ref = np.array([[g.cka(H[a], H[b]) for b in range(6)] for a in range(6)])
    np.testing.assert_allclose(g.layer_similarity(H), ref, atol=1e-5)
    monkeypatch.setattr(geometry_metrics, "_GRAM_BUDGET", 1000)     # row-blocked path
    np.testing.assert_allclose(g.layer_similarity(H), ref, atol=1e-5)
    H[2] = 1.0
    S = g.layer_similarity(H)
    assert np.isnan(S[2]).all() and np.isnan(S[:, 2]).all() and S[0, 0] == 1.0


# ---- stabilisation ----------------------------------------------------------------------

def test_stabilization_layer_known_plateau():
    curve = [10, 8, 5, 3, 2.02, 2.0, 1.99, 2.0, 2.01]
    assert g.stabilization_layer(curve) == 4                     # band 5% of the range 8.01: +-0.40
    assert g.stabilization_layer(curve, eps=0.001) is None       # band +-0.008: the last value 2.01 is outside
    assert g.stabilization_layer(curve, eps=0.0015) == 5         # band +-0.012: 2.02 is the last one outside
    assert g.stabilization_layer(curve, eps=0.2) == 3            # band +-1.6: 3 is inside, 5 is not
    assert g.stabilization_layer(curve, eps=0.6) == 2
    assert g.stabilization_layer([100.0, 101.0, 100.5, 100.8, 100.2]) is None   # 1% of the level, but not settled
    assert g.stabilization_layer([4.0, 4.0, 4.0, 4.0]) == 0      # a flat curve is flat from the start
    assert g.stabilization_layer(np.arange(1.0, 11.0)) is None   # keeps rising
    assert g.stabilization_layer([5, 1, 1, 1, 1]) == 1
    assert g.stabilization_layer([3, 0, 0, 0]) == 1              # zero plateau: band from max|curve|
    assert g.stabilization_layer([4, 2, np.nan, 2, 2, 2]) == 3    # a NaN breaks the band
    assert g.stabilization_layer([np.nan, np.nan]) is None
    assert g.stabilization_layer([1, 5, 1, 9, 3, 3.05]) is None          # only 2 values settled
    assert g.stabilization_layer([1, 5, 1, 9, 3, 3.05], tail=2) == 4
    assert g.stabilization_layer([2.0, 2.0, 2.0]) is None                # too short to tell
    assert g.stabilization_layer([7.0, 2.0, 2.0, 2.0]) == 1


# ---- curves of a stack and of a Run --------------------------------------------------

def layered(L=6, n=40, d=64, seed=0):
    """Token states that start isotropic and collapse towards a 3-d subspace with depth."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    low = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))
    w = np.linspace(0, 1, L)[:, None, None]
    return ((1 - w) * base + w * low * 2 + 0.05 * rng.standard_normal((L, n, d))).astype(np.float16)


def test_layer_curves_match_single_metric_functions():
    H = layered()
    out = g.layer_curves(H, k=10)
    H32 = H.astype(np.float32)
    np.testing.assert_allclose(out["entropy"], [g.entropy(x) for x in H32], rtol=1e-4)
    np.testing.assert_allclose(out["entropy_normalized"], [g.entropy(x, normalize=True) for x in H32], rtol=1e-4)
    np.testing.assert_allclose(out["id_twonn"], [g.intrinsic_dimension(x) for x in H32], rtol=1e-4)
    np.testing.assert_allclose(out["id_mle"], [g.intrinsic_dimension(x, method="mle", k=10) for x in H32], rtol=1e-4)
    np.testing.assert_allclose(out["sequence_curvature"], [g.sequence_curvature(x) for x in H32], rtol=1e-5)
    np.testing.assert_allclose(out["curvature"], g.curvature(H), rtol=1e-6)
    np.testing.assert_allclose(out["cosine_distance"], g.cosine_distance(H), rtol=1e-6)
    np.testing.assert_allclose(out["cka"], g.layer_similarity(H), atol=1e-5)
    assert out["entropy"][-1] < out["entropy"][0] - 1.0         # the collapse is visible
    assert out["id_twonn"][-1] < 6 < out["id_twonn"][0]
    assert g.layer_curves(H, k=10, workers=1)["id_mle"] == pytest.approx(out["id_mle"])
    wide = g.layer_curves(H[:, :, :16].astype(np.float32), k=10)   # n > d branch
    np.testing.assert_allclose(wide["entropy"], [g.entropy(x) for x in H32[:, :, :16]], rtol=1e-4)
    np.testing.assert_allclose(wide["cka"], g.layer_similarity(H32[:, :, :16]), atol=1e-5)


def test_non_finite_states_give_nan_or_are_left_out():
    H = layered().astype(np.float32)
    bad = H.copy()
    bad[3, 5, 7] = np.inf                                   # float16 overflow of one token
    with np.errstate(all="ignore"):
        assert math.isnan(g.entropy(bad[3]))
        assert math.isnan(g.intrinsic_dimension(bad[3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = g.layer_curves(bad, k=10)
    ref = g.layer_curves(np.delete(H, 5, axis=1), k=10)
    for name in ("entropy", "id_twonn", "curvature", "cosine_distance", "cka"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-6, err_msg=name)


def make_run(L=5, d=32, n_sys=2, n_img=36, n_txt=6, n_gen=1, seed=0):
    rng = np.random.default_rng(seed)
    n_prompt = n_sys + n_img + n_txt
    n_total = n_prompt + n_gen
    hs = np.cumsum(rng.standard_normal((L + 1, n_total, d)), axis=0).astype(np.float16)
    return Run(
        meta={"model": "synthetic", "family": "llava", "n_layers": L},
        tokens=[f"t{i}" for i in range(n_total)], token_ids=list(range(n_total)),
        spans=TokenSpans(n_prompt, n_total, tuple(range(n_sys, n_sys + n_img))),
        image_grid=(6, 6), generated_text="x", token_logprobs=[-0.1] * n_gen,
        image=Image.new("RGB", (8, 8)), arrays={"hidden_states": hs},
    )


def test_per_layer_and_dynamics_table(tmp_path):
    run = make_run()
    ent = g.per_layer(run, g.entropy, span="image")
    assert ent.shape == (6,) and np.all(ent > 0)
    assert ent[3] == pytest.approx(g.entropy(run.span_states("image")[3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = g.dynamics(run)
    assert list(df.columns) == ["metric", "span", "layer", "value"]
    assert set(df["span"]) == {"image", "text", "generated"}
    sizes = df.groupby(["metric", "span"]).size()
    for span in ("image", "text", "generated"):
        assert sizes[("entropy", span)] == 6 and sizes[("id_twonn", span)] == 6
        assert sizes[("cosine_distance", span)] == 5 and sizes[("curvature", span)] == 4
    img = df[(df.metric == "entropy") & (df.span == "image")].sort_values("layer")
    np.testing.assert_allclose(img["value"], ent, rtol=1e-4)
    assert list(img["layer"]) == list(range(6))
    cos = df[(df.metric == "cosine_distance") & (df.span == "text")]
    assert list(cos["layer"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(cos["value"], g.cosine_distance(run.span_states("text")), rtol=1e-6)
    gen = df[df.span == "generated"].set_index("metric")["value"]
    assert gen[["entropy", "id_twonn", "id_mle", "sequence_curvature"]].isna().all()   # 1 token
    assert np.isfinite(gen["cosine_distance"]).all() and np.isfinite(gen["curvature"]).all()
    assert df.attrs["n_tokens"] == {"image": 36, "text": 6, "generated": 1}
    stab = g.stabilization_table(df)
    assert len(stab) == len(df.groupby(["metric", "span"]))
    assert pd.DataFrame(df.attrs["stabilization"]).equals(stab)
    assert stab["plateau"].notna().any()   # random curves need not settle within 5% of their range
    path = tmp_path / "dyn.csv"
    df.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert len(back) == len(df) and np.allclose(back["value"], df["value"], equal_nan=True)


def test_dynamics_skips_empty_spans():
    run = make_run(n_txt=0, n_gen=0)
    df = g.dynamics(run)
    assert set(df["span"]) == {"image"}
    assert np.isnan(g.per_layer(run, g.entropy, span="text")).all()


def test_layer_curves_finish_in_place_when_no_pool_takes_work(monkeypatch):
    """While the interpreter shuts down a thread pool takes no new work: the curves are then computed in the
    calling thread, equal to the pooled ones (a dashboard's background drawing ends cleanly at exit)."""
    from vlmlens.analysis import geometry as geo

    H = np.random.default_rng(0).normal(size=(4, 20, 16)).astype(np.float32)
    pooled = geo.layer_curves(H)
    monkeypatch.setattr(geo, "_pool", lambda workers: geo._InPlace())
    inplace = geo.layer_curves(H)
    assert set(pooled) == set(inplace)
    for k in pooled:
        np.testing.assert_allclose(inplace[k], pooled[k], rtol=0, atol=0, equal_nan=True)
