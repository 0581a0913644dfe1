"""Token pruning through the lens, against independent references.

The reference is the same model with *eager* attention over the prompt (+ the lens's tokens,
teacher-forced): a forward hook on the attention module of the ranking layer reads eager's own
attention weights, ranks the image tokens here (numpy, stable, ties to the earlier position), and
the masks of the deeper layers are built by hand: no query that stays may read a pruned key.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import greedy_generate, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import (VTW, FastV, Freeze, Knockout, PyramidDrop, SkipLayers, StagePruner, TokenPruner,
                                   Truncate, from_json, n_kept, prefix_effect, validate_all)
from vlmlens.lens import Lens, Plan

from tests._models import additive_mask, deep_llava, eager_attentions, mask_pre_hook, extend_inputs, random_lm, set_attn

PROMPT = "What is in the image? Describe it."
N_NEW = 4


@pytest.fixture(scope="module")
def deep():
    """A random LLaVA with 5 decoder layers (room for stages)."""
    return deep_llava()


def lens_steps(lm, image, ivs, n=N_NEW):
    """Tokens and the full logits of every greedy step through the lens."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    plan = Plan.build(image_positions(lm, ids), lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens(lm.arch.decoder_layers(lm.model), plan) as lens:
        out = greedy_generate(lm, inputs, n)
    kept = {}
    for iv in ivs:
        if hasattr(iv, "record_arrays"):
            kept = iv.record_arrays(lens.context, lm.n_layers)["image_kept"]
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([l[0] for l in out.logits]), kept


def _rank_np(scores: np.ndarray, n: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n])


