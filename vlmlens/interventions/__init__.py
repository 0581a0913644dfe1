"""Interventions: small frozen dataclasses the lens applies (no second hooking mechanism).

* :mod:`.core` -- Truncate, Freeze, Substitute, SkipLayers, Knockout;
* :mod:`.pruning` -- token pruning: TokenPruner, FastV, PyramidDrop, VTW; :mod:`.policies` --
  StagePruner (a treatment per causal stage) and AdaptiveVTW (a depth per input);
* :mod:`.encoder` -- EncoderDepth (the vision tower run only up to layer m), PatchPrune (a subset
  of the patches reaches the language model);
* :mod:`.base` -- what they share: the meaning methods (``prefix_effect``, ``gradient_safe``,
  ``conflicts``, ``image_row_edits``) and the functions that ask them.

:func:`from_json` rebuilds any of them from the dict a Run's meta stores.
"""
from __future__ import annotations

from ..errors import InputError
from .base import (INDEPENDENT, RECOMPUTE, UNCHANGED, PrefixEffect, batch_conflict, decides_every_step, gradient_safe,
                   prefix_effect, removal_conflict, validate_all)
from .encoder import PATCH_SCORES, Downsample, EncoderDepth, PatchKnockout, PatchPrune
from .core import DST_SPANS, SRC_SPANS, TRUNCATE_MODES, Freeze, Knockout, SkipLayers, Substitute, Truncate
from .dart import DART
from .policies import STAGE_TREATMENTS, VISIPRUNER_TREATMENTS, AdaptiveVTW, StagePruner
from .pruning import PRUNE_MODES, PRUNE_SCORES, RERANKS, VTW, FastV, PyramidDrop, TokenPruner, n_kept

PRUNERS = (TokenPruner, FastV, PyramidDrop, VTW, StagePruner, AdaptiveVTW, DART)

KINDS = {c.__name__: c for c in (Truncate, Freeze, Substitute, SkipLayers, Knockout, EncoderDepth, PatchPrune, PatchKnockout, Downsample, *PRUNERS)}


def from_json(d: dict):
    """Rebuild an intervention from its ``to_json`` dict (as stored in a Run's meta)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in KINDS:
        raise InputError(f"unknown intervention kind {kind!r}; expected one of {sorted(KINDS)}")
    if kind in ("Truncate", "Freeze") and "after_layer" in d and "from_layer" not in d:
        d["from_layer"] = d.pop("after_layer")        # runs saved before the rename
    try:
        return KINDS[kind](**d)
    except TypeError as e:
        raise InputError(f"bad fields for {kind}: {e}") from None


__all__ = ["batch_conflict", "DART", "EncoderDepth", "PATCH_SCORES", "PatchPrune", "PatchKnockout", "Downsample", "AdaptiveVTW", "PRUNERS", "DST_SPANS", "INDEPENDENT", "KINDS", "PRUNE_MODES", "PRUNE_SCORES", "RECOMPUTE", "SRC_SPANS",
           "STAGE_TREATMENTS", "TRUNCATE_MODES", "UNCHANGED", "VISIPRUNER_TREATMENTS", "VTW", "FastV", "Freeze",
           "Knockout", "PrefixEffect", "PyramidDrop", "SkipLayers", "StagePruner", "Substitute", "TokenPruner",
           "Truncate", "from_json", "gradient_safe", "n_kept", "prefix_effect", "removal_conflict", "validate_all"]
