"""Tiny random models: real transformers classes, offline processors, SDPA == eager."""

import functools
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmlens.models.families import get_arch
from vlmlens.models.pixtral_processor import PixtralProcessorPil

from vlmlens.models.tiny_random import FAMILIES, build_random

torch.set_num_threads(2)

PROMPT = "What is in the image?"
CONV = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]

MODEL_CLASS = {
    "llava": transformers.LlavaForConditionalGeneration,
    "llava_next": transformers.LlavaNextForConditionalGeneration,
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "internvl": transformers.InternVLForConditionalGeneration,
    "idefics3": transformers.Idefics3ForConditionalGeneration,
    "gemma3": transformers.Gemma3ForConditionalGeneration,
    "smolvlm": transformers.SmolVLMForConditionalGeneration,
    "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
    "aya_vision": transformers.AyaVisionForConditionalGeneration,
    "glm4v": transformers.Glm4vForConditionalGeneration,
    "paligemma": transformers.PaliGemmaForConditionalGeneration,
    "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    "glm46v": transformers.Glm46VForConditionalGeneration,
    "glm4v_moe": transformers.Glm4vMoeForConditionalGeneration,
    "vipllava": transformers.VipLlavaForConditionalGeneration,
    "llava_next_video": transformers.LlavaNextVideoForConditionalGeneration,
    "video_llava": transformers.VideoLlavaForConditionalGeneration,
    "deepseek_vl": transformers.DeepseekVLForConditionalGeneration,
    "janus": transformers.JanusForConditionalGeneration,
    "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
    "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration,
    "mllama": transformers.MllamaForConditionalGeneration,
    "mistral3": transformers.Mistral3ForConditionalGeneration,
    "glm_ocr": transformers.GlmOcrForConditionalGeneration,
    "lighton_ocr": transformers.LightOnOcrForConditionalGeneration,
    "paddleocr_vl": transformers.PaddleOCRVLForConditionalGeneration,
}
PROCESSOR_CLASS = {
    "llava": transformers.LlavaProcessor,
    "llava_next": transformers.LlavaNextProcessor,
    "qwen2_vl": transformers.Qwen2VLProcessor,
    "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
    "internvl": transformers.InternVLProcessor,
    "idefics3": transformers.Idefics3Processor,
    "gemma3": transformers.Gemma3Processor,
    "smolvlm": transformers.SmolVLMProcessor,
    "llava_onevision": transformers.LlavaOnevisionProcessor,
    "aya_vision": transformers.AyaVisionProcessor,
    "glm4v": transformers.Glm4vProcessor,
    "paligemma": transformers.PaliGemmaProcessor,
    "qwen3_vl": transformers.Qwen3VLProcessor,
    "qwen3_vl_moe": transformers.Qwen3VLProcessor,
    "glm46v": transformers.Glm46VProcessor,
    "glm4v_moe": transformers.Glm4vProcessor,
    "vipllava": transformers.LlavaProcessor,
    "llava_next_video": transformers.LlavaNextVideoProcessor,
    "video_llava": transformers.VideoLlavaProcessor,
    "deepseek_vl": transformers.DeepseekVLProcessor,
    "janus": transformers.JanusProcessor,
    "qwen3_5": transformers.Qwen3VLProcessor,
    "qwen3_5_moe": transformers.Qwen3VLProcessor,
    "mllama": transformers.MllamaProcessor,
    "mistral3": PixtralProcessorPil,          # transformers' PixtralProcessor needs torchvision
    "glm_ocr": transformers.Glm46VProcessor,
    "lighton_ocr": transformers.LightOnOcrProcessor,
    "paddleocr_vl": transformers.PaddleOCRVLProcessor,
}
# placeholder the chat template inserts for one image (the processor expands it)
TEMPLATE_IMAGE = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
    "idefics3": "<image>",
    "gemma3": "<start_of_image>",
    "smolvlm": "<image>",
    "llava_onevision": "<image>",
    "aya_vision": "<image>",
    "glm4v": "<|begin_of_image|><|image|><|end_of_image|>",
    "paligemma": None,
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "glm46v": "<|begin_of_image|><|image|><|end_of_image|>",
    "glm4v_moe": "<|begin_of_image|><|image|><|end_of_image|>",
    "vipllava": "<image>",
    "llava_next_video": "<image>",
    "video_llava": "<image>",
    "deepseek_vl": "<image_placeholder>",
    "janus": "<image_placeholder>",
    "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_5_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "mllama": "<|image|>",
    "mistral3": "[IMG]",
    "glm_ocr": "<|begin_of_image|><|image|><|end_of_image|>",
    "lighton_ocr": "<|image_pad|>",
    "paddleocr_vl": "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
}


@functools.lru_cache(maxsize=None)
def tiny(family):
    return build_random(family)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (56, 72, 3), dtype=np.uint8))


def _inputs(family, image):
    """What the family's Arch builds (the chat template, or PaliGemma's plain prompt)."""
    from vlmlens.models.families import get_arch

    _, proc = tiny(family)
    return get_arch(family).build_inputs(proc, image, PROMPT)


