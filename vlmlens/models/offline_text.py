"""Offline text parts for processors: a word-level tokenizer, Jinja chat templates, and processor
classes without their (torchvision-only) video processor. Used by ``tiny_processors`` for the tiny
random models, and by ``loading`` for real checkpoints whose processor declares a video processor.
"""

from __future__ import annotations

import inspect

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
    video: str | None = None,
) -> str:
    """Build a Jinja chat template. ``roles[role] = (prefix, suffix)`` wraps each message; an image part
    renders as ``image``, a video part as ``video`` (given); text parts render verbatim. ``default_system`` is emitted when the
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
        content = _CONTENT.replace("@IMAGE@", _jinja_literal(image))
        if video is not None:
            content = content.replace("{%- elif part['type'] == 'text'",
                                      "{%- elif part['type'] == 'video' -%}" + _jinja_literal(video)
                                      + "{%- elif part['type'] == 'text'")
        parts.append(content)
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
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                     chat_template=chat_template, **kwargs)

    # keep the parent's other parameters (e.g. InternVL's image_seq_length) visible, so that
    # save_pretrained writes them and from_pretrained restores them
    sig = inspect.signature(cls.__init__)
    __init__.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "video_processor"])

    return type(
        f"{cls.__name__}NoVideo",
        (cls, _WithoutVideoArgument),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"{cls.__name__} without a video processor.",
         "video_processor": NO_VIDEO},
    )


class _WithoutVideoArgument(transformers.ProcessorMixin):
    """Sits between a family's processor and ``ProcessorMixin`` in the subclass's MRO: the family's
    ``__init__`` hands its sub-processors on positionally, in its own order (video first for
    LLaVA-NeXT-Video, last for Qwen2-VL); the empty video slot is taken out of that call, so that
    ``ProcessorMixin`` gets just the image processor and tokenizer it expects."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(*(a for a in args if a is not None), **kwargs)


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
