"""Architecture of the tiny shapes VLM: a stock ``LlavaForConditionalGeneration``.

CLIP-style vision tower (64x64 input, 8x8 patches -> 64 patch tokens + CLS)
-> 2-layer GELU projector -> 8-layer Llama decoder over a 76-token word vocabulary.
Nothing custom: ``from_pretrained`` on the saved folder needs only transformers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .scenes import IMAGE_SIZE
from .tokenizer import NUM_IMAGE_TOKENS, PATCH_SIZE


@dataclass
class TinyArch:
    vision_dim: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    text_dim: int = 160
    text_layers: int = 8
    text_heads: int = 4
    text_mlp: int = 432
    max_positions: int = 256
    embed_std: float = 1.0  # input embeddings ~ unit RMS, like the (normed) image features

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(arch: TinyArch, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_dim, intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, hidden_act="gelu",
        projection_dim=arch.vision_dim)
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=arch.text_dim, intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads, max_position_embeddings=arch.max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"], rope_theta=10000.0)
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=NUM_IMAGE_TOKENS, multimodal_projector_bias=True,
        tie_word_embeddings=False)
    cfg.pad_token_id = vocab["<pad>"]
    cfg.bos_token_id = vocab["<s>"]
    cfg.eos_token_id = vocab["</s>"]
    return cfg


def build_model(arch: TinyArch, tokenizer, seed: int = 0):
    """Randomly initialised model (deterministic for a given ``seed``)."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(arch, tokenizer))
    # Untied input embeddings at unit scale: with the default std 0.02 the word embeddings
    # are ~100x smaller than the projected image tokens, and a word's identity is drowned
    # by the first attention update.  (lm_head keeps the small default init.)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, arch.embed_std)
    vocab = tokenizer.get_vocab()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        do_sample=False, max_new_tokens=48)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
