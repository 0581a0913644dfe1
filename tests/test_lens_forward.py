"""What the lens derives once per forward (issue #30), with known answers: a value derived from the
same tensors is made once per forward and anew in the next; layers that held the same cache
positions share one tensor; decoding steps' statistics finished together at the end of the
forward equal one layer at a time; a forward that raised leaves nothing half-recorded; the Run's
arrays read re-recorded positions as the last forward left them."""
from __future__ import annotations

import numpy as np
import torch

import vlmlens as vl
from vlmlens.capture import image_positions, prepare_inputs, greedy_generate
from vlmlens.lens import Lens, Plan, Recording
from vlmlens.recorder import _in_order
from vlmlens.session import Positions

P = "What color is the circle?"


def test_derived_once_per_forward_and_anew_in_the_next():
    pos = Positions(np.arange(2, 6), torch.device("cpu"))
    calls = []
    q = pos.begin_forward(3, "cpu")
    a = pos.derived("x", (q,), lambda: calls.append(1) or torch.tensor(7))
    b = pos.derived("x", (q,), lambda: calls.append(1) or torch.tensor(8))
    other = pos.derived("x", (torch.arange(3),), lambda: calls.append(1) or torch.tensor(9))
    assert a is b and int(a) == 7 and int(other) == 9 and len(calls) == 2
    pos.end_forward()
    q2 = pos.begin_forward(1, "cpu")
    assert int(pos.derived("x", (q2,), lambda: torch.tensor(5))) == 5 and int(q2[0]) == 3


