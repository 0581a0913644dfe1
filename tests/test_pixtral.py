"""Mistral 3 (Pixtral's token layout) through vlmlens's torchvision-free processor."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmlens as vl
from vlmlens.models.families import get_arch
from vlmlens.models.pixtral_processor import PixtralProcessorPil
from vlmlens.models.tiny_random import build_random

from tests._models import random_lm

PROMPT = "What is in the image?"


def test_the_image_becomes_rows_of_tokens_each_ended_by_a_break():
    """A 96 x 64 picture on the tiny processor (longest edge 64 px, 16 px a token): scaled by 1/1.5 to 64 x 42, then
    up to whole tokens, 64 x 48 -> 3 rows of 4 [IMG], a [IMG_BREAK] after rows 1 and 2, [IMG_END] after row 3."""
    _, proc = build_random("mistral3")
    arch = get_arch("mistral3")
    inputs = arch.build_inputs(proc, Image.new("RGB", (96, 64), (200, 30, 30)), PROMPT)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 48, 64) and inputs["image_sizes"].tolist() == [[48, 64]]
    toks = proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    start = toks.index("[IMG]")
    row = ["[IMG]"] * 4
    assert toks[start:start + 15] == [*row, "[IMG_BREAK]", *row, "[IMG_BREAK]", *row, "[IMG_END]"]
    assert "[IMG]" not in toks[start + 15:]
    n = int((inputs["input_ids"] == proc.image_token_id).sum())
    info = arch.grid_info(inputs, n)
    assert (info.rows, info.cols, info.exact) == (3, 4, True)
    assert info.index_map().tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="does not match 11 image tokens"):
        arch.grid_info(inputs, 11)


def test_a_tall_picture_keeps_its_aspect_ratio_on_the_heatmap():
    """30 x 90 px: scaled by 1/1.40625 to 21 x 64, then up to whole tokens, 32 x 64 -> 4 rows of 2 tokens; the run
    draws them as a 4 x 2 raster, token i at divmod(i, 2)."""
    lm = random_lm("mistral3")
    run = vl.capture(lm, Image.new("RGB", (30, 90), (20, 200, 30)), PROMPT, max_new_tokens=2)
    assert run.image_grid == (4, 2) and run.meta["grid_order"] == "raster" and run.meta["grid_exact"]
    assert run.grid_index.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    ids = run.token_ids
    breaks = [i for i, t in enumerate(ids) if t == lm.processor.image_break_token_id]
    img = [i for i, t in enumerate(ids) if t == lm.processor.image_token_id]
    assert len(img) == 8 and len(breaks) == 3 and all(img[2 * r + 1] + 1 == breaks[r] for r in range(3))


def test_a_checkpoint_folder_naming_transformers_processor_loads_into_ours(tmp_path, image):
    """A real checkpoint's processor_config.json names PixtralProcessor (which needs torchvision here): the folder
    loads into PixtralProcessorPil and captures exactly as the built model does."""
    model, proc = build_random("mistral3")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    cfg = tmp_path / "processor_config.json"
    doc = json.loads(cfg.read_text())
    doc["processor_class"] = "PixtralProcessor"
    cfg.write_text(json.dumps(doc))
    lm = vl.load_model(str(tmp_path), device="cpu", dtype="float32")
    assert isinstance(lm.processor, PixtralProcessorPil) and lm.family == "mistral3"
    ref = random_lm("mistral3")
    lm.model.generation_config.suppress_tokens = ref.model.generation_config.suppress_tokens
    a = vl.capture(lm, image, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    b = vl.capture(ref, image, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    assert a.token_ids == b.token_ids
    assert np.abs(a.hidden_states - b.hidden_states).max() <= 1e-5


def test_a_batch_pads_each_picture_below_and_to_the_right_only():
    from vlmlens.experiments.batch import _pad_pixels

    a, b = torch.ones(1, 3, 2, 4), torch.full((1, 3, 3, 2), 2.0)
    pa, pb = _pad_pixels([a, b])
    assert pa.shape == pb.shape == (1, 3, 3, 4)
    assert torch.equal(pa[..., :2, :4], a) and pa[..., 2:, :].abs().sum() == 0
    assert torch.equal(pb[..., :3, :2], b) and pb[..., :, 2:].abs().sum() == 0


def _llava_pixtral(tmp_path):
    """Pixtral-12B's structure, tiny: LLaVA's classes over a Pixtral tower (no patch merger: 8 px a token here),
    saved as the checkpoint is, its processor files naming transformers' PixtralProcessor."""
    import transformers

    from vlmlens.models.offline_text import chat_template, make_tokenizer

    tok = make_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
    tpl = chat_template(start="<s>", roles={"user": ("[INST]", "[/INST]"), "assistant": ("", "</s>"),
                                            "system": ("", "\n\n")}, image="[IMG]", generation_prompt="")
    proc = PixtralProcessorPil(image_processor=transformers.PixtralImageProcessorPil(size={"longest_edge": 64},
                                                                                     patch_size=8),
                               tokenizer=tok, patch_size=8, spatial_merge_size=1, chat_template=tpl)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, head_dim=16, image_size=64, patch_size=8)
    text = transformers.MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=proc.image_token_id,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    cfg = tmp_path / "processor_config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), processor_class="PixtralProcessor")))
    return vl.load_model(str(tmp_path), device="cpu", dtype="float32")


