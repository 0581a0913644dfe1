"""DART through the lens against a reference written here from the paper's definition: keys of
layer K-1 computed by hand (k_proj, then RoPE), the states leaving layer K-1 through the final
norm, the pivots and the least-similar picks with plain loops; the logits against an eager
forward whose masks cut the unchosen image tokens from layer K."""
import numpy as np
import pytest
import torch

from vlmlens.capture import image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import DART, from_json

from tests._models import additive_mask, deep_llava, extend_inputs, mask_pre_hook, set_attn
from tests.test_pruning import PROMPT


def lens_steps(lm, image, ivs, n=4):
    """Tokens, every greedy step's logits and the kept tokens, through the lens on the whole model."""
    from vlmlens.capture import greedy_generate
    from vlmlens.lens import Lens, Plan

    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    plan = Plan.build(image_positions(lm, ids), lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens.for_model(lm, plan) as lens:
        out = greedy_generate(lm, inputs, n)
    kept = ivs[0].record_arrays(lens.context, lm.n_layers)["image_kept"]
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([l[0] for l in out.logits]), kept


@pytest.fixture(scope="module")
def deep():
    return deep_llava()


def _reference_choice(lm, image, K: int, keep: float, pivots=(4, 4)) -> list[int]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n_prompt = inputs["input_ids"].shape[1]
    img = [int(p) for p in image_positions(lm, inputs["input_ids"])]
    layer = lm.arch.decoder_layers(lm.model)[K - 1]
    got = {}

    def attn_pre(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        hd = mod.head_dim
        k = mod.k_proj(h).view(h.shape[0], h.shape[1], -1, hd).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        got["keys"] = k[0].permute(1, 0, 2).reshape(h.shape[1], -1).double().numpy()

    def out_hook(mod, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        got["states"] = lm.arch.final_norm(lm.model)(h)[0].double().numpy()

    hs = [layer.self_attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
          layer.register_forward_hook(out_hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            lm.model(**inputs)
    finally:
        for h in hs:
            h.remove()
    l1 = np.abs(got["keys"]).sum(-1)
    text = list(range(img[-1] + 1, n_prompt))
    img_piv = sorted(img, key=lambda p: -l1[p])[:pivots[0]]
    text_piv = sorted(text, key=lambda p: -l1[p])[:pivots[1]]
    per = int(keep * len(img) / sum(pivots))
    x = got["states"] / np.linalg.norm(got["states"], axis=1, keepdims=True)
    chosen, valid = set(img_piv), [p for p in img if p not in img_piv]
    for piv in sorted(img_piv + text_piv):
        sims = {p: float(x[p] @ x[piv]) for p in valid}
        pick = sorted(valid, key=lambda p: sims[p])[:per]
        chosen |= set(pick)
        valid = [p for p in valid if p not in pick]
    return sorted(chosen)


def test_dart_keeps_what_the_definition_keeps_and_matches_an_eager_reference(deep, image):
    K, keep = 2, 0.25
    want = _reference_choice(deep, image, K, keep)
    inputs, _, _ = prepare_inputs(deep, image, PROMPT)
    img = image_positions(deep, inputs["input_ids"])
    gen, logits, kept = lens_steps(deep, image, [DART(K, keep, mode="mask")])
    assert (kept[:K] == 1).all()
    assert img[np.flatnonzero(kept[K])].tolist() == want and (kept[K:] == kept[K]).all()
    assert len(want) <= 4 + int(keep * len(img) / 8) * 8
    # eager reference: from layer K no surviving query reads an unchosen image key
    full = extend_inputs(inputs, gen)
    n = full["input_ids"].shape[1]
    pruned = np.zeros(n, bool)
    pruned[img] = True
    pruned[want] = False

    def mask(l):
        q, k = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = k <= q
        if l >= K:
            allowed = allowed & ~((~pruned)[:, None] & pruned[None, :])
        return additive_mask(allowed)

    layers = deep.arch.decoder_layers(deep.model)
    hs = [layer.self_attn.register_forward_pre_hook(mask_pre_hook(mask, l), with_kwargs=True)
          for l, layer in enumerate(layers)]
    set_attn(deep.model, "eager")
    try:
        with torch.no_grad():
            ref = deep.model(**full).logits[0, inputs["input_ids"].shape[1] - 1:][:len(gen)]
    finally:
        set_attn(deep.model, "sdpa")
        for h in hs:
            h.remove()
    assert torch.allclose(logits, ref, atol=1e-4), float((logits - ref).abs().max())
    # removing the rows gives the same tokens and logits as masking them
    gen_r, logits_r, kept_r = lens_steps(deep, image, [DART(K, keep)])
    assert gen_r == gen and (kept_r == kept).all() and torch.allclose(logits_r, logits, atol=1e-4)


def test_dart_by_name_json_and_bad_settings():
    from vlmlens.experiments.methods import parse_methods

    d = parse_methods("dart:2:drop=75%", 5)["dart:2:drop=75%"][0]
    assert d == DART(2, 0.25) and from_json(d.to_json()) == d and "DART" in d.describe()
    for bad, msg in ((DART(0, 0.25), "DART layer"), (DART(2, 0.0), "fraction"), (DART(2, 0.5, pivots=(0, 4)), "pivots")):
        with pytest.raises(InputError, match=msg):
            bad.validate(5)
