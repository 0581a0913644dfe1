"""Figures of layer dynamics (vlmlens.figures.dynamics) on a synthetic run with known structure.

The synthetic run mimics the finding the figures are for: image-token states collapse onto
a 3-d subspace and then stop changing at layer FREEZE, while text tokens keep rotating.
"""
import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from vlmlens.analysis import geometry as geo
from vlmlens.figures import _style
from vlmlens.figures import dynamics as fd
from vlmlens.run import Run, TokenSpans

L, D, FREEZE = 10, 48, 4
N_SYS, N_IMG, N_TXT, N_GEN = 2, 64, 8, 3


def synthetic_run(seed=0, n_img=N_IMG, n_gen=N_GEN) -> Run:
    rng = np.random.default_rng(seed)
    n_prompt = N_SYS + n_img + N_TXT
    n_total = n_prompt + n_gen
    hs = np.zeros((L + 1, n_total, D))
    img = slice(N_SYS, N_SYS + n_img)
    start = rng.standard_normal((n_img, D))
    target = rng.standard_normal((n_img, 3)) @ rng.standard_normal((3, D))
    for l in range(L + 1):
        w = min(l / FREEZE, 1.0)
        hs[l, img] = (1 - w) * start + w * target
    rest = np.r_[0:N_SYS, N_SYS + n_img:n_total]
    h = rng.standard_normal((len(rest), D))
    for l in range(L + 1):             # text: rotated and re-stretched at every layer
        Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        hs[l, rest] = (h @ Q) * np.exp(rng.normal(0.0, 1.5, D))
    tokens = ["<s>", "USER:"] + ["<image>"] * n_img + ["What", " colour", " is", " the", " circle", "?", "\n", "ASSISTANT:"]
    tokens += [" red", " circle", "."][:n_gen]
    return Run(
        meta={"model": "synthetic", "family": "llava", "n_layers": L},
        tokens=tokens, token_ids=list(range(n_total)),
        spans=TokenSpans(n_prompt, n_total, tuple(range(N_SYS, N_SYS + n_img))),
        image_grid=(8, 8) if n_img == 64 else (1, n_img), generated_text="red circle.",
        token_logprobs=[-0.1] * n_gen, image=Image.new("RGB", (16, 16)),
        arrays={"hidden_states": hs.astype(np.float16)},
    )


@pytest.fixture(scope="module")
def run():
    return synthetic_run()


def traces_in_panel(fig, panel):
    axis = "x" if panel == 0 else f"x{panel + 1}"
    return [t for t in fig.data if t.xaxis == axis]


def test_style_colours_are_consistent():
    assert set(_style.SPAN_COLORS) >= {"system", "image", "text", "generated"}
    assert len(set(_style.SPAN_COLORS.values())) == len(_style.SPAN_COLORS)
    fig = _style.new_figure(2, 2, titles=list("abcd"), title="t")
    assert isinstance(fig, go.Figure) and fig.layout.template.layout.paper_bgcolor == "white"


def test_fig_dynamics_panels_traces_and_lengths(run):
    fig = fd.fig_dynamics(run)
    expected_len = {"entropy_normalized": L + 1, "id_twonn": L + 1, "curvature": L - 1, "cosine_distance": L}
    for panel, (metric, _title, _y) in enumerate(fd.PANELS):
        curves = [t for t in traces_in_panel(fig, panel) if "stabilises" not in t.name and "text's n" not in t.name]
        assert [t.name for t in curves] == ["image", "text", "generated"], metric
        n = {"image": N_IMG, "text": N_TXT, "generated": N_GEN}
        for t in curves:
            assert len(t.x) == expected_len[metric]
            weak = n[t.name] < fd.MIN_POINTS.get(metric, 0)        # e.g. TwoNN on 8 text tokens: greyed
            assert t.line.color == (fd.UNRELIABLE if weak else _style.span_color(t.name)), (metric, t.name)
            assert "layer %{x}" in t.hovertemplate and f"(n={n[t.name]})" in t.hovertemplate
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == ["image", "text", "generated", f"image at text's n={N_TXT}"]
    ent_img = traces_in_panel(fig, 0)[0]
    want = geo.entropy(run.span_states("image")[7], normalize=True)
    assert ent_img.y[7] == pytest.approx(want, rel=1e-4)


def test_fig_dynamics_draws_image_at_the_text_sample_size(run):
    from vlmlens.analysis.stability import image_vs_text

    fig = fd.fig_dynamics(run)
    band = [t for t in traces_in_panel(fig, 0) if t.name == f"image at text's n={N_TXT}"]
    assert len(band) == 2 and band[0].fill == "toself"
    want = image_vs_text(run, metrics=("entropy_normalized",))["image"]["entropy_normalized"].median
    np.testing.assert_allclose(band[1].y, want)
    # TwoNN needs 10 points: at the text's n = 8 there is no band, only the reason
    assert not [t for t in traces_in_panel(fig, 1) if "text's n" in t.name]
    assert any("needs at least 10 tokens" in (a.text or "") for a in fig.layout.annotations)


def test_fig_dynamics_marks_stabilisation_where_image_tokens_freeze(run):
    fig = fd.fig_dynamics(run)
    marks = {(i, t.name): t.x[0] for i in range(4) for t in traces_in_panel(fig, i) if t.name.endswith("stabilises")}
    assert marks[(0, "image stabilises")] == FREEZE            # entropy constant from FREEZE on
    assert marks[(1, "image stabilises")] == FREEZE            # intrinsic dimension too
    assert marks[(3, "image stabilises")] == FREEZE + 1        # first zero cosine distance: pair (4, 5)
    text_entropy = marks.get((0, "text stabilises"))
    assert text_entropy is None or text_entropy > FREEZE
    vlines = [s for s in fig.layout.shapes if s.line.dash == "dot" and s.x0 == FREEZE]
    assert vlines and all(s.line.color == _style.span_color("image") for s in vlines)


