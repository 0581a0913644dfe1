"""PatchPrune: a subset of the image's patches reaches the language model. Against an eager
reference whose masks are built here (no query reads a pruned image key, at any layer), with
the kept sets computed here (even grid, the vision features' L2 norms read off the tower's
hidden states); keep everything = the baseline; remove = mask; composes with Truncate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import FastV, PatchPrune, Truncate
from vlmlens.lens import Lens, Plan

from tests._models import extend_inputs, random_lm, set_attn

PROMPT = "What is in the image?"
N_NEW = 4


def lens_run(lm, image, ivs, n=N_NEW):
    """Greedy tokens and their logits under ``ivs``, and the interventions' arrays."""
    from vlmlens.capture import greedy_generate

    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    plan = Plan.build(image_positions(lm, ids), lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens.for_model(lm, plan) as lens:
        out = greedy_generate(lm, inputs, n)
    arrays = {}
    for iv in ivs:
        if hasattr(iv, "record_arrays"):
            arrays.update(iv.record_arrays(lens.context, lm.n_layers))
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([l[0] for l in out.logits]), arrays


def reference(lm, image, gen, kept_idx, truncate_from=None):
    """Eager teacher-forced logits with the image tokens outside ``kept_idx`` unread by every
    other query at every layer (and, from ``truncate_from``, all image keys unread by text)."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n_prompt = inputs["input_ids"].shape[1]
    img = image_positions(lm, inputs["input_ids"])
    full = extend_inputs(inputs, gen)
    n = full["input_ids"].shape[1]
    pruned = np.zeros(n, bool)
    pruned[img] = True
    pruned[img[kept_idx]] = False
    is_img = np.zeros(n, bool)
    is_img[img] = True

    def mask(l):
        q, k = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = (k <= q) & ~((~pruned)[:, None] & pruned[None, :])
        if truncate_from is not None and l >= truncate_from:
            allowed &= ~((~is_img)[:, None] & is_img[None, :])
        m = torch.zeros(1, 1, n, n)
        m[0, 0][~torch.from_numpy(allowed)] = torch.finfo(torch.float32).min
        return m

    handles = [layer.self_attn.register_forward_pre_hook(
        lambda mod, a, kw, l=l: (a, dict(kw, attention_mask=mask(l))), with_kwargs=True)
        for l, layer in enumerate(lm.arch.decoder_layers(lm.model))]
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            return lm.model(**full).logits[0, n_prompt - 1:n_prompt - 1 + len(gen)]
    finally:
        set_attn(lm.model, "sdpa")
        for h in handles:
            h.remove()


def test_grid_keeps_an_even_subset_and_equals_the_eager_reference(image):
    lm = random_lm("llava")
    for keep in (0.5, 0.25):
        gen, logits, arrays = lens_run(lm, image, [PatchPrune(keep, "grid")])
        n = arrays["image_kept"].shape[1]
        m = int(np.floor(keep * n + 0.5))
        want = np.floor((np.arange(m) + 0.5) * n / m).astype(int)       # evenly spaced, built here
        assert np.flatnonzero(arrays["image_kept"][0]).tolist() == want.tolist()
        assert (arrays["image_kept"] == arrays["image_kept"][0]).all() and (arrays["image_rows"] == m).all()
        ref = reference(lm, image, gen, want)
        assert torch.allclose(logits, ref, atol=1e-4), float((logits - ref).abs().max())
        # mask mode: the same outputs
        gen_m, logits_m, _ = lens_run(lm, image, [PatchPrune(keep, "grid", mode="mask")])
        assert gen_m == gen and torch.allclose(logits_m, logits, atol=1e-5)


def test_l2_ranks_the_vision_features_before_the_projector(image):
    lm = random_lm("llava")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    F = lm.arch.vision_feature_depth(lm.model)
    with torch.no_grad():          # the features the projector gets, read off the tower here
        hs = lm.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[F]
    norms = hs[0, 1:].norm(dim=-1).numpy()                               # LLaVA's "default": CLS dropped
    n = norms.size
    want = np.sort(np.argsort(-norms, kind="stable")[: int(np.floor(0.3 * n + 0.5))])
    gen, logits, arrays = lens_run(lm, image, [PatchPrune(0.3, "l2")])
    assert np.flatnonzero(arrays["image_kept"][0]).tolist() == want.tolist()
    assert torch.allclose(logits, reference(lm, image, gen, want), atol=1e-4)


def test_fastervlm_keeps_what_the_cls_token_attends_to(image):
    """FasterVLM: [CLS] attention (head mean) of the layer whose output the projector reads, from an
    eager forward of the tower here; int(n * keep) of the patches kept."""
    lm = random_lm("llava")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    F = lm.arch.vision_feature_depth(lm.model)
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            att = lm.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[F - 1]
    finally:
        set_attn(lm.model, "sdpa")
    cls = att[0, :, 0, 1:].mean(0).double().numpy()
    n = cls.size
    for keep in (0.3, 0.5):
        want = np.sort(np.argsort(-cls, kind="stable")[: int(n * keep)])
        gen, logits, arrays = lens_run(lm, image, [PatchPrune(keep, "cls")])
        assert np.flatnonzero(arrays["image_kept"][0]).tolist() == want.tolist()
        assert torch.allclose(logits, reference(lm, image, gen, want), atol=1e-4)


def _divprune_reference(emb: np.ndarray, m: int) -> list[int]:
    """DivPrune written from its definition with plain loops (float64)."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = 1.0 - x @ x.T
    n = len(d)
    chosen = [max(range(n), key=lambda j: (sorted(d[:, j])[1], -j))]
    while len(chosen) < m:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[s, j] for s in chosen), -j)))
    return sorted(chosen)


