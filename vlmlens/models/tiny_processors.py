"""Offline processors for the tiny random models: a word-level tokenizer plus each family's own
image-processor and processor classes, configured small.

Nothing here touches the network. Image processors are the PIL/numpy-backed ``*ImageProcessorPil``
classes (the default "fast" ones in transformers 5 need torchvision). Processors whose constructor also
takes a video processor (Qwen2-VL, Qwen2.5-VL, InternVL) get a thin subclass that drops that slot,
because every video processor in transformers 5 is torchvision-backed; see ``without_video_processor``.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass, field

import transformers
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

# A few hundred common English words. The tokenizer lowercases, so capitalised prompt words still hit.
_WORDS = """
a an the this that these those it its is are was were be been being am do does did done have has had
i you he she we they me him her us them my your his our their mine yours what which who whom whose
where when why how there here not no yes and or but if then so because as of in on at by for with
about into onto over under above below between behind front near far from to up down out off again
left right top bottom middle center side corner edge inside outside around through across along
image picture photo photograph scene view shown show shows see seen look looks looking visible
color colour colors red green blue yellow orange purple pink black white gray grey brown gold silver
shape shapes circle square triangle rectangle line lines dot dots star cross ring box ball cube
small large big little tiny huge long short tall wide narrow thick thin round flat bright dark light
one two three four five six seven eight nine ten many few some all any each every more most less
man woman person people child boy girl dog cat bird horse cow fish animal animals car bus truck bike
tree trees flower grass sky sun cloud water sea river road street house building window door wall
table chair bed cup plate food apple banana book phone computer screen sign text word letter number
can could will would should may might must shall describe tell answer question count find name
there's it's i'm don't
first second last next other same different new old good bad best better very much also only just
background foreground object objects thing things part parts area region pattern texture
day night time year way place world home room city water fire air ground floor field
make made take taken give given go going come coming get got put say said know think want like
use used find found work seem seems feel try leave call keep let begin help turn start run move
live believe hold bring happen write sit stand lose pay meet include continue set learn change lead
understand watch follow stop create speak read allow add spend grow open walk win offer remember
love consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest
raise pass sell require report decide pull empty full half whole
please thanks hello hi ok okay yes sure user assistant system model inst helpful
""".split()

_PUNCT = [".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "/", "[", "]", "<", ">", "|", "_"]
_DIGITS = [str(d) for d in range(10)]


def _vocab_words() -> list[str]:
    seen: dict[str, None] = {}
    for w in [*_PUNCT, *_DIGITS, *_WORDS]:
        seen.setdefault(w, None)
    return list(seen)


def make_tokenizer(
    special_tokens: list[str],
    *,
    eos: str,
    bos: str | None = None,
    extra_named: dict[str, str] | None = None,
    added_plain: list[str] = ("\n",),
) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer: ``<unk>``, ``<pad>``, the given special tokens, ``\\n``, punctuation, digits
    and a few hundred lowercase English words. Whitespace is dropped except ``\\n``, which is its own
    (non-special) token so that templates with line breaks survive a round trip through ids.

    ``extra_named`` maps attribute names (e.g. ``"context_image_token"``) to special tokens; transformers
    then exposes ``tok.<name>`` and ``tok.<name>_id``, which some processors read.
    """
    specials: list[str] = []
    for tok in ["<unk>", "<pad>", *([bos] if bos else []), eos, *special_tokens, *(extra_named or {}).values()]:
        if tok not in specials:
            specials.append(tok)
    vocab = {tok: i for i, tok in enumerate([*specials, *added_plain, *_vocab_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"bos_token": bos} if bos else {}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=eos,
        extra_special_tokens=dict(extra_named or {}),
        padding_side="left",
        **kwargs,
    )
    # Register every special string as an added token so it is matched before normalisation and
    # pre-tokenisation (``<image>`` must not split into ``<``, ``image``, ``>``).
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in specials], special_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_plain])
    return tok


