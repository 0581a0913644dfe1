"""FastV as its authors run it (#24 part 3): re-ranked at every decoding step.

FastV's released evaluation generates without a KV cache: every step is one forward over the
whole sequence, the head-averaged attention of that forward's *last* token at layer K-1 ranks
the image tokens, and from layer K on only the top ones stay (kept tokens keep their position
ids). The reference below is written from that rule with eager attention and hand-built masks,
one forward per step; vlmlens's ``rerank="step"`` must equal it, and must differ from the kept
set fixed at the prefill (``rerank="prefill"``, vlmlens's default) where the two disagree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import extend_inputs, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.experiments.engine import Trial
from vlmlens.interventions import FastV, n_kept

from tests._models import additive_mask, deep_llava, mask_pre_hook, set_attn

PROMPT = "What is in the image? Describe it."
N_NEW = 6


@pytest.fixture(scope="module")
def deep():
    """A random LLaVA with 5 decoder layers (room for stages)."""
    return deep_llava()


def repo_step(lm, inputs, img, K: int, n_keep: int):
    """One step of FastV's no-cache generation: (next-token log-probs, kept image indices).
    Eager attention; at layer K-1 the last row's head-mean attention on the image ranks it; from
    layer K no query reads a dropped image key (the same outputs as cutting the rows out)."""
    n = inputs["input_ids"].shape[1]
    layers = lm.arch.decoder_layers(lm.model)
    kept: list[np.ndarray] = []

    def mask(l):
        allowed = np.tril(np.ones((n, n), bool))
        if l >= K:
            dropped = np.setdiff1d(np.arange(len(img)), kept[0])
            allowed[:, img[dropped]] = False
            allowed[np.arange(n), np.arange(n)] = True       # a row always sees itself (dropped rows are never read)
        return additive_mask(allowed)

    def read(mod, args, kwargs, out):
        w = out[1][0].double().numpy()                          # [heads, n, n]
        s = w.mean(0)[n - 1, img]                               # the newest token's attention on the image
        order = np.argsort(-s, kind="stable")
        kept.append(np.sort(order[:n_keep]))

    hs = [layer.self_attn.register_forward_pre_hook(mask_pre_hook(mask, l), with_kwargs=True)
          for l, layer in enumerate(layers)]
    hs.append(layers[K - 1].self_attn.register_forward_hook(read, with_kwargs=True))
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            logits = lm.model(**inputs, use_cache=False).logits[0, -1].double()
    finally:
        set_attn(lm.model, "sdpa")
        for h in hs:
            h.remove()
    return torch.log_softmax(logits, -1), kept[0]         # raw log-probs (as Run.token_logprobs)


def repo_generate(lm, image, K: int, keep: float, n_new: int = N_NEW):
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = image_positions(lm, inputs["input_ids"])
    gen, steps, kept = [], [], []
    eos = lm.model.generation_config.eos_token_id
    for _ in range(n_new):
        logp, k = repo_step(lm, extend_inputs(inputs, gen), img, K, n_kept(keep, len(img)))
        steps.append(logp)
        kept.append(k)
        pick = logp.clone()
        pick[list(lm.model.generation_config.suppress_tokens or [])] = -float("inf")   # as generate's processor
        tok = int(pick.argmax())
        if tok == eos:
            break
        gen.append(tok)
    return gen, steps, kept


CONFIGS = [(1, 0.25), (2, 0.5), (3, 0.25), (2, 0.1)]


@pytest.mark.parametrize("K,keep", CONFIGS)
def test_rerank_step_equals_the_authors_rule(deep, image, K, keep):
    gen, steps, kept = repo_generate(deep, image, K, keep)
    run = vl.capture(deep, image, PROMPT, max_new_tokens=N_NEW, interventions=[FastV(K, keep, rerank="step")],
                     hidden_dtype="float32")
    assert run.token_ids[run.spans.n_prompt:] == gen
    # every step's distribution, teacher-forced on those tokens (one whole forward per step)
    s = Trial(deep, image, PROMPT, max_new_tokens=N_NEW)
    mine = s._score([FastV(K, keep, rerank="step")], gen, None)[0]
    ref = torch.stack(steps[:len(gen) + 1]).float()
    assert (mine[: len(ref)] - ref).abs().max() <= 1e-4
    # the Run records the last step's forward: its kept set is the one ranked by the newest token
    last_kept = np.flatnonzero(run.arrays["image_kept"][K])
    if len(gen) == N_NEW:
        _, k_last = repo_step(deep, extend_inputs(prepare_inputs(deep, image, PROMPT)[0], gen),
                              image_positions(deep, prepare_inputs(deep, image, PROMPT)[0]["input_ids"]), K,
                              n_kept(keep, run.spans.n_image))
        assert last_kept.tolist() == k_last.tolist()


def test_per_step_and_prefill_ranking_differ_where_the_newest_token_looks_elsewhere(deep, image):
    """The two are different methods: on these configurations the kept set of some step differs
    from the prefill's, and the generated tokens diverge on at least one (the test can fail)."""
    differ_tokens, differ_sets = 0, 0
    for K, keep in CONFIGS:
        gen, _steps, kept = repo_generate(deep, image, K, keep)
        pre = vl.capture(deep, image, PROMPT, max_new_tokens=N_NEW, interventions=[FastV(K, keep)], store="none")
        differ_tokens += pre.token_ids[pre.spans.n_prompt:] != gen
        differ_sets += any(k.tolist() != kept[0].tolist() for k in kept[1:])
    assert differ_sets >= 1 and differ_tokens >= 1


