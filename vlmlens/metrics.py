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

import re
import shutil

TASKS = ("vqa", "mc", "caption", "cot", "shapes")

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "its": "it's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$:'")
_NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_vqa(text: str) -> str:
    """A VQA answer in the evaluation's normal form (see the module docstring)."""
    s = " ".join(str(text).replace("\n", " ").replace("\t", " ").strip().lower().split())
    s = _NUMBER_COMMA.sub(r"\1\3", s)             # 1,000 -> 1000
    out = []
    for ch in s:
        out.append("" if ch in _PUNCT else ch)
    s = _PERIOD.sub("", "".join(out))
    words = []
    for w in s.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(pred: str, answers) -> float:
    """VQAv2 soft accuracy of ``pred`` against the reference ``answers`` (leave-one-out mean)."""
    refs = [normalize_vqa(a) for a in answers]
    if not refs:
        raise ValueError("no reference answers")
    p = normalize_vqa(pred)
    if len(refs) == 1:
        return float(p == refs[0])
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


def final_answer(text: str, separator: str = "answer:") -> str:
    """The text after the last ``separator`` (case-insensitive); the whole text without one."""
    i = text.lower().rfind(separator.lower()) if separator else -1
    return text if i < 0 else text[i + len(separator):]


def simple_tokenize(text: str) -> str:
    """Lower case, punctuation dropped (what the PTB tokenizer + its punctuation filter keep)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(preds: dict, refs: dict, *, tokenizer: str = "auto") -> dict:
    """Corpus CIDEr-D and BLEU-4 (pycocoevalcap) with per-item CIDEr-D; ``preds`` {id: text},
    ``refs`` {id: [texts]}. ``tokenizer``: "ptb" (Java), "simple" or "auto" (PTB when Java is there)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        from .errors import InputError

        raise InputError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    keys = [k for k in preds if k in refs]
    if not keys:
        return {"cider_d": float("nan"), "bleu_4": float("nan"), "per_item": {}, "tokenizer": None}
    use = "ptb" if tokenizer == "ptb" or (tokenizer == "auto" and java_available()) else "simple"
    if use == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        res = tok.tokenize({k: [{"caption": preds[k]}] for k in keys})
        gts = tok.tokenize({k: [{"caption": r} for r in refs[k]] for k in keys})
    else:
        res = {k: [simple_tokenize(preds[k])] for k in keys}
        gts = {k: [simple_tokenize(r) for r in refs[k]] for k in keys}
    cider, per = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider_d": float(cider), "bleu_4": float(bleu[3]), "per_item": {k: float(v) for k, v in zip(keys, per)},
            "tokenizer": "PTB (Java)" if use == "ptb" else "simple (Python: lower case, punctuation dropped)"}


def item_score(task: str, pred: str, answers, choices=(), separator: str = "answer:") -> float | None:
    """Per-item score of the tasks scored per item (vqa, mc, cot); None for caption (a corpus metric)."""
    if task == "vqa":
        return vqa_accuracy(pred, answers)
    if task == "mc":
        return mc_accuracy(pred, answers, choices)
    if task == "cot":
        return vqa_accuracy(final_answer(pred, separator), answers)
    if task == "caption":
        return None
    raise ValueError(f"unknown task {task!r}")
