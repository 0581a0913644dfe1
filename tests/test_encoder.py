"""The vision tower run only up to layer m (EncoderDepth), against references made by model
surgery: the tower's layer list cut (LLaVA, Qwen2-VL, Idefics3: three different towers). Exact
(logits <= 1e-5), alone and with a decoder-side cut."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import greedy_generate, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import EncoderDepth, Truncate
from vlmlens.lens import Lens, Plan

from tests._models import random_lm

PROMPT = "What is in the image?"


def steps(lm, image, ivs, n=3):
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    ids = inputs["input_ids"]
    plan = Plan.build(image_positions(lm, ids), lm.n_layers, ids.shape[1], interventions=ivs)
    with torch.no_grad(), Lens.for_model(lm, plan):
        out = greedy_generate(lm, inputs, n)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack([l[0] for l in out.logits])


@contextlib.contextmanager
def surgery(lm, m: int):
    """The reference model: the tower's layer list cut so that the features the model reads are
    its state after m layers (LLaVA reads hidden_states[vision_feature_layer], e.g. the
    penultimate: keep one layer more than m)."""
    layers = lm.arch.vision_layers(lm.model)
    n, F = len(layers), lm.arch.vision_feature_depth(lm.model)
    kept = list(layers)
    cfg = lm.arch.vision_modules(lm.model)["vision_tower"].config
    old_n = getattr(cfg, "num_hidden_layers", None)
    while len(layers) > m + (n - F):
        del layers[len(layers) - 1]
    if old_n is not None:
        cfg.num_hidden_layers = len(layers)        # transformers picks hidden states by this count
    try:
        yield
    finally:
        layers.extend(kept[len(layers):])
        if old_n is not None:
            cfg.num_hidden_layers = old_n


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_encoder_depth_equals_a_cut_tower(family, image):
    lm = random_lm(family)
    n = len(lm.arch.vision_layers(lm.model))
    F = lm.arch.vision_feature_depth(lm.model)
    base_gen, base = steps(lm, image, [])
    for m in range(0, F):
        gen, logits = steps(lm, image, [EncoderDepth(m)])
        with surgery(lm, m):
            ref_gen, ref = steps(lm, image, [])
        assert gen == ref_gen and (logits - ref).abs().max() <= 1e-5, (family, m)
        assert (logits - base).abs().max() > 1e-4, (family, m)         # the tower's depth matters
        # composed with a decoder-side cut: the same as the cut on the cut tower
        gen, logits = steps(lm, image, [EncoderDepth(m), Truncate(1, "remove")])
        with surgery(lm, m):
            ref_gen, ref = steps(lm, image, [Truncate(1, "remove")])
        assert gen == ref_gen and (logits - ref).abs().max() <= 1e-5, (family, m)
    for m in range(F, n + 1):                                         # at or past the feature depth: the baseline
        gen, logits = steps(lm, image, [EncoderDepth(m)])
        assert gen == base_gen and (logits - base).abs().max() <= 1e-6, (family, m)
    assert len(lm.arch.vision_layers(lm.model)) == n                   # surgery undone


def test_encoder_depth_bad_input(image):
    lm = random_lm("llava")
    with pytest.raises(InputError, match="must be an integer >= 0"):
        vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[EncoderDepth(-1)])
    with pytest.raises(InputError, match="this vision tower has 2 layers"):
        vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[EncoderDepth(9)])
    with pytest.raises(InputError, match="more than one EncoderDepth"):
        vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[EncoderDepth(0), EncoderDepth(1)])
    run = vl.capture(lm, image, PROMPT, max_new_tokens=1, interventions=[EncoderDepth(0)])
    assert run.meta["interventions"] == [{"kind": "EncoderDepth", "layers": 0}]


def test_encoder_decoder_grid_rows_and_columns_are_the_single_sweeps(image):
    """Row m = F is the decoder-only sweep, column k = L the encoder-only captures."""
    from vlmlens.experiments.compare import compare
    from vlmlens.experiments.encoder import encoder_decoder_grid
    from vlmlens.figures import fig_encoder_grid

    lm = random_lm("qwen2_vl")
    L, F = lm.n_layers, lm.arch.vision_feature_depth(lm.model)
    g = encoder_decoder_grid(lm, image, PROMPT, max_new_tokens=3)
    assert g.encoder_depths == list(range(F + 1)) and g.decoder_depths == list(range(L + 1))
    assert g.kept[F][L] and g.output_kl[F][L] == 0
    sweep = compare(lm, image, PROMPT, list(range(L + 1)), mode="remove", max_new_tokens=3)
    for j, d in enumerate(sweep.depths):
        assert g.text[F][j] == d.text and abs(g.output_kl[F][j] - d.output_kl) <= 1e-5
    for i, m in enumerate(g.encoder_depths):
        run = vl.capture(lm, image, PROMPT, max_new_tokens=3, interventions=[EncoderDepth(m)] if m < F else [])
        assert g.text[i][L] == run.generated_text
    fig = fig_encoder_grid(g)
    assert np.asarray(fig.data[0].z).shape == (F + 1, L + 1)
    with pytest.raises(InputError, match=r"encoder depths must be integers in 0\.\.2"):
        encoder_decoder_grid(lm, image, PROMPT, encoder_depths=[3])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_states_recorded_and_drawn_on_one_axis(family, image):
    """record_vision keeps the tower's own states; they equal the tower's hidden states computed
    here, and the one-axis figure draws tower then decoder curves."""
    from vlmlens.figures import fig_encoder_decoder_dynamics

    lm = random_lm(family)
    run = vl.capture(lm, image, PROMPT, max_new_tokens=2, hidden_dtype="float32", record_vision=True)
    vs = run.arrays["vision_hidden_states"]
    layers = lm.arch.vision_layers(lm.model)
    assert vs.shape[0] == len(layers) + 1
    seen = []
    hooks = [layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)]
    hooks += [l.register_forward_hook(lambda m, a, kw, o: seen.append(o[0] if isinstance(o, tuple) else o),
                                      with_kwargs=True) for l in layers]
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    try:
        with torch.no_grad():
            lm.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    ref = torch.stack([s.reshape(-1, s.shape[-1]) for s in seen[:len(layers) + 1]]).numpy()
    assert vs.shape == ref.shape and np.abs(vs - ref).max() <= 1e-5
    fig = fig_encoder_decoder_dynamics(run)
    names = {t.name for t in fig.data}
    assert names == {"vision tower (patches)", "decoder (image tokens)"}
    enc = next(t for t in fig.data if t.name.startswith("vision"))
    assert list(enc.x) == list(range(len(layers) + 1))                   # entropy panel: every tower state
    plain = vl.capture(lm, image, PROMPT, max_new_tokens=2)
    assert "vision_hidden_states" not in plain.arrays and "record_vision=True" in \
        fig_encoder_decoder_dynamics(plain).layout.annotations[0].text