def test_a_llava_checkpoint_with_a_pixtral_tower_reads_as_pixtral(tmp_path):
    """72 x 56 px on longest edge 64, 8 px a token: 64 x 49 -> whole tokens 64 x 56 -> 7 rows of 8 tokens, drawn on
    the picture's own aspect ratio (not LLaVA's square); the lens's forward equals the plain model's."""
    lm = _llava_pixtral(tmp_path)
    assert lm.family == "llava" and isinstance(lm.processor, PixtralProcessorPil)
    pic = Image.fromarray(np.random.default_rng(3).integers(0, 255, (56, 72, 3), dtype=np.uint8))
    run = vl.capture(lm, pic, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    assert run.image_grid == (7, 8) and run.meta["grid_exact"] and len(run.spans.image_positions) == 56
    inputs = lm.arch.build_inputs(lm.processor, pic, PROMPT)
    with torch.no_grad():
        plain = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.token_ids == plain[0].tolist()


def test_a_batch_of_pictures_of_different_sizes_equals_one_at_a_time_on_a_pixtral_llava(tmp_path):
    from vlmlens.experiments.engine import Trial, truncation
    from vlmlens.experiments.batch import BatchTrial
    from vlmlens.interventions import Truncate

    lm = _llava_pixtral(tmp_path)
    rng = np.random.default_rng(4)
    pairs = [(Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)), p)
             for s, p in [((48, 48, 3), "What is this?"), ((32, 80, 3), "Colour of the thing on the left, please?")]]
    bs = BatchTrial(lm, pairs, max_new_tokens=3, baseline=[truncation(lm.n_layers, "drop")])
    assert bs.inputs["pixel_values"].shape[-2:] == (48, 64)        # 48 x 48 and 32 x 64 pictures, padded to one size
    for b, (im, pr) in enumerate(pairs):
        one = Trial(lm, im, pr, max_new_tokens=3, baseline=[truncation(lm.n_layers, "drop")])
        assert bs.baseline.generated_ids[b] == one.baseline.generated_ids
        v, o = bs.evaluate([Truncate(1)]), one.evaluate([Truncate(1)])
        assert v.generated_ids[b] == o.generated_ids
        T = len(one.baseline.generated_ids)
        assert float((v.step_logprobs[b] - o.step_logprobs[:T + 1]).abs().max()) <= 1e-4


def test_lighton_ocr_expands_the_image_to_a_plain_raster_and_its_folder_loads(tmp_path):
    """LightOnOCR (transformers' own processor, which needs no torchvision): the same 96 x 64 picture as above ->
    64 x 48 -> 3 x 4 = 12 image tokens in a row, no break or end token; its saved folder loads and captures as the
    built model."""
    import transformers

    model, proc = build_random("lighton_ocr")
    inputs = get_arch("lighton_ocr").build_inputs(proc, Image.new("RGB", (96, 64), (200, 30, 30)), PROMPT)
    toks = proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    start = toks.index("<|image_pad|>")
    assert toks[start:start + 12] == ["<|image_pad|>"] * 12 and toks.count("<|image_pad|>") == 12
    assert "<|vision_pad|>" not in toks and "<|vision_end|>" not in toks
    assert get_arch("lighton_ocr").grid_info(inputs, 12).index_map().shape == (3, 4)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    lm = vl.load_model(str(tmp_path), device="cpu", dtype="float32")
    assert type(lm.processor) is transformers.LightOnOcrProcessor
    ref = random_lm("lighton_ocr")
    lm.model.generation_config.suppress_tokens = ref.model.generation_config.suppress_tokens
    pic = Image.new("RGB", (40, 70), (10, 90, 200))
    a = vl.capture(lm, pic, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    b = vl.capture(ref, pic, PROMPT, max_new_tokens=3, hidden_dtype="float32")
    assert a.token_ids == b.token_ids and np.abs(a.hidden_states - b.hidden_states).max() <= 1e-5
