"""The lens on masks that are not plain causal: Gemma 3's bidirectional image block and sliding
windows, and Qwen2-VL with ``use_sliding_window`` layers, with generation past the window,
against an independent reference.

The reference is the same model with eager attention, teacher-forced on the lens's tokens, each
attention module handed a mask built here by hand (a forward pre-hook replaces its
``attention_mask``): causal OR same-image-block, AND the window on sliding layers, AND NOT the
intervention's blocked (query, key) pairs in the layers it acts on.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import greedy_generate, image_positions, prepare_inputs
from vlmlens.interventions import Freeze, Knockout, Truncate
from vlmlens.lens import Lens, Plan
from vlmlens.models.families import get_arch
from vlmlens.models.loading import LoadedModel
from vlmlens.models.tiny_random import build_random

from tests._models import extend_inputs, set_attn

PROMPT = "What is in the image? Describe it in detail."
WINDOW = 8
N_NEW = 6
#: family -> (layer types, image block attends to itself bidirectionally, extra text-config fields)
CASES = {
    "gemma3": (["sliding_attention", "full_attention", "sliding_attention", "full_attention"], True, {}),
    "qwen2_vl": (["full_attention", "sliding_attention", "sliding_attention"], False,
                 {"use_sliding_window": True, "max_window_layers": 1}),
}


def windowed(family: str) -> LoadedModel:
    layer_types, bidirectional, extra = CASES[family]
    model, proc = build_random(family, seed=3, text_overrides={
        "num_hidden_layers": len(layer_types), "layer_types": layer_types, "sliding_window": WINDOW, **extra})
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    model.generation_config.suppress_tokens = [i for i in sorted(set(tok.all_special_ids)) if i not in eos]
    lm = LoadedModel(model, proc, get_arch(family), f"random:{family}-window", torch.device("cpu"), torch.float32)
    lm.layer_types, lm.bidirectional = layer_types, bidirectional
    return lm


@pytest.fixture(scope="module")
def gemma():
    return windowed("gemma3")


@pytest.fixture(scope="module")
def qwen():
    return windowed("qwen2_vl")


def hand_mask(lm, n: int, img: np.ndarray, layer: int, ivs) -> torch.Tensor:
    """Additive [1, 1, n, n] mask of decoder layer ``layer`` over positions 0..n-1."""
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    is_img = np.zeros(n, bool)
    is_img[img] = True
    block = np.full(n, -1)
    if lm.bidirectional:
        block[img] = 0                                   # one image: one bidirectional block
    allowed = (k <= q) | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
    if lm.layer_types[layer] == "sliding_attention":
        allowed &= k > q - WINDOW
    for iv in ivs:
        if isinstance(iv, Knockout) and (not iv.layers or layer in iv.layers):
            allowed &= ~((~is_img)[:, None] & is_img[None, :])
        if isinstance(iv, Truncate) and layer >= iv.from_layer:
            allowed &= ~((~is_img)[:, None] & is_img[None, :])
    mask = torch.zeros(1, 1, n, n)
    mask[0, 0][~torch.from_numpy(allowed)] = torch.finfo(torch.float32).min
    return mask


def reference(lm, image, ids: list[int], ivs=(), freeze: int | None = None):
    """Eager forward over prompt + ``ids`` with hand-built masks (and image rows passed
    through decoder layers >= ``freeze``); returns (logits [n, V], hidden states [L+1, n, d])."""
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    img = image_positions(lm, inputs["input_ids"])
    full = extend_inputs(inputs, ids)
    n = full["input_ids"].shape[1]
    layers = lm.arch.decoder_layers(lm.model)
    handles = []

    def put(l):
        def hook(mod, args, kwargs):
            return args, dict(kwargs, attention_mask=hand_mask(lm, n, img, l, ivs))
        return hook

    def keep_image(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[:, img] = h_in[:, img]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    for l, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_pre_hook(put(l), with_kwargs=True))
        if freeze is not None and l >= freeze:
            handles.append(layer.register_forward_hook(keep_image, with_kwargs=True))
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            out = lm.model(**full, output_hidden_states=True)
    finally:
        set_attn(lm.model, "sdpa")
        for h in handles:
            h.remove()
    return out.logits[0], out.hidden_states


def lens_steps(lm, image, ivs, n=N_NEW):
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    plan = Plan.build(image_positions(lm, ids), lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens(lm.arch.decoder_layers(lm.model), plan):
        out = greedy_generate(lm, inputs, n)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([l[0] for l in out.logits]), ids.shape[1]


def check_against_reference(lm, image, ivs, freeze=None, tol=1e-4):
    gen, logits, n_prompt = lens_steps(lm, image, ivs)
    assert n_prompt > WINDOW and n_prompt + N_NEW > 3 * WINDOW // 2       # the window bites in prefill and decoding
    ref_logits, _ = reference(lm, image, gen[:-1], ivs, freeze)
    ref = ref_logits[n_prompt - 1:]
    err = (logits - ref).abs().max().item()
    assert err <= tol, (ivs, err)
    return gen, logits


def test_capture_past_the_window_matches_the_reference(gemma, image):
    gen, _ = check_against_reference(gemma, image, [])
    run = vl.capture(gemma, image, PROMPT, max_new_tokens=N_NEW, hidden_dtype="float32")   # no "lost track of positions"
    assert run.token_ids[run.spans.n_prompt:] == gen
    _, hs = reference(gemma, image, gen[:-1])
    n = run.spans.n_total - 1
    for l in range(gemma.n_layers):       # every row, image rows included (their bidirectional block)
        assert np.abs(run.hidden_states[l][:n] - hs[l][0, :n].numpy()).max() <= 1e-4, l
    last = gemma.arch.final_norm(gemma.model)(torch.from_numpy(run.hidden_states[-1][:n]))
    assert (last - hs[-1][0, :n]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layers", [(0,), (1, 2), (3,)])
def test_knockout_with_layer_subsets_keeps_the_image_block(gemma, image, layers):
    check_against_reference(gemma, image, [Knockout(src="all", dst="image", layers=layers)])


@pytest.mark.parametrize("k", [0, 1, 3])
def test_truncate_drop_and_remove_match_the_reference(gemma, image, k):
    gd, ld = check_against_reference(gemma, image, [Truncate(k, "drop")])
    gr, lr = check_against_reference(gemma, image, [Truncate(k, "remove")])
    assert gd == gr and (ld - lr).abs().max().item() <= 1e-4
    run = vl.capture(gemma, image, PROMPT, max_new_tokens=N_NEW, hidden_dtype="float32",
                     interventions=[Truncate(k, "drop")])
    _, hs = reference(gemma, image, run.token_ids[run.spans.n_prompt:-1], [Truncate(k, "drop")])
    img = run.spans.positions("image")
    L = gemma.n_layers
    for l in range(L):                    # the image rows of a drop run keep their bidirectional block
        assert np.abs(run.hidden_states[l][img] - hs[l][0, img].numpy()).max() <= 1e-4, l
    last = gemma.arch.final_norm(gemma.model)(torch.from_numpy(run.hidden_states[L][img]))
    assert (last - hs[L][0, img]).abs().max().item() <= 1e-4


def test_freeze_matches_the_reference(gemma, image):
    check_against_reference(gemma, image, [Freeze(2)], freeze=2)


def test_sweep_matches_independent_references(gemma, image):
    from vlmlens.experiments.compare import sweep

    res = sweep(gemma, image, PROMPT, mode="remove", max_new_tokens=N_NEW, store="none", record_attention=False)
    for d in res.depths:
        gen, _ = check_against_reference(gemma, image, [Truncate(d.depth, "drop")])
        assert d.token_ids == gen, d.depth


@pytest.mark.parametrize("ivs", [[], [Truncate(1, "drop")], [Truncate(1, "remove")], [Truncate(0, "remove")],
                                 [Knockout(src="all", dst="image", layers=(0,))]], ids=str)
def test_qwen2_vl_sliding_window_layers(qwen, image, ivs):
    assert [getattr(m.self_attn, "sliding_window", None) for m in qwen.arch.decoder_layers(qwen.model)] == [None, 8, 8]
    check_against_reference(qwen, image, ivs)
