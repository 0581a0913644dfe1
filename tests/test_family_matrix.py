"""Every family x every intervention, against an eager reference built here (#26's matrix).

The reference runs the model in eager attention and starts from the mask the model builds for
itself (causality, Gemma 3's bidirectional image block, sliding windows), read off each
attention module's input; the intervention is then written by hand on top: key blocks as
additive masks, Freeze as a hook copying image rows through, FastV's ranking from eager
attention weights. The lens (SDPA, its own attention function) must give the same logits.

With ``VLMLENS_MATRIX_OUT=path.json`` the results are also written there (tests._models.record_matrix;
conftest writes them at the end of the session): scripts/support_matrix.py turns them into
docs/support.md (the support matrix is generated from these tests, not typed).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from vlmlens.capture import image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import FastV, Freeze, Knockout, Substitute, Truncate, n_kept
from vlmlens.lens import NOTHING, Lens, Plan
from vlmlens.models.families import get_arch
from vlmlens.models.loading import LoadedModel
from vlmlens.models.tiny_random import FAMILIES, build_random

from tests._models import random_lm, record_matrix, set_attn

PROMPT = "What is in the image? Describe it."
TOL = 1e-4
_record = record_matrix


def _lens_logits(lm, inputs, img, ivs):
    plan = Plan.build(img, lm.n_layers, inputs["input_ids"].shape[1], NOTHING, ivs)
    with torch.no_grad(), Lens.for_model(lm, plan):
        return lm.model(**inputs).logits[0].double()


def _eager_logits(lm, inputs, block=None, freeze_from=None, img=None, rank=None, substitute=None, remove=None):
    """Eager forward; ``block(layer) -> bool [n, n]`` (True: the query may not read the key) added
    to the model's own mask; ``freeze_from``: the image rows that layer reads are kept in every
    later layer's input and in the final norm's; ``substitute=(at, from)``: the image rows of layer
    ``at``'s input are those of layer ``from``'s; ``rank(layer, weights)``: called with each
    layer's eager attention weights [H, n, n]; ``remove=(k, keep)``: from layer k on, only the rows
    ``keep`` (bool [n]) are in the sequence -- every layer's inputs sliced as the model built them
    (its own mask's rows and columns, rotary tables, positions); the logits of those rows."""
    layers = list(lm.arch.decoder_layers(lm.model))
    att = set(lm.arch.attention_layers(lm.model))
    n = inputs["input_ids"].shape[1]
    hooks, kept = [], {}

    def pre(l):
        def hook(mod, args, kwargs):
            m = kwargs.get("attention_mask")
            if m is None:
                m = torch.zeros(1, 1, n, n)
                m[0, 0][~torch.ones(n, n, dtype=torch.bool).tril()] = torch.finfo(torch.float32).min
            m = m.clone()
            b = block(l) if block is not None else None
            if b is not None:
                m[..., torch.as_tensor(b)] = torch.finfo(m.dtype).min
            return args, dict(kwargs, attention_mask=m)
        return hook

    def post_attn(l):
        def hook(mod, args, kwargs, out):
            rank(l, out[1][0].double())
        return hook

    def rows_in(l, save=None, put=None):
        """Pre-hook on a layer (or the final norm): save its input's image rows, or put saved ones there."""
        def hook(mod, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            if save is not None:
                kept[save] = h[:, img].clone()
            if put is not None:
                h[:, img] = kept[put]
            return ((h, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=h))
        return hook

    def cut_rows(mod, args, kwargs):
        k_idx = torch.as_tensor(np.flatnonzero(remove[1]))
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] == n:
            h = h[:, k_idx]
        kw = dict(kwargs)
        for name, axis in (("position_embeddings", -2), ("position_ids", -1)):
            v = kw.get(name)
            if v is not None:
                kw[name] = (tuple(t.index_select(axis % t.dim(), k_idx) for t in v) if isinstance(v, tuple)
                            else v.index_select(axis % v.dim(), k_idx))
        m = kw.get("attention_mask")
        if isinstance(m, torch.Tensor):
            kw["attention_mask"] = m[..., k_idx, :][..., k_idx] if m.dim() == 4 else m[..., k_idx]
        return ((h, *args[1:]), kw) if args else (args, dict(kw, hidden_states=h))

    stack = lm.arch.injection_module(lm.model)
    if remove is not None and stack is not None:     # DeepStack: no features are added from layer k on either
        hooks.append(stack.register_forward_pre_hook(
            lambda m, a, kw: (a, dict(kw, deepstack_visual_embeds=list(kw["deepstack_visual_embeds"])[:remove[0]])),
            with_kwargs=True))
    for l, layer in enumerate(layers):
        if remove is not None and l >= remove[0]:
            hooks.append(layer.register_forward_pre_hook(cut_rows, with_kwargs=True))
        if l in att:                     # (a linear-attention / convolution layer has no mask, no weights)
            hooks.append(layer.self_attn.register_forward_pre_hook(pre(l), with_kwargs=True))
            if rank is not None:
                hooks.append(layer.self_attn.register_forward_hook(post_attn(l), with_kwargs=True))
        if freeze_from is not None and l >= freeze_from:
            hooks.append(layer.register_forward_pre_hook(
                rows_in(l, save="frozen" if l == freeze_from else None, put="frozen" if l > freeze_from else None),
                with_kwargs=True))
        if substitute is not None and l in substitute:
            at, src = substitute
            hooks.append(layer.register_forward_pre_hook(
                rows_in(l, save="src" if l == src else None, put="src" if l == at else None), with_kwargs=True))
    if freeze_from is not None:
        hooks.append(lm.arch.final_norm(lm.model).register_forward_pre_hook(rows_in(-1, put="frozen"),
                                                                            with_kwargs=True))
    return _eager_with(lm, inputs, hooks)


def _eager_with(lm, inputs, hooks):
    """The eager forward's logits with ``hooks`` installed (removed after; the model is put back on SDPA)."""
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            return lm.model(**inputs).logits[0].double()
    finally:
        set_attn(lm.model, "sdpa")
        for h in hooks:
            h.remove()


@functools.lru_cache(maxsize=None)
def deep(family):
    """The family's tiny random model with 4 decoder layers: deep enough that a state computed
    wrongly after a cut at layer 1 is read again by a later layer (2 layers would hide it)."""
    over = {"num_hidden_layers": 4}
    pattern = getattr(random_lm(family).text_config, "layer_types", None)
    if pattern:
        over["layer_types"] = (list(pattern) * 4)[:4]
    model, proc = build_random(family, text_overrides=over)
    return LoadedModel(model, proc, get_arch(family), f"random:{family}-4", torch.device("cpu"), torch.float32)


def _setup(family, image):
    lm = deep(family)
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n = inputs["input_ids"].shape[1]
    img = image_positions(lm, inputs["input_ids"])
    is_img = np.zeros(n, bool)
    is_img[img] = True
    return lm, inputs, n, img, is_img


def _check(family, what, mine, ref, rows):
    """The text rows' logits (when the lens removed rows, its output holds only those that stay:
    then the last row, the one that predicts the next token, and the text rows when all stay)."""
    if mine.shape[0] == ref.shape[0]:
        mine, want = mine[rows], ref[rows]
    elif mine.shape[0] == len(rows):
        want = ref[rows]
    else:
        mine, want = mine[-1:], ref[-1:]
    err = float((mine - want).abs().max())
    _record(family, what, err <= TOL, f"max |Δ logit| {err:.1e}")
    assert err <= TOL, (family, what, err)


def _refused(family, what, run, layers, att):
    """Where the cell needs attention (a key mask, a ranking) at a layer without softmax attention
    (a hybrid stack's linear layer), the lens must refuse it with the reason, never skip it."""
    if set(layers) <= att:
        return False
    with pytest.raises(InputError, match="no softmax attention"):
        run()
    _record(family, what, True, "refused: no softmax attention at layer " + str(min(set(layers) - att)), refused=True)
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_knockout_freeze_fastv_equal_eager_references(family, image):
    matrix_row(family, family, image)


def matrix_row(model_family, family, image):
    """Every cell of one row: ``family`` is the row's label (a family, or "<family> video"), the input
    an image or a vlmlens.video.Video."""
    if get_arch(model_family).cross_attention:
        return cross_attention_row(family, image)
    lm, inputs, n, img, is_img = _setup(model_family, image)
    L, att = lm.n_layers, set(lm.arch.attention_layers(lm.model))
    text = np.flatnonzero(~is_img)
    k = 1
    cut = (~is_img)[:, None] & is_img[None, :]                      # text queries x image keys
    what = f"Truncate({k}, drop)"
    if not _refused(family, what, lambda: _lens_logits(lm, inputs, img, [Truncate(k)]), range(k, L), att):
        ref = _eager_logits(lm, inputs, block=lambda l: cut if l >= k else None)
        _check(family, what, _lens_logits(lm, inputs, img, [Truncate(k)]), ref, text)
    ref = _eager_logits(lm, inputs, remove=(k, ~is_img))            # the image rows are gone from layer k on
    _check(family, f"Truncate({k}, remove)", _lens_logits(lm, inputs, img, [Truncate(k, "remove")]), ref,
           np.arange(len(text)))
    last = np.zeros(n, bool)
    last[n - 1] = True
    ko = last[:, None] & is_img[None, :]
    what, ivs = "Knockout(last -> image, layer 0)", [Knockout("last", "image", [0])]
    if not _refused(family, what, lambda: _lens_logits(lm, inputs, img, ivs), [0], att):
        ref = _eager_logits(lm, inputs, block=lambda l: ko if l == 0 else None)
        _check(family, what, _lens_logits(lm, inputs, img, ivs), ref, text)
    ref = _eager_logits(lm, inputs, freeze_from=k, img=img)
    _check(family, f"Freeze({k})", _lens_logits(lm, inputs, img, [Freeze(k)]), ref, text)
    ref = _eager_logits(lm, inputs, substitute=(2, 1), img=img)
    _check(family, "Substitute(at 2, from 1)", _lens_logits(lm, inputs, img, [Substitute(2, 1)]), ref, text)
    # FastV: rank by the last token's head-mean attention at layer K-1, then no kept query reads a dropped key
    K, keep = 1, 0.5
    kept = {}

    def rank(l, w):
        if l == K - 1:
            s = w.mean(0)[n - 1, img].numpy()
            kept["idx"] = np.sort(np.argsort(-s, kind="stable")[:n_kept(keep, len(img))])

    def dropped():
        out = np.zeros(n, bool)
        out[img] = True
        out[img[kept["idx"]]] = False
        return out

    def fastv_block(l):
        return None if l < K else (~dropped())[:, None] & dropped()[None, :]

    for mode in ("mask", "remove"):
        what, ivs = f"FastV({K}, keep {keep}, {mode})", [FastV(K, keep, mode=mode)]
        needs = [K - 1, *(range(K, L) if mode == "mask" else ())]
        if _refused(family, what, lambda: _lens_logits(lm, inputs, img, ivs), needs, att):
            continue
        ref = _eager_logits(lm, inputs, block=fastv_block, rank=rank)
        _check(family, what, _lens_logits(lm, inputs, img, ivs), ref, text)
    base = _eager_logits(lm, inputs)
    cut0 = _lens_logits(lm, inputs, img, [Truncate(0, "remove")])
    assert float((cut0[-1] - base[-1]).abs().max()) > TOL   # the image matters: it can fail


def _skipping(lm, inputs, skip):
    """Eager logits with decoder layers ``skip`` -> bool [n] (rows whose output is their input) written by hand."""
    layers = lm.arch.decoder_layers(lm.model)
    hooks = []
    for l, rows in skip.items():
        def hook(mod, args, kwargs, out, rows=rows):
            h_in = args[0] if args else kwargs["hidden_states"]
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, torch.as_tensor(rows)] = h_in[:, torch.as_tensor(rows)]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        hooks.append(layers[l].register_forward_hook(hook, with_kwargs=True))
    return _eager_with(lm, inputs, hooks)


