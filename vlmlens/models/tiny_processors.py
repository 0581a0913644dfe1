"""Offline processors for the tiny random models: a word-level tokenizer plus each family's own
image-processor and processor classes, configured small.

Nothing here touches the network. Image processors are the PIL/numpy-backed ``*ImageProcessorPil``
classes (the default "fast" ones in transformers 5 need torchvision). Processors whose constructor also
takes a video processor (Qwen2-VL, Qwen2.5-VL, InternVL) get a thin subclass that drops that slot,
because every video processor in transformers 5 is torchvision-backed; see ``without_video_processor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from .offline_text import NO_VIDEO, chat_template, make_tokenizer, without_video_processor  # noqa: F401


@dataclass(frozen=True)
class TinyProcessorSpec:
    """What ``build_processor`` needs to know about the model it is paired with."""

    family: str
    image_size: int  # vision-tower input side (pixels); tiles for tiled families
    patch_size: int
    image_seq_len: int = 0  # tokens per tile (InternVL, Idefics3) or per image (Gemma3)
    extra: dict = field(default_factory=dict)


_IM = ("<|im_start|>", "<|im_end|>")


def build_processor(spec: TinyProcessorSpec):
    """Return the family's processor, built offline. Called by ``tiny_random.build_random``."""
    f, s, p = spec.family, spec.image_size, spec.patch_size
    if f in ("llava", "vipllava", "video_llava"):
        tok = make_tokenizer(["<image>", "<video>"] if f == "video_llava" else ["<image>"], bos="<s>", eos="</s>")
        ip = (transformers.VideoLlavaImageProcessor if f == "video_llava" else transformers.LlavaImageProcessorPil)(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        tpl = chat_template(
            start="<s>",
            roles={"user": ("USER: ", " "), "assistant": ("ASSISTANT: ", "</s>"), "system": ("", " ")},
            image="<image>\n",
            generation_prompt="ASSISTANT:",
        )
        # CLIP emits CLS + patches; "default" drops CLS, so one extra token is added then removed again.
        cls = without_video_processor(transformers.VideoLlavaProcessor) if f == "video_llava" else transformers.LlavaProcessor
        return cls(
            image_processor=ip, tokenizer=tok, patch_size=p, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tpl,
        )  # fmt: skip
    if f in ("llava_next", "llava_next_video"):
        tok = make_tokenizer(["<image>", "<video>", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
        ip = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_grid_pinpoints=spec.extra["image_grid_pinpoints"],
        )  # fmt: skip
        tpl = chat_template(
            start="<s>",
            roles={"user": ("[INST] ", " [/INST]"), "assistant": (" ", "</s>"), "system": ("", "\n")},
            image="<image>\n",
            generation_prompt="",
        )
        cls = (transformers.LlavaNextProcessor if f == "llava_next"
               else without_video_processor(transformers.LlavaNextVideoProcessor))
        return cls(image_processor=ip, tokenizer=tok, patch_size=p, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=tpl)
    if f in ("glm4v", "glm4v_moe", "glm46v", "glm_ocr"):
        names = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
        tok = make_tokenizer(names, eos="<|endoftext|>")
        lo, hi = spec.extra["min_pixels"], spec.extra["max_pixels"]
        ip = (transformers.Glm46VImageProcessorPil if f in ("glm46v", "glm_ocr") else transformers.Glm4vImageProcessorPil)(
            patch_size=p, merge_size=spec.extra["merge_size"], temporal_patch_size=spec.extra["temporal_patch_size"],
            size={"shortest_edge": lo, "longest_edge": hi})
        tpl = chat_template(roles={r: (f"<|{r}|>\n", "") for r in ("system", "user", "assistant")},
                            image="<|begin_of_image|><|image|><|end_of_image|>", generation_prompt="<|assistant|>\n")
        cls = transformers.Glm46VProcessor if f in ("glm46v", "glm_ocr") else transformers.Glm4vProcessor
        return without_video_processor(cls)(image_processor=ip, tokenizer=tok, chat_template=tpl)
    if f == "aya_vision":
        marks = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE",
                 "TILE_GLOBAL", *[f"TILE_{i}" for i in range(1, 13)]]
        turns = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]
        tok = make_tokenizer([*marks, *turns], bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>")
        ip = transformers.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=True, min_patches=1,
                                                   max_patches=spec.extra["max_patches"])
        tpl = chat_template(
            start="<BOS_TOKEN>",
            roles={"user": ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
                   "assistant": ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
                   "system": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>")},
            image="<image>",
            generation_prompt="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        )  # fmt: skip
        return transformers.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=p, img_size=s,
                                               downsample_factor=2, chat_template=tpl)
    if f == "llava_onevision":
        tok = make_tokenizer(["<image>", "<video>", *_IM], eos="<|im_end|>")
        ip = transformers.LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                          image_grid_pinpoints=spec.extra["image_grid_pinpoints"])
        tpl = chat_template(
            roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
            image="<image>\n",
            generation_prompt="<|im_start|>assistant\n",
        )
        return without_video_processor(transformers.LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, chat_template=tpl, num_image_tokens=spec.image_seq_len,
            vision_feature_select_strategy="full",
        )
    if f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", *_IM]
        tok = make_tokenizer(names, eos="<|im_end|>")
        merge = spec.extra["merge_size"]
        lo, hi = spec.extra["min_pixels"], spec.extra["max_pixels"]
        ip = transformers.Qwen2VLImageProcessorPil(
            patch_size=p, merge_size=merge, temporal_patch_size=spec.extra["temporal_patch_size"],
            size={"shortest_edge": lo, "longest_edge": hi},
        )  # fmt: skip
        tpl = chat_template(
            roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
            image="<|vision_start|><|image_pad|><|vision_end|>",
            video="<|vision_start|><|video_pad|><|vision_end|>",
            generation_prompt="<|im_start|>assistant\n",
            default_system="You are a helpful assistant.",
        )
        base = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}.get(
            f, transformers.Qwen3VLProcessor)
        return without_video_processor(base)(image_processor=ip, tokenizer=tok, chat_template=tpl)
    if f == "internvl":
        named = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
        tok = make_tokenizer(list(_IM), eos="<|im_end|>", extra_named=named)
        ip = transformers.GotOcr2ImageProcessorPil(
            size={"height": s, "width": s}, crop_to_patches=True, min_patches=1,
            max_patches=spec.extra["max_patches"],
        )  # fmt: skip
        tpl = chat_template(
            roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
            image="<IMG_CONTEXT>\n",
            generation_prompt="<|im_start|>assistant\n",
        )
        return without_video_processor(transformers.InternVLProcessor)(
            image_processor=ip, tokenizer=tok, image_seq_length=spec.image_seq_len, chat_template=tpl
        )
    if f in ("idefics3", "smolvlm"):
        rowcol = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        names = ["<image>", "<fake_token_around_image>", "<global-img>", "<|im_start|>", *rowcol]
        tok = make_tokenizer(names, bos="<|im_start|>", eos="<end_of_utterance>")
        image_proc, proc_cls = ((transformers.Idefics3ImageProcessorPil, transformers.Idefics3Processor) if f == "idefics3"
                                else (transformers.SmolVLMImageProcessorPil,
                                      without_video_processor(transformers.SmolVLMProcessor)))  # needs num2words
        ip = image_proc(
            size={"longest_edge": spec.extra["longest_edge"]}, max_image_size={"longest_edge": s},
            do_image_splitting=True,
        )  # fmt: skip
        tpl = chat_template(
            start="<|im_start|>",
            roles={"system": ("System: ", "<end_of_utterance>\n"), "user": ("User:", "<end_of_utterance>\n"),
                   "assistant": ("Assistant: ", "<end_of_utterance>\n")},
            image="<image>",
            generation_prompt="Assistant:",
        )  # fmt: skip
        return proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=spec.image_seq_len, chat_template=tpl)
    if f in ("deepseek_vl", "janus"):
        bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
        named = {"image_token": "<image_placeholder>"}
        if f == "janus":
            named.update(boi_token="<begin_of_image>", eoi_token="<end_of_image>")
        tok = make_tokenizer([], bos=bos, eos=eos, extra_named=named)
        user, bot = ("User", "Assistant") if f == "deepseek_vl" else ("<|User|>", "<|Assistant|>")
        tpl = chat_template(start=bos, roles={"user": (f"{user}: ", "\n\n"), "assistant": (f"{bot}: ", eos),
                                              "system": ("", "\n\n")},
                            image="<image_placeholder>", generation_prompt=f"{bot}:")
        if f == "janus":
            ip = transformers.JanusImageProcessorPil(size={"height": s, "width": s})
            return transformers.JanusProcessor(image_processor=ip, tokenizer=tok, chat_template=tpl,
                                               num_image_tokens=spec.image_seq_len)
        ip = transformers.DeepseekVLImageProcessorPil(size={"height": s, "width": s})
        return transformers.DeepseekVLProcessor(image_processor=ip, tokenizer=tok, chat_template=tpl,
                                                num_image_tokens=spec.image_seq_len)
    if f == "mistral3":
        tok = make_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
        ip = transformers.PixtralImageProcessorPil(size={"longest_edge": s}, patch_size=p * spec.extra["merge_size"])
        tpl = chat_template(
            start="<s>",
            roles={"user": ("[INST]", "[/INST]"), "assistant": ("", "</s>"), "system": ("", "\n\n")},
            image="[IMG]",
            generation_prompt="",
        )
        from .pixtral_processor import PixtralProcessorPil      # transformers' PixtralProcessor needs torchvision

        return PixtralProcessorPil(image_processor=ip, tokenizer=tok, patch_size=p,
                                   spatial_merge_size=spec.extra["merge_size"], chat_template=tpl)
    if f == "paddleocr_vl":
        named = {"image_token": "<|IMAGE_PLACEHOLDER|>"}
        tok = make_tokenizer(["<|IMAGE_START|>", "<|IMAGE_END|>", "User:", "Assistant:"], bos="<s>", eos="</s>",
                             extra_named=named)
        lo, hi = spec.extra["min_pixels"], spec.extra["max_pixels"]
        ip = transformers.PaddleOCRVLImageProcessorPil(patch_size=p, merge_size=spec.extra["merge_size"],
                                                       size={"shortest_edge": lo, "longest_edge": hi})
        tpl = chat_template(start="<s>", roles={"user": ("User: ", "\n"), "assistant": ("Assistant: ", "</s>"),
                                                "system": ("", "\n")},
                            image="<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", generation_prompt="Assistant: ")
        return transformers.PaddleOCRVLProcessor(image_processor=ip, tokenizer=tok, chat_template=tpl)
    if f == "lighton_ocr":
        named = {"image_token": "<|image_pad|>", "image_break_token": "<|vision_pad|>",
                 "image_end_token": "<|vision_end|>"}
        tok = make_tokenizer(list(_IM), eos="<|im_end|>", extra_named=named)
        side = p * spec.extra["merge_size"]
        ip = transformers.PixtralImageProcessorPil(size={"longest_edge": s}, patch_size=side)
        tpl = chat_template(
            roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
            image="<|image_pad|>",
            generation_prompt="<|im_start|>assistant\n",
        )
        return transformers.LightOnOcrProcessor(image_processor=ip, tokenizer=tok, patch_size=p,
                                                spatial_merge_size=spec.extra["merge_size"], chat_template=tpl)
    if f == "mllama":
        tok = make_tokenizer(["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                             bos="<|begin_of_text|>", eos="<|eot_id|>")
        ip = transformers.MllamaImageProcessorPil(size={"height": s, "width": s}, max_image_tiles=spec.extra["tiles"])
        tpl = chat_template(
            start="<|begin_of_text|>",
            roles={r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user",
                                                                                            "assistant")},
            image="<|image|>",
            generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        )
        return transformers.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tpl)
    if f == "paligemma":
        tok = make_tokenizer(["<image>"], bos="<bos>", eos="<eos>")
        ip = transformers.SiglipImageProcessorPil(size={"height": s, "width": s})
        ip.image_seq_length = spec.image_seq_len          # read by PaliGemmaProcessor (the real config has it)
        return transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    if f == "gemma3":
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok = make_tokenizer(["<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", extra_named=named)
        ip = transformers.Gemma3ImageProcessorPil(size={"height": s, "width": s})
        tpl = chat_template(
            start="<bos>",
            roles={r: (f"<start_of_turn>{r}\n", "<end_of_turn>\n") for r in ("user", "model", "system")},
            image="<start_of_image>",
            generation_prompt="<start_of_turn>model\n",
        ).replace("message['role'] == 'model'", "message['role'] in ('model', 'assistant')")
        return transformers.Gemma3Processor(
            image_processor=ip, tokenizer=tok, image_seq_length=spec.image_seq_len, chat_template=tpl
        )
    raise ValueError(f"no tiny processor for family {f!r}")
