"""Per-family architecture facts, as data, for the capture code.

``families.ARCHES`` maps ``config.model_type`` to an ``Arch`` (frozen dataclass). Each ``Arch`` answers the
questions capture and the dashboard need without family-specific ``if``s at the call site::

    arch = get_arch(model.config.model_type)        # families.get_arch, or arch_for(model)
    inputs = arch.build_inputs(processor, image, "What is in the image?")
    layers = arch.decoder_layers(model)             # hook these for per-layer hidden states
    cfg = arch.text_config(model)                   # the object the decoder attention reads
    n = (inputs["input_ids"] == arch.image_token_id(model, processor)).sum()
    info = arch.grid_info(inputs, n, processor=processor, image=image)
    heat = info.to_grid(per_image_token_values)     # (rows, cols) heatmap over the image
    logits = arch.unembed(model, hidden)            # logit lens: lm_head(final_norm(h))

Verified against transformers 5.25 with the tiny models in ``tiny_random`` (tests/test_arch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import grids
from .grids import GridInfo, GridSegment

__all__ = ["Arch", "GridInfo", "GridSegment", "UnsupportedArchitecture"]


class UnsupportedArchitecture(KeyError):
    """``get_arch`` was given a ``model_type`` with no entry in ``ARCHES``."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


#: words of a layer type without softmax attention (Qwen3.5's "linear_attention", LFM2's "conv")
_NO_SOFTMAX = ("linear", "conv", "mamba")


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
    # inputs whose dimension 1 counts an image's tiles, which the forward reads only as far as each image
    # has them, so a batch pads them with zero tiles (LLaVA-NeXT slices by image_sizes; Idefics3 drops
    # all-zero tiles and their pixel_attention_mask)
    tile_inputs: tuple[str, ...] = ()
    # inputs whose last two dimensions (pixel rows, columns) the forward reads only as far as ``image_sizes`` says
    # (Pixtral crops each image's patches to its size), so a batch whose inputs carry ``image_sizes`` pads them with
    # zeros below and to the right (a LLaVA with a CLIP tower has none: its pictures are one size, or refused)
    sized_inputs: tuple[str, ...] = ()
    image_token_on_tokenizer: bool = False  # the processor's own image_token_id is another token, or absent
    injections: str | None = None  # path of the decoder stack whose call carries DeepStack features (Qwen3-VL)
    cross_attention: bool = False  # the image is read by gated cross-attention layers, not in the sequence (Mllama)
    # the text-config attribute the model's logits are multiplied by (Aya Vision's Cohere2 "logit_scale", applied
    # by its forward since transformers 5.25); a family's own class decides, not the text config alone: LLaVA-NeXT
    # over a Granite language model does not divide by the config's logits_scaling
    logit_scale: str | None = None
    video: str | None = None  # how the lens reads a video: "qwen" (vlmlens.models.video_frames); None: images only
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
        """Logit lens: ``lm_head(final_norm(hidden))`` (times the family's logit scale, and through the final
        logit soft-cap where the config sets one), equal to the model's own logits when ``hidden`` is the last
        decoder layer's output."""
        logits = self.lm_head(model)(self.final_norm(model)(hidden))
        config = self.text_config(model)
        if self.logit_scale:
            logits = logits * getattr(config, self.logit_scale)
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self, model) -> tuple[int, ...]:
        """Decoder layers with softmax attention over the sequence: all of them, except a hybrid
        stack's linear-attention or convolution layers (the text config's ``layer_types``), where
        attention weights -- and a key mask -- are not defined."""
        n = len(self.decoder_layers(model))
        types = list(getattr(self.text_config(model), "layer_types", None) or ())
        cross = set(self.cross_layers(model))
        return tuple(i for i in range(n) if i not in cross and (
            i >= len(types) or not any(w in str(types[i]) for w in _NO_SOFTMAX)))

    def cross_layers(self, model) -> tuple[int, ...]:
        """Decoder layers that read the image by gated cross-attention (Mllama's ``cross_attention_layers``):
        their queries are the text rows, their keys the vision tower's patches, never sequence positions."""
        if not self.cross_attention:
            return ()
        return tuple(sorted(int(i) for i in self.text_config(model).cross_attention_layers))

    def cross_key_layout(self, model, inputs: dict) -> dict | None:
        """Where the cross-attention keys sit on the image (Mllama): ``tile_grid`` [rows, cols] of the image's tiles
        (row-major), ``tile_side`` patches per tile side, ``keys_per_tile`` (the tile's CLS key first, then its
        patches row-major), ``tiles`` keys' tiles in all (the unused ones are masked). None without cross-attention."""
        if not self.cross_attention:
            return None
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        vc = model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        rows, cols = get_all_supported_aspect_ratios(int(vc.max_num_tiles))[int(inputs["aspect_ratio_ids"][0, 0]) - 1]
        return {"tile_grid": [int(rows), int(cols)], "tile_side": side, "keys_per_tile": side * side + 1,
                "tiles": int(vc.max_num_tiles)}

    def injection_module(self, model) -> torch.nn.Module | None:
        """The decoder stack whose forward receives vision features to add between layers (Qwen3-VL's
        DeepStack, see ``vlmlens.lens_injections``); None for families without injections."""
        return _attr_path(model, self.injections) if self.injections else None

    def injection_layers(self, model) -> tuple[int, ...]:
        """Decoder layers whose output receives injected vision features: one per DeepStack level
        (``vision_config.deepstack_visual_indexes``), the first ones; () without injections."""
        if not self.injections:
            return ()
        levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
        return tuple(range(min(levels, len(self.decoder_layers(model)))))

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
        if vfl is None:                  # VipLLaVA reads several layers: the deepest one counts
            vfl = getattr(model.config, "vision_feature_layers", None)
        picks = [vfl] if isinstance(vfl, int) else list(vfl) if isinstance(vfl, (list, tuple)) else []
        if picks and all(isinstance(v, int) for v in picks):
            return max(v if v >= 0 else n + 1 + v for v in picks)
        return n

    # ----------------------------------------------------------------------------------------- inputs
    def image_token_id(self, model, processor=None) -> int:
        """Id of the placeholder token that the model replaces with image features (one per image
        token). Structural tokens around them (``<img>``, ``<fake_token_around_image>``,
        ``<row_1_col_1>``, ``<|vision_start|>``, ...) are not counted."""
        tid = model.config.image_token_id
        if processor is not None:
            # Gemma3Processor.image_token_id is the begin-of-image token, and JanusProcessor has none: the
            # token the model replaces is the tokenizer's image token there
            owner = processor.tokenizer if self.image_token_on_tokenizer else processor
            pid = owner.image_token_id
            if pid != tid:
                raise ValueError(f"processor image token id {pid} != model config image_token_id {tid}")
        return int(tid)

    def video_token_id(self, model) -> int | None:
        """Id of the placeholder the model replaces with video features (None: the lens reads no video)."""
        return int(model.config.video_token_id) if self.video else None

    def build_video_inputs(self, processor, video, prompt: str) -> dict[str, torch.Tensor]:
        """Like ``build_inputs`` for a :class:`vlmlens.video.Video`: [video, prompt] as a user turn, its
        frames through the processor's video processor (``video_frames``), with their frame rate and
        source frame numbers (Qwen2.5-VL spaces its temporal positions by them)."""
        if not self.video:
            raise ValueError(f"{self.family} reads images only through the lens; no video input")
        from transformers.video_utils import VideoMetadata

        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        meta = VideoMetadata(total_num_frames=video.n_source, fps=video.fps, frames_indices=list(video.indices),
                             width=video.size[0], height=video.size[1])
        batch = processor(videos=[video.array()], text=[text], video_metadata=[meta], return_tensors="pt")
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}

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
        if self.video and "video_grid_thw" in inputs:
            return grids.qwen_video_grid(inputs, n)
        extra = {"processor": processor, "image": image}
        return self._grid(inputs, n, **{k: extra[k] for k in self._grid_kwargs})

    def image_grid(self, inputs: dict, n_image_tokens: int, **kwargs) -> tuple[int, int]:
        """(rows, cols) of the primary drawable grid; ``rows * cols == n_image_tokens`` when the tokens
        form one raster (``token_order == "raster"``). See ``grid_info`` for the rest."""
        info = self.grid_info(inputs, n_image_tokens, **kwargs)
        return info.rows, info.cols
