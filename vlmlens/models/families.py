"""Every supported family's ``Arch``: one declaration per token layout, the others ``replace()``s
of it (see ``arch.py`` for what each field means). ``ARCHES`` maps ``config.model_type`` to it;
``get_arch`` / ``arch_for`` look one up."""

from __future__ import annotations

from dataclasses import replace

from . import grids
from .arch import Arch, UnsupportedArchitecture


def _square(inputs, n):
    return grids.square_raster(n)


_LLAVA = Arch(
    family="llava",
    model_class="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    image_token="<image>",
    token_order="raster",
    grid_rule="square k x k raster of the vision patches (CLS dropped): k = image_size / patch_size; with a Pixtral "
    "tower (Pixtral-12B) Mistral 3's layout: (h/16) x (w/16) from image_sizes, rows ended by [IMG_BREAK]",
    required_inputs=("pixel_values",),
    sized_inputs=("pixel_values",),          # a Pixtral tower's pictures differ in size (a CLIP tower's never do)
    vision_tower_path="model.vision_tower",
    projector_path="model.multi_modal_projector",
    notes="processor needs num_additional_image_tokens=1 with the 'default' strategy so that the "
    "placeholder count equals the patch count",
    _grid=grids.llava_grid,
)

_DEEPSEEK_VL = Arch(
    family="deepseek_vl",
    model_class="DeepseekVLForConditionalGeneration",
    processor_class="DeepseekVLProcessor",
    image_token="<image_placeholder>",
    token_order="raster",
    grid_rule="square k x k raster of the SigLIP patches (576 = 24 x 24 on the 384 px checkpoints)",
    required_inputs=("pixel_values",),
    vision_tower_path="model.vision_model",
    projector_path="model.aligner",
    notes="DeepSeek-VL (SigLIP tower, MLP aligner, Llama language model)",
    _grid=_square,
)

_QWEN2_VL = Arch(
    family="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    image_token="<|image_pad|>",
    token_order="raster",
    grid_rule="image_grid_thw = (1, h, w) patches -> (h/2) x (w/2) raster after the 2x2 merge",
    required_inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    vision_tower_path="model.visual",
    projector_path="model.visual.merger",
    notes="pixel_values are flattened patches (N, C*t*p*p); M-RoPE positions come from "
    "mm_token_type_ids; the image keeps its aspect ratio (resized to multiples of 28 px)",
    video="qwen",
    _grid=grids.qwen_grid,
)

_QWEN3_VL = replace(
    _QWEN2_VL,
    family="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    injections="model.language_model",
    notes="Qwen2-VL's 2x2-merged raster with interleaved M-RoPE; DeepStack: features of a few vision-tower layers "
    "are added to the image rows of the outputs of the first decoder layers (the lens adds them itself, so "
    "cuts, freezes and removals decide about them; see vlmlens.lens_injections); images only (its video input "
    "is not read)",
)

_GLM4V = replace(
    _QWEN2_VL,
    family="glm4v",
    model_class="Glm4vForConditionalGeneration",
    processor_class="Glm4vProcessor",
    image_token="<|image|>",
    video=None,
    notes="GLM-4.1V: Qwen2-VL's 2x2-merged raster and M-RoPE (3D positions from mm_token_type_ids); "
    "decoder layers with extra post-attention / post-MLP norms; images only (its video input is not read)",
)

_LLAVA_NEXT = Arch(
    family="llava_next",
    model_class="LlavaNextForConditionalGeneration",
    processor_class="LlavaNextProcessor",
    image_token="<image>",
    token_order="base+anyres",
    grid_rule="[base k x k | anyres Hu x (Wu + newline)]; primary grid = base k x k; the anyres "
    "segment is the unpadded high-resolution grid over the whole picture",
    required_inputs=("pixel_values", "image_sizes"),
    tile_inputs=("pixel_values",),
    vision_tower_path="model.vision_tower",
    projector_path="model.multi_modal_projector",
    notes="one newline token (the learned image_newline vector) ends every anyres row; it is an "
    "image token in input_ids but has no image position",
    _grid=grids.llava_next_grid,
    _grid_kwargs=("processor",),
)

_INTERNVL = Arch(
    family="internvl",
    model_class="InternVLForConditionalGeneration",
    processor_class="InternVLProcessor",
    image_token="<IMG_CONTEXT>",
    token_order="tiles",
    grid_rule="<img> tiles (row-major, each k x k after 0.5 pixel shuffle) then a thumbnail </img>; "
    "primary grid = tile mosaic; one tile -> plain k x k raster",
    required_inputs=("pixel_values",),
    vision_tower_path="model.vision_tower",
    projector_path="model.multi_modal_projector",
    notes="pixel_values is (tiles, 3, H, W) with no batch axis; tile arrangement is not in the "
    "inputs (pass processor and image to grid_info)",
    _grid=grids.internvl_grid,
    _grid_kwargs=("processor", "image"),
)

