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


def test_deferred_decoding_statistics_equal_one_layer_at_a_time(tiny, image, monkeypatch):
    """The same capture with every layer's statistics finished on the spot, one layer alone."""
    from vlmlens import recorder

    fast = vl.capture(tiny, image, P, max_new_tokens=5, hidden_dtype="float32")
    original, taken = recorder.Recorder._attention_stats, []

    def on_the_spot(self, *args, **kwargs):
        original(self, *args, **kwargs)
        items, self._pending = self._pending, []
        taken.extend(items)
        for layer, plan, s in items:
            c = plan["chunks"][0]
            p = torch.softmax(s, dim=-1)[:, :, plan["img_keys"]]
            self._store_stats(layer, plan, p.sum(-1), None if c["mrows"] is None else p[:, c["mrows"]].mean(0),
                              c["map_pos"])

    monkeypatch.setattr(recorder.Recorder, "_attention_stats", on_the_spot)
    slow = vl.capture(tiny, image, P, max_new_tokens=5, hidden_dtype="float32")
    assert len(taken) >= tiny.n_layers, "no decoding step took the end-of-forward path"
    assert fast.token_ids == slow.token_ids
    for name in ("attention_to_image", "attention_maps", "attention_head_maps", "hidden_states"):
        np.testing.assert_array_equal(fast.arrays[name], slow.arrays[name])


def test_a_forward_that_raised_leaves_nothing_half_recorded(tiny, image):
    """Layers 0-2 of a decoding step ran, layer 3 raised: their waiting statistics are dropped when the
    next forward begins, not recorded as if the step had finished."""
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
        assert sorted(layer for layer, _, _ in rec._pending) == [0, 1, 2]
        shares = {l: len(v) for l, v in rec.share.items()}
        rec.begin_forward(torch.zeros(1, 1, int(tiny.text_config.hidden_size)), torch.tensor([n + 1]))
        rec.flush()
    assert rec._pending == [] and {l: len(v) for l, v in rec.share.items()} == shares
