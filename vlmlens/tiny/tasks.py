"""Question/answer generation for the shapes world (three task families).

* ``single``    -- VQA with a one-word answer (color, shape, size, count, yes/no, side)
* ``caption``   -- canonical description of every object, row-major order
* ``reasoning`` -- short step-by-step trace ending in ``answer: X``

Everything is a pure function of ``(seed, family)``; the splits use disjoint seed
ranges so that the test split is never seen in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scenes import COLORS, COLS, ROWS, SHAPES, SIZES, Scene, make_scene

FAMILIES = ("single", "caption", "reasoning")
NUMBERS = ("zero", "one", "two", "three", "four")
SPLITS = {  # [start, stop) seed ranges, disjoint
    "test": (0, 100_000),
    "val": (100_000, 200_000),
    "train": (1_000_000, 2**31 - 1),
}
SINGLE_KINDS = ("color", "shape", "size", "count", "count_shape", "exist", "side")
REASONING_KINDS = ("left_of", "above", "more", "same_color", "count_color")
CAPTION_PROMPTS = ("Describe the image.", "Describe the scene.", "What is in the image?")

# every word a prompt or answer template can produce, besides attribute words
_TEMPLATE_TEXT = """
what color is the shape object size how many objects are there is a on left or
right of describe image scene in at above below column row so answer : yes no than more
not do and have same they different ? . , :
"""


@dataclass
class Example:
    seed: int
    family: str
    kind: str
    prompt: str
    answer: str
    scene: Scene = field(repr=False)

    @property
    def final_answer(self) -> str:
        """The one-word answer: the answer itself, or the word after 'answer:'."""
        return final_answer(self.answer)


def final_answer(text: str) -> str:
    """Word after the last 'answer:' (or the last word) of a generated text."""
    t = text.strip().lower()
    if "answer" in t:
        t = t.rsplit("answer", 1)[1]
    words = t.replace(":", " ").replace(".", " ").replace("?", " ").split()
    return words[0] if words else ""


def plural(shape: str) -> str:
    return shape + "s"


def caption(scene: Scene) -> str:
    """Canonical caption: every object, row-major order, joined with 'and'."""
    return " and ".join(o.describe() for o in scene.objects)


def _unique(items):
    return [x for x in set(items) if list(items).count(x) == 1]


# ---------------------------------------------------------------- single-token
def _single_candidates(scene: Scene, kind: str, want_yes: bool):
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if kind == "color":
        return [(f"What color is the {o.shape}?", o.color) for o in objs if o.shape in _unique(shapes)]
    if kind == "shape":
        return [(f"What shape is the {o.color} object?", o.shape) for o in objs if o.color in _unique(colors)]
    if kind == "size":
        return [(f"What size is the {o.name}?", o.size) for o in objs]
    if kind == "count":
        return [("How many objects are there?", NUMBERS[len(objs)])]
    if kind == "count_shape":
        return [(f"How many {plural(s)} are there?", NUMBERS[shapes.count(s)]) for s in SHAPES]
    if kind == "exist":
        present = {o.name for o in objs}
        pool = [f"{c} {s}" for c in COLORS for s in SHAPES]
        names = sorted(present) if want_yes else [n for n in pool if n not in present]
        return [(f"Is there a {n}?", "yes" if n in present else "no") for n in names]
    if kind == "side":
        return [(f"Is the {a.name} on the left or right of the {b.name}?", "left" if a.col < b.col else "right")
                for a in objs for b in objs if a.col != b.col]
    raise ValueError(kind)


# ------------------------------------------------------------------ reasoning
def _reasoning_candidates(scene: Scene, kind: str):
    objs = scene.objects
    out = []
    if kind == "left_of":
        for a in objs:
            for b in objs:
                if a.col != b.col:
                    rel, ans = ("left", "yes") if a.col < b.col else ("right", "no")
                    out.append((f"Is the {a.name} left of the {b.name}?",
                                f"the {a.name} is in the {COLS[a.col]} column. the {b.name} is in the "
                                f"{COLS[b.col]} column. so the {a.name} is {rel} of the {b.name}. answer: {ans}"))
    elif kind == "above":
        for a in objs:
            for b in objs:
                if a.row != b.row:
                    rel, ans = ("above", "yes") if a.row < b.row else ("below", "no")
                    out.append((f"Is the {a.name} above the {b.name}?",
                                f"the {a.name} is in the {ROWS[a.row]} row. the {b.name} is in the "
                                f"{ROWS[b.row]} row. so the {a.name} is {rel} the {b.name}. answer: {ans}"))
    elif kind == "more":
        shapes = [o.shape for o in objs]
        for s1 in SHAPES:
            for s2 in SHAPES:
                if s1 == s2:
                    continue
                n1, n2 = NUMBERS[shapes.count(s1)], NUMBERS[shapes.count(s2)]
                more = shapes.count(s1) > shapes.count(s2)
                out.append((f"Are there more {plural(s1)} than {plural(s2)}?",
                            f"{plural(s1)}: {n1}. {plural(s2)}: {n2}. so {n1} is "
                            f"{'more' if more else 'not more'} than {n2}. answer: {'yes' if more else 'no'}"))
    elif kind == "same_color":
        uniq = [o for o in objs if o.shape in _unique([x.shape for x in objs])]
        for a in uniq:
            for b in uniq:
                if a.shape < b.shape:
                    same = a.color == b.color
                    out.append((f"Do the {a.shape} and the {b.shape} have the same color?",
                                f"the {a.shape} is {a.color}. the {b.shape} is {b.color}. so they are "
                                f"{'the same' if same else 'different'}. answer: {'yes' if same else 'no'}"))
    elif kind == "count_color":
        for c in COLORS:
            found = scene.find(color=c)
            listed = " and ".join(f"the {o.name}" for o in found) if found else "none"
            out.append((f"How many {c} objects are there?",
                        f"{c} objects: {listed}. answer: {NUMBERS[len(found)]}"))
    else:
        raise ValueError(kind)
    return out


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(0, len(items)))]


def make_example(seed: int, family: str, kind: str | None = None, scene: Scene | None = None,
                 variant: int = 0) -> Example:
    """Deterministic example for ``(seed, family)``; ``kind`` forces a question type;
    ``variant`` > 0 draws another question about the same scene (training asks several)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    scene = make_scene(seed) if scene is None else scene
    key = [int(seed), FAMILIES.index(family), 1234] + ([int(variant)] if variant else [])
    rng = np.random.default_rng(key)
    want_yes = bool(rng.integers(0, 2))
    if family == "caption":
        return Example(seed, family, "caption", _pick(rng, CAPTION_PROMPTS), caption(scene), scene)
    kinds = SINGLE_KINDS if family == "single" else REASONING_KINDS
    order = [kind] if kind is not None else [kinds[i] for i in rng.permutation(len(kinds))]
    for k in order:
        if family == "single":
            cands = _single_candidates(scene, k, want_yes)
        else:
            cands = _reasoning_candidates(scene, k)
            # balance yes/no (and zero/non-zero counts) where the scene allows it
            if k == "count_color":
                wanted = [c for c in cands if (not c[1].endswith("zero")) == want_yes]
            else:
                wanted = [c for c in cands if c[1].endswith("yes") == want_yes]
            cands = wanted or cands
        if cands:
            prompt, answer = _pick(rng, sorted(cands))
            return Example(int(seed), family, k, prompt, answer, scene)
    raise ValueError(f"no {family}/{kind} question possible for seed {seed}")


def split_seeds(split: str, n: int, offset: int = 0) -> list[int]:
    """The first ``n`` seeds of a split (after ``offset``)."""
    lo, hi = SPLITS[split]
    if lo + offset + n > hi:
        raise ValueError("not enough seeds in split")
    return list(range(lo + offset, lo + offset + n))


def split_examples(family: str, n: int, offset: int = 0) -> list[Example]:
    """Fixed, reproducible test-split examples for one family."""
    out = []
    for s in split_seeds("test", n, offset):
        out.append(make_example(s, family))
    return out


def vocabulary_words() -> list[str]:
    """All lower-case words/punctuation the task templates can emit."""
    words = set(_TEMPLATE_TEXT.split())
    words |= set(COLORS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COLS) | set(NUMBERS)
    words |= {plural(s) for s in SHAPES} | {"center", "answer", "none"}
    return sorted(words)
