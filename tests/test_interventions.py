"""Interventions are exact: identities equal the baseline, drop equals remove, and each
one matches an independent reference built in the test with plain torch hooks/masks."""
import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import greedy_generate, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import Freeze, Knockout, SkipLayers, Substitute, Truncate, from_json
from vlmlens.lens import Lens, Plan

from tests._models import random_lm, set_attn

PROMPT = "What is in the image?"
FAMS = ["llava", "qwen2_vl"]


def cap(lm, image, ivs=(), n=3):
    return vl.capture(lm, image, PROMPT, max_new_tokens=n, hidden_dtype="float32", interventions=list(ivs))


def step_logits(lm, image, ivs, n=3):
    """Full logits of the prefill and of every decode step, with interventions applied."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    pos = image_positions(lm, ids)
    plan = Plan.build(pos, lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens(lm.arch.decoder_layers(lm.model), plan):
        out = greedy_generate(lm, inputs, n)
    return out.sequences[0].tolist(), torch.stack([l[0] for l in out.logits])


@pytest.mark.parametrize("family", FAMS)
def test_identities_equal_baseline(family, image):
    lm = random_lm(family)
    L = lm.n_layers
    base = cap(lm, image)
    for iv in [Truncate(L), Freeze(L), Substitute(1, 1), SkipLayers([])]:
        r = cap(lm, image, [iv])
        assert r.token_ids == base.token_ids, iv
        assert np.abs(np.array(r.token_logprobs) - base.token_logprobs).max() <= 1e-5, iv
        assert np.abs(r.hidden_states - base.hidden_states).max() <= 1e-5, iv
        assert r.meta["interventions"] == [iv.to_json()] and from_json(iv.to_json()) == iv


@pytest.mark.parametrize("family", FAMS)
def test_drop_equals_remove(family, image):
    lm = random_lm(family)
    L = lm.n_layers
    for k in sorted({0, 1, L - 1}):
        seq_d, lg_d = step_logits(lm, image, [Truncate(k, "drop")])
        seq_r, lg_r = step_logits(lm, image, [Truncate(k, "remove")])
        assert seq_d == seq_r
        assert (lg_d - lg_r).abs().max().item() <= 1e-4, k
        a, b = cap(lm, image, [Truncate(k, "drop")]), cap(lm, image, [Truncate(k, "remove")])
        text = np.setdiff1d(np.arange(a.spans.n_total), a.spans.positions("image"))
        assert np.abs(a.hidden_states[:, text] - b.hidden_states[:, text]).max() <= 1e-4
        # removed image rows keep the state they had when they left (layer k = input of decoder layer k)
        img = b.spans.positions("image")
        assert np.abs(b.hidden_states[L][img] - b.hidden_states[k][img]).max() == 0
        # nothing reads the image after k: zero image share in layers >= k
        assert np.nanmax(np.abs(b.attention_to_image[k:])) == 0 and np.nanmax(np.abs(a.attention_to_image[k:])) < 1e-7


def test_truncate_zero_equals_explicit_eager_mask(image):
    lm = random_lm("llava")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    run = cap(lm, image, [Truncate(0)], n=0)
    n = inputs["input_ids"].shape[1]
    img = run.spans.positions("image")
    is_img = np.zeros(n, bool)
    is_img[img] = True
    allowed = np.tril(np.ones((n, n), bool)) & ~((~is_img)[:, None] & is_img[None, :])
    mask = torch.zeros(1, 1, n, n)
    mask[0, 0][~torch.from_numpy(allowed)] = torch.finfo(torch.float32).min
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            ref = lm.model(**{**inputs, "attention_mask": mask}, output_hidden_states=True)
    finally:
        set_attn(lm.model, "sdpa")
    text = np.flatnonzero(~is_img)
    for l in range(lm.n_layers):
        assert np.abs(run.hidden_states[l][text] - ref.hidden_states[l][0].numpy()[text]).max() <= 1e-5, l
    seq, logits = step_logits(lm, image, [Truncate(0)], n=1)
    assert (logits[0] - ref.logits[0, -1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMS)
def test_freeze_keeps_image_states(family, image):
    lm = random_lm(family)
    k = 1
    r = cap(lm, image, [Freeze(k)])
    img = r.spans.positions("image")
    for l in range(k + 1, lm.n_layers + 1):
        assert np.array_equal(r.hidden_states[l][img], r.hidden_states[k][img])
    base = cap(lm, image)
    assert not np.allclose(base.hidden_states[lm.n_layers][img], base.hidden_states[k][img])


def test_substitute_matches_manual_hooks(image):
    lm = random_lm("llava")
    i, j = 0, 1
    r = cap(lm, image, [Substitute(at_layer=j, from_layer=i)], n=0)
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = torch.from_numpy(r.spans.positions("image"))
    layers = lm.arch.decoder_layers(lm.model)
    saved = {}

    def grab(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        saved["h"] = h[:, img].clone()

    def put(mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, img] = saved["h"]
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    hs = [layers[i].register_forward_pre_hook(grab, with_kwargs=True), layers[j].register_forward_pre_hook(put, with_kwargs=True)]
    try:
        with torch.no_grad():
            ref = lm.model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for h in hs:
            h.remove()
    for l in range(lm.n_layers):
        if l != j:  # HF records layer j's input before the hook replaced it
            assert np.abs(r.hidden_states[l] - ref[l][0].numpy()).max() <= 1e-5, l
    assert np.array_equal(r.hidden_states[j][img.numpy()], r.hidden_states[i][img.numpy()])


def test_skip_all_tokens_is_identity_layer(image):
    lm = random_lm("llava")
    r = cap(lm, image, [SkipLayers([1], tokens="all")])
    assert np.array_equal(r.hidden_states[2], r.hidden_states[1])
    img = r.spans.positions("image")
    r2 = cap(lm, image, [SkipLayers([1], tokens="image")])
    text = np.setdiff1d(np.arange(r2.spans.n_total), img)
    assert np.array_equal(r2.hidden_states[2][img], r2.hidden_states[1][img])
    assert not np.allclose(r2.hidden_states[2][text], r2.hidden_states[1][text])


def test_knockout_everything_equals_truncate_zero(image):
    lm = random_lm("qwen2_vl")
    a = cap(lm, image, [Knockout(src="all", dst="image")])
    b = cap(lm, image, [Truncate(0)])
    assert a.token_ids == b.token_ids
    assert np.abs(np.array(a.token_logprobs) - b.token_logprobs).max() <= 1e-6
    last = cap(lm, image, [Knockout(src="last", dst="image")])
    assert np.nanmax(last.attention_to_image[:, :, last.spans.n_prompt - 1]) == 0


@pytest.mark.parametrize("ivs, msg", [
    ([Truncate(99)], r"0\.\.2"),
    ([Truncate(-1)], r"0\.\.2"),
    ([Truncate(1, "shrink")], "unknown truncation mode"),
    ([Substitute(at_layer=0, from_layer=1)], "from_layer <= at_layer"),
    ([Truncate(1), Truncate(2)], "more than one Truncate"),
    ([Truncate(1, "remove"), SkipLayers([1])], "conflicting"),
    ([Knockout(src="nowhere")], "Knockout.src"),
])
def test_bad_interventions_are_clear_errors(image, ivs, msg):
    lm = random_lm("llava")
    assert lm.n_layers == 2 or msg.startswith("unknown") or "0\\.\\.2" not in msg
    with pytest.raises(InputError, match=msg.replace("2", str(lm.n_layers)) if "0\\." in msg else msg):
        cap(lm, image, ivs)


def test_from_layer_is_the_name_and_after_layer_still_works():
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = Truncate(after_layer=3, mode="remove")
        assert any(issubclass(x.category, DeprecationWarning) and "from_layer" in str(x.message) for x in w)
    assert old == Truncate(3, "remove") == Truncate(from_layer=3, mode="remove") and old.after_layer == 3
    assert old.to_json() == {"kind": "Truncate", "from_layer": 3, "mode": "remove"}
    assert from_json({"kind": "Truncate", "after_layer": 2, "mode": "drop"}) == Truncate(2)   # runs saved before
    assert from_json({"kind": "Freeze", "after_layer": 1}) == Freeze(1) and Freeze(from_layer=1).after_layer == 1
    with pytest.raises(InputError, match="from_layer only"):
        Truncate(2, after_layer=2)
    with pytest.raises(InputError, match="needs from_layer"):
        Freeze()


def test_one_layer_check_everywhere(image):
    from vlmlens.analysis.cam import llava_cam
    from vlmlens.experiments.skip import layer_skip_scan
    from vlmlens.experiments.substitution import substitution_layers

    lm = random_lm("llava")
    run = cap(lm, image, n=1)
    L = lm.n_layers
    for call in (lambda: llava_cam(lm, run, layers=[L]), lambda: layer_skip_scan(lm, image, PROMPT, layers=[-1]),
                 lambda: substitution_layers(L, layers=[1.5]), lambda: Truncate(True).validate(L)):
        with pytest.raises(InputError, match=r"must be an integer in 0\.\.\d+ for this model"):
            call()
