"""Tiny configs of each family's real transformers config classes (see ``tiny_random``)."""

from __future__ import annotations

import transformers

from .tiny_processors import TinyProcessorSpec

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


def tiny_config(family: str, spec: TinyProcessorSpec, processor):
    """The family's config: a 64-wide decoder of a few layers and a 2-layer vision tower."""
    tok = processor.tokenizer
    s, p = spec.image_size, spec.patch_size
    if family in ("llava", "llava_next", "llava_next_video", "vipllava", "video_llava"):
        kw = dict(
            vision_config=transformers.CLIPVisionConfig(**_vision_kwargs(s, p), projection_dim=32),
            text_config=transformers.LlamaConfig(**_text_kwargs(tok, layers=2)),
            image_token_index=processor.image_token_id,
            image_seq_length=(s // p) ** 2,
        )
        if family == "vipllava":      # features of the last two tower layers, concatenated (CLS dropped)
            return transformers.VipLlavaConfig(**kw, vision_feature_layers=[-2, -1])
        kw.update(vision_feature_select_strategy="default", vision_feature_layer=-2)
        if family == "llava":
            return transformers.LlavaConfig(**kw)
        if family == "video_llava":     # the image tower (its video tower reads the frames)
            return transformers.VideoLlavaConfig(**kw, video_token_index=tok.convert_tokens_to_ids("<video>"))
        if family == "llava_next_video":
            return transformers.LlavaNextVideoConfig(**kw, image_grid_pinpoints=spec.extra["image_grid_pinpoints"],
                                                     video_token_index=tok.convert_tokens_to_ids("<video>"))
        return transformers.LlavaNextConfig(**kw, image_grid_pinpoints=spec.extra["image_grid_pinpoints"])
    if family == "aya_vision":
        text = _text_kwargs(tok, layers=2, kv_heads=2)
        text_cfg = transformers.Cohere2Config(**text, layer_types=["sliding_attention", "full_attention"],
                                              sliding_window=512)
        return transformers.AyaVisionConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)), text_config=text_cfg,
            image_token_index=processor.image_token_id, downsample_factor=2, tie_word_embeddings=False,
        )  # fmt: skip
    if family in ("glm4v", "glm46v", "glm4v_moe", "glm_ocr"):
        return _glm4v(family, tok, p)
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)),
            text_config=transformers.Qwen2Config(**_text_kwargs(tok, layers=2, kv_heads=2)),
            image_token_index=processor.image_token_id, vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=spec.extra["image_grid_pinpoints"], tie_word_embeddings=False,
        )  # fmt: skip
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_vl(family, tok)
    if family in ("qwen3_5", "qwen3_5_moe"):
        return _qwen3_5(family, tok)
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
    if family == "deepseek_vl":
        return transformers.DeepseekVLConfig(
            vision_config=transformers.SiglipVisionConfig(**_vision_kwargs(s, p)),
            text_config=transformers.LlamaConfig(**_text_kwargs(tok, layers=2)),
            image_token_id=processor.image_token_id, tie_word_embeddings=False)
    if family == "janus":       # the understanding path, plus the small VQ model the class always builds
        vision = transformers.JanusVisionConfig(**_vision_kwargs(s, p), mlp_ratio=2.0, projection_dim=_HIDDEN,
                                                num_image_tokens=spec.image_seq_len)
        vq = transformers.JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, base_channels=32,
                                           channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=_HIDDEN,
                                           image_token_embed_dim=_HIDDEN, num_patches=16, resolution=16)
        return transformers.JanusConfig(vision_config=vision, vq_config=vq,
                                        text_config=transformers.LlamaConfig(**_text_kwargs(tok, layers=2)),
                                        image_token_id=tok.image_token_id, tie_word_embeddings=False)
    if family == "mllama":
        # 32 px tiles of 8 px patches (16 + CLS, padded to 24 per tile), up to 2 tiles; decoder layers 1 and 3
        # are gated cross-attention layers (the image's keys never enter the self-attention stream)
        vision = transformers.MllamaVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
            vision_output_dim=32 * 3, image_size=s, patch_size=p, max_num_tiles=spec.extra["tiles"],
            intermediate_layers_indices=[0, 1], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
        text = transformers.MllamaTextConfig(**_text_kwargs(tok, layers=4, kv_heads=2), cross_attention_layers=[1, 3])
        return transformers.MllamaConfig(vision_config=vision, text_config=text,
                                         image_token_index=processor.image_token_id)
    if family in ("mistral3", "lighton_ocr"):
        # Pixtral tower (2D rotary positions, one sequence of every image's patches) and Mistral's patch merger
        # (2x2 patches -> one token), over a Mistral (Mistral 3) or Qwen3 (LightOnOCR) language model
        vision = transformers.PixtralVisionConfig(**_vision_kwargs(s, p), head_dim=16)
        common = dict(vision_config=vision, spatial_merge_size=spec.extra["merge_size"], tie_word_embeddings=False)
        if family == "mistral3":     # the language model reads the last tower layer
            return transformers.Mistral3Config(
                **common, text_config=transformers.MistralConfig(**_text_kwargs(tok, layers=2, kv_heads=2)),
                image_token_index=processor.image_token_id, vision_feature_layer=-1)
        text = transformers.Qwen3Config(**_text_kwargs(tok, layers=2, kv_heads=2), head_dim=_HIDDEN // _HEADS)
        return transformers.LightOnOcrConfig(**common, text_config=text, image_token_id=processor.image_token_id)
    if family == "paddleocr_vl":     # Qwen2-VL's layout: a SigLIP-style tower with 2D rotary, Ernie 4.5 decoder
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = transformers.PaddleOCRTextConfig(**_text_kwargs(tok, layers=2, kv_heads=2), head_dim=_HIDDEN // _HEADS,
                                                rope_parameters=rope)
        vision = transformers.PaddleOCRVisionConfig(**_vision_kwargs(64, p), spatial_merge_size=spec.extra["merge_size"])
        return transformers.PaddleOCRVLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                              image_token_id=tok.image_token_id,
                                              vision_start_token_id=tok.convert_tokens_to_ids("<|IMAGE_START|>"),
                                              vision_end_token_id=tok.convert_tokens_to_ids("<|IMAGE_END|>"))
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