def test_rerank_settings_are_checked_and_recorded(deep, image):
    with pytest.raises(InputError, match="rerank must be one of"):
        vl.capture(deep, image, PROMPT, max_new_tokens=1, interventions=[FastV(2, 0.5, rerank="token")])
    with pytest.raises(InputError, match="needs score='last'"):
        vl.capture(deep, image, PROMPT, max_new_tokens=1, interventions=[FastV(2, 0.5, score="l2", rerank="step")])
    run = vl.capture(deep, image, PROMPT, max_new_tokens=2, interventions=[FastV(2, 0.5, rerank="step")], store="none")
    assert run.meta["interventions"][0]["rerank"] == "step"
    assert "rerank" not in FastV(2, 0.5).to_json()                 # runs saved before keep their JSON
    from vlmlens.interventions import from_json

    assert from_json(run.meta["interventions"][0]) == FastV(2, 0.5, rerank="step")
    assert "keep 50 % (drop 50 %) from layer 2" in FastV(2, 0.5).describe()
    assert "re-ranked at every step" in FastV(2, 0.25, rerank="step").describe()


def test_the_papers_notation_and_unambiguous_names():
    from vlmlens.experiments.methods import default_methods, parse_methods

    same = ["fastv:2:0.25", "fastv:2:keep=0.25", "fastv:2:keep=25%", "fastv:2:drop=0.75", "fastv:2:drop=75%"]
    for spec in same:
        assert parse_methods(spec, 4)[spec] == [FastV(2, 0.25)], spec
    assert parse_methods("fastv:2:drop=50%:step", 4)["fastv:2:drop=50%:step"] == [FastV(2, 0.5, rerank="step")]
    assert parse_methods("pdrop:1/2:drop=0.5/0.75", 4)["pdrop:1/2:drop=0.5/0.75"][0].keep == (0.5, 0.25)
    for bad, msg in [("fastv:2:drop=1", r"drop must be in \[0, 1\)"), ("fastv:2:0.5:sometimes", "step .* or prefill"),
                     ("fastv:2:drop=x", "must be a number"), ("random:2:0.5:step", "needs 2 value")]:
        with pytest.raises(InputError, match=msg):
            parse_methods(bad, 4)
    names = list(default_methods(8))
    assert "FastV K=2 keep 25%" in names and not any(" R=" in n for n in names)


def test_per_step_reranking_costs_what_it_recomputes(deep, image):
    """Re-ranking at every step cannot reuse a pruned cache: from layer K on each step recomputes
    the whole (pruned) sequence. Known answer: with K = 0 that is one prefill per step."""
    from vlmlens.analysis.compute import LayerShape, prefill_flops, rerank_decode_flops
    from vlmlens.experiments.methods import parse_methods
    from vlmlens.experiments.pruning import compare_pruning

    shape = LayerShape.from_model(deep)
    sched = [36, 9, 9, 9, 9][:shape.n_layers]
    got = rerank_decode_flops(shape, 36, 10, 3, 5, image_per_layer=sched, from_layer=0).sum()
    want = sum(prefill_flops(shape, 36, 10 + i + 1, 3, image_per_layer=sched).sum() for i in range(5))
    assert got == pytest.approx(want, rel=1e-12)
    res = compare_pruning(deep, image, PROMPT, parse_methods("fastv:1:0.25,fastv:1:0.25:step", deep.n_layers),
                          max_new_tokens=4)
    pre, step = res.method("fastv:1:0.25"), res.method("fastv:1:0.25:step")
    assert step.savings["prefill_saving"] == pytest.approx(pre.savings["prefill_saving"])
    assert step.savings["decode_saving"] < 0 < pre.savings["decode_saving"]      # costs more than no pruning
    md = res.markdown()
    assert "re-ranked at every step" in md and "keep 25 % (drop 75 %) from layer 1" in md
