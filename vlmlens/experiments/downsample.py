"""Image downsampling to a token budget: the honest baseline of a token-pruning comparison.

VTC-Bench (arXiv 2510.07143) finds that simply giving a dynamic-resolution model (Qwen2-VL) a
smaller image, with as many image tokens as a pruning method keeps, beats many of the methods.
:func:`downsample_to` finds that image: the largest size (aspect ratio kept, bicubic) at which
the model's own processor gives at most ``round(keep * n)`` image tokens. :func:`downsampled`
runs the model on it and scores the original baseline's tokens under it (teacher-forced), so the
output KL and "answer kept" read as for every other method.

A family whose processor resizes every image to one size (LLaVA-1.5, tiny-shapes: always the
same grid) gives the same number of tokens at any input size: refused with that reason
(``patch:R:grid``, a coarser grid of the same patches, is the nearest baseline there).
"""
from __future__ import annotations

from PIL import Image

from ..capture import image_positions, prepare_inputs
from ..errors import InputError


def _tokens(lm, image: Image.Image, prompt: str) -> int:
    inputs, _, _ = prepare_inputs(lm, image, prompt)
    return len(image_positions(lm, inputs["input_ids"]))


def _resized(image: Image.Image, width: int) -> Image.Image:
    w, h = image.size
    return image.resize((width, max(1, round(h * width / w))), Image.Resampling.BICUBIC)


def downsample_to(lm, image: Image.Image, prompt: str, keep: float) -> tuple[Image.Image, int, int]:
    """(the smaller image, its image tokens, the original's) for a budget of ``round(keep * n)`` tokens
    (``image``: a PIL image or anything :func:`vlmlens.images.load_image` reads)."""
    from ..images import load_image

    image = load_image(image)[0]
    n = _tokens(lm, image, prompt)
    want = max(1, int(round(keep * n)))
    if want >= n:
        return image, n, n
    w = image.size[0]
    if _tokens(lm, _resized(image, max(1, w // 8)), prompt) >= n:
        raise InputError(f"downsampling does not change this model's image tokens ({n} at any size: its processor"
                         " resizes every image to one size); use patch:R:grid, a coarser grid of the same patches")
    lo, hi = 1, w                      # tokens(lo) <= want is checked below; tokens(hi) = n > want
    if _tokens(lm, _resized(image, lo), prompt) > want:
        raise InputError(f"the processor's smallest input still gives more than {want} image tokens (of {n}):"
                         " this budget is below what downsampling can reach on this model")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _tokens(lm, _resized(image, mid), prompt) <= want:
            lo = mid
        else:
            hi = mid
    small = _resized(image, lo)
    return small, _tokens(lm, small, prompt), n


def downsampled(trial, keep: float):
    """The model on the downsampled input: (its Outcome scored on ``trial``'s baseline tokens,
    the smaller image, its image tokens)."""
    from .engine import Outcome, Trial

    if trial.prep.video is not None:
        raise InputError("downsampling is defined for an image, not a video")
    small, m, _ = downsample_to(trial.lm, trial.prep.rgb, trial.prep.prompt, keep)
    t = Trial(trial.lm, small, trial.prep.prompt, max_new_tokens=trial.n_new)
    steps, lps = t._score([], trial.baseline.generated_ids, None)
    return Outcome([], t.baseline.run, steps[0], lps, steps), small, m