def cross_attention_row(family, image):
    """A cross-attention model (Mllama): the image is read only by the gated cross-attention layers. Truncate(k)
    skips those >= k (references: hand-written skips; for k = 0 the model's own path without an image),
    Knockout skips one for the src rows; what acts on image rows of the stream is refused with the reason."""
    lm = deep(family)
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n = inputs["input_ids"].shape[1]
    img = image_positions(lm, inputs["input_ids"])
    cross = lm.arch.cross_layers(lm.model)
    every = np.ones(n, bool)
    k = 1
    ref = _skipping(lm, inputs, {c: every for c in cross if c >= k})
    _check(family, f"Truncate({k}, drop)", _lens_logits(lm, inputs, img, [Truncate(k)]), ref, np.arange(n))
    text_only = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref0 = lm.model(**text_only).logits[0].double()           # the model's own path without an image
    cut0 = _lens_logits(lm, inputs, img, [Truncate(0)])
    _check(family, "Truncate(0, drop) == the model without the image", cut0, ref0, np.arange(n))
    last = np.zeros(n, bool)
    last[n - 1] = True
    what = f"Knockout(last -> image, cross layer {cross[0]})"
    ref = _skipping(lm, inputs, {cross[0]: last})
    _check(family, what, _lens_logits(lm, inputs, img, [Knockout("last", "image", [cross[0]])]), ref, np.arange(n))
    refused = {"Truncate(1, remove)": [Truncate(1, "remove")], "Knockout(last -> image, layer 0)": [Knockout("last",
               "image", [0])], "Freeze(1)": [Freeze(1)], "Substitute(at 2, from 1)": [Substitute(2, 1)],
               "FastV(1, keep 0.5, mask)": [FastV(1, 0.5, mode="mask")],
               "FastV(1, keep 0.5, remove)": [FastV(1, 0.5, mode="remove")]}
    for what, ivs in refused.items():
        with pytest.raises(InputError, match="cross-attention") as e:
            _lens_logits(lm, inputs, img, ivs)
        why = str(e.value).split(": ", 1)[1].split(";")[0]
        _record(family, what, True, "refused: " + why, refused=True)
    base = _lens_logits(lm, inputs, img, [])
    assert float((cut0[-1] - base[-1]).abs().max()) > TOL     # the image matters: it can fail


def test_the_support_matrix_in_the_docs_lists_every_family():
    """docs/support.md is regenerated (python scripts/support_matrix.py) whenever a family is added."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "support.md").read_text()
    rows = [l for l in doc.splitlines() if l.startswith("| `")]
    assert [l.split("`")[1] for l in rows if not l.split("`")[2].startswith(" video")] == list(FAMILIES)
    assert not any("fails" in l for l in rows)


def test_the_readme_lists_the_families_of_the_support_matrix():
    from pathlib import Path
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Supported families", 1)[1].split("\n\n", 2)[1]
    listed = [name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])]
    assert sorted(listed) == sorted(FAMILIES) and len(listed) == len(set(listed))