def test_fig_dynamics_overlay_adds_dashed_traces(run):
    base = fd.fig_dynamics(run)
    other = synthetic_run(seed=1, n_img=16)
    fig = fd.fig_dynamics(run, other=other)
    extra = [t for t in fig.data if t.name.endswith("(other)")]
    assert sorted({t.name for t in extra}) == ["generated (other)", "image (other)", "text (other)"]
    assert len(extra) == 12 and all(t.line.dash == "dash" for t in extra)
    assert len(fig.data) > len(base.data) + 12 - 1
    img_other = [t for t in traces_in_panel(fig, 0) if t.name == "image (other)"][0]
    want = geo.entropy(other.span_states("image")[2], normalize=True)
    assert img_other.y[2] == pytest.approx(want, rel=1e-4)


def test_geometry_table_is_cached_per_run(run):
    assert fd.run_dynamics(run) is fd.run_dynamics(run)
    assert fd.run_dynamics(synthetic_run(seed=2)) is not fd.run_dynamics(run)


def test_fig_layer_similarity_heatmap(run):
    fig = fd.fig_layer_similarity(run, span="image")
    hm = fig.data[0]
    z = np.asarray(hm.z, dtype=float)
    assert isinstance(hm, go.Heatmap) and z.shape == (L + 1, L + 1)
    np.testing.assert_allclose(np.diag(z), 1.0)
    np.testing.assert_allclose(z[FREEZE:, FREEZE:], 1.0, atol=1e-6)   # frozen layers are identical
    assert z[0, L] < 0.9
    np.testing.assert_allclose(z, z.T)
    assert fd.layer_similarity_matrix(run, "image") is fd.layer_similarity_matrix(run, "image")
    txt = np.asarray(fd.fig_layer_similarity(run, span="text").data[0].z, dtype=float)
    assert txt[FREEZE, L] < z[FREEZE, L]


def test_fig_layer_similarity_too_few_tokens_gives_message():
    one = synthetic_run(n_gen=1)
    fig = fd.fig_layer_similarity(one, span="generated")
    assert len(fig.data) == 0 and "at least 2" in fig.layout.annotations[0].text


def test_token_embedding_pca_shape_index_and_cache(run):
    n_tok = run.spans.n_total
    emb = fd.token_embedding(run, "pca", max_tokens=None)
    assert emb.shape == ((L + 1) * n_tok, 2) and np.isfinite(emb).all()
    assert fd.token_embedding(run, "pca", max_tokens=None) is emb          # cached: the same array, not recomputed
    lay, pos = fd.embedding_index(run, max_tokens=None)
    assert len(lay) == len(emb) and lay[0] == 0 and lay[-1] == L and pos[-1] == n_tok - 1
    # frozen image states share a point from layer FREEZE on (same direction after scaling)
    i_a = np.flatnonzero((lay == FREEZE) & (pos == N_SYS))[0]
    i_b = np.flatnonzero((lay == L) & (pos == N_SYS))[0]
    np.testing.assert_allclose(emb[i_a], emb[i_b], atol=1e-5)
    sub = fd.token_embedding(run, "pca", layers=[0, 5], max_tokens=30)
    lay_s, pos_s = fd.embedding_index(run, layers=[0, 5], max_tokens=30)
    assert sub.shape == (60, 2) and len(lay_s) == 60
    non_image = np.r_[0:N_SYS, N_SYS + N_IMG:n_tok]
    assert set(non_image) <= set(pos_s.tolist())        # every non-image token kept
    with pytest.raises(ValueError):
        fd.token_embedding(run, "tsne")


def test_fig_token_umap_pca_traces(run):
    fig = fd.fig_token_umap(run, method="pca", max_tokens=None)
    names = [t.name for t in fig.data]
    assert names == ["system", "image", "text", "generated"]
    counts = {t.name: len(t.x) for t in fig.data}
    assert counts == {"system": (L + 1) * N_SYS, "image": (L + 1) * N_IMG, "text": (L + 1) * N_TXT,
                      "generated": (L + 1) * N_GEN}
    img = fig.data[1]
    assert img.marker.symbol == "circle" and set(np.asarray(img.marker.color)) == set(range(L + 1))
    assert "customdata[0]" in img.hovertemplate
    gen = fig.data[3]
    assert [row[0] for row in gen.customdata[:3]] == [" red", " circle", "."]


def test_token_umap_embedding_shape_and_cache():
    small = synthetic_run(n_img=16)
    emb = fd.token_embedding(small, "umap", layers=[0, 5, 10], max_tokens=None)
    assert emb.shape == (3 * small.spans.n_total, 2) and np.isfinite(emb).all()
    assert fd.token_embedding(small, "umap", layers=[0, 5, 10], max_tokens=None) is emb
    fig = fd.fig_token_umap(small, layers=[0, 5, 10], max_tokens=None)
    assert sum(len(t.x) for t in fig.data) == len(emb)


def test_fig_token_movement_marks_where_the_image_tokens_stop(run):
    from vlmlens.analysis.stability import run_movement

    from vlmlens.figures.movement import fig_token_movement

    fig = fig_token_movement(run)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == [f"image (n={N_IMG})", f"text (n={N_TXT})"]
    np.testing.assert_allclose(lines[0].y, run_movement(run).quantile(0.5))
    assert max(lines[0].y[FREEZE:]) < 1e-3 and min(lines[0].y[:FREEZE]) > 0.05   # frozen from layer FREEZE on
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1 and s.x0 == FREEZE]
    assert vlines and f"stable from decoder layer {FREEZE}" in fig.layout.title.text
