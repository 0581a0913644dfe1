"""Tiny random-weight vision-language models of the real transformers classes, built fully offline.

``build_random(family)`` returns ``(model, processor)``: the family's real ``*ForConditionalGeneration``
class with a few-layer, 64-wide decoder and a 2-layer vision tower, plus the family's own processor
(see ``tiny_processors``). Weights are random (``torch.manual_seed(seed)``), so outputs are noise, but
shapes, token layouts, attention paths and generation behave exactly as for the full-size models.

Sizes (one square test image, e.g. 224x224):

================  ===========================  =====================================================
family            vision input                 image tokens in ``input_ids``
================  ===========================  =====================================================
llava             48 px, patch 8               36 (6x6 raster)
llava_next        32 px tiles, patch 8,        16 base (4x4) + anyres grid with a newline column,
                  pinpoints 32x64/64x32/64x64  e.g. 8x(8+1)=72 for a square image -> 88
qwen2_vl          patch 8, merge 2,            (h/16)x(w/16) raster; 224x224 -> 96x96 -> 6x6 = 36
                  32^2..96^2 pixels
qwen2_5_vl        same as qwen2_vl             same
internvl          64 px tiles, patch 8,        16 per tile (4x4); square image -> 2x2 tiles +
                  max 4 tiles + thumbnail      thumbnail = 80
idefics3          64 px tiles, patch 8,        16 per tile (4x4); square image -> 128x128 -> 2x2
                  longest edge 128             tiles + global = 80
gemma3            64 px, patch 8, pooled       16 (4x4 raster)
smolvlm           as idefics3                  as idefics3 (SmolVLM's own classes)
llava_onevision   32 px tiles, patch 8         as llava_next ("full" features: SigLIP has no CLS)
aya_vision        64 px tiles, patch 8,        16 per tile (4x4); tiles + global, as internvl
                  pixel shuffle 2, max 4 tiles
glm4v             as qwen2_vl                  as qwen2_vl (GLM-4V's classes, partial rotary M-RoPE)
paligemma         64 px, patch 16              16 (4x4 raster), before <bos> and the prompt (prefix-LM)
qwen3_vl(_moe)    as qwen2_vl, 3 tower layers  as qwen2_vl; DeepStack adds tower layers 0, 1 to decoder layers 0, 1
glm46v, glm4v_moe as glm4v                     as glm4v
glm_ocr           as glm4v                     as glm4v (GLM-OCR's classes, GLM-4.6V's processor)
vipllava          as llava                     as llava (features of the last two tower layers)
llava_next_video  as llava_next                as llava_next (images; its video input is not read)
video_llava       as llava (its image tower)   as llava
deepseek_vl       64 px, patch 16 (SigLIP)     16 (4x4 raster)
janus             as deepseek_vl               as deepseek_vl (its VQ image-generation model is built, not read)
qwen3_5(_moe)     as qwen2_vl                  as qwen2_vl; 4 decoder layers: linear attention in 0 and 2
mllama            32 px tiles, patch 8,        one <|image|> token; cross-attention layers 1 and 3 read
                  up to 2 tiles                2 tiles x (16 patches + CLS) = 34 keys
mistral3          longest edge 64 px, patch 8, (h/16)x(w/16) raster, each row but the last followed by
                  2x2 patch merge              [IMG_BREAK], the last by [IMG_END]; square -> 4x4 = 16
lighton_ocr       as mistral3                  (h/16)x(w/16) raster, no break tokens (Qwen3 language model)
paddleocr_vl      as qwen2_vl (one frame)      as qwen2_vl (SigLIP-style tower, Ernie 4.5 language model)
================  ===========================  =====================================================
"""

from __future__ import annotations

import torch
import transformers

from .tiny_configs import tiny_config
from .tiny_processors import TinyProcessorSpec, build_processor

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "gemma3",
                             "smolvlm", "llava_onevision", "aya_vision", "glm4v", "paligemma", "qwen3_vl",
                             "qwen3_vl_moe", "glm46v", "glm4v_moe", "vipllava", "llava_next_video",
                             "video_llava", "deepseek_vl", "janus", "qwen3_5", "qwen3_5_moe", "mllama", "mistral3", "glm_ocr",
                             "lighton_ocr", "paddleocr_vl")

