"""Attention flow: shares equal eager attention, recorded value contributions equal a hooked
eager reference, and the three-stage / cliff / concentration rules give known answers."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmlens as vl
from vlmlens.analysis.attention import (
    attention_cliff, attention_cliff_details, attention_share, image_concentration, image_contribution, query_positions,
    sharpest_drop, stage_bands, stage_details, three_stages,
)
from vlmlens.capture import prepare_inputs
from vlmlens.run import Run, TokenSpans

from tests._models import extend_inputs, random_lm, set_attn

PROMPT = "What is in the image?"


def _eager(lm, inputs, **kw):
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            return lm.model(**inputs, output_attentions=True, **kw)
    finally:
        set_attn(lm.model, "sdpa")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_shares_equal_eager_reference(family, image):
    lm = random_lm(family)
    run = vl.capture(lm, image, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    att = _eager(lm, extend_inputs(inputs, run.token_ids[run.spans.n_prompt:])).attentions
    a = np.stack([x[0].numpy() for x in att]).astype(np.float64)  # [L, H, q, k]
    img = run.spans.positions("image")
    n_prompt = run.spans.n_prompt
    expect = {
        "last": [n_prompt - 1],
        "text": list(range(img[-1] + 1, n_prompt)),
        "generated": list(range(n_prompt, run.spans.n_total)),
        "all": [p for p in range(img[0] + 1, run.spans.n_total) if p not in set(img.tolist())],
    }
    for query, pos in expect.items():
        assert query_positions(run, query).tolist() == pos
        ref_h = a[:, :, pos][..., img].sum(-1)                  # [L, H, P]
        got = attention_share(run, query=query)
        assert got.image.shape == (lm.n_layers,)
        assert np.abs(got.image - ref_h.mean(1).mean(-1)).max() <= 1e-5, query
        assert np.allclose(got.image + got.rest, 1.0)
        per_head = attention_share(run, query=query, per_head=True).image
        assert np.abs(per_head - ref_h.mean(-1)).max() <= 1e-5, query
        # per-key normalisation, from the eager weights directly: mean attention per image key
        # vs per other visible key (keys 0..p)
        dens = []
        for p in pos:
            w = a[:, :, p, : p + 1].mean(1)                      # [L, p+1] head-averaged
            vis_img = img[img < p]
            other = np.setdiff1d(np.arange(p + 1), vis_img)
            di, do = w[:, vis_img].sum(-1) / len(vis_img), w[:, other].sum(-1) / len(other)
            dens.append(di / (di + do))
        norm = attention_share(run, query=query, normalize_per_key=True).image
        assert np.abs(norm - np.mean(dens, 0)).max() <= 1e-5, query
        for s in (got.image, per_head, norm):
            assert np.all((s >= 0) & (s <= 1))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_recorded_contributions_equal_hooked_reference(family, image):
    """o (o_proj output) and c_j = W_O concat_h(a_hj v_hj) at the last prompt token, rebuilt
    from eager attention weights and v_proj / o_proj outputs caught by plain forward hooks."""
    lm = random_lm(family)
    run = vl.capture(lm, image, PROMPT, max_new_tokens=1)
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    layers = lm.arch.decoder_layers(lm.model)
    seen: dict = {}
    hooks = []
    for l, layer in enumerate(layers):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(("v", l), o)))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(("o", l), o)))
    try:
        att = _eager(lm, inputs).attentions
    finally:
        for h in hooks:
            h.remove()
    q = run.spans.n_prompt - 1
    img = run.spans.positions("image")
    H = lm.text_config.num_attention_heads
    for l, layer in enumerate(layers):
        a = att[l][0, :, q].double()                                     # [H, k]
        v = seen[("v", l)][0].double()                                    # [k, kvH*dh]
        n, kvd = v.shape
        dh = kvd // lm.text_config.num_key_value_heads
        v = v.view(n, -1, dh).repeat_interleave(H // (kvd // dh), dim=1)  # [k, H, dh]
        w = layer.self_attn.o_proj.weight.detach().double()
        c = torch.einsum("hj,jhd->jhd", a[:, img], v[img]).reshape(len(img), H * dh) @ w.T
        o = seen[("o", l)][0, q].double()
        assert np.abs(run.arrays["attn_out"][l] - o.numpy()).max() <= 1e-5
        assert np.abs(run.arrays["image_contrib"][l] - c.sum(0).numpy()).max() <= 1e-5
        assert np.abs(run.arrays["image_contrib_norm"][l] - c.norm(dim=-1).numpy()).max() <= 1e-5
    saved_cos = image_contribution(run)["cos"]
    assert np.all(np.isfinite(saved_cos)) and np.all(np.abs(saved_cos) <= 1 + 1e-9)


def test_truncation_zeroes_image_contribution_and_marks_discard(image):
    """A constructed case on a real model: from layer 1 on no query reads image keys, so the
    image's contribution there is exactly zero (cos = 1) and the layer is 'discard'."""
    lm = random_lm("llava")
    base = vl.capture(lm, image, PROMPT, max_new_tokens=1)
    cut = vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[vl.Truncate(from_layer=1)])
    assert np.array_equal(cut.arrays["image_contrib"][1], np.zeros_like(cut.arrays["image_contrib"][1]))
    assert np.all(cut.arrays["image_contrib_norm"][1] == 0)
    d = stage_details(base)
    assert d.cos[0] < 0.995 and d.labels[0] == "fusion"   # random model: the image dominates layer 0
    assert three_stages(cut) == ["fusion", "discard"]
    assert three_stages(vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[vl.Truncate(from_layer=0)])) == [
        "discard", "discard"]
    none = vl.capture(lm, image, PROMPT, max_new_tokens=1, record_contrib=False)
    assert "attn_out" not in none.arrays
    with pytest.raises(KeyError, match="record_contrib"):
        three_stages(none)