def chat_template(
    *,
    roles: dict[str, tuple[str, str]],
    image: str,
    generation_prompt: str,
    start: str = "",
    default_system: str | None = None,
) -> str:
    """Build a Jinja chat template. ``roles[role] = (prefix, suffix)`` wraps each message; an image part
    renders as ``image``; text parts render verbatim. ``default_system`` is emitted when the
    conversation has no system message (Qwen style)."""
    parts = [start]
    if default_system is not None:
        sp, ss = roles["system"]
        parts.append(
            "{%- if messages[0]['role'] != 'system' -%}" + _jinja_literal(sp + default_system + ss) + "{%- endif -%}"
        )
    parts.append("{%- for message in messages -%}")
    first = True
    for role, (prefix, suffix) in roles.items():
        kw = "if" if first else "elif"
        first = False
        parts.append(f"{{%- {kw} message['role'] == '{role}' -%}}{_jinja_literal(prefix)}")
        parts.append(_CONTENT.replace("@IMAGE@", _jinja_literal(image)))
        parts.append(_jinja_literal(suffix))
    parts.append("{%- endif -%}{%- endfor -%}")
    parts.append("{%- if add_generation_prompt -%}" + _jinja_literal(generation_prompt) + "{%- endif -%}")
    return "".join(parts)


_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}@IMAGE@"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def _jinja_literal(s: str) -> str:
    if not s:
        return ""
    escaped = s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "{{ '" + escaped + "' }}"


def without_video_processor(cls: type) -> type:
    """Subclass of processor ``cls`` with no video-processor slot.

    transformers 5 requires every declared sub-processor at construction time, and all of its video
    processors need torchvision (not installed here). The subclass's ``__init__`` has no
    ``video_processor`` parameter, so ``ProcessorMixin`` expects only the image processor and tokenizer;
    image + text processing is inherited unchanged. Its ``video_processor`` is :data:`NO_VIDEO`: passing
    ``videos=`` is refused with the reason, and the video defaults some processors read while rendering
    any chat (SmolVLM) are None. The subclass's
    ``from_pretrained`` also works on a saved checkpoint directory (it loads no video processor).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=None, **kwargs):
        # image_seq_length is named here because from_pretrained keeps only the arguments that
        # __init__'s code object names (InternVL needs it; the others never receive it)
        if image_seq_length is not None:
            kwargs["image_seq_length"] = image_seq_length
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # keep the parent's other parameters (e.g. InternVL's image_seq_length) visible, so that
    # save_pretrained writes them and from_pretrained restores them
    sig = inspect.signature(cls.__init__)
    __init__.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "video_processor"])

    return type(
        f"{cls.__name__}NoVideo",
        (cls,),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"{cls.__name__} without a video processor.",
         "video_processor": NO_VIDEO},
    )


class _NoVideo:
    """Where a processor without its video processor is asked for one: the video defaults some
    processors read while rendering any chat (SmolVLM reads ``num_frames`` and ``fps``) are None,
    and processing a video is refused with the reason."""

    num_frames = None
    fps = None

    def __call__(self, *args, **kwargs):
        raise ValueError("this processor was loaded without its video processor (transformers' video processors"
                         " need torchvision, which vlmlens does not install); vlmlens reads images")


NO_VIDEO = _NoVideo()


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
    if f == "llava":
        tok = make_tokenizer(["<image>"], bos="<s>", eos="</s>")
        ip = transformers.LlavaImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        tpl = chat_template(
            start="<s>",
            roles={"user": ("USER: ", " "), "assistant": ("ASSISTANT: ", "</s>"), "system": ("", " ")},
            image="<image>\n",
            generation_prompt="ASSISTANT:",
        )
        # CLIP emits CLS + patches; "default" drops CLS, so one extra token is added then removed again.
        return transformers.LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=p, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tpl,
        )  # fmt: skip
    if f == "llava_next":
        tok = make_tokenizer(["<image>", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
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
        return transformers.LlavaNextProcessor(
            image_processor=ip, tokenizer=tok, patch_size=p, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tpl,
        )  # fmt: skip
    if f == "glm4v":
        names = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
        tok = make_tokenizer(names, eos="<|endoftext|>")
        lo, hi = spec.extra["min_pixels"], spec.extra["max_pixels"]
        ip = transformers.Glm4vImageProcessorPil(patch_size=p, merge_size=spec.extra["merge_size"],
                                                 temporal_patch_size=spec.extra["temporal_patch_size"],
                                                 size={"shortest_edge": lo, "longest_edge": hi})
        tpl = chat_template(roles={r: (f"<|{r}|>\n", "") for r in ("system", "user", "assistant")},
                            image="<|begin_of_image|><|image|><|end_of_image|>", generation_prompt="<|assistant|>\n")
        return without_video_processor(transformers.Glm4vProcessor)(image_processor=ip, tokenizer=tok, chat_template=tpl)
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
    if f in ("qwen2_vl", "qwen2_5_vl"):
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
            generation_prompt="<|im_start|>assistant\n",
            default_system="You are a helpful assistant.",
        )
        base = transformers.Qwen2VLProcessor if f == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
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