def _spec(family: str) -> TinyProcessorSpec:
    if family in ("llava", "vipllava", "video_llava"):
        return TinyProcessorSpec(family, image_size=48, patch_size=8)
    if family in ("llava_next", "llava_next_video"):
        return TinyProcessorSpec(
            family, image_size=32, patch_size=8, extra={"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}
        )
    if family == "aya_vision":
        # 64 px tiles, 8x8 patches pixel-shuffled by 2 -> 4x4 = 16 tokens per tile, up to 4 tiles + global
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"max_patches": 4})
    if family == "llava_onevision":
        return TinyProcessorSpec(family, image_size=32, patch_size=8, image_seq_len=16,
                                 extra={"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]})
    if family in ("qwen2_vl", "qwen2_5_vl", "glm4v", "qwen3_vl", "qwen3_vl_moe", "glm46v", "glm4v_moe", "glm_ocr",
                  "paddleocr_vl", "qwen3_5",
                  "qwen3_5_moe"):
        extra = {"merge_size": 2, "temporal_patch_size": 2, "min_pixels": 32 * 32, "max_pixels": 96 * 96}
        return TinyProcessorSpec(family, image_size=0, patch_size=8, extra=extra)
    if family == "internvl":
        # 64/8 = 8x8 patches, pixel-shuffled by 0.5 -> 4x4 = 16 tokens per tile
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"max_patches": 4})
    if family in ("idefics3", "smolvlm"):
        # 8x8 patches, scale_factor 2 -> 16 tokens per tile
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"longest_edge": 128})
    if family in ("paligemma", "deepseek_vl", "janus"):
        # 64 px, patch 16 -> 4x4 = 16 tokens
        return TinyProcessorSpec(family, image_size=64, patch_size=16, image_seq_len=16)
    if family == "gemma3":
        # 8x8 patches average-pooled 2x2 -> 4x4 = 16 tokens
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16)
    if family == "mllama":
        return TinyProcessorSpec(family, image_size=32, patch_size=8, extra={"tiles": 2})
    if family in ("mistral3", "lighton_ocr"):
        # longest edge 64 px, patch 8, 2x2 merge -> 16 px a token: a square image -> 4x4 = 16 tokens
        return TinyProcessorSpec(family, image_size=64, patch_size=8, extra={"merge_size": 2})
    raise ValueError(f"unknown family {family!r}; supported families: {', '.join(FAMILIES)}")


_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "aya_vision": "AyaVisionForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "glm46v": "Glm46VForConditionalGeneration",
    "glm4v_moe": "Glm4vMoeForConditionalGeneration",
    "vipllava": "VipLlavaForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "video_llava": "VideoLlavaForConditionalGeneration",
    "deepseek_vl": "DeepseekVLForConditionalGeneration",
    "janus": "JanusForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "glm_ocr": "GlmOcrForConditionalGeneration",
    "lighton_ocr": "LightOnOcrForConditionalGeneration",
    "paddleocr_vl": "PaddleOCRVLForConditionalGeneration",
}


def build_random(family: str, *, seed: int = 0, attn_implementation: str | None = None,
                 text_overrides: dict | None = None):
    """Build ``(model, processor)`` for ``family`` (one of ``FAMILIES``) with random float32 weights.

    The model is in eval mode. ``attn_implementation`` (``"sdpa"`` default, or ``"eager"``) is applied
    to the whole model; it can also be switched later with ``model.set_attn_implementation``.
    ``text_overrides`` sets fields of the text config before the model is built (e.g. more layers
    with ``num_hidden_layers`` + ``layer_types``, or a small ``sliding_window``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported families: {', '.join(FAMILIES)}")
    spec = _spec(family)
    processor = build_processor(spec)
    config = tiny_config(family, spec, processor)
    for key, value in (text_overrides or {}).items():
        if not hasattr(config.text_config, key):
            raise ValueError(f"{type(config.text_config).__name__} has no field {key!r}")
        setattr(config.text_config, key, value)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    cls = getattr(transformers, _MODEL_CLASSES[family])
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG state
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
        if family == "gemma3":
            # Gemma3's _init_weights zeroes the image projection, which would hide the image from the LM.
            with torch.no_grad():
                torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
        if family == "mllama":
            # the cross-attention gates start at 0 (tanh(0) = 0: the image would be read and never added)
            with torch.no_grad():
                for layer in model.model.language_model.layers:
                    for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                        if hasattr(layer, name):
                            getattr(layer, name).fill_(0.8)
    gen = model.generation_config
    gen.pad_token_id = processor.tokenizer.pad_token_id
    gen.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor
