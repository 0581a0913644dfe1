"""Word-level tokenizer, chat template and LlavaProcessor for the tiny model.

The tokenizer is a ``tokenizers`` WordLevel model (lower-casing normalizer,
whitespace + isolated-punctuation pre-tokenizer) wrapped in
``PreTrainedTokenizerFast``.  Unknown words map to ``<unk>``.  The processor
is a stock ``LlavaProcessor`` with the PIL-backed CLIP image processor, so it
works without torchvision and loads with plain ``AutoProcessor.from_pretrained``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .scenes import IMAGE_SIZE
from .tasks import vocabulary_words

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
CHAT_WORDS = ("user", "assistant", "system")
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64: CLS is dropped ("default" strategy)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Renders: "<s>USER: <image> What color is the circle? ASSISTANT:"
# (system turns are ignored: the model was never trained on them)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """Fresh ``PreTrainedTokenizerFast`` whose vocabulary covers every task template."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + list(CHAT_WORDS) + vocabulary_words()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    # join with spaces, then glue punctuation back: "left . answer : yes" -> "left. answer: yes"
    tk.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True),
                                    decoders.Replace(" :", ":")])
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=512,
        padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor():
    """PIL/numpy CLIP image processor: any RGB/L/RGBA image -> 64x64 normalised."""
    from transformers import CLIPImageProcessorPil

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return CLIPImageProcessorPil(
        size=size, crop_size=size, do_resize=True, do_center_crop=False, do_rescale=True,
        do_normalize=True, do_convert_rgb=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def build_processor():
    from transformers import LlavaProcessor

    tok = build_tokenizer()
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=tok, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE)


def chat_prompt(prompt: str) -> list[dict]:
    """The single-turn conversation every consumer (and training) uses."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


# ------------------------------------------------------------------ fast paths
class FastEncoder:
    """Token ids / pixel tensors exactly as the processor would produce them, but
    without the per-call overhead (used by training; equality is unit-tested)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = tokenizer.get_vocab()
        self.image_id = self.ids[IMAGE]
        self.bos_id, self.eos_id, self.pad_id = self.ids[BOS], self.ids[EOS], self.ids[PAD]
        self._cache: dict[str, list[int]] = {}
        head = self.words("USER:")
        self.head = [self.bos_id] + head + [self.image_id] * NUM_IMAGE_TOKENS
        self.tail = self.words("ASSISTANT:")

    def words(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def turn_ids(self, prompt: str, first: bool) -> list[int]:
        """A user turn after the head (first) or after an earlier answer's '</s>':
        '{prompt} ASSISTANT:' or 'USER: {prompt} ASSISTANT:'."""
        return ([] if first else self.words("USER:")) + self.words(prompt) + self.tail

    def answer_ids(self, answer: str) -> list[int]:
        return self.words(answer) + [self.eos_id]


def pixels(image: Image.Image) -> np.ndarray:
    """(3, 64, 64) float32 normalised pixels for an RGB image of the native size."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) or image.mode != "RGB":
        raise ValueError("fast path expects a native-size RGB image; use the processor otherwise")
    arr = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