# ---- synthetic runs with chosen arrays ----------------------------------------------------

def _synthetic_run(L=8, H=2, n_img=16, n_text=3, n_gen=2, arrays=None) -> Run:
    n_sys = 2
    n_prompt = n_sys + n_img + n_text
    n_total = n_prompt + n_gen
    spans = TokenSpans(n_prompt, n_total, tuple(range(n_sys, n_sys + n_img)))
    side = int(np.sqrt(n_img))
    return Run(meta={"n_layers": L, "n_heads": H, "d_model": 4}, tokens=[f"t{i}" for i in range(n_total)],
               token_ids=list(range(n_total)), spans=spans, image_grid=(side, side), generated_text="",
               token_logprobs=[0.0] * n_gen, image=Image.new("RGB", (32, 32)), arrays=dict(arrays or {}))


def _with_cos(cos_values, d=4, scale=3.0):
    """attn_out / image_contrib whose cos(o - c, o) equals each given value."""
    o, c = [], []
    for cv in cos_values:
        th = np.arccos(cv)
        ov = np.zeros(d); ov[0] = scale
        rest = np.zeros(d); rest[0], rest[1] = np.cos(th), np.sin(th)
        o.append(ov); c.append(ov - 2.0 * rest)
    return {"attn_out": np.array(o, np.float32), "image_contrib": np.array(c, np.float32)}


