"""What a study varies, in one vocabulary.

A :class:`Variant` is a name and the interventions that make it; every study, sweep and
comparison is inputs x variants, each (input, variant) one cell (``Trial.cell``). Depth variants
cut the image from decoder layer ``k`` (and, in an encoder x decoder grid, run only ``m`` of the
vision tower's layers); method variants are token-pruning schedules by name, next to the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..interventions import EncoderDepth
from .engine import truncation


@dataclass(frozen=True)
class Variant:
    key: str                          # how results name it: "4" (depth), "2,4" (encoder m, decoder k), a method
    interventions: tuple = ()         # () = the baseline itself (never run twice)
    depth: int | None = None          # decoder depth k (L: the image is used everywhere)
    encoder_depth: int | None = None  # vision-tower layers run (F: all of them)
    method: str | None = None         # a method's name ("baseline" for the untouched model)


def depth_variants(lm, depths, mode: str, encoder_depths=None) -> list[Variant]:
    """One variant per (encoder depth m, decoder depth k), m-major; without ``encoder_depths`` one per k.
    ``depths`` are parsed depths (0..L); k = L and m = F add no intervention."""
    L, F = lm.n_layers, lm.arch.vision_feature_depth(lm.model)
    out = []
    for m in (encoder_depths or [F]):
        for k in depths:
            ivs = ([EncoderDepth(m)] if m < F else []) + ([truncation(k, mode)] if k < L else [])
            out.append(Variant(f"{m},{k}" if encoder_depths else str(k), tuple(ivs), depth=k, encoder_depth=m))
    return out


def method_variants(methods: dict) -> list[Variant]:
    """The baseline, then each method ({name: interventions}) in order."""
    return [Variant("baseline", method="baseline")] + [Variant(name, tuple(ivs), method=name)
                                                       for name, ivs in methods.items()]