def reference(lm, image, gen: list[int], stages, score: str = "last"):
    """Eager teacher-forced forward with the pruning built here. ``stages``: [(layer, keep)].
    Returns (logits [T, V] predicting each generated token and the next, kept index sets per stage)."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n_prompt = inputs["input_ids"].shape[1]
    img = image_positions(lm, inputs["input_ids"])
    full = extend_inputs(inputs, gen)
    n = full["input_ids"].shape[1]
    layers = lm.arch.decoder_layers(lm.model)
    kept_by_stage: list[np.ndarray] = []          # indices into img

    def gone_mask(l):
        """Additive mask of layer l: causal, and no surviving query reads a pruned image key."""
        pruned = np.zeros(n, bool)
        alive = np.arange(len(img))
        for (sl, _), kept in zip(stages, kept_by_stage):
            if sl <= l:
                alive = kept
        pruned[img] = True
        pruned[img[alive]] = False
        q, k = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = (k <= q) & ~((~pruned)[:, None] & pruned[None, :])
        return additive_mask(allowed)

    def read(j):
        def hook(mod, args, kwargs, out):
            w = out[1][0].double().numpy()                   # eager's own weights [H, n, n]
            alive = kept_by_stage[-1] if kept_by_stage else np.arange(len(img))
            if score == "last":
                s = w[:, n_prompt - 1, img[alive]].mean(0)
            else:
                rows = [r for r in range(img[-1] + 1, n_prompt)]
                s = w[:, rows][:, :, img[alive]].mean(axis=(0, 1))
            kept_by_stage.append(alive[_rank_np(s, n_kept(stages[j][1], len(img)))])
        return hook

    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_pre_hook(mask_pre_hook(gone_mask, l), with_kwargs=True))
    for j, (sl, _) in enumerate(stages):
        handles.append(layers[sl - 1].self_attn.register_forward_hook(read(j), with_kwargs=True))
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            logits = lm.model(**full).logits[0, n_prompt - 1:]
    finally:
        set_attn(lm.model, "sdpa")
        for h in handles:
            h.remove()
    return logits, kept_by_stage, img


@pytest.mark.parametrize("score", ["last", "mean"])
@pytest.mark.parametrize("stages", [[(2, 0.5)], [(1, 0.5), (3, 0.25)]])
def test_kept_sets_and_logits_equal_the_eager_reference(deep, image, stages, score):
    layers, keep = zip(*stages)
    pruner = TokenPruner(layers, keep, score=score)
    gen, logits, kept = lens_steps(deep, image, [pruner])
    ref_logits, ref_kept, img = reference(deep, image, gen, stages, score)
    for (sl, r), idx in zip(stages, ref_kept):
        assert len(idx) == n_kept(r, len(img))
        assert np.flatnonzero(kept[sl]).tolist() == idx.tolist()        # the method's kept set
    assert kept[0].all() and kept.sum(1).tolist() == [
        len(img) if l < stages[0][0] else (n_kept(stages[1][1], len(img)) if len(stages) > 1 and l >= stages[1][0]
                                           else n_kept(stages[0][1], len(img))) for l in range(deep.n_layers)]
    assert (logits - ref_logits[:len(gen)]).abs().max() <= 1e-4
    _, base, _ = lens_steps(deep, image, [])
    assert (logits - base).abs().max() > 1e-4            # the pruning acts (this test can fail)


@pytest.mark.parametrize("ivs", [
    [FastV(2, 0.5)], [FastV(2, 0.5, score="mean")], [FastV(1, 0.3, score="l2")], [FastV(0, 0.4, score="random", seed=3)],
    [PyramidDrop([1, 2, 4], [0.5, 0.25, 0.125])], [StagePruner([(0, 0, "none"), (1, 2, "top"), (3, 4, "drop")], 0.2)],
])
def test_remove_equals_mask(deep, image, ivs):
    iv = ivs[0]
    masked = iv.gradient_safe()
    assert masked != iv
    gen_r, log_r, kept_r = lens_steps(deep, image, [iv])
    gen_m, log_m, kept_m = lens_steps(deep, image, [masked])
    assert gen_r == gen_m and np.array_equal(kept_r, kept_m)
    assert (log_r - log_m).abs().max() <= 1e-4


def test_identities(deep, image):
    L = deep.n_layers
    base_gen, base_logits, _ = lens_steps(deep, image, [])
    for iv in [FastV(2, 1.0), PyramidDrop([1, 3], [1.0, 1.0]), TokenPruner([0], [1.0]),
               StagePruner([(0, L - 1, "all")])]:
        gen, logits, kept = lens_steps(deep, image, [iv])
        assert gen == base_gen and (logits - base_logits).abs().max() <= 1e-6, iv
        assert kept.all()
    for k in range(L + 1):
        for mode, tmode in (("remove", "remove"), ("mask", "drop")):
            gen, logits, kept = lens_steps(deep, image, [VTW(k, mode)])
            tgen, tlogits, _ = lens_steps(deep, image, [Truncate(k, tmode)])
            assert gen == tgen and (logits - tlogits).abs().max() <= 1e-5, (k, mode)
            assert kept[:k].all() and not kept[k:].any()
        gen, logits, _ = lens_steps(deep, image, [TokenPruner([k], [0.0]) if k < L else TokenPruner([0], [1.0])])
        tgen, tlogits, _ = lens_steps(deep, image, [Truncate(k, "remove")])
        assert gen == tgen and (logits - tlogits).abs().max() <= 1e-5


def test_random_and_l2_baselines_keep_what_they_say(deep, image):
    run = vl.capture(deep, image, PROMPT, max_new_tokens=2, hidden_dtype="float32",
                     interventions=[FastV(2, 0.25, score="l2")])
    base = vl.capture(deep, image, PROMPT, max_new_tokens=2, hidden_dtype="float32")
    img = run.spans.positions("image")
    norms = np.linalg.norm(base.hidden_states[2][img], axis=-1)      # residual leaving layer 1 = entering layer 2
    want = _rank_np(norms, n_kept(0.25, len(img)))
    assert np.flatnonzero(run.arrays["image_kept"][2]).tolist() == want.tolist()
    a = vl.capture(deep, image, PROMPT, max_new_tokens=1, interventions=[FastV(2, 0.25, score="random", seed=1)])
    b = vl.capture(deep, image, PROMPT, max_new_tokens=1, interventions=[FastV(2, 0.25, score="random", seed=1)])
    c = vl.capture(deep, image, PROMPT, max_new_tokens=1, interventions=[FastV(2, 0.25, score="random", seed=2)])
    assert np.array_equal(a.arrays["image_kept"], b.arrays["image_kept"])
    assert not np.array_equal(a.arrays["image_kept"], c.arrays["image_kept"])
    assert a.arrays["image_kept"][2].sum() == n_kept(0.25, len(img))


def test_runs_save_and_reload_with_kept_tokens(deep, image, tmp_path):
    run = vl.capture(deep, image, PROMPT, max_new_tokens=2, interventions=[PyramidDrop([1, 3], [0.5, 0.25])])
    vl.save_run(run, tmp_path / "r")
    back = vl.load_run(tmp_path / "r")
    assert np.array_equal(back.arrays["image_kept"], run.arrays["image_kept"])
    assert [from_json(d) for d in back.meta["interventions"]] == [PyramidDrop([1, 3], [0.5, 0.25])]


def test_prefix_reuse_takes_what_pruners_say(image):
    """In a sweep session: FastV needs the whole prompt (independent captures), VTW is a cut of the
    shared prefix; both equal independent captures."""
    from vlmlens.experiments.engine import Trial

    lm = random_lm("llava")
    L = lm.n_layers
    assert prefix_effect(FastV(1, 0.5), L).kind == "independent"
    assert prefix_effect(VTW(1), L).kind == "cut_image" and prefix_effect(VTW(1, "mask"), L).kind == "unchanged"
    assert prefix_effect(FastV(1, 0.5, score="l2"), L).kind == "recompute"
    s = Trial(lm, image, PROMPT, max_new_tokens=3)
    fresh = Trial(lm, image, PROMPT, max_new_tokens=3, reuse=False)
    for iv in [FastV(1, 0.5), VTW(1), FastV(1, 0.5, score="l2"), StagePruner([(0, 0, "top"), (1, 1, "drop")], 0.3)]:
        a, b = s.evaluate([iv]), fresh.evaluate([iv])
        assert a.generated_ids == b.generated_ids and (a.step_logprobs - b.step_logprobs).abs().max() <= 1e-5, iv
        assert np.array_equal(a.run.arrays["image_kept"], b.run.arrays["image_kept"])


@pytest.mark.parametrize("ivs, msg", [
    ([FastV(2, 0.0)], r"keep ratio must be in \(0, 1\]"),
    ([FastV(2, 1.5)], r"keep ratio must be in \(0, 1\]"),
    ([FastV(2, float("nan"))], r"keep ratio must be a number"),
    ([FastV(9, 0.5)], r"layer must be an integer in 0\.\.5"),
    ([FastV(0, 0.5)], "a stage at layer 0 can keep all"),
    ([PyramidDrop([1, 2], [0.5])], "2 layers but 1 keep ratios"),
    ([PyramidDrop([2, 1], [0.5, 0.25])], "must increase strictly"),
    ([PyramidDrop([1, 2], [0.25, 0.5])], "must not grow"),
    ([FastV(2, 0.5, score="entropy")], "score must be one of"),
    ([FastV(2, 0.5, mode="cut")], "mode must be one of"),
    ([FastV(2, 0.5), PyramidDrop([1], [0.5])], "more than one token pruner"),
    ([FastV(2, 0.5), Truncate(3)], "both decide which image tokens"),
    ([FastV(2, 0.5), SkipLayers([3])], r"FastV takes the image tokens out of layers >= 2"),
    ([StagePruner([(0, 1, "none"), (3, 4, "drop")])], "without gaps"),
    ([StagePruner([(0, 1, "drop"), (2, 4, "all")])], "only the last stages may drop"),
    ([StagePruner([(0, 4, "some")])], "unknown stage treatment"),
    ([StagePruner([(0, 4, "top")], top=0)], r"top must be in \(0, 1\]"),
])
def test_bad_pruning_inputs(ivs, msg):
    with pytest.raises(InputError, match=msg):
        validate_all(ivs, 5)


def test_stage_pruner_from_causal_labels():
    sp = StagePruner.from_stages(["sink", "sink", "fusion", "discard", "discard"], top=0.2)
    assert sp.stages == ((0, 1, "none"), (2, 2, "top"), (3, 4, "drop"))
    sp.validate(5)
    assert sp.image_per_layer(10, 5) == [10, 10, 10, 0, 0]
    assert StagePruner.from_stages(["fusion"] * 3, {"fusion": "all"}).stages == ((0, 2, "all"),)
    assert FastV(2, 0.5).image_per_layer(576, 4) == [576, 576, 288, 288]
    assert PyramidDrop([1, 2], [0.5, 0.25]).image_per_layer(8, 3) == [8, 4, 2]
    validate_all([FastV(2, 0.5), Knockout("last", "image", [0]), Freeze(4)], 5)      # compatible


# ---- comparisons, calibration, studies, the command line ------------------------------------------

def test_compare_pruning_on_one_input(image):
    from vlmlens.analysis.compute import LayerShape
    from vlmlens.experiments.pruning import compare_pruning

    lm = random_lm("llava")
    methods = {"fastv": [FastV(1, 0.5)], "vtw0": [VTW(0)], "mask": [FastV(1, 0.5, mode="mask")]}
    res = compare_pruning(lm, image, PROMPT, methods, max_new_tokens=3)
    base, fast, vtw0, mask = (res.method(n) for n in ("baseline", "fastv", "vtw0", "mask"))
    n = res.n_image
    assert base.output_kl == 0 and base.answer_kept and base.savings["total_saving"] == 0
    assert fast.image_rows == [n, n_kept(0.5, n)] and np.asarray(fast.image_kept).sum(1).tolist() == fast.image_rows
    assert mask.image_rows == [n, n] and mask.savings["total_saving"] == 0          # a mask computes every row
    assert mask.text == fast.text and abs(mask.output_kl - fast.output_kl) <= 1e-4
    assert vtw0.depth == 0 and vtw0.image_rows == [0, 0]
    # the saving is the FLOP count of the schedule (an independent count: the depth-0 truncation)
    from vlmlens.analysis.compute import truncation_savings

    s0 = vl.capture(lm, image, PROMPT, max_new_tokens=3)
    img = s0.spans.positions("image")
    n_sys, n_text = int(img[0]), s0.spans.n_prompt - int(img[0]) - n
    t = truncation_savings(LayerShape.from_model(lm), n, n_text, n_sys, len(s0.generated_tokens), [0])
    assert abs(vtw0.savings["total_saving"] - t["total_saving"][0]) <= 1e-12
    assert "| fastv |" in res.markdown() and "measured" not in res.markdown()      # no timing unless asked


def test_compare_pruning_measures_latency_side_by_side(image):
    from vlmlens.experiments.method_cell import MethodResult, time_note
    from vlmlens.experiments.pruning import compare_pruning

    lm = random_lm("llava")
    res = compare_pruning(lm, image, PROMPT, {"vtw0": [VTW(0)]}, max_new_tokens=3, latency=True, repeats=1)
    base, vtw0 = res.method("baseline"), res.method("vtw0")
    assert base.latency["prefill_saving"] == 0 and base.latency["total_saving"] == 0
    for m in (base, vtw0):
        assert 0 < m.latency["prefill_s"] < m.latency["total_s"]       # both phases from the same runs
        assert m.latency["total_saving"] == pytest.approx(1 - m.latency["total_s"] / base.latency["total_s"])
        share = base.latency["prefill_s"] / base.latency["total_s"]
        assert m.latency["prefill_time_share"] == pytest.approx(share)
        assert m.latency["time_weighted_saving"] == pytest.approx(
            share * m.savings["prefill_saving"] + (1 - share) * m.savings["decode_saving"])
    assert base.latency["time_weighted_saving"] == 0
    md = res.markdown()
    assert "end-to-end time saved (measured)" in md and md.count("|\n") >= 3
    # a method that saves FLOPs but not time says so; one that saves both, or little of either, does not
    made = MethodResult("m", [], "", "", True, 0.0, None, [], [], {"total_saving": 0.4, "kv_saving": 0.4}, None,
                        latency={"total_saving": 0.05})
    assert "saves 40% of the decoder FLOPs but 5% of the measured end-to-end time" in time_note(made)
    made.latency.update(prefill_time_share=0.7, time_weighted_saving=0.06)
    assert "spends 30% of its time decoding" in time_note(made) and "expected saving is 6%." in time_note(made)
    assert "FLOPs saved, each phase weighted by its measured time" in md
    made.latency = {"total_saving": 0.3}
    assert time_note(made) is None


def test_find_vtw_layer_rule(image):
    from vlmlens.experiments.engine import Trial, answer_scores
    from vlmlens.experiments.pruning import find_vtw_layer

    lm = random_lm("llava")
    ex = [(image, PROMPT), (image.rotate(90, expand=True), "Describe the image.")]
    cal = find_vtw_layer(lm, ex, eta=1e9, max_new_tokens=3)
    assert cal.layer == 0 and cal.stable_layer == 0 and cal.mean_kl[-1] == 0
    strict = find_vtw_layer(lm, ex, eta=1e-12, max_new_tokens=3)
    assert strict.layer is None and strict.per_example == cal.per_example
    # the KL of depth 0 for the first example, computed here: Truncate(0, remove), teacher-forced
    s = Trial(lm, image, PROMPT, max_new_tokens=3, reuse=False)
    kl = answer_scores(s.baseline, s.score([Truncate(0, "remove")]), 0)["answer_kl"]
    assert abs(cal.per_example[0][0] - kl) <= 1e-9 and kl > 0
    mid = (cal.mean_kl[0] + cal.mean_kl[1]) / 2
    pick = find_vtw_layer(lm, ex, eta=mid, max_new_tokens=3)
    assert pick.layer == (1 if cal.mean_kl[1] <= mid else None)
    with pytest.raises(InputError, match="eta must be a positive"):
        find_vtw_layer(lm, ex, eta=0)


def test_adaptive_depth_follows_the_attention_share(deep, image):
    """The depth AdaptiveVTW picks is the layer after the first whose last-token image share
    (head-averaged, computed here from an eager forward) falls below the threshold."""
    from vlmlens.interventions import AdaptiveVTW

    inputs, _, _ = prepare_inputs(deep, image, PROMPT)
    img = image_positions(deep, inputs["input_ids"])
    att = eager_attentions(deep, inputs)
    share = [float(a[0, :, -1, img].sum(-1).mean()) for a in att]
    for thr in sorted(share)[1:4]:
        first = next(l for l in range(deep.n_layers) if share[l] < thr)
        run = vl.capture(deep, image, PROMPT, max_new_tokens=2, interventions=[AdaptiveVTW(thr)])
        rows = run.arrays["image_rows"].tolist()
        assert rows == [len(img)] * (first + 1) + [0] * (deep.n_layers - first - 1), thr
        ref = vl.capture(deep, image, PROMPT, max_new_tokens=2, interventions=[Truncate(first + 1, "remove")])
        assert run.token_ids == ref.token_ids


def test_adaptive_vs_fixed_on_a_made_up_study():
    from vlmlens.experiments.pruning import PruningStudy, adaptive_vs_fixed

    def row(m, acc, sav, depth=None):
        return {"family": "single", "method": m, "accuracy": acc, "total_saving": sav, "mean_depth": depth}

    st = PruningStudy("m", "shapes", 8, 10, ["single"], ["baseline", "VTW k=0", "VTW k=4", "adaptive"],
                      [row("baseline", 1.0, 0.0), row("VTW k=0", 0.0, 0.8), row("VTW k=4", 0.9, 0.4),
                       row("adaptive", 0.95, 0.6, 2.5)])
    r = adaptive_vs_fixed(st, "adaptive")["single"]
    assert abs(r["fixed_accuracy_at_same_saving"] - 0.45) <= 1e-12          # halfway from (0.4, 0.9) to (0.8, 0)
    assert r["best_fixed_at_least_as_cheap"] == {"method": "VTW k=0", "saving": 0.8, "accuracy": 0.0}


def test_parse_methods_and_bad_specs():
    from vlmlens.experiments.methods import parse_methods

    m = parse_methods("fastv:2:0.5,random:2:0.5,pdrop:1/2/3:0.5/0.25/0.125,vtw:3,adaptive:0.3", 4)
    assert m["fastv:2:0.5"] == [FastV(2, 0.5)] and m["random:2:0.5"] == [FastV(2, 0.5, score="random")]
    assert m["pdrop:1/2/3:0.5/0.25/0.125"] == [PyramidDrop([1, 2, 3], [0.5, 0.25, 0.125])] and m["vtw:3"] == [VTW(3)]
    for bad, msg in [("fastv:2", "needs 2 value"), ("fastv:x:0.5", "whole number"), ("prune:2:0.5", "unknown method"),
                     ("fastv:2:1.5", r"keep ratio must be in \(0, 1\]"), ("vtw:9", r"0\.\.4"), ("", "no methods"),
                     ("stages:0.1", "needs this input's causal stages")]:
        with pytest.raises(InputError, match=msg):
            parse_methods(bad, 4)
    sp = parse_methods("stages:0.2", 4, ["sink", "fusion", "discard", "discard"])["stages:0.2"]
    assert sp == [StagePruner([(0, 0, "none"), (1, 1, "top"), (2, 3, "drop")], 0.2)]
    with pytest.raises(InputError, match="3 stage labels for a model with 4 layers"):
        parse_methods("stages:0.2", 4, ["sink", "fusion", "discard"])


def test_cli_prune(image, tmp_path, capsys):
    from vlmlens.cli import main

    path = tmp_path / "img.png"
    image.save(path)
    assert main(["prune", "--model", "random:llava", "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--methods", "fastv:1:0.5,vtw:1"]) == 0
    out = capsys.readouterr().out
    assert "| fastv:1:0.5 |" in out and "| vtw:1 |" in out
    assert main(["prune", "--model", "random:llava", "--image", str(path), "--methods", "fastv:1:2"]) == 2
    assert "give both --image and --prompt" in capsys.readouterr().err
    assert main(["prune", "--model", "random:llava", "--image", str(path), "--prompt", PROMPT,
                 "--methods", "fastv:1:2"]) == 2
    assert "keep ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["prune", "--model", "random:llava", "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--methods", "fastervlm:0.5,divprune:0.5", "--latency"]) == 0
    out = capsys.readouterr().out
    assert "| fastervlm:0.5 |" in out and "| divprune:0.5 |" in out and "end-to-end time saved (measured)" in out
    assert main(["prune", "--model", "random:llava", "--latency", "--n", "1"]) == 2
    assert "--latency times one input" in capsys.readouterr().err


def test_pruning_study_and_figures(tmp_path, tiny):
    from vlmlens.experiments.pruning import pruning_study
    from vlmlens.figures import fig_kept_tokens, fig_pruning_pareto

    lm = tiny
    st = pruning_study(lm, {"FastV K=2 keep 50%": [FastV(2, 0.5)], "VTW k=0": [VTW(0)], "VTW k=4": [VTW(4)]}, n=3,
                       families=["single"])
    assert st.methods == ["baseline", "FastV K=2 keep 50%", "VTW k=0", "VTW k=4"]
    b, v0 = st.row("single", "baseline"), st.row("single", "VTW k=0")
    assert b["answer_kept"] == 1 and b["total_saving"] == 0 and b["mean_depth"] == lm.n_layers
    assert v0["mean_depth"] == 0 and v0["total_saving"] > st.row("single", "VTW k=4")["total_saving"] > 0
    assert st.csv().splitlines()[0].startswith("family,method,n,accuracy")
    fig = fig_pruning_pareto(st)
    assert {t.name for t in fig.data} >= {"baseline", "FastV", "VTW (fixed depth)"}
    from vlmlens.tiny.tasks import split_examples

    scene = split_examples("single", 1)[0].scene.image
    run = vl.capture(lm, scene, "how many shapes are there?", max_new_tokens=2,
                     interventions=[PyramidDrop([2, 4], [0.5, 0.25])])
    kf = fig_kept_tokens(run)
    assert [a.text for a in kf.layout.annotations] == ["layer 0: 64/64 kept", "layer 2: 32/64 kept", "layer 4: 16/64 kept"]
    # drawn over the picture: the cells of the tokens no longer read are dark, the others untouched
    import base64
    import io

    from PIL import Image as PILImage

    pic = np.asarray(PILImage.open(io.BytesIO(base64.b64decode(kf.data[1].source.split(",", 1)[1]))).convert("RGB"),
                     dtype=float)
    orig = np.asarray(run.image.convert("RGB"), dtype=float)
    cells = (pic.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3, 4)) + 1) / (orig.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3, 4)) + 1)
    kept2 = run.to_grid(run.arrays["image_kept"][2])
    assert (cells[kept2 > 0.5] > 0.99).all() and (cells[kept2 < 0.5] < 0.5).all() and int((kept2 < 0.5).sum()) == 32
    plain = vl.capture(lm, scene, "how many shapes are there?", max_new_tokens=1)
    assert "not pruned" in fig_kept_tokens(plain).layout.annotations[0].text
