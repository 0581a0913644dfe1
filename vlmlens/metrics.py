"""Task metrics of the studies: VQA soft accuracy, exact match, multiple choice, captions, traces.

* ``vqa``: VQAv2 accuracy. Answers are normalised as the VQA evaluation does (lower case;
  punctuation removed, or kept inside numbers like 1,000 / 2.5; number words -> digits;
  articles dropped; common contractions restored). With ``m`` reference answers the score of a
  prediction is the mean over the ``m`` leave-one-out subsets of ``min(#matches in the subset /
  3, 1)`` (VQAv2 has m = 10); a single reference degrades to exact match. Also reported:
  ``exact_match``, the normalised prediction equals any normalised reference (GQA-style).
* ``mc``: the option letter extracted from the output ("B", "B.", "(B)", "B) ...", "The answer is
  B", or the text of one choice) against the reference letter (or the reference choice's text).
* ``caption``: CIDEr-D and BLEU-4 over the dataset with ``pycocoevalcap``'s scorers; its PTB
  tokenizer needs Java -- used when ``java`` is on the PATH, else :func:`simple_tokenize`
  (lower case, punctuation split off and dropped as the PTB tokenizer's filter does), and the
  result says which.
* ``cot``: the final answer after ``separator`` (default "answer:") scored as ``vqa``.
* ``shapes``: the shapes world's own scorers (:mod:`vlmlens.tiny.eval`).
"""
from __future__ import annotations

import contextlib
import re
import shutil
import threading

#: the tasks a dataset row can name (the shapes world's suite is scored by ``vlmlens.tiny.eval``)
TASKS = ("vqa", "mc", "caption", "cot")
#: what precedes the final answer of a trace ("... answer: red")
DEFAULT_SEPARATOR = "answer:"
#: summed answer KL (nats) below which a change is reported as "no change" (numerical noise
#: of float32 forwards is ~1e-6; a real change on tiny-shapes is >= 1e-2)
NOISE_FLOOR = 1e-3

# The answer processing of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py), as data:
# its contraction table (verbatim, its odd entries included: keys with capitals never match after
# lower-casing; "somebody'd" -> "somebodyd"), number words, articles and punctuation list.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'           # the official list: & % $ : ' * # are not in it
_DIGIT_COMMA = re.compile(r"[0-9],[0-9]")      # ASCII digits: the official script's Python 2 ``\d``
_PERIOD = re.compile(r"\.(?![0-9])")           # every "." not followed by a digit ("2." -> "2", "2.5" kept)
_PERIOD_MAX = 32                               # the official call passes re.UNICODE (= 32) as sub's count
VQA_NORMALIZATIONS = ("official", "always")


def _vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a listed mark is deleted when it touches a space anywhere
    in the text or the text holds a digit,digit pattern, else it becomes a space ("red/white" ->
    "red white", "1,000" -> "1000"); then periods not followed by a digit are deleted (at most 32)."""
    gone = bool(_DIGIT_COMMA.search(text))
    table = {}
    for p in _PUNCT:
        table[ord(p)] = "" if gone or f"{p} " in text or f" {p}" in text else " "
    return _PERIOD.sub("", text.translate(table), count=_PERIOD_MAX)


def _vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words -> digits, articles dropped,
    contractions restored from its table."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _vqa_clean(text: str) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa(text: str) -> str:
    """A VQA answer after the official evaluation's processing (punctuation, then digits/articles)."""
    return _vqa_digits_articles(_vqa_punctuation(_vqa_clean(text)))