def test_three_stages_on_chosen_contributions():
    cos = [1.0, 0.9999, 0.99, 0.98, 0.996, 0.9985, 0.9995, 1.0]
    arrays = _with_cos(cos)
    norms = np.zeros((8, 16), np.float32)
    norms[2, [5, 9]] = [1.0, 3.0]
    norms[3, 7] = 2.0
    arrays["image_contrib_norm"] = norms
    run = _synthetic_run(arrays=arrays)
    d = stage_details(run)
    assert np.allclose(d.cos, cos, atol=1e-6)
    assert d.labels == ["sink", "sink", "fusion", "fusion", "fusion", "fusion", "discard", "discard"]
    assert d.fusion_layers == [2, 3] and d.first_fusion == 2 and d.discard_from == 6
    assert d.critical[2][:2] == [9, 5] and d.critical[3][0] == 7
    assert stage_bands(d.labels) == [("sink", 0, 1), ("fusion", 2, 5), ("discard", 6, 7)]
    # thresholds are parameters: a looser fusion threshold moves the first fusion layer
    assert three_stages(run, fusion_cos=0.99995, discard_cos=0.99999) == ["sink"] + ["fusion"] * 6 + ["discard"]
    assert three_stages(run, fusion_cos=0.95, discard_cos=0.95) == ["discard"] * 8
    assert three_stages(_synthetic_run(arrays=_with_cos([0.9995, 0.998, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))) == (
        ["sink", "sink"] + ["discard"] * 6)  # no fusion layer at all
    with pytest.raises(ValueError):
        three_stages(run, fusion_cos=0.999, discard_cos=0.99)


def test_cliff_and_concentration_on_chosen_arrays():
    L, H, n_img = 6, 2, 16
    run = _synthetic_run(L=L, H=H, n_img=n_img)
    n = run.spans.n_total
    share = np.full((L, H, n), np.nan, np.float32)
    last = run.spans.n_prompt - 1
    nonimg = np.setdiff1d(np.arange(n), run.spans.positions("image"))
    share[:, :, nonimg] = 0.3
    curve = [0.8, 0.75, 0.7, 0.2, 0.15, 0.03]
    share[:, :, last] = np.array(curve)[:, None]
    maps = np.zeros((L, 3, n_img), np.float32)
    maps[:, 0] = 0.5 / n_img         # uniform everywhere...
    maps[2, 0] = 0.0
    maps[2, 0, 4] = 0.5              # ...except a one-token sink at layer 2
    run.arrays.update(attention_to_image=share, attention_maps=maps, map_positions=np.arange(last, n))
    assert sharpest_drop(run) == 3                         # largest drop 0.7 -> 0.2
    assert sharpest_drop(run, relative=True) == 5          # 0.15 -> 0.03 (-80%) beats 0.7 -> 0.2 (-71%)
    assert sharpest_drop(run, min_drop=0.6) is None
    assert attention_cliff(run) == 4                       # below 0.25 * 0.8 = 0.2 from layer 4 on (0.2 is not below)
    assert attention_cliff(run, frac=0.3) == 3             # below 0.24 from layer 3 on
    assert np.allclose(attention_share(run).image, curve)
    c = image_concentration(run)
    assert c["k"] == 1 and np.allclose(c["mass"], 0.5)
    assert np.allclose(np.delete(c["entropy"], 2), 1.0) and c["entropy"][2] == 0.0
    assert np.allclose(np.delete(c["top_share"], 2), 1 / n_img) and c["top_share"][2] == 1.0
    assert c["top_tokens"][2, 0] == 4
    share[:, :, last] = np.array([0.8, 0.75, 0.02, 0.02, 0.5, 0.9])[:, None]   # drops, then looks back
    assert sharpest_drop(run) == 2 and attention_cliff(run) is None
    assert "still puts 90%" in attention_cliff_details(run).statement
    assert image_concentration(run, top_frac=0.25)["top_share"][0] == pytest.approx(0.25)
    nogen = _synthetic_run(L=L, H=H, n_img=n_img, n_gen=0)
    nogen.arrays["attention_to_image"] = np.zeros((L, H, nogen.spans.n_total), np.float32)
    assert np.isnan(attention_share(nogen, query="generated").image).all()


def test_contribution_arrays_round_trip_and_are_validated(image, tmp_path):
    lm = random_lm("llava")
    run = vl.capture(lm, image, PROMPT, max_new_tokens=1)
    back = vl.load_run(vl.save_run(run, tmp_path / "ok"))
    for k in ("attn_out", "image_contrib", "image_contrib_norm"):
        assert np.array_equal(back.arrays[k], run.arrays[k], equal_nan=True)
    assert three_stages(back) == three_stages(run)
    run.arrays["image_contrib_norm"] = run.arrays["image_contrib_norm"][:, :-1]
    with pytest.raises(vl.RunFormatError, match="image_contrib_norm"):
        vl.save_run(run, tmp_path / "bad")


def test_nanmean_skips_missing_layers_quietly():
    """A hybrid model's linear-attention layers record no weights (NaN): their mean is NaN, with no warning."""
    import warnings

    from vlmlens.analysis.attention import nanmean

    x = np.array([[0.2, np.nan, 0.4], [np.nan, np.nan, np.nan]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = nanmean(x, axis=1)
    assert m[0] == pytest.approx(0.3) and np.isnan(m[1])
    np.testing.assert_allclose(nanmean(x[:1], axis=-1), [0.3])
