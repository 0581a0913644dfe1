"""The lens core's contracts: interventions say what they mean (prefix effect, gradient-safe
form, conflicts) and code that combines them asks instead of testing classes; one Recording
and one Plan builder; hooks (MLP taps included) installed and removed by the lens only; the
old method names still work, with a DeprecationWarning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.analysis.cam import llava_cam
from vlmlens.errors import InputError
from vlmlens.experiments.engine import Trial, compare_outputs
from vlmlens.interventions import (INDEPENDENT, UNCHANGED, Freeze, Knockout, SkipLayers, Substitute, Truncate,
                                   gradient_safe, prefix_effect, validate_all)
from vlmlens.lens import Lens, Plan, Recording
from vlmlens.run import span_mask

from tests._models import random_lm

P = "What is in the image?"


class _NeedsWholePrompt:
    """A user-written intervention: knocks the last prompt token off the image in layer 1 and
    says no prefix can be shared (as a ranking read at the last prompt token would)."""

    def key_block(self, layer, qpos, kpos, ctx):
        if layer != 1:
            return None
        return (qpos == ctx.n_prompt - 1)[:, None] & ctx.is_image(kpos)[None, :]

    def prefix_effect(self, n_layers):
        return INDEPENDENT

    def to_json(self):
        return {"kind": "_NeedsWholePrompt"}


def _same(a, b, tol=1e-5):
    assert a.generated_ids == b.generated_ids
    assert np.abs(np.array(a.target_logprobs) - b.target_logprobs).max(initial=0) <= tol
    assert (a.step_logprobs - b.step_logprobs).abs().max() <= tol


def test_variants_take_the_prefix_their_effects_say(image):
    lm = random_lm("llava")
    L = lm.n_layers
    reuse = Trial(lm, image, P, max_new_tokens=4)
    fresh = Trial(lm, image, P, max_new_tokens=4, reuse=False)
    assert reuse.reuse and not fresh.reuse
    cases = {
        "knockout after the image: the shared prefix": ([Knockout("last", "image", [1])], "shared"),
        "knockout of every query: recomputed": ([Knockout("all", "system", [0])], "recomputed"),
        "remove: the shared prefix, cut": ([Truncate(1, "remove")], "cut"),
        "remove + knockout: cut once": ([Truncate(1, "remove"), Knockout("text", "image", [0])], "cut"),
        "needs the whole prompt: no prefix": ([_NeedsWholePrompt()], None),
        "freeze: recomputed": ([Freeze(1)], "recomputed"),
        "remove at depth L: a no-op, the shared prefix": ([Truncate(L, "remove")], "shared"),
    }
    for name, (ivs, kind) in cases.items():
        p = reuse._prefix_for(ivs)
        if kind is None:
            assert p is None, name
        elif kind == "shared":
            assert p.cache is reuse._prefix.cache and p.start is reuse._prefix.start, name
        elif kind == "cut":
            assert p.cache is not reuse._prefix.cache and p.start.pruned, name
        else:
            assert p.cache is not reuse._prefix.cache and p.start is not reuse._prefix.start, name
        _same(reuse.evaluate(ivs), fresh.evaluate(ivs))
    # the knockouts really act (a test of identical numbers must be able to fail)
    ko = fresh.evaluate([Knockout("last", "image", [1])])
    assert compare_outputs(fresh.baseline, ko)["output_kl"] > 1e-6
    assert prefix_effect(Truncate(L), L) == UNCHANGED and prefix_effect(Freeze(L), L) == UNCHANGED
    assert prefix_effect(object(), L).kind == "recompute"        # unknown interventions are recomputed


def test_session_with_an_independent_extra_never_reuses(image):
    lm = random_lm("llava")
    s = Trial(lm, image, P, max_new_tokens=3, interventions=[_NeedsWholePrompt()])
    assert not s.reuse
    ref = vl.capture(lm, image, P, max_new_tokens=3, interventions=[_NeedsWholePrompt()])
    assert s.baseline.generated_ids == ref.token_ids[ref.spans.n_prompt:]


class _EditsImageRows:
    def image_row_edits(self, n_layers):
        return {2}


def test_conflicts_are_the_interventions_own():
    L = 4
    validate_all([Truncate(3, "remove"), _EditsImageRows()], L)          # edits layer 2 < 3: fine
    with pytest.raises(InputError, match=r"Truncate\(from_layer=2, mode='remove'\).*_EditsImageRows"):
        validate_all([Truncate(2, "remove"), _EditsImageRows()], L)
    with pytest.raises(InputError, match="more than one Truncate"):
        validate_all([Truncate(1), Truncate(2)], L)
    with pytest.raises(InputError, match="more than one Freeze"):
        validate_all([Freeze(1), Freeze(2)], L)
    with pytest.raises(InputError, match="conflicting"):
        validate_all([Substitute(3, 0), Truncate(1, "remove")], L)
    validate_all([Substitute(1, 1), SkipLayers([0]), Truncate(1, "remove")], L)   # identity / shallower: fine
    validate_all([object(), Truncate(0)], L)                              # no methods at all: nothing to check
    assert gradient_safe(Truncate(2, "remove")) == Truncate(2, "drop")
    assert gradient_safe(Freeze(1)) == Freeze(1)


def test_recording_is_one_validated_value():
    with pytest.raises(InputError, match="store must be one of"):
        Recording(store="everything")
    with pytest.raises(InputError, match="hidden_dtype"):
        Recording(hidden_dtype="int8")
    r = Recording("image_text", "float32", 1, 0)
    assert r.attention is True and r.contrib is False and r == Recording("image_text", "float32", True, False)
    plan = Plan.build(np.array([3, 4, 5]), 2, 9, r, n_new=2)
    assert plan.map_from == 8 and plan.hidden_dtype == torch.float32
    assert plan.store_positions.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11]     # image, then text + generated


class _OldNames:
    """An intervention written against the old method names."""

    def edit_output(self, layer, h_in, h_out, state):
        return h_in if layer == 0 else None          # layer 0 passes every row through


def test_old_method_names_still_work(image):
    lm = random_lm("llava")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = vl.capture(lm, image, P, max_new_tokens=2, hidden_dtype="float32", interventions=[_OldNames()])
    assert any(issubclass(x.category, DeprecationWarning) and "edit_resid_post" in str(x.message) for x in w)
    new = vl.capture(lm, image, P, max_new_tokens=2, hidden_dtype="float32", interventions=[SkipLayers([0], "all")])
    assert old.token_ids == new.token_ids and np.abs(old.hidden_states - new.hidden_states).max() == 0


class _Boom:
    def edit_resid_post(self, layer, h_in, h_out, ctx):
        if layer == 1:
            raise RuntimeError("boom inside the forward")


def test_cam_hooks_come_and_go_with_the_lens(image):
    lm = random_lm("llava")
    run = vl.capture(lm, image, P, max_new_tokens=2)
    mlps = [layer.mlp for layer in lm.arch.decoder_layers(lm.model)]
    with pytest.raises(RuntimeError, match="boom"):
        llava_cam(lm, run, interventions=[_Boom()])
    assert all(len(m._forward_pre_hooks) == 0 for m in mlps)
    cam = llava_cam(lm, run)
    assert all(len(m._forward_pre_hooks) == 0 for m in mlps)
    assert cam.per_token.shape == (lm.n_layers, run.spans.n_image) and cam.per_token[:-1].max() > 0
    with pytest.raises(InputError, match="activation must be one of"):
        llava_cam(lm, run, activation="logits")


def test_context_spans_are_the_vocabulary(image):
    """What an intervention reads through its context agrees with the Run's spans."""
    lm = random_lm("llava")
    run = vl.capture(lm, image, P, max_new_tokens=3)
    pos = torch.arange(run.spans.n_total)
    plan = Plan.build(run.spans.positions("image"), lm.n_layers, run.spans.n_prompt)
    lens = Lens(lm.arch.decoder_layers(lm.model), plan)
    for name in ("system", "image", "text", "generated", "last", "prompt", "all", "non_image", "reads_image"):
        want = span_mask(name, pos.numpy(), is_image=np.isin(pos.numpy(), run.spans.positions("image")),
                         first_image=run.spans.image_positions[0], last_image=run.spans.image_positions[-1],
                         n_prompt=run.spans.n_prompt)
        assert lens.context.span(name, pos).numpy().tolist() == want.tolist(), name
        assert np.array_equal(np.flatnonzero(want), run.spans.positions(name)), name