def vqa_accuracy(pred: str, answers, normalization: str = "official") -> float:
    """VQAv2 soft accuracy of ``pred`` against the reference ``answers``, as the official evaluation
    computes it: the mean over the leave-one-out subsets of ``min(#matches / 3, 1)``.

    ``normalization="official"`` (default) reproduces the official script exactly, its quirk
    included: when all references are the same string, neither they nor the prediction are
    normalised (only stripped), so "Yes" against ten "yes" scores 0. ``"always"`` -- a cleaner
    variant, not comparable with published numbers -- normalises in every case.

    One reference (GQA-style data; the official script would score every answer 0 there, having
    no other answers to leave one out from): exact match after the processing, in both modes."""
    if normalization not in VQA_NORMALIZATIONS:
        raise ValueError(f"unknown VQA normalization {normalization!r}; expected one of {VQA_NORMALIZATIONS}")
    refs = [_vqa_clean(a) for a in answers]
    if not refs:
        raise ValueError("no reference answers")
    p = _vqa_clean(pred)
    if len(refs) == 1:          # outside the official script's domain (it would score 0): exact match
        return float(normalize_vqa(p) == normalize_vqa(refs[0]))
    if normalization == "always" or len(set(refs)) > 1:
        refs = [normalize_vqa(r) for r in refs]
        p = normalize_vqa(p)
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(sum(r == p for r in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def exact_match(pred: str, answers) -> float:
    """1 when the normalised prediction equals any normalised reference."""
    p = normalize_vqa(pred)
    return float(any(p == normalize_vqa(a) for a in answers))


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]?\s*$"),                       # "B", "(B)", "B.", "B:"
    re.compile(r"\banswer\s+is\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", re.I),  # "The answer is B"
    re.compile(r"\banswer\s*:\s*\(?([A-Z])\)?(?![A-Za-z])", re.I),        # "answer: B"
    re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]\s+"),                          # "B. a red circle", "B) ..."
]


def mc_letter(pred: str, choices=()) -> str | None:
    """The option letter an output picks (None: none found). Tries the letter patterns, then
    whether the output is exactly one choice's text."""
    n = len(choices) if choices else len(LETTERS)
    for pat in _LETTER_PATTERNS:
        m = pat.search(pred.strip())
        if m:
            letter = m.group(1).upper()
            if LETTERS.index(letter) < n:
                return letter
    if choices:
        p = normalize_vqa(pred)
        hits = [i for i, c in enumerate(choices) if normalize_vqa(c) == p]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


def mc_accuracy(pred: str, answers, choices=()) -> float:
    """1 when the picked letter is the reference's (a letter, or the text of the right choice)."""
    want = set()
    for a in answers:
        a = a.strip()
        if len(a) == 1 and a.upper() in LETTERS:
            want.add(a.upper())
        elif choices:
            for i, c in enumerate(choices):
                if normalize_vqa(c) == normalize_vqa(a):
                    want.add(LETTERS[i])
    got = mc_letter(pred, choices)
    return float(got is not None and got in want)


