"""Compute model: hand counts, torch's own FLOP counter, monotone savings, latency smoke test."""
import statistics

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmlens.analysis.compute import (LayerShape, causal_pairs, compute_tradeoff, decode_flops, kv_cache_bytes,
                                      layer_flops, prefill_flops, token_counts, truncation_savings)
from vlmlens.errors import InputError
from vlmlens.figures.matrices import fig_compute_tradeoff

from tests._models import random_lm

PROMPT = "What is in the image?"

# d=4, f=8, 2 query heads of dim 2 sharing 1 kv head, 2 layers, gated MLP, fp16 cache
TINY = LayerShape(d_model=4, d_ffn=8, n_heads=2, n_kv_heads=1, head_dim=2, n_layers=2, mlp_matrices=3, bytes_per_value=2)


def test_layer_flops_hand_count():
    q, pairs = 3, 6  # three causal queries: 1 + 2 + 3 pairs
    wq, wk, wv, wo = 4 * 4, 4 * 2, 4 * 2, 4 * 4          # weight entries (d x H*hd, d x KV*hd, ...)
    proj = 2 * q * (wq + wk + wv + wo)                   # 288
    scores = 2 * (2 * 2) * pairs + 2 * (2 * 2) * pairs   # QK^T and AV over 2 heads x hd 2: 96
    mlp = 2 * q * (4 * 8 + 4 * 8 + 8 * 4)                # gate, up, down: 576
    got = layer_flops(TINY, q, pairs)
    assert (got["proj"], got["scores"], got["mlp"]) == (proj, scores, mlp) == (288, 96, 576)
    assert got["total"] == 960
    assert causal_pairs(3) == 6


def test_prefill_decode_kv_hand_counts():
    # [system 1][image 2][text 1]: baseline 4 tokens per layer; truncated layers keep 2
    base = prefill_flops(TINY, n_image=2, n_text=1, n_system=1)
    assert np.array_equal(base, [layer_flops(TINY, 4, 10)["total"]] * 2)
    cut = prefill_flops(TINY, 2, 1, 1, depth=1)
    assert cut[0] == base[0] and cut[1] == layer_flops(TINY, 2, 3)["total"]
    # one decode step attends to the 4 prompt keys + itself (5 pairs); after truncation 2 + 1
    assert decode_flops(TINY, 2, 1, 1, n_steps=1, depth=0)[0] == layer_flops(TINY, 1, 3)["total"]
    assert decode_flops(TINY, 2, 1, 1, n_steps=2)[1] == layer_flops(TINY, 2, 5 + 6)["total"]
    # K and V, 1 kv head x dim 2, 2 bytes: 8 bytes per token
    assert np.array_equal(kv_cache_bytes(TINY, 2, 1, 1, n_generated=3), [8 * 7, 8 * 7])
    assert np.array_equal(kv_cache_bytes(TINY, 2, 1, 1, n_generated=3, depth=1), [8 * 7, 8 * 5])


def test_savings_monotone_and_zero_at_baseline():
    shape = LayerShape(d_model=64, d_ffn=176, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=6)
    s = truncation_savings(shape, n_image=64, n_text=12, n_system=3, n_steps=8)
    assert s["depths"] == list(range(7))
    for key in ("prefill_saving", "decode_saving", "total_saving", "kv_saving"):
        v = np.array(s[key])
        assert v[-1] == 0 and np.all(np.diff(v) < 0), key   # strictly less saved as k grows
        assert np.all((v >= 0) & (v < 1)), key
    assert s["prefill_saving"][0] > 0.8 and s["decode_saving"][0] < s["prefill_saving"][0]
    with pytest.raises(InputError, match=r"0\.\.6"):
        truncation_savings(shape, 64, 12, depths=[7])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_projection_and_mlp_flops_match_torch_flop_counter(family):
    lm = random_lm(family)
    shape = LayerShape.from_model(lm)
    cfg = lm.text_config
    assert (shape.d_model, shape.d_ffn, shape.n_heads, shape.n_kv_heads) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape.n_layers == lm.n_layers and shape.mlp_matrices == 3 and shape.bytes_per_value == 4
    n = 10
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:  # the text decoder alone: only the layers' matmuls
        lm.model.model.language_model(input_ids=torch.randint(5, 100, (1, n)))
    counted = counter.get_flop_counts()["Global"]
    mm = sum(v for k, v in counted.items() if "mm" in str(k))
    f = layer_flops(shape, n, causal_pairs(n))
    assert mm == lm.n_layers * (f["proj"] + f["mlp"])


def test_a_timed_run_makes_every_token_and_gives_both_phases(image, monkeypatch):
    """One generate per repeat gives prefill and total of the same run (so prefill < total in every
    sample, which two separate runs cannot promise), and a model that would stop at once still makes
    every token asked for (the methods are timed over the same number of forwards)."""
    import vlmlens.generation as generation
    from vlmlens.analysis.compute import measure_methods_latency, timed_generate
    from vlmlens.capture import image_positions, prepare_inputs
    from vlmlens.interventions import FastV

    lm = random_lm("llava")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    pos = image_positions(lm, inputs["input_ids"])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = int(lm.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, n])
    monkeypatch.setattr(lm.model.generation_config, "eos_token_id", first)   # plain generate now stops at once
    with torch.no_grad():
        assert lm.model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == n + 1
    t = timed_generate(lm, inputs, pos, 4, [])
    assert len(t) == 4 and all(a < b for a, b in zip(t, t[1:])) and t[0] > 0

    calls = []
    real = generation.greedy_generate
    monkeypatch.setattr(generation, "greedy_generate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    m = measure_methods_latency(lm, image, PROMPT, {"base": [], "fastv": [FastV(1, 0.5)]}, n_steps=3, repeats=2,
                                keep_samples=True)
    assert calls == [2, 2] + [4] * 4          # warm-up, then one run per method and repeat
    for i in range(2):
        pre, tot, steps = m["samples"]["prefill"][i], m["samples"]["total"][i], m["samples"]["steps"][i]
        assert all(p < q for p, q in zip(pre, tot)) and all(len(s) == 3 for s in steps)
        assert [sum(s) for s in steps] == pytest.approx([q - p for p, q in zip(pre, tot)])
        assert m["decode_s"][i] == pytest.approx(statistics.median(q - p for p, q in zip(pre, tot)))


def test_tradeoff_on_a_real_prompt(image):
    lm = random_lm("llava")
    c = token_counts(lm, image, "What is in the image?")
    assert c["image"] == 36 and c["system"] + c["image"] + c["text"] > 36
    t = compute_tradeoff(lm, image, "What is in the image?", n_steps=2, repeats=1)
    L = lm.n_layers
    assert t["depths"] == list(range(L + 1)) and t["total_saving"][L] == 0
    m = t["measured"]
    assert all(x > 0 for x in m["prefill_s"]) and all(x >= 0 for x in m["decode_s"])
    assert t["measured_total_saving"][L] == 0
    share = m["prefill_s"][L] / (m["prefill_s"][L] + m["decode_s"][L])
    assert t["prefill_time_share"] == pytest.approx(share) and 0 < share < 1
    assert t["time_weighted_saving"] == pytest.approx(
        [share * p + (1 - share) * d for p, d in zip(t["prefill_saving"], t["decode_saving"])])
    assert t["time_weighted_saving"][L] == 0 and t["time_weighted_saving"][0] < t["total_saving"][0]
    fig = fig_compute_tradeoff(t)
    assert len(fig.data) == 6 and all(len(tr.x) == L + 1 for tr in fig.data)
    assert fig.data[-1].name == "prefill + decode FLOPs, each phase weighted by its measured time"