def test_layers_holding_the_same_positions_share_one_key_tensor():
    pos = Positions(np.arange(2, 6), torch.device("cpu"))
    pos.begin_forward(4, "cpu")
    for layer in range(3):
        pos.enter_layer(layer, None)
    pos.end_forward()
    pos.begin_forward(1, "cpu")
    for layer in range(3):
        pos.enter_layer(layer, None)
    assert pos.key_pos[0] is pos.key_pos[1] is pos.key_pos[2]
    assert pos.key_pos[2].tolist() == [0, 1, 2, 3, 4]
    # a layer that lost rows holds its own positions from then on
    pos.end_forward()
    pos.begin_forward(1, "cpu")
    pos.enter_layer(0, None)
    pos.enter_layer(1, torch.tensor([False]))
    assert pos.key_pos[1].tolist() == [0, 1, 2, 3, 4] and pos.key_pos[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_in_order_joins_growing_chunks_and_keeps_repeated_ones():
    a = (np.array([0, 1]), torch.tensor([[1.0, 2.0]]))
    b = (np.array([2]), torch.tensor([[3.0]]))
    (pos, vals), = _in_order([a, b], 1)
    assert pos.tolist() == [0, 1, 2] and vals.tolist() == [[1.0, 2.0, 3.0]]
    again = (np.array([1]), torch.tensor([[9.0]]))
    assert _in_order([a, again], 1) == [a, again]      # position 1 recorded twice: one chunk at a time


def test_deferred_decoding_statistics_equal_each_step_on_the_spot(tiny, image, monkeypatch):
    """The decoding rows' statistics taken at the end of the run, against the newest keys of each layer, equal
    the same capture with each step's scores taken on the spot against the keys of its own step."""
    from vlmlens import recorder
    from vlmlens.decoding_rows import DeferredRows

    finished = []
    original_finish = DeferredRows.finish

    def count(self, layer, *a, **k):
        finished.append(self.rows(layer))
        return original_finish(self, layer, *a, **k)

    monkeypatch.setattr(DeferredRows, "finish", count)
    late = vl.capture(tiny, image, P, max_new_tokens=5, hidden_dtype="float32")
    n_gen = len(late.token_ids) - late.spans.n_prompt
    assert n_gen >= 2 and finished == [n_gen] * tiny.n_layers     # every layer: every generated token, at the end

    original_rows = recorder.Recorder._rows

    def on_the_spot(self, *args, **kwargs):        # the plan without "defer": each step's own scores at once
        plan = original_rows(self, *args, **kwargs)
        return {k: v for k, v in plan.items() if k != "defer"}

    monkeypatch.setattr(recorder.Recorder, "_rows", on_the_spot)
    finished.clear()
    spot = vl.capture(tiny, image, P, max_new_tokens=5, hidden_dtype="float32")
    assert finished == [] and spot.token_ids == late.token_ids
    np.testing.assert_array_equal(spot.arrays["hidden_states"], late.arrays["hidden_states"])
    np.testing.assert_array_equal(spot.arrays["attention_head_maps"], late.arrays["attention_head_maps"])
    for name in ("attention_to_image", "attention_maps"):
        np.testing.assert_allclose(spot.arrays[name], late.arrays[name], rtol=0, atol=1e-6)
    assert np.isfinite(late.arrays["attention_to_image"][:, :, late.spans.n_prompt:]).all()


def test_deferred_rows_are_read_in_chunks_against_the_keys_of_their_step():
    """Rows of different steps in one chunk each read only the keys their step had: a row's softmax is over its
    first n keys, whatever the newest keys hold after them (chunked below the budget, the same numbers)."""
    from vlmlens.decoding_rows import DeferredRows

    torch.manual_seed(0)
    H, d, T = 2, 4, 7
    key = torch.randn(1, H, T, d)
    image = slice(1, 3)
    rows = [(torch.randn(H, d), n) for n in (4, 5, 7)]
    want_share, want_map = [], []
    for q, n in rows:                                        # each step alone, against its own keys
        p = torch.softmax(torch.matmul(q[:, None], key[0, :, :n].transpose(-1, -2))[:, 0] * 0.5, dim=-1)
        want_share.append(p[:, image].sum(-1))
        want_map.append(p[:, image].mean(0))
    for budget in (1 << 22, H * T):                           # one chunk; one row a chunk
        dr = DeferredRows()
        for q, n in rows:
            dr.stage(0, q, n, n - 1, image, 0.5, key[:, :, :n])
        dr.commit()
        dr.stage(0, torch.randn(H, d), T, T, image, 0.5, key)  # a step of a forward that raised: never scored
        dr.drop_staged()
        chunks = dr.finish(0, budget=budget)
        pos = np.concatenate([c[0] for c in chunks])
        assert pos.tolist() == [3, 4, 6] and 0 not in dr
        share = torch.cat([c[1] for c in chunks], dim=1)
        maps = torch.cat([c[2] for c in chunks], dim=0)
        torch.testing.assert_close(share, torch.stack(want_share, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(maps, torch.stack(want_map, 0), rtol=0, atol=1e-6)


def test_a_forward_that_raised_leaves_nothing_half_recorded(tiny, image):
    """Layers 0-2 of a decoding step ran, layer 3 raised: their waiting rows are dropped when the next
    forward begins, not recorded as if the step had finished; the step before it is recorded."""
    inputs, _, _ = prepare_inputs(tiny, image, P)
    n = int(inputs["input_ids"].shape[1])
    plan = Plan.build(image_positions(tiny, inputs["input_ids"]), tiny.n_layers, n,
                      Recording("all", "float32", True, False, False), [], n_new=3)
    seen = []

    class Stop(Exception):
        pass

    def boom(module, args, kwargs):
        seen.append(1)
        if len(seen) == 3:              # the prefill, the first decoding step, then the second one stops
            raise Stop

    layer3 = tiny.arch.decoder_layers(tiny.model)[3]
    with torch.no_grad(), Lens.for_model(tiny, plan) as lens:
        h = layer3.register_forward_pre_hook(boom, with_kwargs=True)
        try:
            greedy_generate(tiny, inputs, 3)
        except Stop:
            pass
        finally:
            h.remove()
        rec = lens.recorder
        assert sorted(layer for layer, _ in rec._deferred._staged) == [0, 1, 2]
        assert [rec._deferred.rows(l) for l in range(tiny.n_layers)] == [1] * tiny.n_layers
        shares = {l: len(v) for l, v in rec.share.items()}
        rec.begin_forward(torch.zeros(1, 1, int(tiny.text_config.hidden_size)), torch.tensor([n + 1]))
        rec.flush()
        assert rec._deferred._staged == [] and [rec._deferred.rows(l) for l in range(tiny.n_layers)] == [1] * tiny.n_layers
        rec.finish()                    # the finished step only: one decoding row more per layer
    assert rec._pending == [] and {l: len(v) for l, v in rec.share.items()} == {l: k + 1 for l, k in shares.items()}
    assert all(pos.tolist() == [n] for l in range(tiny.n_layers) for pos, _ in rec.share[l][-1:])