_IDEFICS3 = Arch(
    family="idefics3",
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    image_token="<image>",
    token_order="tiles",
    grid_rule="per tile <fake><row_i_col_j> k x k, rows end in \\n, then <fake><global-img> k x k "
    "<fake>; primary grid = tile mosaic; no splitting -> plain k x k raster",
    required_inputs=("pixel_values", "pixel_attention_mask"),
    tile_inputs=("pixel_values", "pixel_attention_mask"),
    vision_tower_path="model.vision_model",
    projector_path="model.connector",
    notes="SmolVLM (v1) checkpoints use this class; pixel_values is (1, tiles, 3, H, W)",
    _grid=grids.idefics3_grid,
    _grid_kwargs=("processor",),
)

_MISTRAL3 = Arch(
    family="mistral3",
    model_class="Mistral3ForConditionalGeneration",
    processor_class="PixtralProcessor",
    image_token="[IMG]",
    token_order="raster",
    grid_rule="image_sizes (h, w) -> (h/s) x (w/s) raster, s = patch x merge (28 px on the checkpoints); every "
    "row but the last ends in [IMG_BREAK], the last in [IMG_END] (text tokens, not image tokens)",
    required_inputs=("pixel_values", "image_sizes"),
    sized_inputs=("pixel_values",),
    vision_tower_path="model.vision_tower",
    projector_path="model.multi_modal_projector",
    notes="Mistral Small 3.1 / 3.2 (Pixtral tower with 2D rotary positions, a 2x2 patch merger, Mistral "
    "language model); the picture keeps its aspect ratio; without torchvision the processor is "
    "vlmlens.models.pixtral_processor's (transformers' PixtralProcessor needs it)",
    _grid=grids.pixtral_grid,
)