def _qwen_ids(tok) -> dict:
    return {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"))}


def _qwen3_vl(family: str, tok):
    """Qwen3-VL (dense or MoE): a 3-layer vision tower whose layers 0 and 1 also feed DeepStack, so
    the outputs of decoder layers 0 and 1 (of 3) receive vision features (two injection layers)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(_text_kwargs(tok, layers=3, kv_heads=2), head_dim=_HIDDEN // _HEADS, rope_parameters=rope)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=_HIDDEN, num_position_embeddings=144,
                  deepstack_visual_indexes=[0, 1])
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=transformers.Qwen3VLTextConfig(**text),
                                          vision_config=transformers.Qwen3VLVisionConfig(**vision),
                                          tie_word_embeddings=False, **_qwen_ids(tok))
    moe = dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return transformers.Qwen3VLMoeConfig(text_config=transformers.Qwen3VLMoeTextConfig(**text, **moe),
                                         vision_config=transformers.Qwen3VLMoeVisionConfig(**vision),
                                         tie_word_embeddings=False, **_qwen_ids(tok))


def _glm4v(family: str, tok, patch: int):
    """GLM-4.1V / GLM-4.6V (dense) and GLM-4.5V (MoE: one dense layer, then routed experts)."""
    # head_dim 16, half of it rotary -> 4 frequencies split over (temporal, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
    text = {k: v for k, v in _text_kwargs(tok, layers=2, kv_heads=2).items()
            if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")}
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=_HIDDEN, intermediate_size=64, image_size=64)
    marks = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in (
        ("image", "<|image|>"), ("video", "<|video|>"), ("image_start", "<|begin_of_image|>"),
        ("image_end", "<|end_of_image|>"), ("video_start", "<|begin_of_video|>"), ("video_end", "<|end_of_video|>"))}
    if family == "glm4v_moe":
        moe = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                   first_k_dense_replace=1)
        return transformers.Glm4vMoeConfig(
            text_config=transformers.Glm4vMoeTextConfig(**text, **moe, rope_parameters=rope),
            vision_config=transformers.Glm4vMoeVisionConfig(**vision), tie_word_embeddings=False, **marks)
    if family == "glm_ocr":         # GLM-OCR: GLM-4.1V's layout, biased vision attention
        return transformers.GlmOcrConfig(text_config=transformers.GlmOcrTextConfig(**text, rope_parameters=rope),
                                         vision_config=transformers.GlmOcrVisionConfig(**vision),
                                         tie_word_embeddings=False, **marks)
    cfg = transformers.Glm46VConfig if family == "glm46v" else transformers.Glm4vConfig
    return cfg(text_config=transformers.Glm4vTextConfig(**text, rope_parameters=rope),
               vision_config=transformers.Glm4vVisionConfig(**vision), tie_word_embeddings=False, **marks)


def _qwen3_5(family: str, tok):
    """Qwen3.5 (dense or MoE): a hybrid stack -- gated-delta-net linear attention in layers 0 and 2,
    softmax attention in layers 1 and 3 (the checkpoints alternate three linear layers with one full one)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True,
            "partial_rotary_factor": 0.5}
    text = dict(_text_kwargs(tok, layers=4, kv_heads=2), head_dim=_HIDDEN // _HEADS, rope_parameters=rope,
                layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=_HIDDEN, num_position_embeddings=144)
    if family == "qwen3_5_moe":
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        return transformers.Qwen3_5MoeConfig(text_config=transformers.Qwen3_5MoeTextConfig(**text, **moe),
                                             vision_config=transformers.Qwen3_5MoeVisionConfig(**vision),
                                             tie_word_embeddings=False, **_qwen_ids(tok))
    return transformers.Qwen3_5Config(text_config=transformers.Qwen3_5TextConfig(**text),
                                      vision_config=transformers.Qwen3_5VisionConfig(**vision),
                                      tie_word_embeddings=False, **_qwen_ids(tok))
