"""Per-family architecture facts, as data, for the capture code.

``ARCHES`` maps ``config.model_type`` to an ``Arch`` (frozen dataclass). Each ``Arch`` answers the
questions capture and the dashboard need without family-specific ``if``s at the call site::

    arch = get_arch(model.config.model_type)        # or arch_for(model)
    inputs = arch.build_inputs(processor, image, "What is in the image?")
    layers = arch.decoder_layers(model)             # hook these for per-layer hidden states
    cfg = arch.text_config(model)                   # the object the decoder attention reads
    n = (inputs["input_ids"] == arch.image_token_id(model, processor)).sum()
    info = arch.grid_info(inputs, n, processor=processor, image=image)
    heat = info.to_grid(per_image_token_values)     # (rows, cols) heatmap over the image
    logits = arch.unembed(model, hidden)            # logit lens: lm_head(final_norm(h))

Verified against transformers 5.23 with the tiny models in ``tiny_random`` (tests/test_arch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import grids
from .grids import GridInfo, GridSegment

__all__ = ["Arch", "ARCHES", "GridInfo", "GridSegment", "UnsupportedArchitecture", "arch_for", "get_arch"]


class UnsupportedArchitecture(KeyError):
    """``get_arch`` was given a ``model_type`` with no entry in ``ARCHES``."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Arch:
    family: str  # our name; equals ``config.model_type`` for every supported family
    model_class: str  # transformers class name
    processor_class: str
    image_token: str  # placeholder string the processor expands (counted by ``image_token_id``)
    token_order: str  # "raster" | "base+anyres" | "tiles" (see ``grids``)
    grid_rule: str  # human-readable description of ``grid_info``
    required_inputs: tuple[str, ...]  # keys ``model(**inputs)`` needs beyond input_ids/attention_mask
    vision_tower_path: str  # attribute path from the ``*ForConditionalGeneration`` model
    projector_path: str
    notes: str = ""
    bidirectional: str | None = None  # read both ways (the model's own mask): "image" (Gemma 3), "prefix" (PaliGemma)
    chat: bool = True  # the prompt goes through the chat template (PaliGemma's processor takes the plain prompt)
    generated_token_type: int = 0  # token_type_ids of generated tokens (PaliGemma: 1, the causal suffix)
    _grid: Callable[..., GridInfo] = field(default=None, repr=False, compare=False)
    _grid_kwargs: tuple[str, ...] = field(default=(), repr=False, compare=False)  # which of processor/image

    # ---------------------------------------------------------------------------------------- modules
    def decoder_layers(self, model) -> torch.nn.ModuleList:
        """The language model's decoder blocks, in order (one hidden state each)."""
        return model.get_decoder().layers

    def text_config(self, model):
        """The config held as ``self.config`` by the decoder's attention modules (so its
        ``_attn_implementation`` decides eager vs SDPA for the language model). It exposes
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` and ``hidden_size``."""
        return model.config.text_config

    def final_norm(self, model) -> torch.nn.Module:
        return model.get_decoder().norm

    def lm_head(self, model) -> torch.nn.Module:
        return model.get_output_embeddings()

    def unembed(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Logit lens: ``lm_head(final_norm(hidden))`` (plus the final logit soft-cap where a config sets
        one), equal to the model's own logits when ``hidden`` is the last decoder layer's output."""
        logits = self.lm_head(model)(self.final_norm(model)(hidden))
        cap = getattr(self.text_config(model), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def vision_modules(self, model) -> dict[str, torch.nn.Module]:
        """``{"vision_tower": ..., "projector": ...}``: the image encoder and the module mapping its
        features into the language model's embedding space."""
        return {
            "vision_tower": _attr_path(model, self.vision_tower_path),
            "projector": _attr_path(model, self.projector_path),
        }

    def vision_layers(self, model) -> torch.nn.ModuleList | None:
        """The vision tower's stack of encoder layers (its longest ModuleList; None if it has none)."""
        tower = self.vision_modules(model)["vision_tower"]
        lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        return max(lists, key=len) if lists else None

    def vision_feature_depth(self, model) -> int:
        """After how many vision-tower layers the language model's image features are read: the
        configured ``vision_feature_layer`` (LLaVA-style, an index into the tower's hidden states,
        negative from the end), else every layer."""
        layers = self.vision_layers(model)
        n = len(layers) if layers is not None else 0
        vfl = getattr(model.config, "vision_feature_layer", None)
        if isinstance(vfl, int):
            return vfl if vfl >= 0 else n + 1 + vfl
        return n

    # ----------------------------------------------------------------------------------------- inputs
    def image_token_id(self, model, processor=None) -> int:
        """Id of the placeholder token that the model replaces with image features (one per image
        token). Structural tokens around them (``<img>``, ``<fake_token_around_image>``,
        ``<row_1_col_1>``, ``<|vision_start|>``, ...) are not counted."""
        tid = model.config.image_token_id
        if processor is not None:
            pid = (
                processor.tokenizer.image_token_id if self.family == "gemma3" else processor.image_token_id
            )  # Gemma3Processor.image_token_id is the begin-of-image token; the soft token is on the tokenizer
            if pid != tid:
                raise ValueError(f"processor image token id {pid} != model config image_token_id {tid}")
        return int(tid)

    def build_inputs(self, processor, image, prompt: str) -> dict[str, torch.Tensor]:
        """Batch of one: [image, prompt] as a user turn through the chat template (with the generation
        prompt), then the processor. Returns every tensor ``model(**inputs)`` and ``generate`` need."""
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        ]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True) if self.chat else prompt
        if image.mode != "RGB":
            image = image.convert("RGB")
        batch = processor(images=[image], text=[text], return_tensors="pt")
        # every tensor the forward reads (not "labels": no loss is asked for here)
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        missing = [k for k in ("input_ids", "attention_mask", *self.required_inputs) if k not in inputs]
        if missing:
            raise ValueError(f"{type(processor).__name__} did not return {missing} needed by {self.model_class}")
        return inputs

    # ------------------------------------------------------------------------------------------- grid
    def grid_info(self, inputs: dict, n_image_tokens: int, *, processor=None, image=None) -> GridInfo:
        """Layout of the image tokens over the image (see ``grids``). ``processor`` and ``image`` (the
        PIL image given to ``build_inputs``) are optional; InternVL needs both to know its tile
        arrangement exactly, Idefics3 and LLaVA-NeXT use the processor when given. ``info.exact`` is
        False when the layout had to be guessed."""
        n = int(n_image_tokens)
        extra = {"processor": processor, "image": image}
        return self._grid(inputs, n, **{k: extra[k] for k in self._grid_kwargs})

    def image_grid(self, inputs: dict, n_image_tokens: int, **kwargs) -> tuple[int, int]:
        """(rows, cols) of the primary drawable grid; ``rows * cols == n_image_tokens`` when the tokens
        form one raster (``token_order == "raster"``). See ``grid_info`` for the rest."""
        info = self.grid_info(inputs, n_image_tokens, **kwargs)
        return info.rows, info.cols


