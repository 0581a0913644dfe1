"""Token pruning as interventions of the lens: FastV, PyramidDrop, VTW, random / L2-norm
baselines, and a VisiPruner-style policy read off the causal three stages.

All of them act through the lens's existing hooks (no second mechanism): a ranking is read where
the method says (``observe_attention``: the model's own attention before any key block;
``edit_resid_post``: a layer's output rows), and the tokens it leaves out are either *removed*
(``removed_positions``: they leave the hidden rows and the KV cache of the layers from the stage on,
so those layers do less work) or *masked* (``key_block``: no remaining query reads them; the same
outputs, no saving -- the form a backward pass can go through).

:class:`TokenPruner` (the general form) has stages ``(layer_i, keep_i)``: from decoder layer
``layer_i`` on, only ``round(keep_i * n_image)`` of the image tokens stay, chosen among those
the previous stages kept. The ranking of stage i is read at decoder layer ``layer_i - 1`` --
the last layer that sees them all -- for the attention scores (FastV's released code reads the
attention of layer K-1 and prunes from layer K), so a stage at layer 0 can only keep all or
nothing. Scores (``score=``):

* ``"last"``: head-averaged attention each image token receives from the last prompt token,
  ``a_j = mean_h softmax_h(q_last . k_j / sqrt(d))`` over the keys the model's mask allows
  (minus tokens already pruned);
* ``"mean"``: the same averaged over every text query after the image (FastV's "average
  attention received");
* ``"l2"``: the L2 norm of the token's residual state leaving layer ``layer_i - 1``;
* ``"random"``: a uniformly random subset (``seed``), the baseline any ranking must beat.

Ties go to the earlier position. When the ranking is read (``rerank=``):

* ``"prefill"`` (default): once, in the prompt's forward (its last token's attention); the kept
  set stays for every generated token, so the pruned KV cache is reused -- where the saving is;
* ``"step"``: anew at every generation step, from the attention of the newest token (the last row
  of a forward over the whole sequence), as FastV's released evaluation runs it (generation
  without a KV cache: each step re-ranks and re-runs every layer). It needs ``score="last"``; a
  step's pruned cache cannot be reused by the next step, so it costs more than no pruning.

The papers' methods: :class:`FastV` (one stage), :class:`PyramidDrop` (stages with shrinking keep
ratios), :class:`VTW` (keep nothing from layer K: identical to ``Truncate(K)``); policies.py adds
:class:`StagePruner` (a treatment per stage of VisiPruner's three), :class:`AdaptiveVTW` (a depth per input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, check_layer
from .base import INDEPENDENT, RECOMPUTE, UNCHANGED, PrefixEffect, _Base, removal_conflict
from .core import Truncate

PRUNE_SCORES = ("last", "mean", "l2", "random")
PRUNE_MODES = ("remove", "mask")
RERANKS = ("prefill", "step")


def n_kept(keep: float, n_image: int) -> int:
    """How many of ``n_image`` tokens a keep ratio leaves: round half up, at least 1 when keep > 0."""
    if keep <= 0:
        return 0
    return min(n_image, max(1, int(math.floor(keep * n_image + 0.5))))


def _check_ratio(name: str, keep, *, allow_zero: bool) -> float:
    lo = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating, np.integer)) or not math.isfinite(keep):
        raise InputError(f"{name} must be a number in {lo}, got {keep!r}")
    if not (0 <= keep <= 1) or (keep == 0 and not allow_zero):
        raise InputError(f"{name} must be in {lo}, got {keep!r}")
    return float(keep)


def _scores_at(p: torch.Tensor, kpos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``p`` [kv] read at ``positions`` (0 for one not among the keys, e.g. past a sliding window; kpos sorted)."""
    idx = torch.searchsorted(kpos, positions).clamp(max=max(kpos.numel() - 1, 0))
    present = kpos[idx] == positions
    return torch.where(present, p[idx], torch.zeros_like(p[idx]))


def _pct(r: float) -> str:
    return f"{100 * r:.4g} %"


def _rows(kept: np.ndarray, mode: str) -> np.ndarray:
    """Image rows each layer computes: the kept ones when pruned tokens are removed, all when masked."""
    return (kept.sum(1) if mode == "remove" else np.full(kept.shape[0], kept.shape[1])).astype(np.int64)