def final_answer(text: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """The text after the last ``separator`` (case-insensitive), unstripped; the whole text without one
    (what the VQA scorer reads of a trace)."""
    i = text.lower().rfind(separator.lower()) if separator else -1
    return text if i < 0 else text[i + len(separator):]


def split_answer(text: str, separator: str = DEFAULT_SEPARATOR) -> tuple[str, str | None]:
    """(trace, answer): the text before / after the last ``separator`` (case-insensitive).

    Without the separator the whole text is the trace and the answer is None.
    """
    if not separator:
        return text.strip(), None
    i = text.lower().rfind(separator.lower())
    if i < 0:
        return text.strip(), None
    return text[:i].strip(), text[i + len(separator):].strip()


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation (how answers are compared)."""
    return " ".join(text.lower().split()).strip(" .,!?;:")


def answer_of(text: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """The answer a text gives: after the last separator when present, else the whole text."""
    trace, ans = split_answer(text, separator)
    return normalize(trace if ans is None else ans)


def is_correct(text: str, truth: str | None, separator: str = DEFAULT_SEPARATOR) -> bool | None:
    """Does ``text`` give the ground-truth answer? Both are compared as :func:`answer_of`
    (after the separator when present, normalised); None without a truth."""
    if truth is None or not str(truth).strip():
        return None
    return answer_of(text, separator) == answer_of(str(truth), separator)


def simple_tokenize(text: str) -> str:
    """Lower case, punctuation dropped. NOT the PTB tokenizer (it splits clitics, keeps "t-shirt",
    "3.5", "12:30", "u.s." and "$ % & #" whole or as tokens): scores made with it are not
    comparable with published CIDEr-D / BLEU-4, and say so."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def java_available() -> bool:
    return shutil.which("java") is not None


CAPTION_TOKENIZERS = ("auto", "ptb", "simple")
PTB_NAME = "PTB (Java, pycocoevalcap's Stanford tokenizer)"
SIMPLE_NAME = "simple (Python: lower case, punctuation dropped; NOT PTB, not comparable with published scores)"
NO_JAVA = ("caption scores (CIDEr-D, BLEU-4) are computed with the PTB tokenizer, which needs a Java runtime, and"
           " none is on the PATH: install one (Debian/Ubuntu: apt-get install default-jre-headless, or"
           " bash scripts/install.sh), or ask for the simple tokenizer (--caption-tokenizer simple; its scores are"
           " not comparable with published ones)")


def caption_tokenizer(tokenizer: str = "auto") -> str:
    """The tokenizer captions will be scored with: "ptb" or "simple". "auto" means PTB, and is
    refused (with how to get Java) when no Java runtime is there -- never a silent fallback."""
    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; expected one of {CAPTION_TOKENIZERS}")
    if tokenizer == "simple":
        return "simple"
    if not java_available():
        from .errors import InputError

        raise InputError(NO_JAVA)
    return "ptb"


_PTB_LOCK = threading.Lock()


@contextlib.contextmanager
def _java_stderr_quiet():
    """pycocoevalcap starts Java with the console as its stderr, so every corpus scored printed
    "PTBTokenizer tokenized N tokens at ..." into the user's terminal (and the dashboard's log). For the
    call, its Popen sends Java's stderr to /dev/null; the tokens (stdout) are read as before."""
    import functools
    import subprocess
    import types

    from pycocoevalcap.tokenizer import ptbtokenizer

    with _PTB_LOCK:
        real = ptbtokenizer.subprocess
        ptbtokenizer.subprocess = types.SimpleNamespace(
            PIPE=subprocess.PIPE, Popen=functools.partial(subprocess.Popen, stderr=subprocess.DEVNULL))
        try:
            yield
        finally:
            ptbtokenizer.subprocess = real


def caption_scores(preds: dict, refs: dict, *, tokenizer: str = "auto") -> dict:
    """Corpus CIDEr-D and BLEU-4 (pycocoevalcap) with per-item CIDEr-D; ``preds`` {id: text},
    ``refs`` {id: [texts]}. ``tokenizer``: "auto" / "ptb" -- the PTB tokenizer (Java), as the
    COCO caption evaluation does (refused without Java); "simple" -- :func:`simple_tokenize`,
    named as such in the result."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        from .errors import InputError

        raise InputError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    use = caption_tokenizer(tokenizer)
    keys = [k for k in preds if k in refs]
    if not keys:
        return {"cider_d": float("nan"), "bleu_4": float("nan"), "per_item": {}, "tokenizer": None}
    if use == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        with _java_stderr_quiet():
            res = tok.tokenize({k: [{"caption": preds[k]}] for k in keys})
            gts = tok.tokenize({k: [{"caption": r} for r in refs[k]] for k in keys})
    else:
        res = {k: [simple_tokenize(preds[k])] for k in keys}
        gts = {k: [simple_tokenize(r) for r in refs[k]] for k in keys}
    cider, per = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider_d": float(cider), "bleu_4": float(bleu[3]), "per_item": {k: float(v) for k, v in zip(keys, per)},
            "tokenizer": PTB_NAME if use == "ptb" else SIMPLE_NAME}


def item_score(task: str, pred: str, answers, choices=(), separator: str = DEFAULT_SEPARATOR,
               vqa_normalization: str = "official") -> float | None:
    """Per-item score of the tasks scored per item (vqa, mc, cot); None for caption (a corpus metric)."""
    if task == "vqa":
        return vqa_accuracy(pred, answers, vqa_normalization)
    if task == "mc":
        return mc_accuracy(pred, answers, choices)
    if task == "cot":
        return vqa_accuracy(final_answer(pred, separator), answers, vqa_normalization)
    if task == "caption":
        return None
    raise ValueError(f"unknown task {task!r}")
