"""What a study varies, in one vocabulary.

A :class:`Variant` is a name and the interventions that make it; every study, sweep and
comparison is inputs x variants, each (input, variant) one cell (``Trial.cell``). Depth variants
cut the image from decoder layer ``k`` (and, in an encoder x decoder grid, run only ``m`` of the
vision tower's layers); method variants are token-pruning schedules by name, next to the baseline.

:func:`parse_variants` reads what a user wrote or picked -- depths, encoder depths or methods, as
the command line and the dashboard take them -- into a checked :class:`Plan` of variants; every
study, comparison and tab starts there.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..interventions import EncoderDepth
from .engine import check_mode, parse_depths, truncation
from .methods import check_methods, parse_methods


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


def parse_encoder_depths(encoder_depths, feature_depth: int) -> list[int]:
    """Vision-tower depths m ("0,2,4" or a sequence of ints) in 0..F, sorted and unique."""
    F = int(feature_depth)
    items = encoder_depths.split(",") if isinstance(encoder_depths, str) else list(encoder_depths)
    why = (f"encoder depths must be integers in 0..{F} (this tower's features are read after {F} layers),"
           f" got {encoder_depths!r}")
    if any(isinstance(m, (bool, float)) for m in items):
        raise InputError(why)
    try:
        ms = sorted({int(str(m).strip()) for m in items})
    except ValueError:
        raise InputError(why) from None
    if not ms or any(not 0 <= m <= F for m in ms):
        raise InputError(why)
    return ms


@dataclass(frozen=True)
class Plan:
    """What a study varies, checked against the model: a truncation sweep over ``depths``, an
    encoder x decoder ``grid``, or token-pruning ``methods`` next to the baseline."""
    kind: str                          # "depths", "grid" or "methods"
    mode: str
    depths: list                       # decoder depths (a methods plan keeps the default ones, unused)
    encoder_depths: list | None
    methods: dict | None               # {name: interventions}
    variants: list

    @property
    def method_names(self) -> list[str] | None:
        return list(self.methods) if self.methods else None


def parse_variants(lm, *, depths=None, mode: str = "drop", encoder_depths=None, methods=None,
                   stage_labels=None, include_full: bool = False) -> Plan:
    """The variants of a study from their written (or picked) form.

    ``depths``: "0,4,all" or a sequence (default every depth 0..L; ``include_full`` adds L, the
    untruncated row, when it is missing); ``encoder_depths``: vision-tower depths m, which makes it
    an encoder x decoder grid; ``methods``: written as ``METHOD_SYNTAX`` (or {name: interventions}),
    which makes it a pruning study -- not with depths or encoder depths. ``stage_labels``: the
    input's causal stages, for ``stages:R``."""
    L = lm.n_layers
    if methods is not None and methods != "":
        if depths is not None:
            raise InputError("give depths (a truncation study) or methods (a pruning study), not both")
        if encoder_depths is not None:
            raise InputError("give encoder depths (an encoder x decoder grid) or methods (a pruning study), not both")
        parsed = (parse_methods(methods, L, stage_labels) if isinstance(methods, str)
                  else check_methods(methods, L))
        return Plan("methods", check_mode(mode), list(range(L + 1)), None, parsed, method_variants(parsed))
    check_mode(mode)
    ks = parse_depths(range(L + 1) if depths is None else depths, L)
    if include_full and L not in ks:
        ks.append(L)
    ems = None
    if encoder_depths is not None:
        ems = parse_encoder_depths(encoder_depths, lm.arch.vision_feature_depth(lm.model))
    return Plan("grid" if ems else "depths", mode, ks, ems, None, depth_variants(lm, ks, mode, ems))