def _rank(scores: torch.Tensor, positions: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` positions with the highest scores (ties: earlier position), sorted."""
    order = torch.sort(-scores.double(), stable=True).indices       # positions come sorted: ties keep order
    return torch.sort(positions[order[:n_keep]]).values


class _Pruning(_Base):
    """What the pruners share: their state lives in the session's scratch space."""

    exclusive = "token pruner"
    exclusive_hint = " (combine the stages in one TokenPruner)"

    def _state(self, ctx) -> dict:
        # keyed by value: equal pruners make equal decisions (and a continuation resumes them)
        return ctx.scratch.setdefault(("pruning", self), {"kept": {}, "critical": {}})

    def conflicts(self, others, n_layers):
        msg = super().conflicts(others, n_layers)
        if msg:
            return msg
        for iv in others:
            if isinstance(iv, Truncate):
                return (f"conflicting interventions: {type(self).__name__} and Truncate both decide which image tokens"
                        " the model reads; use one (VTW(K) is Truncate(K) as a pruner)")
        k = self.first_removal(n_layers)
        return None if k is None else removal_conflict(type(self).__name__, k, others, n_layers)

    def first_removal(self, n_layers: int) -> int | None:     # overridden
        return None


@dataclass(frozen=True, init=False)
class TokenPruner(_Pruning):
    """Stages ``(layers[i], keep[i])``: from decoder layer ``layers[i]`` on, the top
    ``round(keep[i] * n_image)`` image tokens by ``score`` stay (see the module docstring)."""

    layers: tuple
    keep: tuple
    score: str = "last"
    mode: str = "remove"
    seed: int = 0
    rerank: str = "prefill"

    def __init__(self, layers: Sequence[int], keep: Sequence[float], score: str = "last", mode: str = "remove",
                 seed: int = 0, rerank: str = "prefill"):
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "keep", tuple(keep))
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "rerank", rerank)

    @property
    def every_step(self) -> bool:
        """Re-ranked at every generation step (each step one full forward, no KV cache)."""
        return self.rerank == "step"

    #: keep ratio 0 is allowed (the image leaves entirely: VTW); FastV/PyramidDrop ask for (0, 1]
    _allow_zero = True

    def validate(self, n_layers: int) -> None:
        name = type(self).__name__
        if not self.layers:
            raise InputError(f"{name} needs at least one stage (a layer and a keep ratio)")
        if len(self.layers) != len(self.keep):
            raise InputError(f"{name}: {len(self.layers)} layers but {len(self.keep)} keep ratios; give one ratio per layer")
        for l in self.layers:
            check_layer(f"{name} layer", l, 0, n_layers)
        for r in self.keep:
            _check_ratio(f"{name} keep ratio", r, allow_zero=self._allow_zero)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise InputError(f"{name} layers must increase strictly, got {list(self.layers)}")
        if any(b > a for a, b in zip(self.keep, self.keep[1:])):
            raise InputError(f"{name} keep ratios must not grow from stage to stage (a pruned token never comes back),"
                             f" got {list(self.keep)}")
        if self.score not in PRUNE_SCORES:
            raise InputError(f"{name}.score must be one of {PRUNE_SCORES}, got {self.score!r}")
        if self.mode not in PRUNE_MODES:
            raise InputError(f"{name}.mode must be one of {PRUNE_MODES}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"{name}.seed must be an integer, got {self.seed!r}")
        if self.rerank not in RERANKS:
            raise InputError(f"{name}.rerank must be one of {RERANKS} (prefill: ranked once in the prompt's forward;"
                             f" step: re-ranked by the newest token at every step, as FastV's evaluation), got"
                             f" {self.rerank!r}")
        if self.rerank == "step" and self.score != "last":
            raise InputError(f"{name}: rerank='step' ranks by the newest token's attention, so it needs score='last'"
                             f" (got {self.score!r})")
        for l, r in zip(self.layers, self.keep):
            if l == 0 and 0 < r < 1 and self.score != "random":
                raise InputError(f"{name}: a stage at layer 0 can keep all (1) or nothing (0): its ranking would be read"
                                 " at layer -1; start the stage at layer >= 1")

    def _rerank_json(self) -> dict:
        return {"rerank": self.rerank} if self.rerank != "prefill" else {}    # runs saved before keep their JSON

    def to_json(self) -> dict:
        return {"kind": "TokenPruner", "layers": list(self.layers), "keep": list(self.keep), "score": self.score,
                "mode": self.mode, "seed": int(self.seed), **self._rerank_json()}

    def describe(self) -> str:
        """What it keeps, unambiguously ("keep 25 % (drop 75 %) of the image tokens from layer 2 ...")."""
        how = {"last": "the last prompt token's attention", "mean": "the text's mean attention",
               "l2": "their L2 norm", "random": f"random choice (seed {self.seed})"}[self.score]
        if self.rerank == "step":
            how = "the newest token's attention, re-ranked at every step"
        parts = [f"keep {_pct(r)} (drop {_pct(1 - r)}) from layer {l}" for l, r in zip(self.layers, self.keep)]
        return f"{'; '.join(parts)} of the image tokens, by {how}" + (" (masked)" if self.mode == "mask" else "")

    # -- what the pruning means --------------------------------------------------------------------
    def first_removal(self, n_layers):
        if self.mode != "remove":
            return None
        return next((l for l, r in zip(self.layers, self.keep) if r < 1 and l < n_layers), None)

    def prefix_effect(self, n_layers):
        active = [(l, r) for l, r in zip(self.layers, self.keep) if r < 1 and l < n_layers]
        if not active:
            return UNCHANGED
        if self.rerank == "step":
            return INDEPENDENT                 # each step is a whole forward: no prefix to continue from
        if all(r == 0 for _, r in active):     # the image leaves: nothing to rank
            l = active[0][0]
            return PrefixEffect("cut_image", l) if self.mode == "remove" else UNCHANGED
        # attention rankings are read from text queries (after the prefix); the others from image rows
        return INDEPENDENT if self.score in ("last", "mean") else RECOMPUTE

    def gradient_safe(self):
        if self.mode != "remove":
            return self
        return TokenPruner(self.layers, self.keep, self.score, "mask", self.seed, self.rerank)

    def image_row_edits(self, n_layers):
        return set()

    def image_per_layer(self, n_image: int, n_layers: int) -> list[int]:
        """Image tokens each decoder layer processes (the schedule the FLOP counts use)."""
        out, cur = [], n_image
        for l in range(n_layers):
            for sl, r in zip(self.layers, self.keep):
                if sl == l:
                    cur = min(cur, n_kept(r, n_image))
            out.append(cur)
        return out

    # -- the ranking ----------------------------------------------------------------------------
    def _stage_of(self, layer: int) -> int:
        """Index of the last stage starting at or before ``layer`` (-1: none)."""
        i = -1
        for j, l in enumerate(self.layers):
            if l <= layer:
                i = j
        return i

    def _kept(self, j: int, ctx) -> torch.Tensor:
        """Image positions kept from stage ``j`` on (stage -1: all)."""
        st = self._state(ctx)
        if j < 0:
            return ctx.image_pos
        if j not in st["kept"]:
            prev = self._kept(j - 1, ctx)
            n = n_kept(self.keep[j], int(ctx.image_pos.numel()))
            if n >= prev.numel():
                st["kept"][j] = prev
            elif n == 0:
                st["kept"][j] = prev[:0]
            elif self.score == "random":
                g = torch.Generator().manual_seed(int(self.seed) * 1000 + j)
                pick = torch.randperm(prev.numel(), generator=g)[:n].to(prev.device)
                st["kept"][j] = torch.sort(prev[pick]).values
            elif self.score != "l2" and self.layers[j] - 1 not in (ctx.attention_layers or range(self.layers[j])):
                raise InputError(f"{type(self).__name__}: stage {j} ranks the image by the attention of layer "
                                 f"{self.layers[j] - 1}, which has no softmax attention in this model (linear attention"
                                 f" or convolution); start it one layer after an attention layer "
                                 f"{sorted(ctx.attention_layers)}, or rank by score='l2'")
            else:
                raise RuntimeError(f"{type(self).__name__}: stage {j} needs its ranking, which was not read at layer "
                                   f"{self.layers[j] - 1} (the prompt's last token must be in the first forward)")
        return st["kept"][j]

    def _needs_ranking(self, layer: int, ctx) -> int | None:
        """The stage whose ranking is read at ``layer`` (None: none, or already read)."""
        for j, (l, r) in enumerate(zip(self.layers, self.keep)):
            if l - 1 == layer and j not in self._state(ctx)["kept"]:
                n = n_kept(r, int(ctx.image_pos.numel()))
                prev = self._kept(j - 1, ctx)
                return j if 0 < n < prev.numel() else None
        return None

    def observe_attention(self, layer, view, ctx):
        if self.score not in ("last", "mean"):
            return
        j = self._needs_ranking(layer, ctx)
        if j is None:
            return
        qpos, kpos = view.qpos, view.kpos
        if self.rerank == "step":              # the newest token: the last row of a whole forward
            rows = torch.nonzero(qpos == qpos.max()).flatten()
        elif self.score == "last":
            rows = torch.nonzero(qpos == ctx.n_prompt - 1).flatten()
        else:
            last_image = int(ctx.image_pos[-1])
            rows = torch.nonzero(~ctx.is_image(qpos) & (qpos > last_image) & (qpos < ctx.n_prompt)).flatten()
        if rows.numel() == 0:
            return                          # not the prompt's forward (a decode step)
        prev = self._kept(j - 1, ctx)
        gone = ctx.is_image(kpos) & ~torch.isin(kpos, prev)        # pruned by earlier stages (mask mode)
        p = view.probs(rows, exclude_keys=gone).mean(dim=(0, 1))    # heads, then query rows
        n = n_kept(self.keep[j], int(ctx.image_pos.numel()))
        self._state(ctx)["kept"][j] = _rank(_scores_at(p, kpos, prev), prev, n)

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        if self.score != "l2":
            return None
        j = self._needs_ranking(layer, ctx)
        if j is None:
            return None
        rows = ctx.rows(layer)
        prev = self._kept(j - 1, ctx)
        at = torch.searchsorted(rows, prev)
        if at.numel() == 0 or bool((at >= rows.numel()).any()) or not torch.equal(rows[at], prev):
            return None                     # not the forward that holds the image rows
        norms = h_out[0, at].float().norm(dim=-1)
        self._state(ctx)["kept"][j] = _rank(norms, prev, n_kept(self.keep[j], int(ctx.image_pos.numel())))
        return None

    # -- acting on the sequence ------------------------------------------------------------------
    def _pruned(self, layer: int, ctx) -> torch.Tensor | None:
        j = self._stage_of(layer)
        if j < 0:
            return None
        kept = self._kept(j, ctx)
        if kept.numel() == ctx.image_pos.numel():
            return None
        gone = self._state(ctx).setdefault("gone", {})      # per stage: (its kept positions, the others)
        if j not in gone or gone[j][0] is not kept:
            gone[j] = (kept, ctx.image_pos[~torch.isin(ctx.image_pos, kept)])
        return gone[j][1]

    def removed_positions(self, layer, ctx):
        return self._pruned(layer, ctx) if self.mode == "remove" else None

    def key_block(self, layer, qpos, kpos, ctx):
        if self.mode != "mask":
            return None
        gone = self._pruned(layer, ctx)
        if gone is None:
            return None
        return (~torch.isin(qpos, gone))[:, None] & torch.isin(kpos, gone)[None, :]

    def record_arrays(self, ctx, n_layers: int) -> dict:
        """``image_kept`` [L, n_image] uint8: 1 where decoder layer l still reads image token i;
        ``image_rows`` [L]: image rows layer l computes (the compute schedule)."""
        n = int(ctx.image_pos.numel())
        out = np.ones((n_layers, n), dtype=np.uint8)
        for l in range(n_layers):
            gone = self._pruned(l, ctx)
            if gone is not None:
                out[l, torch.searchsorted(ctx.image_pos, gone).cpu().numpy()] = 0
        return {"image_kept": out, "image_rows": _rows(out, self.mode)}


@dataclass(frozen=True, init=False)
class FastV(TokenPruner):
    """FastV (arXiv 2403.06764): from decoder layer ``layer`` on keep the top ``keep`` of the
    image tokens by the attention they receive at layer ``layer - 1``. ``keep`` is the fraction
    kept; the paper's R is the fraction dropped (its K=2, R=50 % is ``FastV(2, keep=0.5)``; R=75 %
    is ``keep=0.25``). ``rerank="step"``: re-ranked at every step, as its released evaluation runs."""

    _allow_zero = False

    def __init__(self, layer: int = 2, keep: float = 0.5, score: str = "last", mode: str = "remove", seed: int = 0,
                 rerank: str = "prefill"):
        super().__init__((layer,), (keep,), score, mode, seed, rerank)

    def to_json(self) -> dict:
        return {"kind": "FastV", "layer": self.layers[0], "keep": self.keep[0], "score": self.score, "mode": self.mode,
                "seed": int(self.seed), **self._rerank_json()}


@dataclass(frozen=True, init=False)
class PyramidDrop(TokenPruner):
    """PyramidDrop: stage-wise keep ratios of the original image tokens (e.g. layers 8/16/24 at
    0.5/0.25/0.125), each stage ranked by the last prompt token's attention among the survivors."""

    _allow_zero = False

    def __init__(self, layers: Sequence[int], keep: Sequence[float], score: str = "last", mode: str = "remove",
                 seed: int = 0, rerank: str = "prefill"):
        super().__init__(layers, keep, score, mode, seed, rerank)

    def to_json(self) -> dict:
        return {**super().to_json(), "kind": "PyramidDrop"}


@dataclass(frozen=True, init=False)
class VTW(TokenPruner):
    """Visual tokens withdrawal (arXiv 2405.05803): every image token leaves from decoder layer
    ``layer`` on (K found by :func:`vlmlens.experiments.pruning.find_vtw_layer`). With
    ``mode="remove"`` it is ``Truncate(layer, "remove")``, with ``"mask"`` ``Truncate(layer, "drop")``."""

    def __init__(self, layer: int, mode: str = "remove"):
        super().__init__((layer,), (0.0,), "last", mode, 0)

    def to_json(self) -> dict:
        return {"kind": "VTW", "layer": self.layers[0], "mode": self.mode}

    def describe(self) -> str:
        return f"drop every image token (keep 0 %) from layer {self.layers[0]} on"


PRUNERS = (TokenPruner, FastV, PyramidDrop, VTW)