def _square(inputs, n):
    return grids.square_raster(n)


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
    _grid=grids.qwen_grid,
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
    vision_tower_path="model.vision_model",
    projector_path="model.connector",
    notes="SmolVLM (v1) checkpoints use this class; pixel_values is (1, tiles, 3, H, W)",
    _grid=grids.idefics3_grid,
    _grid_kwargs=("processor",),
)

ARCHES: dict[str, Arch] = {
    a.family: a
    for a in [
        Arch(
            family="llava",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            image_token="<image>",
            token_order="raster",
            grid_rule="square k x k raster of the vision patches (CLS dropped): k = image_size / patch_size",
            required_inputs=("pixel_values",),
            vision_tower_path="model.vision_tower",
            projector_path="model.multi_modal_projector",
            notes="processor needs num_additional_image_tokens=1 with the 'default' strategy so that the "
            "placeholder count equals the patch count",
            _grid=_square,
        ),
        _LLAVA_NEXT,
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
        replace(
            _QWEN2_VL,
            family="glm4v",
            model_class="Glm4vForConditionalGeneration",
            processor_class="Glm4vProcessor",
            image_token="<|image|>",
            notes="GLM-4.1V/4.5V: Qwen2-VL's 2x2-merged raster and M-RoPE (3D positions from mm_token_type_ids); "
            "decoder layers with extra post-attention / post-MLP norms; images only (its video input is not read)",
        ),
        replace(
            _QWEN2_VL,
            family="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            notes="vision tower uses windowed attention internally but un-permutes its output, so the "
            "merged tokens reach the LM in raster order",
        ),
        _INTERNVL,
        replace(
            _INTERNVL,
            family="aya_vision",
            model_class="AyaVisionForConditionalGeneration",
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