ARCHES: dict[str, Arch] = {
    a.family: a
    for a in [
        _LLAVA,
        replace(_LLAVA, family="vipllava", model_class="VipLlavaForConditionalGeneration",
                notes="LLaVA's layout; the projector reads several tower layers (vision_feature_layers), concatenated"),
        replace(_LLAVA, family="video_llava", model_class="VideoLlavaForConditionalGeneration",
                processor_class="VideoLlavaProcessor", required_inputs=("pixel_values_images",),
                vision_tower_path="model.image_tower",
                notes="Video-LLaVA: separate image and video towers into one projector; images only (its video input "
                "is not read); its processor returns the image as pixel_values_images"),
        _DEEPSEEK_VL,
        replace(_DEEPSEEK_VL, family="janus", model_class="JanusForConditionalGeneration",
                processor_class="JanusProcessor", image_token_on_tokenizer=True,
                notes="Janus / Janus-Pro: DeepSeek-VL's understanding path (SigLIP, aligner, Llama); its "
                "image-generation path (VQ tokens) is not read"),
        _LLAVA_NEXT,
        replace(_LLAVA_NEXT, family="llava_next_video", model_class="LlavaNextVideoForConditionalGeneration",
                processor_class="LlavaNextVideoProcessor",
                notes=_LLAVA_NEXT.notes + "; images only (its video input is not read)"),
        replace(
            _LLAVA_NEXT,
            family="llava_onevision",
            model_class="LlavaOnevisionForConditionalGeneration",
            processor_class="LlavaOnevisionProcessor",
            grid_rule="as llava_next: [base k x k | anyres Hu x (Wu + newline)], the anyres grid shrunk to about "
            "N tiles (anyres_max_N)",
            notes="SigLIP tower, 'full' feature strategy; images only (its video input is not read)",
            _grid=grids.llava_onevision_grid,
        ),
        _QWEN2_VL,
        replace(_GLM4V, family="glm46v", model_class="Glm46VForConditionalGeneration", processor_class="Glm46VProcessor",
                notes="GLM-4.6V: " + _GLM4V.notes),
        replace(_GLM4V, family="glm4v_moe", model_class="Glm4vMoeForConditionalGeneration",
                notes="GLM-4.5V: " + _GLM4V.notes + "; mixture-of-experts MLPs after the first layer"),
        _GLM4V,
        replace(_QWEN2_VL, family="paddleocr_vl", model_class="PaddleOCRVLForConditionalGeneration",
                processor_class="PaddleOCRVLProcessor", image_token="<|IMAGE_PLACEHOLDER|>", video=None,
                projector_path="model.projector",
                notes="PaddleOCR-VL: Qwen2-VL's 2x2-merged raster and M-RoPE over an Ernie 4.5 language model; a "
                "SigLIP-style tower with 2D rotary positions; images only"),
        replace(_GLM4V, family="glm_ocr", model_class="GlmOcrForConditionalGeneration", processor_class="Glm46VProcessor",
                notes="GLM-OCR: " + _GLM4V.notes + "; GLM-4.6V's processor"),
        replace(
            _QWEN2_VL,
            family="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            notes="vision tower uses windowed attention internally but un-permutes its output, so the "
            "merged tokens reach the LM in raster order",
        ),
        _QWEN3_VL,
        replace(_QWEN3_VL, family="qwen3_5", model_class="Qwen3_5ForConditionalGeneration", injections=None,
                notes="Qwen3.5: Qwen3-VL's image layout; a hybrid stack (three gated-delta-net linear-attention layers "
                "to one softmax-attention layer): attention statistics are not defined (NaN) on the linear layers, "
                "and a key mask there is refused (cut rows out with mode='remove' instead)"),
        replace(_QWEN3_VL, family="qwen3_5_moe", model_class="Qwen3_5MoeForConditionalGeneration", injections=None,
                notes="Qwen3.5 MoE: as qwen3_5, with mixture-of-experts MLPs"),
        replace(_QWEN3_VL, family="qwen3_vl_moe", model_class="Qwen3VLMoeForConditionalGeneration",
                notes=_QWEN3_VL.notes + "; mixture-of-experts MLPs"),
        _INTERNVL,
        replace(
            _INTERNVL,
            family="aya_vision",
            model_class="AyaVisionForConditionalGeneration",
            logit_scale="logit_scale",
            processor_class="AyaVisionProcessor",
            image_token="<|IMG_PATCH|>",
            grid_rule="<|START_OF_IMG|> TILE_i k x k per tile (row-major) then TILE_GLOBAL k x k <|END_OF_IMG|>; "
            "primary grid = tile mosaic; one tile -> plain k x k raster",
            notes="SigLIP tower, pixel-shuffle projector, Cohere2 language model (parallel attention + MLP "
            "blocks, sliding-window layers); pixel_values is (tiles, 3, H, W); the tile arrangement needs the "
            "processor and the image (as InternVL's)",
        ),
        _IDEFICS3,
        replace(
            _IDEFICS3,
            family="smolvlm",
            model_class="SmolVLMForConditionalGeneration",
            processor_class="SmolVLMProcessor",
            notes="SmolVLM2 checkpoints: Idefics3's token layout with SmolVLM's own classes (its processor needs "
            "num2words; video input is not read); pixel_values is (1, tiles, 3, H, W)",
        ),
        Arch(
            family="mllama",
            model_class="MllamaForConditionalGeneration",
            processor_class="MllamaProcessor",
            image_token="<|image|>",
            token_order="raster",
            grid_rule="one <|image|> token in the sequence (1 x 1); the image's patches are the keys of the "
            "cross-attention layers, not sequence positions",
            required_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
            vision_tower_path="model.vision_model",
            projector_path="model.multi_modal_projector",
            cross_attention=True,
            notes="Llama 3.2 Vision: gated cross-attention layers read the image (tiles of patches + CLS); the "
            "self-attention stream holds one <|image|> token and text. Truncate(k) skips the cross-attention "
            "layers >= k, Knockout skips a cross-attention layer for its query rows; interventions on image rows "
            "in the stream are refused (see docs/support.md)",
            _grid=_square,
        ),
        _MISTRAL3,
        replace(_MISTRAL3, family="lighton_ocr", model_class="LightOnOcrForConditionalGeneration",
                processor_class="LightOnOcrProcessor", image_token="<|image_pad|>",
                vision_tower_path="model.vision_encoder", projector_path="model.vision_projection",
                grid_rule="image_sizes (h, w) -> (h/s) x (w/s) raster, s = patch x merge (28 px on the checkpoint); no "
                "break or end tokens",
                notes="LightOnOCR: Mistral 3's Pixtral tower and merger over a Qwen3 language model; its own processor "
                "(no torchvision needed)"),
        Arch(
            family="paligemma",
            model_class="PaliGemmaForConditionalGeneration",
            processor_class="PaliGemmaProcessor",
            image_token="<image>",
            token_order="raster",
            grid_rule="square k x k raster of the SigLIP patches, before the prompt",
            required_inputs=("pixel_values",),
            vision_tower_path="model.vision_tower",
            projector_path="model.multi_modal_projector",
            bidirectional="prefix",
            chat=False,
            generated_token_type=1,
            notes="prefix-LM: the image and the prompt (the prefix) attend both ways, generated tokens causally; "
            "the processor takes the plain prompt (no chat template) and puts the image tokens, <bos> and a "
            "closing newline around it",
            _grid=_square,
        ),
        Arch(
            family="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            processor_class="Gemma3Processor",
            image_token="<image_soft_token>",
            token_order="raster",
            grid_rule="square raster of mm_tokens_per_image average-pooled patches (e.g. 16 x 16)",
            required_inputs=("pixel_values", "token_type_ids"),
            vision_tower_path="model.vision_tower",
            projector_path="model.multi_modal_projector",
            bidirectional="image",
            image_token_on_tokenizer=True,
            notes="token_type_ids marks image tokens (they attend bidirectionally within the image); "
            "the chat template inserts <start_of_image>, which the processor expands",
            _grid=grids.gemma3_grid,
        ),
    ]
}


def get_arch(model_type: str) -> Arch:
    """The ``Arch`` for a ``config.model_type``; raises ``UnsupportedArchitecture`` (a ``KeyError``)
    naming the supported model types otherwise."""
    try:
        return ARCHES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHES))}"
        ) from None


def arch_for(model) -> Arch:
    return get_arch(model.config.model_type)
