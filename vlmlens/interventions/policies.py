"""Pruning policies beyond a fixed ranking schedule: a treatment per causal stage
(VisiPruner-style) and a depth chosen per input (adaptive VTW). Same hooks, same lens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, check_layer
from .base import INDEPENDENT, UNCHANGED, PrefixEffect
from .pruning import PRUNE_MODES, _check_ratio, _Pruning, _rank, _rows, _scores_at, n_kept

STAGE_TREATMENTS = ("all", "none", "top", "drop")
#: VisiPruner's reading of the stages: the text need not read the image while it is a sink, reads
#: only a few critical tokens during fusion, and the image can leave in the discard stage
VISIPRUNER_TREATMENTS = {"sink": "none", "fusion": "top", "discard": "drop"}


@dataclass(frozen=True, init=False)
class StagePruner(_Pruning):
    """A VisiPruner-style policy: contiguous stages ``(first, last, treatment)`` covering decoder
    layers 0..L-1 in order, each treatment deciding which image tokens the *text* reads there:

    * ``"all"``: every image token; ``"none"``: none (a key block; image rows still computed,
      later stages may need them);
    * ``"top"``: only the ``top`` fraction of image tokens that receive the most attention from
      the last prompt token at the stage's first layer (head-averaged, the model's own mask),
      VisiPruner's "few critical tokens";
    * ``"drop"``: the image tokens leave the sequence (rows and KV cache) from the stage on;
      only the last stages may drop (a removed token never comes back).

    :meth:`from_stages` builds it from a :class:`vlmlens.experiments.stages.CausalStages` with
    :data:`VISIPRUNER_TREATMENTS` by default. Only "drop" saves decoder compute here: the key
    blocks of "none" and "top" are masks inside SDPA.
    """

    stages: tuple
    top: float = 0.1

    def __init__(self, stages: Sequence, top: float = 0.1):
        object.__setattr__(self, "stages", tuple((int(a), int(b), str(t)) if not isinstance(a, bool) else (a, b, t)
                                                 for a, b, t in stages))
        object.__setattr__(self, "top", top)

    def describe(self) -> str:
        what = {"all": "every image token", "none": "no image token (masked)", "drop": "none (dropped)",
                "top": f"the top {100 * self.top:.4g} % (drop {100 * (1 - self.top):.4g} %)"}
        return "; ".join(f"layers {a}-{b}: {what.get(t, t)}" for a, b, t in self.stages)

    @classmethod
    def from_stages(cls, stages, treatments: dict | None = None, top: float = 0.1) -> "StagePruner":
        """From per-layer labels (``CausalStages.labels`` or the object itself): one stage per run of
        equal labels, treated as ``treatments[label]`` (default: VisiPruner's reading)."""
        labels = list(getattr(stages, "labels", stages))
        if not labels:
            raise InputError("no stage labels to build a StagePruner from")
        treat = {**VISIPRUNER_TREATMENTS, **(treatments or {})}
        out, start = [], 0
        for l in range(1, len(labels) + 1):
            if l == len(labels) or labels[l] != labels[start]:
                if labels[start] not in treat:
                    raise InputError(f"no treatment for stage {labels[start]!r}; give treatments={{...}} for it")
                out.append((start, l - 1, treat[labels[start]]))
                start = l
        return cls(out, top)

    def validate(self, n_layers: int) -> None:
        if not self.stages:
            raise InputError("StagePruner needs at least one stage (first, last, treatment)")
        want = 0
        for a, b, t in self.stages:
            check_layer("StagePruner stage start", a, 0, n_layers - 1)
            check_layer("StagePruner stage end", b, 0, n_layers - 1)
            if a != want or b < a:
                raise InputError(f"StagePruner stages must cover layers 0..{n_layers - 1} in order without gaps; "
                                 f"got {list(self.stages)}")
            if t not in STAGE_TREATMENTS:
                raise InputError(f"unknown stage treatment {t!r}; expected one of {STAGE_TREATMENTS}")
            want = b + 1
        if want != n_layers:
            raise InputError(f"StagePruner stages end at layer {want - 1}, the model has layers 0..{n_layers - 1}")
        ts = [t for _, _, t in self.stages]
        if "drop" in ts and any(t != "drop" for t in ts[ts.index("drop"):]):
            raise InputError("StagePruner: only the last stages may drop the image (a removed token never comes back);"
                             f" got treatments {ts}")
        _check_ratio("StagePruner.top", self.top, allow_zero=False)

    def to_json(self) -> dict:
        return {"kind": "StagePruner", "stages": [list(s) for s in self.stages], "top": self.top}

    def _treatment(self, layer: int) -> tuple[int, str]:
        for a, b, t in self.stages:
            if a <= layer <= b:
                return a, t
        return layer, "all"

    def first_removal(self, n_layers):
        return next((a for a, _, t in self.stages if t == "drop"), None)

    def prefix_effect(self, n_layers):
        if any(t == "top" for _, _, t in self.stages):
            return INDEPENDENT
        k = self.first_removal(n_layers)
        return UNCHANGED if k is None else PrefixEffect("cut_image", k)

    def gradient_safe(self):
        return StagePruner([(a, b, "none" if t == "drop" else t) for a, b, t in self.stages], self.top)

    def image_per_layer(self, n_image: int, n_layers: int) -> list[int]:
        return [0 if self._treatment(l)[1] == "drop" else n_image for l in range(n_layers)]

    def observe_attention(self, layer, view, ctx):
        first, t = self._treatment(layer)
        crit = self._state(ctx)["critical"]
        if t != "top" or layer != first or first in crit:
            return
        rows = torch.nonzero(view.qpos == ctx.n_prompt - 1).flatten()
        if rows.numel() == 0:
            return
        img = ctx.image_pos
        p = view.probs(rows).mean(dim=(0, 1))
        crit[first] = _rank(_scores_at(p, view.kpos, img), img, n_kept(self.top, int(img.numel())))

    def key_block(self, layer, qpos, kpos, ctx):
        first, t = self._treatment(layer)
        if t in ("all", "drop"):
            return None
        text = ~ctx.is_image(qpos)
        keys = ctx.is_image(kpos)
        if t == "top":
            crit = self._state(ctx)["critical"].get(first)
            if crit is None:
                raise RuntimeError(f"StagePruner: the critical tokens of the stage at layer {first} were not ranked "
                                   "(the prompt's last token must be in the first forward)")
            keys = keys & ~torch.isin(kpos, crit)
        return text[:, None] & keys[None, :]

    def removed_positions(self, layer, ctx):
        return ctx.image_pos if self._treatment(layer)[1] == "drop" else None

    def record_arrays(self, ctx, n_layers: int) -> dict:
        """``image_kept`` [L, n_image] uint8: 1 where the text of decoder layer l reads image token i."""
        img = ctx.image_pos
        out = np.ones((n_layers, int(img.numel())), dtype=np.uint8)
        for l in range(n_layers):
            first, t = self._treatment(l)
            if t in ("none", "drop"):
                out[l] = 0
            elif t == "top":
                crit = self._state(ctx)["critical"].get(first)
                if crit is not None:
                    out[l] = torch.isin(img, crit).cpu().numpy().astype(np.uint8)
        rows = np.array([0 if self._treatment(l)[1] == "drop" else img.numel() for l in range(n_layers)], np.int64)
        return {"image_kept": out, "image_rows": rows}


@dataclass(frozen=True, init=False)
class AdaptiveVTW(_Pruning):
    """Adaptive depth per input: the image leaves from the layer after the first decoder layer
    ``l >= min_layer`` whose last prompt token puts less than ``share`` of its attention on the
    image (head-averaged, the model's own mask) -- the model has stopped reading it. Read during
    the prefill, so every input gets its own depth (``image_kept`` shows it; never below
    ``min_layer + 1``; no such layer: the image stays everywhere)."""

    share: float = 0.1
    min_layer: int = 0
    mode: str = "remove"

    def __init__(self, share: float = 0.1, min_layer: int = 0, mode: str = "remove"):
        object.__setattr__(self, "share", share)
        object.__setattr__(self, "min_layer", min_layer)
        object.__setattr__(self, "mode", mode)

    def validate(self, n_layers: int) -> None:
        _check_ratio("AdaptiveVTW.share", self.share, allow_zero=False)
        check_layer("AdaptiveVTW.min_layer", self.min_layer, 0, n_layers - 1)
        if self.mode not in PRUNE_MODES:
            raise InputError(f"AdaptiveVTW.mode must be one of {PRUNE_MODES}, got {self.mode!r}")

    def to_json(self) -> dict:
        return {"kind": "AdaptiveVTW", "share": self.share, "min_layer": self.min_layer, "mode": self.mode}

    def describe(self) -> str:
        return (f"drop every image token (keep 0 %) from the layer after the first one (>= {self.min_layer}) whose last"
                f" prompt token puts < {100 * self.share:.4g} % of its attention on the image")

    def first_removal(self, n_layers):
        return self.min_layer + 1 if self.mode == "remove" else None

    def prefix_effect(self, n_layers):
        return INDEPENDENT

    def gradient_safe(self):
        return AdaptiveVTW(self.share, self.min_layer, "mask") if self.mode == "remove" else self

    def depth(self, ctx) -> int | None:
        """The depth chosen for this input (None: not yet / never)."""
        return self._state(ctx).get("depth")

    def observe_attention(self, layer, view, ctx):
        st = self._state(ctx)
        if "depth" in st or layer < self.min_layer:
            return
        rows = torch.nonzero(view.qpos == ctx.n_prompt - 1).flatten()
        if rows.numel() == 0:
            return
        p = view.probs(rows).mean(dim=(0, 1))
        if float(p[ctx.is_image(view.kpos)].sum()) < self.share:
            st["depth"] = layer + 1

    def _gone(self, layer, ctx):
        d = self.depth(ctx)
        return ctx.image_pos if d is not None and layer >= d else None

    def removed_positions(self, layer, ctx):
        return self._gone(layer, ctx) if self.mode == "remove" else None

    def key_block(self, layer, qpos, kpos, ctx):
        if self.mode != "mask" or self._gone(layer, ctx) is None:
            return None
        return (~ctx.is_image(qpos))[:, None] & ctx.is_image(kpos)[None, :]

    def record_arrays(self, ctx, n_layers: int) -> dict:
        d = self.depth(ctx)
        out = np.ones((n_layers, int(ctx.image_pos.numel())), dtype=np.uint8)
        if d is not None:
            out[d:] = 0
        return {"image_kept": out, "image_rows": _rows(out, self.mode)}
