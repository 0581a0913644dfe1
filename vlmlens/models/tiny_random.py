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
================  ===========================  =====================================================
"""

from __future__ import annotations

import torch
import transformers

from .tiny_processors import TinyProcessorSpec, build_processor

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "gemma3",
                             "smolvlm", "llava_onevision", "aya_vision", "glm4v", "paligemma")

# Shared decoder shape: 64 wide, 4 heads of 16.
_HIDDEN, _HEADS, _INTER = 64, 4, 128


def _text_kwargs(tok, *, layers: int = 2, kv_heads: int = _HEADS) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=_HIDDEN,
        intermediate_size=_INTER,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )


def _vision_kwargs(image_size: int, patch_size: int) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _spec(family: str) -> TinyProcessorSpec:
    if family == "llava":
        return TinyProcessorSpec(family, image_size=48, patch_size=8)
    if family == "llava_next":
        return TinyProcessorSpec(
            family, image_size=32, patch_size=8, extra={"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}
        )
    if family == "aya_vision":
        # 64 px tiles, 8x8 patches pixel-shuffled by 2 -> 4x4 = 16 tokens per tile, up to 4 tiles + global
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"max_patches": 4})
    if family == "llava_onevision":
        return TinyProcessorSpec(family, image_size=32, patch_size=8, image_seq_len=16,
                                 extra={"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]})
    if family in ("qwen2_vl", "qwen2_5_vl", "glm4v"):
        extra = {"merge_size": 2, "temporal_patch_size": 2, "min_pixels": 32 * 32, "max_pixels": 96 * 96}
        return TinyProcessorSpec(family, image_size=0, patch_size=8, extra=extra)
    if family == "internvl":
        # 64/8 = 8x8 patches, pixel-shuffled by 0.5 -> 4x4 = 16 tokens per tile
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"max_patches": 4})
    if family in ("idefics3", "smolvlm"):
        # 8x8 patches, scale_factor 2 -> 16 tokens per tile
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16, extra={"longest_edge": 128})
    if family == "paligemma":
        # 64 px, patch 16 -> 4x4 = 16 tokens
        return TinyProcessorSpec(family, image_size=64, patch_size=16, image_seq_len=16)
    if family == "gemma3":
        # 8x8 patches average-pooled 2x2 -> 4x4 = 16 tokens
        return TinyProcessorSpec(family, image_size=64, patch_size=8, image_seq_len=16)
    raise ValueError(f"unknown family {family!r}; supported families: {', '.join(FAMILIES)}")


def _config(family: str, spec: TinyProcessorSpec, processor):
    tok = processor.tokenizer
    s, p = spec.image_size, spec.patch_size
    if family in ("llava", "llava_next"):
        n_patches = (s // p) ** 2
        kw = dict(
            vision_config=transformers.CLIPVisionConfig(**_vision_kwargs(s, p), projection_dim=32),
            text_config=transformers.LlamaConfig(**_text_kwargs(tok, layers=2)),
            image_token_index=processor.image_token_id,
            image_seq_length=n_patches,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        if family == "llava":
            return transformers.LlavaConfig(**kw)
        return transformers.LlavaNextConfig(**kw, image_grid_pinpoints=spec.extra["image_grid_pinpoints"])
    if family == "aya_vision":
        text = _text_kwargs(tok, layers=2, kv_heads=2)
        text_cfg = transformers.Cohere2Config(**text, layer_types=["sliding_attention", "full_attention"],
                                              sliding_window=512)
        return transformers.AyaVisionConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)), text_config=text_cfg,
            image_token_index=processor.image_token_id, downsample_factor=2, tie_word_embeddings=False,
        )  # fmt: skip
    if family == "glm4v":
        # head_dim 16, half of it rotary -> 4 frequencies split over (temporal, height, width)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
        text = {k: v for k, v in _text_kwargs(tok, layers=2, kv_heads=2).items()
                if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")}
        vision = transformers.Glm4vVisionConfig(depth=2, hidden_size=32, num_heads=2, patch_size=p, spatial_merge_size=2,
                                                temporal_patch_size=2, out_hidden_size=_HIDDEN, intermediate_size=64,
                                                image_size=64)
        marks = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in (
            ("image", "<|image|>"), ("video", "<|video|>"), ("image_start", "<|begin_of_image|>"),
            ("image_end", "<|end_of_image|>"), ("video_start", "<|begin_of_video|>"), ("video_end", "<|end_of_video|>"))}
        return transformers.Glm4vConfig(text_config=transformers.Glm4vTextConfig(**text, rope_parameters=rope),
                                        vision_config=vision, tie_word_embeddings=False, **marks)
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)),
            text_config=transformers.Qwen2Config(**_text_kwargs(tok, layers=2, kv_heads=2)),
            image_token_index=processor.image_token_id, vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=spec.extra["image_grid_pinpoints"], tie_word_embeddings=False,
        )  # fmt: skip
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # head_dim 16 -> rotary half-dim 8 split over (temporal, height, width)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = _text_kwargs(tok, layers=2, kv_heads=2)
        ids = dict(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        common_v = dict(depth=2, num_heads=2, in_channels=3, patch_size=p, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = transformers.Qwen2VLVisionConfig(**common_v, embed_dim=32, hidden_size=_HIDDEN, mlp_ratio=2)
            text_cfg = transformers.Qwen2VLTextConfig(**text, rope_parameters=rope)
            return transformers.Qwen2VLConfig(vision_config=vision, text_config=text_cfg, **ids)
        vision = transformers.Qwen2_5_VLVisionConfig(
            **common_v, hidden_size=32, intermediate_size=64, out_hidden_size=_HIDDEN,
            window_size=2 * p * 2, fullatt_block_indexes=[1],
        )  # fmt: skip
        text_cfg = transformers.Qwen2_5_VLTextConfig(**text, rope_parameters=rope)
        return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text_cfg, **ids)
    if family == "internvl":
        vision = transformers.InternVLVisionConfig(**_vision_kwargs(s, p))
        return transformers.InternVLConfig(
            vision_config=vision,
            text_config=transformers.Qwen2Config(**_text_kwargs(tok, layers=3, kv_heads=2)),
            image_token_id=processor.image_token_id,
            image_seq_length=spec.image_seq_len,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if family in ("idefics3", "smolvlm"):
        cfg, vis = ((transformers.Idefics3Config, transformers.Idefics3VisionConfig) if family == "idefics3"
                    else (transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig))
        return cfg(
            vision_config=vis(**_vision_kwargs(s, p)),
            text_config=transformers.LlamaConfig(**_text_kwargs(tok, layers=2)),
            image_token_id=processor.image_token_id,
            scale_factor=2,
            pad_token_id=tok.pad_token_id,
        )
    if family == "paligemma":
        text = _text_kwargs(tok, layers=2, kv_heads=2)
        text.update(head_dim=_HIDDEN // _HEADS)
        return transformers.PaliGemmaConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)),
            text_config=transformers.GemmaConfig(**text), image_token_index=processor.image_token_id,
            projection_dim=_HIDDEN, hidden_size=_HIDDEN, tie_word_embeddings=False,
        )  # fmt: skip
    if family == "gemma3":
        text = _text_kwargs(tok, layers=2, kv_heads=2)
        text.update(head_dim=_HIDDEN // _HEADS, query_pre_attn_scalar=_HIDDEN // _HEADS, sliding_window=512)
        text["layer_types"] = ["sliding_attention", "full_attention"]
        return transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**text),
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)),
            mm_tokens_per_image=spec.image_seq_len,
            boi_token_index=tok.boi_token_id,
            eoi_token_index=tok.eoi_token_id,
            image_token_index=tok.image_token_id,
            tie_word_embeddings=False,
        )
    raise AssertionError(family)


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
    config = _config(family, spec, processor)
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
    gen = model.generation_config
    gen.pad_token_id = processor.tokenizer.pad_token_id
    gen.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor
