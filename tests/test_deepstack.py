"""Qwen3-VL's DeepStack through the lens: vision features added to the image rows of the first
decoder layers' outputs. The lens adds them itself (vlmlens.lens_injections), so cuts, freezes and
removals decide about them; references are plain forwards of the model's own code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import image_positions, prepare_inputs
from vlmlens.figures.dynamics import fig_dynamics
from vlmlens.figures.movement import fig_token_movement
from vlmlens.interventions import FastV, Freeze, Truncate
from vlmlens.lens import NOTHING, Lens, Plan

from tests._models import layer_inputs, random_lm

PROMPT = "What is in the image?"


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def lm(request):
    return random_lm(request.param)


def _states(lm, image, ivs):
    run = vl.capture(lm, image, PROMPT, max_new_tokens=2, interventions=ivs, hidden_dtype="float32")
    return run, run.hidden_states, run.spans.positions("image")


def test_the_features_are_added_after_the_first_layers_and_recorded_where_the_next_layer_reads_them(lm, image):
    assert lm.arch.injection_layers(lm.model) == (0, 1)
    run, hs, img = _states(lm, image, [])
    assert run.meta["injection_layers"] == [0, 1] and run.meta["injections_stopped"] == []
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    from vlmlens.generation import extend_inputs
    full = extend_inputs(inputs, run.token_ids[run.spans.n_prompt:], 0)
    ref = layer_inputs(lm, full)                   # what each layer reads in the model's own forward
    for l in range(lm.n_layers):
        assert np.abs(hs[l] - ref[l][0].numpy()).max() <= 1e-5
    # transformers' hidden_states are the layers' outputs before the addition: they differ on image rows
    with torch.no_grad():
        hf = lm.model(**full, output_hidden_states=True).hidden_states
    assert np.abs(hs[1][img] - hf[1][0].numpy()[img]).max() > 1e-3
    text = np.setdiff1d(np.arange(hs.shape[1]), img)
    assert np.abs(hs[1][text] - hf[1][0].numpy()[text]).max() <= 1e-5


def test_the_features_change_the_answer_so_the_tests_can_see_them(lm, image):
    """Without the injection (the model's call stripped of it) the logits move: every exactness test
    of this family is sensitive to where the features go."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    stack = lm.arch.injection_module(lm.model)
    h = stack.register_forward_pre_hook(lambda m, a, k: (a, dict(k, deepstack_visual_embeds=None)), with_kwargs=True)
    try:
        with torch.no_grad():
            without = lm.model(**inputs).logits
    finally:
        h.remove()
    with torch.no_grad():
        plain = lm.model(**inputs).logits
    assert (plain - without).abs().max() > 1e-3


def test_freeze_stops_the_features_from_its_layer_on(lm, image):
    run, hs, img = _states(lm, image, [Freeze(1)])
    assert run.meta["injections_stopped"] == [1]
    for l in range(2, lm.n_layers + 1):          # the image rows layer 1 read stay, with nothing added
        assert np.array_equal(hs[l][img], hs[1][img])
    base, bhs, _ = _states(lm, image, [])
    assert np.abs(hs[1][img] - bhs[1][img]).max() <= 1e-5    # what layer 0 received is kept (added before 1)


def test_a_cut_stops_the_features_from_its_layer_on_and_drop_equals_remove(lm, image):
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = image_positions(lm, inputs["input_ids"])
    outs = {}
    for mode in ("drop", "remove"):
        plan = Plan.build(img, lm.n_layers, inputs["input_ids"].shape[1], NOTHING, [Truncate(1, mode)])
        with torch.no_grad(), Lens.for_model(lm, plan) as lens:
            outs[mode] = lm.model(**inputs).logits[0, -1]
        assert lens.injections.stopped == {1} and lens.injections.added == {0}
    assert (outs["drop"] - outs["remove"]).abs().max() <= 1e-4
    run, _, _ = _states(lm, image, [Truncate(0, "remove")])
    assert run.meta["injections_stopped"] == [0, 1]


def test_pruned_rows_get_nothing_and_kept_rows_get_their_own_features(lm, image):
    """FastV removing half the image rows at layer 1 (where features are still added) equals the
    same ranking applied as a mask (rows kept in place, their features added as the model does)."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = image_positions(lm, inputs["input_ids"])
    outs = {}
    for mode in ("mask", "remove"):
        plan = Plan.build(img, lm.n_layers, inputs["input_ids"].shape[1], NOTHING, [FastV(1, 0.5, mode=mode)])
        with torch.no_grad(), Lens.for_model(lm, plan) as lens:
            outs[mode] = lm.model(**inputs).logits[0, -1]
        assert lens.injections.added == {0, 1}
    assert (outs["mask"] - outs["remove"]).abs().max() <= 1e-4


def test_the_layer_figures_mark_the_injection_layers(lm, image):
    run, _, _ = _states(lm, image, [])
    for fig, shift in ((fig_token_movement(run), 0), (fig_dynamics(run), 1)):
        rects = [s for s in fig.layout.shapes if s.type == "rect"]
        centres = sorted({round((s.x0 + s.x1) / 2) for s in rects})
        assert centres == [0 + shift, 1 + shift], centres
    cut, _, _ = _states(lm, image, [Truncate(1)])
    rects = [s for s in fig_token_movement(cut).layout.shapes if s.type == "rect"]
    assert [round((s.x0 + s.x1) / 2) for s in rects] == [0]       # the stopped one is not drawn
    plain = vl.capture(random_lm("qwen2_vl"), image, PROMPT, max_new_tokens=1)
    assert "injection_layers" not in plain.meta
    assert not [s for s in fig_token_movement(plain).layout.shapes if s.type == "rect"]