def test_families_listed():
    assert FAMILIES == ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "gemma3", "smolvlm",
                        "llava_onevision", "aya_vision", "glm4v", "paligemma", "qwen3_vl", "qwen3_vl_moe", "glm46v",
                        "glm4v_moe", "vipllava", "llava_next_video", "video_llava", "deepseek_vl", "janus",
                        "qwen3_5", "qwen3_5_moe", "mllama", "mistral3", "glm_ocr",
                        "lighton_ocr", "paddleocr_vl")


def test_unknown_family_names_supported_ones():
    with pytest.raises(ValueError) as e:
        build_random("blip2")
    msg = str(e.value)
    assert "blip2" in msg
    for f in FAMILIES:
        assert f in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_real_classes_and_tiny_sizes(family):
    model, proc = tiny(family)
    assert type(model) is MODEL_CLASS[family]
    assert isinstance(proc, PROCESSOR_CLASS[family])
    # PIL/numpy image processor, not the torchvision-backed default (Video-LLaVA's only one is PIL-backed)
    name = type(proc.image_processor).__name__
    assert name.endswith("ImageProcessorPil") or name == "VideoLlavaImageProcessor"
    assert "torchvision" not in sys.modules
    tc = model.config.text_config
    assert 2 <= tc.num_hidden_layers <= 4 and 32 <= tc.hidden_size <= 64 and 2 <= tc.num_attention_heads <= 4
    assert tc.vocab_size == len(proc.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_some_family_uses_gqa():
    gqa = [f for f in FAMILIES if tiny(f)[0].config.text_config.num_key_value_heads
           < tiny(f)[0].config.text_config.num_attention_heads]  # fmt: skip
    assert len(gqa) >= 1, gqa


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_is_word_level_with_family_specials(family):
    _, proc = tiny(family)
    tok = proc.tokenizer
    ids = tok("the red circle is left of the blue square", add_special_tokens=False).input_ids
    assert len(ids) == 9 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "the red circle is left of the blue square"
    assert tok("Zyzzyva", add_special_tokens=False).input_ids == [tok.unk_token_id]
    # every special token of the template is one id, never split into "<", "image", ">"
    for piece in ["<image>", "<|image_pad|>", "<IMG_CONTEXT>", "<start_of_image>", "<row_2_col_3>"]:
        if piece in tok.get_vocab():
            assert tok(piece, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(piece)]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(family):
    from vlmlens.models.families import get_arch

    _, proc = tiny(family)
    if not get_arch(family).chat:              # PaliGemma: no chat template; the processor frames the prompt
        assert proc.chat_template is None
        ids = proc(images=[Image.new("RGB", (40, 40))], text=[PROMPT], return_tensors="pt")["input_ids"][0]
        toks = proc.tokenizer.convert_ids_to_tokens(ids)
        assert toks[0] == "<image>" and "<bos>" in toks and toks[-1] == "\n"
        return
    text = proc.apply_chat_template(CONV, add_generation_prompt=True)
    assert isinstance(text, str)
    assert text.count(TEMPLATE_IMAGE[family]) == 1
    assert PROMPT in text
    no_gen = proc.apply_chat_template(CONV, add_generation_prompt=False)
    assert len(no_gen) <= len(text) and no_gen.count(TEMPLATE_IMAGE[family]) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits_finite_and_image_matters(family, image):
    model, proc = tiny(family)
    inputs = _inputs(family, image)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    # (a cross-attention model holds one placeholder; its image is read as keys of the cross-attention layers)
    assert 4 <= n_img <= 128 or (n_img == 1 and get_arch(family).cross_attention)
    with torch.no_grad():
        logits = model(**inputs).logits
        other = Image.fromarray(255 - np.asarray(image))
        logits2 = model(**_inputs(family, other)).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(logits).all()
    if logits2.shape == logits.shape:
        assert (logits - logits2).abs().max() > 1e-3  # the image reaches the language model


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_sdpa_equals_eager(family, image):
    model, _ = tiny(family)
    inputs = _inputs(family, image)
    assert model.config.text_config._attn_implementation == "sdpa"
    try:
        with torch.no_grad():
            sdpa_logits = model(**inputs).logits
            sdpa = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            model.set_attn_implementation("eager")
            assert model.config.text_config._attn_implementation == "eager"
            eager_logits = model(**inputs).logits
            eager = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    n = inputs["input_ids"].shape[1]
    assert sdpa.shape[1] > n
    assert torch.equal(sdpa, eager)
    assert (sdpa_logits - eager_logits).abs().max() < 1e-4


def test_eager_at_build_and_seed_determinism():
    a, _ = build_random("llava", seed=3, attn_implementation="eager")
    b, _ = build_random("llava", seed=3)
    c, _ = build_random("llava", seed=4)
    assert a.config.text_config._attn_implementation == "eager"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random("gemma3", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_processor_without_video_round_trips(tmp_path):
    _, proc = tiny("qwen2_vl")
    proc.save_pretrained(tmp_path)
    again = type(proc).from_pretrained(tmp_path)
    from vlmlens.models.tiny_processors import NO_VIDEO

    assert isinstance(again, transformers.Qwen2VLProcessor) and again.video_processor is NO_VIDEO
    with pytest.raises(ValueError, match="loaded without its video processor"):
        again(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 40, 40, 3), np.uint8)])
    text = again.apply_chat_template(CONV, add_generation_prompt=True)
    img = Image.new("RGB", (40, 40), (200, 10, 10))
    a = again(images=[img], text=[text], return_tensors="pt")
    b = proc(images=[img], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
