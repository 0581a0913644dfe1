"""The lens is exact: capture changes nothing the model computes, and what it records equals
the same quantities from plain HF forwards (hidden states) and eager attention weights."""
import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.capture import prepare_inputs
from vlmlens.lens import ATTN_NAME, Lens, Plan, Recording
from vlmlens.models.tiny_random import FAMILIES

from tests._models import eager_attentions, extend_inputs, layer_inputs, random_lm

PROMPT = "What is in the image?"


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _plain_generate(lm, inputs, n):
    out = lm.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=lm.processor.tokenizer.pad_token_id or 0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_capture_matches_plain_model(family, image):
    run = assert_capture_exact(random_lm(family), image)
    assert run.spans.n_total - run.spans.n_prompt == 4          # special tokens suppressed: no early stop


def assert_capture_exact(lm, image, tol: float = 1e-5):
    """Capture == plain forwards (tokens, logits, hidden states) and eager attention weights
    (image share, maps, per-head maps), on any loaded model (also smol-shapes)."""
    run = vl.capture(lm, image, PROMPT, max_new_tokens=4, hidden_dtype="float32")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    n_prompt = inputs["input_ids"].shape[1]
    gen = run.token_ids[n_prompt:]
    with torch.no_grad():
        plain_gen = _plain_generate(lm, inputs, 4)
    assert gen == plain_gen[: len(gen)] and len(gen) >= 1

    # logits of a plain forward vs the same forward through the lens
    with torch.no_grad():
        plain = lm.model(**inputs).logits
        plan = Plan.build(run.spans.positions("image"), lm.n_layers, n_prompt, Recording())
        with Lens(lm.arch.decoder_layers(lm.model), plan):
            lensed = lm.model(**inputs).logits
    assert torch.equal(plain, lensed) or (plain - lensed).abs().max().item() <= tol

    # hidden states: teacher-forced forward over prompt + generated tokens
    full = extend_inputs(inputs, gen, lm.arch.generated_token_type)
    ref = layer_inputs(lm, full)
    hs = run.hidden_states
    L = lm.n_layers
    assert hs.shape == (L + 1, run.spans.n_total, lm.text_config.hidden_size)
    for l in range(L):
        assert np.abs(hs[l] - ref[l][0].numpy()).max() <= tol * max(1.0, float(np.abs(hs[l]).max())), f"layer {l}"
    norm = lm.arch.final_norm(lm.model)
    with torch.no_grad():
        last = norm(torch.from_numpy(hs[L]))
    assert (last - ref[L][0]).abs().max().item() <= tol * max(1.0, float(last.abs().max()))

    if lm.arch.cross_attention:
        return _assert_cross_attention_exact(lm, run, full, tol)
    # attention statistics vs eager attention weights
    weights = eager_attentions(lm, full)       # one per softmax-attention layer (a hybrid's linear ones have none)
    with_att = lm.arch.attention_layers(lm.model)
    assert len(weights) == len(with_att)
    img = run.spans.positions("image")
    nonimg = np.setdiff1d(np.arange(run.spans.n_total), img)
    for l in sorted(set(range(L)) - set(with_att)):           # not defined there, and said so (NaN)
        for name in ("attention_to_image", "attention_maps", "attention_head_maps", "attention_first_token"):
            assert np.isnan(run.arrays[name][l]).all(), (name, l)
    for l, w in zip(with_att, weights):
        a = w[0].numpy()  # [H, q, k]
        share = a[:, :, img].sum(-1)
        assert np.abs(run.attention_to_image[l][:, nonimg] - share[:, nonimg]).max() <= tol
        assert np.isnan(run.attention_to_image[l][:, img]).all()
        mp = run.map_positions
        maps = a[:, mp][:, :, img].mean(0)
        assert np.abs(run.attention_maps[l] - maps).max() <= tol
        heads = a[:, run.spans.n_prompt - 1][:, img]          # every head's map of the last prompt token
        assert np.abs(run.attention_head_maps[l] - heads).max() <= tol
        first = a[:, run.spans.n_prompt - 1, 0]                # and its attention on the first token (the sink)
        assert np.abs(run.attention_first_token[l] - first).max() <= tol
    assert np.nanmin(run.attention_to_image) >= 0 and np.nanmax(run.attention_to_image) <= 1 + 1e-6
    return run


def test_image_spans_and_grid(family, image):
    lm = random_lm(family)
    run = vl.capture(lm, image, PROMPT, max_new_tokens=2)
    ids = np.array(run.token_ids)
    img_ids = lm.arch.image_token_id(lm.model, lm.processor)
    img_ids = img_ids if isinstance(img_ids, (list, tuple)) else [img_ids]
    assert np.array_equal(np.flatnonzero(np.isin(ids[: run.spans.n_prompt], img_ids)), run.spans.positions("image"))
    rows, cols = run.image_grid
    idx = run.grid_index
    assert idx.shape == (rows, cols)
    drawn = idx[idx >= 0]
    assert len(np.unique(drawn)) == len(drawn) and drawn.max() < run.spans.n_image
    if run.meta["grid_order"] == "raster":
        assert rows * cols == run.spans.n_image and np.array_equal(idx.ravel(), np.arange(rows * cols))
    heat = run.to_grid(np.arange(run.spans.n_image, dtype=float))
    assert np.array_equal(heat[idx >= 0], drawn)
    assert run.tokens[run.spans.n_prompt:] == lm.processor.tokenizer.convert_ids_to_tokens(run.token_ids[run.spans.n_prompt:])