def test_divprune_keeps_a_diverse_subset_of_the_language_models_input(image):
    from tests._models import layer_inputs

    lm = random_lm("llava")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = image_positions(lm, inputs["input_ids"])
    emb = layer_inputs(lm, inputs)[0][0, img].double().numpy()        # what enters decoder layer 0
    n = len(img)
    for keep in (0.25, 0.5):
        want = _divprune_reference(emb, int(round(keep * n)))
        gen, logits, arrays = lens_run(lm, image, [PatchPrune(keep, "divprune")])
        assert np.flatnonzero(arrays["image_kept"][0]).tolist() == want
        assert torch.allclose(logits, reference(lm, image, gen, want), atol=1e-4)


def test_fastervlm_and_divprune_by_name_and_where_they_refuse(image, tiny):
    from vlmlens.experiments.methods import parse_methods

    m = parse_methods("fastervlm:0.25,divprune:drop=75%", 8)
    assert m["fastervlm:0.25"] == [PatchPrune(0.25, "cls")] and m["divprune:drop=75%"] == [PatchPrune(0.25, "divprune")]
    assert "[CLS] attention (FasterVLM)" in m["fastervlm:0.25"][0].describe()
    for score in ("cls", "divprune"):                 # tiny-shapes' tower is a CLIP one, with its [CLS] token
        run = vl.capture(tiny, image, "What color is the circle?", max_new_tokens=2,
                         interventions=[PatchPrune(0.25, score)])
        assert run.arrays["image_kept"].sum(1).tolist() == [16] * tiny.n_layers
    qwen = random_lm("qwen2_vl")                       # a merging projector: DivPrune acts on the merged tokens
    lens_run(qwen, image, [PatchPrune(0.5, "divprune")])
    with pytest.raises(InputError, match="CLIP-style vision tower with a \\[CLS\\] token"):
        lens_run(qwen, image, [PatchPrune(0.5, "cls")])


def test_identities_and_composition(image):
    lm = random_lm("llava")
    base_gen, base, _ = lens_run(lm, image, [])
    for score in ("grid", "random", "l2", "cls", "divprune"):
        gen, logits, _ = lens_run(lm, image, [PatchPrune(1.0, score)])
        assert gen == base_gen and torch.allclose(logits, base, atol=1e-6)
    # with a decoder-side cut: both masks at once
    gen, logits, arrays = lens_run(lm, image, [PatchPrune(0.5, "random", seed=3), Truncate(1)])
    kept = np.flatnonzero(arrays["image_kept"][0])
    assert torch.allclose(logits, reference(lm, image, gen, kept, truncate_from=1), atol=1e-4)
    gen2, _, arrays2 = lens_run(lm, image, [PatchPrune(0.5, "random", seed=3)])
    assert (arrays2["image_kept"] == arrays["image_kept"]).all()         # the seed decides, not the cut


def test_through_capture_and_a_merging_projector(image, tiny):
    run = vl.capture(tiny, image, "What color is the circle?", max_new_tokens=3,
                     interventions=[PatchPrune(0.25, "l2")])
    assert run.arrays["image_kept"].sum(1).tolist() == [16] * tiny.n_layers
    # Qwen2-VL merges 2x2 patches per image token: "l2" over patches is refused, "grid" works
    qwen = random_lm("qwen2_vl")
    with pytest.raises(InputError, match="one image token per vision patch"):
        lens_run(qwen, image, [PatchPrune(0.5, "l2")])
    lens_run(qwen, image, [PatchPrune(0.5, "grid")])


@pytest.mark.parametrize("iv, msg", [
    (PatchPrune(0.0), "fraction in \\(0, 1\\]"), (PatchPrune(0.5, "saliency"), "score must be one of"),
    (PatchPrune(0.5, mode="drop"), "'remove' or 'mask'"),
])
def test_bad_patch_prune(iv, msg):
    with pytest.raises(InputError, match=msg):
        iv.validate(8)


def test_conflicts_with_token_pruners():
    from vlmlens.interventions import validate_all

    with pytest.raises(InputError, match="both choose image tokens"):
        validate_all([PatchPrune(0.5), FastV(2, 0.5)], 8)
