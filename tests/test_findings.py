"""Honest findings: every headline rule on cases with a known answer.

* token-movement stabilisation: a null case (fresh random rotation + shift per layer) is "not
  stabilised" although every rotation-invariant curve is flat; a trajectory that stops moving
  at layer m stabilises at m;
* image vs text at matched sample size: same distribution at n = 8 vs 64 differs unmatched,
  not matched;
* causal three stages: the rule on constructed outcomes; a model built so that only chosen
  layers can read the image (o_proj zeroed elsewhere) gives exactly those stages; the shipped
  tiny-shapes model on "What color is the circle?" reads the image at the last layer only;
* sweep cliff / VTW / compute saved on constructed sweeps (non-monotonic, freeze mode, none);
* answer-level KL on a caption whose words change.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlens import findings as F
from vlmlens.metrics import NOISE_FLOOR
from vlmlens.analysis import geometry as geo
from vlmlens.analysis.stability import (curves_of, image_vs_text, matched_curves, stabilisation, stabilised_from,
                                        token_movement)
from vlmlens.experiments.stages import causal_stages, describe_stages, stages_from_windows
from vlmlens.models.loading import TINY_SHAPES_DIR
from vlmlens.run import Run, TokenSpans

EXAMPLES = TINY_SHAPES_DIR.parents[0] / "examples"
needs_tiny = pytest.mark.skipif(not TINY_SHAPES_DIR.is_dir(), reason="tiny-shapes checkpoint not in this build")


def _run_with_states(H: np.ndarray, n_text: int = 0) -> Run:
    """A Run whose image span is the states ``H`` [L+1, n_img, d] (plus ``n_text`` text tokens)."""
    L1, n_img, d = H.shape
    rng = np.random.default_rng(5)
    T = rng.standard_normal((L1, n_text, d))
    hs = np.concatenate([H, T], 1).astype(np.float32)
    n = n_img + n_text
    return Run(meta={"model": "synthetic", "family": "llava", "n_layers": L1 - 1}, tokens=["<image>"] * n_img + ["w"] * n_text,
               token_ids=list(range(n)), spans=TokenSpans(n, n, tuple(range(n_img))), image_grid=(1, n_img),
               generated_text="", token_logprobs=[], image=Image.new("RGB", (8, 8)), arrays={"hidden_states": hs})


# ---- stabilisation on the tokens themselves -----------------------------------------------------

def test_null_rotation_is_not_stabilised_although_invariant_curves_are_flat():
    rng = np.random.default_rng(0)
    L, n, d = 8, 64, 24
    X = rng.standard_normal((n, d)) * 3
    H = []
    for _ in range(L + 1):                       # a fresh random rotation + shift at every layer
        Q, _r = np.linalg.qr(rng.standard_normal((d, d)))
        H.append(X @ Q + rng.standard_normal(d) * 5)
    H = np.stack(H)
    curves = geo.layer_curves(H, with_cka=False)
    for m in ("entropy_normalized", "id_twonn", "id_mle"):        # rotation/shift invariant: flat
        assert np.ptp(curves[m]) < 1e-6 * max(1.0, abs(curves[m]).max()), m
        assert geo.stabilization_layer(curves[m]) == 0            # so a curve rule "stabilises at 0"
    mv = token_movement(H)
    assert np.median(mv.cos_dist) > 0.5                          # every token changes completely
    s = stabilisation(_run_with_states(H))
    assert s.layer is None and s.statement.startswith("not stabilised")


def test_trajectory_that_stops_at_layer_m_stabilises_at_m():
    rng = np.random.default_rng(1)
    L, n, d, m = 8, 40, 16, 5
    start, end = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    H = np.stack([start + min(l / m, 1.0) * (end - start) for l in range(L + 1)])   # moves until state m, then stops
    s = stabilisation(_run_with_states(H))
    assert s.layer == m and f"stable from decoder layer {m}" in s.statement
    assert s.drift_median == pytest.approx(0.0, abs=1e-6)
    assert stabilised_from([0.3, 0.2, 0.01, 0.2, 0.01, 0.0]) == 4     # a later move resets it
    assert stabilised_from([0.01, 0.02]) == 0 and stabilised_from([0.01, 0.2]) is None


def test_matched_sample_size_removes_the_spurious_image_text_difference():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((72, 20)) @ rng.standard_normal((20, 96))  # one distribution: a 20-d subspace
    img, txt = np.stack([X[:64]] * 2), np.stack([X[64:]] * 2)         # 64 "image" vs 8 "text" tokens
    un_img, un_txt = curves_of(img)["entropy_normalized"][0], curves_of(txt)["entropy_normalized"][0]
    assert un_txt - un_img > 0.15                                     # unmatched: a large "difference"
    m = matched_curves(img, 8, repeats=30)["entropy_normalized"]
    gap = abs(m.median[0] - un_txt)                                   # matched: the difference is gone
    assert gap < 0.25 * (un_txt - un_img) and gap < m.hi[0] - m.lo[0]
    assert "needs at least 10 tokens" in matched_curves(img, 8)["id_twonn"].reason
    run = _run_with_states(img[:, :, :].astype(np.float32), n_text=8)
    r = image_vs_text(run)
    assert r["n"] == 8 and r["image"]["entropy_normalized"].n_total == 64


# ---- causal three stages ------------------------------------------------------------------------

def test_stage_rule_on_constructed_outcomes():
    L = 8
    r = stages_from_windows([True] * 7 + [False], [False] * 8, L)       # image read at the last layer only
    assert r["labels"] == ["sink"] * 7 + ["fusion"] and r["discard"] is None and r["sink"] == [0, 6]
    assert "no discard stage" in describe_stages(r, L, joint_kept=None)
    r = stages_from_windows([True, True, False, False, False, False, False, False],
                            [True, True, True, False, False, False, False, False], L)
    assert (r["sink"], r["fusion"], r["discard"]) == ([0, 1], [2, 4], [5, 7])
    r = stages_from_windows([True] * 8, [True] * 8, L)
    assert not r["needs_image"] and "does not need the image" in describe_stages(r, L, joint_kept=None)
    r = stages_from_windows([True] * 5 + [False] * 3, [True] * 5 + [False] * 3, L)   # early or late, not both
    assert r["overlap"] and r["fusion"] is None
    assert "no single fusion window" in describe_stages(r, L, joint_kept=False)
    r = stages_from_windows([False] * 8, [False] * 8, L)
    assert r["labels"] == ["fusion"] * 8 and r["sink"] is None




def _reads_only(lm, layers):
    """A copy of ``lm`` whose attention output is zero except in ``layers``: knocking the image
    out of any other layer cannot change anything (exactly)."""
    out = copy.copy(lm)
    out.model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for l, layer in enumerate(lm.arch.decoder_layers(out.model)):
            if l not in layers:
                layer.self_attn.o_proj.weight.zero_()
    return out


@needs_tiny
@pytest.mark.parametrize("reads, want", [
    ((3,), (["sink"] * 3 + ["fusion"] + ["discard"] * 4)),
    ((2, 3, 4), (["sink"] * 2 + ["fusion"] * 3 + ["discard"] * 3)),
    ((7,), (["sink"] * 7 + ["fusion"])),
])
def test_knockout_stages_find_the_layers_that_can_read_the_image(tiny, reads, want):
    lm = _reads_only(tiny, set(reads))
    r = causal_stages(lm, EXAMPLES / "shapes_00.png", "What color is the circle?", max_new_tokens=3, tau=1e-7)
    assert r.labels == want, r.statement
    for w in r.single:                       # outside ``reads`` a knockout changes exactly nothing
        assert (w.answer_kl == 0.0) == (w.first not in reads), (w.first, w.answer_kl)
    if want[-1] == "fusion":
        assert r.discard is None and "no discard stage" in r.statement
    else:
        assert r.joint is not None and r.joint.kept     # sink and discard together keep the output


@needs_tiny
def test_tiny_shapes_reads_the_colour_at_the_last_layer(tiny):
    r = causal_stages(tiny, EXAMPLES / "shapes_00.png", "What color is the circle?", max_new_tokens=4)
    assert r.baseline_text == "red"
    assert r.labels == ["sink"] * 7 + ["fusion"], r.statement
    assert r.single[7].answer_kl > 1.0 and not r.single[7].tokens_kept        # layer 7 alone flips "red"
    assert all(w.answer_kl < 0.01 for w in r.single[:7])
    assert r.prefix[6].kept and r.prefix[6].answer_kl < 0.01                  # layers 0-6 jointly: still "red"
    f = F.stages_finding(r.to_json())
    assert f.status == "causal" and "no discard stage" in f.text


# ---- sweep findings ------------------------------------------------------------------------------

def _sweep(kept, *, mode="drop", akl=None, correct=None, truth=None, base_ok=None):
    L = len(kept) - 1
    akl = akl or [0.0 if k else 2.0 for k in kept]
    depths = [{"depth": d, "answer_kept": k, "first_token_kl": 0.0, "answer_kl": a,
               "correct": None if correct is None else correct[d]} for d, (k, a) in enumerate(zip(kept, akl))]
    return {"n_layers": L, "mode": mode, "depths": depths, "truth": truth, "baseline_correct": base_ok}


COMPUTE = {"depths": list(range(9)), "total_saving": [0.9 - 0.1 * k for k in range(8)] + [0.0],
           "kv_saving": [0.8 - 0.1 * k for k in range(8)] + [0.0]}


def test_sweep_cliff_monotonic_and_not():
    f = F.sweep_cliff_finding(_sweep([False] * 3 + [True] * 6))
    assert f.value == 3 and f.status == "causal" and "non-monotonic" not in f.text
    f = F.sweep_cliff_finding(_sweep([True] * 6 + [False] * 2 + [True],
                                     correct=[False] * 6 + [True] * 3, truth="no", base_ok=True))
    assert f.value == 8 and "not monotonically: kept at 0–5, 8; lost at 6–7" in f.text
    f = F.sweep_cliff_finding(_sweep([True] * 6 + [False] * 2 + [True], correct=[False] * 6 + [True, True, False],
                                     truth="no", base_ok=False))
    assert "fixes the baseline's mistake at depths 6–7" in f.text
    assert F.sweep_cliff_finding(None).status == "unverified"
    assert F.kept_pattern([0, 1, 2, 3], [True, False, True, True]) == "kept at 0, 2–3; lost at 1"


def test_vtw_and_attention_like_thresholds():
    s = _sweep([False, False, True, True, True], akl=[3.0, 0.05, 0.2, 0.0, 0.0])
    assert F.vtw_finding(s).value == 1           # first depth within eta, although depth 1 loses the answer
    assert F.vtw_finding(_sweep([False] * 4 + [True], akl=[5.0] * 4 + [0.0])).status == "not found"


def test_compute_saved_only_when_verified_and_never_mixes_modes():
    f = F.compute_finding(None, COMPUTE)
    assert f.status == "unverified" and "run the sweep" in f.text
    f = F.compute_finding(_sweep([False] * 3 + [True] * 6), COMPUTE)
    assert f.status == "causal" and f.value == pytest.approx(0.6) and "verified by the drop sweep" in f.text
    f = F.compute_finding(_sweep([False] * 3 + [True] * 6, mode="freeze"), COMPUTE)
    assert f.status == "unverified" and "freeze" in f.text and "%" not in f.text
    f = F.compute_finding(_sweep([True] * 6 + [False] * 2 + [True]), COMPUTE)
    assert f.value == 0.0 and "needs the image in every layer" in f.text     # not 30% at depth 6's neighbour


def test_findings_list_on_a_shipped_cached_run():
    from vlmlens.ui.store import RunsDir

    runs = RunsDir(TINY_SHAPES_DIR.parents[1] / "cached_runs")
    run, _derived, extras = runs.open("single-color")
    sweep = extras.get("sweep")
    fs = {f.key: f for f in F.findings(run, sweep=sweep, extras=extras)}
    assert all(f.status in F.STATUSES for f in fs.values())
    assert fs["truth"].value is True
    assert fs["stabilisation"].value is None                        # the image tokens keep moving
    assert fs["sweep_cliff"].value == 8 and fs["compute"].value == 0.0


# ---- answer-level metrics -------------------------------------------------------------------------

@needs_tiny
def test_answer_kl_sees_a_caption_change_that_first_token_kl_misses(tiny):
    from vlmlens.experiments.compare import compare

    res = compare(tiny, EXAMPLES / "shapes_01.png", "What is in the image?", depths=[4], max_new_tokens=40,
                  keep_runs=False, store="none", record_attention=False)
    d = res.depth(4)
    assert not d.answer_kept                          # the caption's words change
    assert d.first_token_kl < NOISE_FLOOR           # its first word "a" does not
    assert d.answer_kl > 1.0 and d.answer_logprob_delta < -1.0 and d.answer_tokens == len(res.baseline_token_ids)


@needs_tiny
def test_output_kl_sees_a_trace_change_that_the_forced_final_answer_hides(tiny):
    from vlmlens.experiments.compare import compare

    res = compare(tiny, EXAMPLES / "shapes_06.png", "Is the green circle above the orange circle?", depths=[6],
                  max_new_tokens=48, keep_runs=False, store="none", record_attention=False)
    d = res.depth(6)
    assert d.answer_start > 0 and d.answer_tokens < len(res.baseline_token_ids)   # the answer follows "answer:"
    assert d.first_divergence is not None                                        # the trace changes at depth 6
    assert d.answer_kl < 0.01            # teacher-forced on the baseline's trace, the final answer barely moves
    assert d.output_kl > 1.0             # over the whole output the change is plain


def test_noise_level_matrices_read_no_change():
    from vlmlens.figures.matrices import fig_layer_skip, fig_substitution_matrix

    sub = {"layers": [0, 2, 4], "kl": [[0.0, None, None], [2e-7, 0.0, None], [1.5e-4, 0.3, 0.0]],
           "output_kl": [[0.0, None, None], [3e-7, 0.0, None], [1.5e-4, 2.5, 0.0]],
           "answer_kept": [[True, None, None], [True, True, None], [True, False, True]],
           "text": [["a", None, None], ["a", "a", None], ["a", "b", "a"]]}
    fig = fig_substitution_matrix(sub)
    cells = fig.data[0].text
    assert cells[1][0] == "no change" and cells[2][0] == "no change" and cells[2][1] == "2.5"
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[1][0]) and np.isnan(z[2][0]) and z[2][1] == 2.5        # noise is not coloured
    assert "output KL" in fig.layout.title.text and "no change" in fig.layout.title.text
    skip = {"layers": [0, 1], "tokens": ["image"], "kl": {"image": [1e-6, 0.2]}, "output_kl": {"image": [2e-6, 1.0]},
            "answer_kept": {"image": [True, False]}, "cosine_distance": None}
    f2 = fig_layer_skip(skip)
    assert list(f2.data[0].hovertext) == ["no change", "1 nats"]
    assert any("no change" in (a.text or "") for a in f2.layout.annotations)
