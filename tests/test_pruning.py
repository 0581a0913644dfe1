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
from vlmlens.models.arch import get_arch
from vlmlens.models.loading import LoadedModel
from vlmlens.models.tiny_random import build_random

from tests._models import extend_inputs, random_lm, set_attn

PROMPT = "What is in the image? Describe it."
N_NEW = 4


@pytest.fixture(scope="module")
def deep():
    """A random LLaVA with 5 decoder layers (room for stages)."""
    model, proc = build_random("llava", seed=5, text_overrides={"num_hidden_layers": 5})
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    model.generation_config.suppress_tokens = [i for i in sorted(set(tok.all_special_ids)) if i not in eos]
    return LoadedModel(model, proc, get_arch("llava"), "random:llava-5", torch.device("cpu"), torch.float32)


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
    state = {"alive": np.arange(len(img))}

    def gone_mask(l):
        """Additive mask of layer l: causal, and no surviving query reads a pruned image key."""
        pruned = np.ones(n, bool)
        pruned[:] = False
        alive = np.arange(len(img))
        for (sl, _), kept in zip(stages, kept_by_stage):
            if sl <= l:
                alive = kept
        pruned[img] = True
        pruned[img[alive]] = False
        q, k = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = (k <= q) & ~((~pruned)[:, None] & pruned[None, :])
        m = torch.zeros(1, 1, n, n)
        m[0, 0][~torch.from_numpy(allowed)] = torch.finfo(torch.float32).min
        return m

    def put(l):
        def hook(mod, args, kwargs):
            return args, dict(kwargs, attention_mask=gone_mask(l))
        return hook

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
        handles.append(layer.self_attn.register_forward_pre_hook(put(l), with_kwargs=True))
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
    from vlmlens.experiments.engine import Session

    lm = random_lm("llava")
    L = lm.n_layers
    assert prefix_effect(FastV(1, 0.5), L).kind == "independent"
    assert prefix_effect(VTW(1), L).kind == "cut_image" and prefix_effect(VTW(1, "mask"), L).kind == "unchanged"
    assert prefix_effect(FastV(1, 0.5, score="l2"), L).kind == "recompute"
    s = Session(lm, image, PROMPT, max_new_tokens=3)
    fresh = Session(lm, image, PROMPT, max_new_tokens=3, reuse=False)
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