class _Boom:
    def edit_resid_post(self, layer, h_in, h_out, ctx):
        if layer == 1:
            raise RuntimeError("boom inside the forward")
        return None


def test_hooks_removed_even_on_exception(image):
    lm = random_lm("llava")
    layers = lm.arch.decoder_layers(lm.model)
    before = [(len(l._forward_hooks), len(l._forward_pre_hooks)) for l in layers]
    impl = lm.text_config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(lm, image, PROMPT, max_new_tokens=2, interventions=[_Boom()])
    assert [(len(l._forward_hooks), len(l._forward_pre_hooks)) for l in layers] == before
    assert lm.text_config._attn_implementation == impl != ATTN_NAME
    assert not any(hasattr(m, "_vlmlens_state") for m in lm.model.modules())
    # and the model still works normally
    run = vl.capture(lm, image, PROMPT, max_new_tokens=2)
    assert len(run.generated_tokens) == 2


def test_store_modes(image):
    lm = random_lm("llava")
    full = vl.capture(lm, image, PROMPT, max_new_tokens=3)
    part = vl.capture(lm, image, PROMPT, max_new_tokens=3, store="image_text")
    none = vl.capture(lm, image, PROMPT, max_new_tokens=3, store="none")
    first = full.spans.positions("image")[0]
    assert np.array_equal(part.hidden_positions, np.arange(first, full.spans.n_total))
    assert np.array_equal(part.hidden_states, full.hidden_states[:, first:])
    assert full.hidden_states.dtype == np.float16
    assert "hidden_states" not in none.arrays and none.token_ids == full.token_ids
    assert np.array_equal(part.span_states("image"), full.span_states("image"))


def test_zero_new_tokens(image):
    lm = random_lm("llava")
    run = vl.capture(lm, image, PROMPT, max_new_tokens=0)
    assert run.spans.n_total == run.spans.n_prompt and run.generated_text == "" and run.token_logprobs == []
    assert run.attention_maps.shape[1] == 1  # the last prompt token only


def test_center_crop_box_recorded(image):
    # the random LLaVA processor resizes the short edge to 48 and centre-crops 48x48:
    # a 64x48 image keeps columns 8..56 of 64
    run = vl.capture(random_lm("llava"), image, PROMPT, max_new_tokens=1)
    assert run.meta["image_box"] == [0.0, 0.125, 1.0, 0.875]
    square = vl.capture(random_lm("llava"), image.resize((48, 48)), PROMPT, max_new_tokens=1)
    assert square.meta["image_box"] is None
    assert vl.capture(random_lm("qwen2_vl"), image, PROMPT, max_new_tokens=1).meta["image_box"] is None


def _assert_cross_attention_exact(lm, run, full, tol):
    """A cross-attention model (Mllama): no image statistic of the sequence is defined (NaN: it holds no image
    tokens), and the cross-attention layers' maps equal their eager weights (head mean, the recorded rows)."""
    for name in ("attention_to_image", "attention_maps", "attention_head_maps"):
        assert np.isnan(run.arrays[name]).all(), name
    cross = lm.arch.cross_layers(lm.model)
    got = {}
    layers = lm.arch.decoder_layers(lm.model)
    hooks = [layers[c].cross_attn.register_forward_hook(lambda m, a, k, out, c=c: got.__setitem__(c, out[1]),
                                                        with_kwargs=True) for c in cross]
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            lm.model(**full)
    finally:
        lm.model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    maps = run.arrays["cross_attention_maps"]
    mp = run.map_positions
    assert maps.shape[:2] == (lm.n_layers, len(mp))
    for l in range(lm.n_layers):
        if l in cross:
            want = got[l][0].mean(0)[mp].numpy()                      # [rows, image keys]
            assert np.abs(maps[l] - want).max() <= tol, l
            assert np.allclose(maps[l].sum(-1), 1.0, atol=1e-5)
        else:
            assert np.isnan(maps[l]).all(), l
    assert run.meta["cross_attention_layers"] == list(cross)
    return run


def test_progress_moves_with_the_tokens_and_changes_nothing(tiny):
    import vlmlens as vl
    from vlmlens.tiny.scenes import make_scene

    img = make_scene(3).image
    seen = []
    run = vl.capture(tiny, img, "Describe the image.", max_new_tokens=6, progress=lambda d, t: seen.append((d, t)))
    plain = vl.capture(tiny, img, "Describe the image.", max_new_tokens=6)
    assert run.token_ids == plain.token_ids                         # the bar never stops or alters generation
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and {t for _, t in seen} == {6}
    assert seen[0][0] == 1 and seen[-1][0] == min(6, len(run.generated_tokens) + 1)
