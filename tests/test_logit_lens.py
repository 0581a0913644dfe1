"""Logit lens: the last layer reproduces the model's logits, layer 0 is unembed(norm(embeddings)),
the patch lens is the same readout at image tokens, and attached results survive save/load."""
import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.analysis.logit_lens import (
    attach_logit_lens, layer_logits, lens_from_run, logit_lens, patch_lens, patch_lens_from_run,
)
from vlmlens.capture import prepare_inputs

from tests._models import extend_inputs, random_lm

PROMPT = "What is in the image?"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lens_ends_at_model_logits_and_starts_at_embeddings(family, image):
    lm = random_lm(family)
    run = vl.capture(lm, image, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    inputs, _, _ = prepare_inputs(lm, image, PROMPT)
    with torch.no_grad():
        out = lm.model(**extend_inputs(inputs, run.token_ids[run.spans.n_prompt:]), output_hidden_states=True)
    logits = out.logits[0].float()
    L = lm.n_layers
    everywhere = np.arange(run.spans.n_total)
    assert (layer_logits(lm, run, L, everywhere) - logits).abs().max().item() <= 1e-5
    head, norm = lm.arch.lm_head(lm.model), lm.arch.final_norm(lm.model)
    with torch.no_grad():
        ref0 = head(norm(out.hidden_states[0][0])).float()
    assert (layer_logits(lm, run, 0, everywhere) - ref0).abs().max().item() <= 1e-5

    ll = logit_lens(lm, run, k=4)
    pos = run.map_positions
    assert np.array_equal(ll.positions, pos) and ll.ids.shape == (L + 1, len(pos), 4) == ll.probs.shape
    p_model = torch.softmax(logits[torch.as_tensor(pos)], -1)
    top = p_model.topk(4, dim=-1)
    assert np.array_equal(ll.ids[L], top.indices.numpy())
    assert np.abs(ll.probs[L] - top.values.numpy()).max() <= 1e-5
    # greedy generation: the last layer's top-1 at position p is the token at p + 1
    assert ll.target_ids[:-1].tolist() == run.token_ids[run.spans.n_prompt:]
    assert np.allclose(ll.target_probs[L], ll.probs[L, :, 0])
    p0 = torch.softmax(ref0[torch.as_tensor(pos)], -1)
    assert np.abs(ll.probs[0] - p0.topk(4, dim=-1).values.numpy()).max() <= 1e-5
    assert np.all(np.diff(ll.probs, axis=-1) <= 0) and np.all((ll.probs >= 0) & (ll.probs <= 1))
    assert ll.tokens[L, 0, 0] == lm.processor.tokenizer.convert_ids_to_tokens(int(ll.ids[L, 0, 0]))


def test_patch_lens_and_attach_round_trip(image, tmp_path):
    lm = random_lm("llava")
    run = vl.capture(lm, image, PROMPT, max_new_tokens=2)
    img = run.spans.positions("image")
    rows, cols = run.image_grid
    for layer in (0, 1, lm.n_layers):
        pl = patch_lens(lm, run, layer)
        lg = torch.softmax(layer_logits(lm, run, layer, img), -1)
        assert pl.ids.shape == (rows, cols) == pl.probs.shape == pl.tokens.shape
        assert np.array_equal(pl.ids, run.to_grid(lg.argmax(-1).numpy()).astype(np.int64))
        assert np.abs(pl.probs - run.to_grid(lg.max(-1).values.numpy())).max() <= 1e-6
    attach_logit_lens(lm, run, k=3)
    L1 = lm.n_layers + 1
    assert run.arrays["logit_lens_ids"].shape == (L1, len(run.map_positions), 3)
    assert run.arrays["patch_lens_ids"].shape == (L1, run.spans.n_image)
    back = vl.load_run(vl.save_run(run, tmp_path / "r"))
    a, b = logit_lens(lm, run, k=3), lens_from_run(back)
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.probs, b.probs) and np.array_equal(a.tokens, b.tokens)
    assert np.array_equal(a.target_ids, b.target_ids) and np.allclose(a.target_probs, b.target_probs)
    p1, p2 = patch_lens(lm, run, 1), patch_lens_from_run(back, 1)
    assert np.array_equal(p1.ids, p2.ids) and np.array_equal(p1.tokens, p2.tokens)
    bad = vl.capture(lm, image, PROMPT, max_new_tokens=1, store="none")
    with pytest.raises(KeyError):
        logit_lens(lm, bad)
    with pytest.raises(KeyError, match="attach_logit_lens"):
        lens_from_run(bad)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_end|>"])
    tk.train_from_iterator(["look at the café\nlook at it, naïve"] * 40, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_lens_tokens_read_as_text_for_byte_level_tokenizers(tiny):
    """#27: smol-shapes' lens showed raw byte-level tokens ("Ġat", "Ċ"). Reference: the tokenizer's own
    ByteLevel decoder, one token at a time."""
    from vlmlens.analysis.logit_lens import token_texts
    from vlmlens.figures.heatmaps import tok_label

    tok = _byte_level_tokenizer()
    ids = tok("look at the café\nlook at it, naïve<|im_end|>")["input_ids"]
    raw = tok.convert_ids_to_tokens(ids)
    assert "Ġat" in raw and any("Ċ" in t for t in raw)                     # what the lens used to show
    texts = token_texts(tok, ids)
    assert texts == [tok.decode([i]) for i in ids]
    assert " at" in texts and "<|im_end|>" in texts and "".join(texts) == "look at the café\nlook at it, naïve<|im_end|>"
    assert tok_label(" at") == "␣at" and tok_label("\n") == "↵"
    # a word-level tokenizer (tiny-shapes) is left as it is
    wl = tiny.processor.tokenizer
    some = wl("What color is the circle?", add_special_tokens=False)["input_ids"]
    assert token_texts(wl, some) == wl.convert_ids_to_tokens(some)
