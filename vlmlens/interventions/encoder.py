"""The encoder side of visual depth: the vision tower run only up to layer m.

``EncoderDepth(m)``: the vision tower's layers m.. pass their input through, so the image
features the projector receives are the tower's state after m layers (in place of the
configured feature layer). ``m`` = the depth the model reads its features at (LLaVA's
``vision_feature_layer``, else every layer) is the baseline; deeper ``m`` changes nothing either.
It composes with every decoder-side intervention (the tower runs once, before the decoder).

``PatchPrune(keep, score)``: only a subset of the image's patches reaches the language model
(see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .base import RECOMPUTE, _Base


@dataclass(frozen=True)
class EncoderDepth(_Base):
    """The vision tower stops after ``layers`` of its layers (0: the patch embeddings)."""

    layers: int
    exclusive = "EncoderDepth"

    def validate(self, n_layers: int) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise InputError(f"EncoderDepth.layers must be an integer >= 0 (vision-tower layers to run), got "
                             f"{self.layers!r}")

    def prefix_effect(self, n_layers):
        return RECOMPUTE                 # the image tokens themselves change

    def edit_vision_output(self, layer, h_in, h_out, ctx):
        if layer == 0 and self.layers > ctx.n_vision_layers:
            raise InputError(f"EncoderDepth({self.layers}): this vision tower has {ctx.n_vision_layers} layers")
        if layer < self.layers:
            return None
        if h_in.shape != h_out.shape:
            raise InputError(f"EncoderDepth({self.layers}): vision-tower layer {layer} changes the shape of its input "
                             f"({tuple(h_in.shape)} -> {tuple(h_out.shape)}), so it cannot be skipped (a convolutional"
                             " tower such as EfficientNet)")
        return h_in


PATCH_SCORES = ("grid", "random", "l2", "cls", "divprune")


def divprune_order(emb: torch.Tensor, m: int) -> torch.Tensor:
    """DivPrune's greedy max-min selection of ``m`` of the rows of ``emb`` [n, d] on the distance
    ``1 - cos``: first the row whose second-smallest distance in its column (its own ~0 is the
    smallest) is largest, then each time the row whose smallest distance to the chosen is largest
    (ties: the lowest index; a chosen row is never chosen again, which the published loop leaves to
    chance when two rows are identical). The chosen rows, in the order chosen."""
    x = torch.nn.functional.normalize(emb.float(), dim=-1)
    dist = 1.0 - x @ x.T
    n = dist.shape[0]
    if n < 2:
        return torch.arange(n)[:m]
    chosen = [int(torch.argmax(torch.topk(dist, 2, dim=0, largest=False).values[1]))]
    nearest = dist[chosen[0]].clone()
    nearest[chosen[0]] = -torch.inf          # never chosen twice (exact duplicates would tie with it)
    for _ in range(1, m):
        j = int(torch.argmax(nearest))
        chosen.append(j)
        nearest = torch.minimum(nearest, dist[j])
        nearest[j] = -torch.inf
    return torch.tensor(chosen, dtype=torch.long)


def _cls_scores(layer, h: torch.Tensor, ctx) -> torch.Tensor:
    """FasterVLM's score of each image token: the head-mean attention of the [CLS] query (row 0 of
    each image or tile) to it, in the CLIP-style pre-norm vision ``layer`` whose output the model
    reads (recomputed from its input ``h``: ``layer_norm1``, then ``self_attn``'s q/k projections)."""
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "layer_norm1", None)
    heads = getattr(attn, "num_heads", None) or getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if layer is None or norm is None or attn is None or heads is None or not all(
            hasattr(attn, a) for a in ("q_proj", "k_proj")):
        raise InputError("PatchPrune(score='cls') (FasterVLM) needs a CLIP-style vision tower with a [CLS] token, read"
                         f" after at least one layer; this one ({type(layer).__name__}) has none: use 'l2', 'divprune',"
                         " 'grid' or 'random'")
    with torch.no_grad():
        x = norm(h)
        q, k = attn.q_proj(x[:, :1]).float(), attn.k_proj(x).float()        # [B, 1, D], [B, T, D]
        b, t, d = k.shape
        hd = d // heads
        s = torch.einsum("bhd,bthd->bht", q.view(b, heads, hd), k.view(b, t, heads, hd)) * (hd ** -0.5)
        share = torch.softmax(s, dim=-1).mean(1)                           # [B, T]
    n = int(ctx.image_pos.numel())
    if b * (t - 1) != n:
        raise InputError(f"PatchPrune(score='cls') (FasterVLM) needs one image token per vision patch after a [CLS]"
                         f" token; this model gives {n} image tokens for {b} x {t} tower tokens")
    return share[:, 1:].reshape(n)


@dataclass(frozen=True)
class PatchPrune(_Base):
    """Only ``keep`` of the image's patches reach the language model: the others never enter
    its sequence (removed before decoder layer 0, positions of the rest unchanged), so it is as
    if the projector had been given the kept patches only.

    ``score``: ``"grid"`` -- an evenly spaced subset in the tokens' raster order (a coarser
    image); ``"random"`` -- a uniformly random subset (``seed``); ``"l2"`` -- the patches whose
    vision-tower features (at the layer the model reads them, before the projector) have the
    largest L2 norm; ``"cls"`` -- FasterVLM (arXiv 2412.01818): the patches the vision tower's [CLS] token
    attends to most (head mean) in the layer the model reads its features from, ``int(keep * n)`` of
    them; ``"divprune"`` -- DivPrune (arXiv 2503.02175): a diverse subset of the image tokens as they
    enter the language model (after the projector), ``round(keep * n)`` of them, greedy max-min on
    the cosine distance: first the token farthest from its nearest neighbour, then each time the one
    farthest from those chosen. With a per-patch projector (LLaVA-1.5, tiny-shapes: one image token per
    patch) this is pruning before the projector exactly; where the projector merges patches
    (Qwen2-VL's 2x2 merger, pixel shuffle, pooling) "grid"/"random"/"divprune" keep or drop whole merged
    tokens and "l2"/"cls" are refused, as "cls" is on a tower without a [CLS] token (SigLIP). ``mode="mask"``: the pruned tokens stay but nothing reads them
    (the same outputs; the form a backward pass can go through). ``keep=1`` is the baseline.
    """

    keep: float
    score: str = "grid"
    mode: str = "remove"
    seed: int = 0
    exclusive = "PatchPrune"

    def describe(self) -> str:
        by = {"cls": "the vision tower's [CLS] attention (FasterVLM)", "divprune": "diversity (DivPrune)"}
        return (f"keep {100 * self.keep:.4g} % (drop {100 * (1 - self.keep):.4g} %) of the image patches before the"
                f" language model, chosen by {by.get(self.score, self.score)}")

    def validate(self, n_layers: int) -> None:
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise InputError(f"PatchPrune.keep must be a fraction in (0, 1], got {k!r}")
        if self.score not in PATCH_SCORES:
            raise InputError(f"PatchPrune.score must be one of {PATCH_SCORES}, got {self.score!r}")
        if self.mode not in ("remove", "mask"):
            raise InputError(f"PatchPrune.mode must be 'remove' or 'mask', got {self.mode!r}")

    def conflicts(self, others, n_layers):
        msg = super().conflicts(others, n_layers)
        if msg:
            return msg
        for iv in others:
            if getattr(iv, "exclusive", None) == "token pruner":
                return (f"conflicting interventions: PatchPrune and {type(iv).__name__} both choose image tokens;"
                        " use one")
        from .base import removal_conflict

        return removal_conflict("PatchPrune", 0, others, n_layers) if self.mode == "remove" else None

    def prefix_effect(self, n_layers):
        return RECOMPUTE

    def gradient_safe(self):
        from dataclasses import replace

        return replace(self, mode="mask")

    # -- the decision ----------------------------------------------------------------------------
    def _state(self, ctx) -> dict:
        return ctx.scratch.setdefault(("patch prune", self), {})

    def edit_vision_output(self, layer, h_in, h_out, ctx):
        if self.score not in ("l2", "cls"):
            return None
        F = ctx.vision_feature_depth
        if F is None or not ((F == 0 and layer == 0) or layer == F - 1):
            return None
        if self.score == "cls":
            self._state(ctx)["cls"] = _cls_scores(ctx.vision_modules[layer] if F else None, h_in, ctx)
            return None
        feats = (h_in if F == 0 else h_out).detach().float()
        feats = feats.reshape(-1, feats.shape[-2], feats.shape[-1])       # [images / tiles, patches, d]
        n = int(ctx.image_pos.numel())
        if feats.shape[0] * (feats.shape[1] - 1) == n:
            feats = feats[:, 1:]                                            # a CLS token the projector skips
        elif feats.shape[0] * feats.shape[1] != n:
            raise InputError(f"PatchPrune(score='l2') needs one image token per vision patch (a per-patch projector,"
                             f" as LLaVA-1.5's); this model gives {n} image tokens for {feats.shape[0] * feats.shape[1]}"
                             " patches: use score='grid' or 'random'")
        self._state(ctx)["l2"] = feats.reshape(n, -1).norm(dim=-1)
        return None

    def kept(self, ctx) -> torch.Tensor:
        """The image positions kept (decided once per session)."""
        st = self._state(ctx)
        if "kept" not in st:
            img = ctx.image_pos
            n = int(img.numel())
            m = min(n, max(1, int(math.floor(self.keep * n + 0.5))))
            if m == n:
                idx = torch.arange(n)
            elif self.score == "grid":
                idx = torch.as_tensor(np.unique(np.floor((np.arange(m) + 0.5) * n / m).astype(np.int64)))
            elif self.score == "random":
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.seed)))[:m]
            elif self.score == "cls":
                if "cls" not in st:
                    raise RuntimeError("PatchPrune(score='cls') saw no vision tower (use Lens.for_model)")
                m = min(n, max(1, int(self.keep * n)))            # FasterVLM keeps int(n * ratio)
                idx = torch.sort(-st["cls"].double(), stable=True).indices[:m]
            elif self.score == "divprune":
                if "emb" not in st:
                    raise RuntimeError("PatchPrune(score='divprune') saw no language-model input (use Lens.for_model)")
                idx = divprune_order(st["emb"], min(n, max(1, int(round(self.keep * n)))))
            else:
                if "l2" not in st:
                    raise RuntimeError("PatchPrune(score='l2') found no vision features: the vision tower did not run"
                                       " through the lens (use Lens.for_model)")
                idx = torch.sort(-st["l2"].double(), stable=True).indices[:m]
            st["kept"] = torch.sort(img[idx.to(img.device)]).values
        return st["kept"]

    def observe_input(self, hidden, qpos, ctx) -> None:
        if self.score != "divprune" or "emb" in self._state(ctx):
            return
        rows = torch.isin(qpos, ctx.image_pos.to(qpos.device))
        if int(rows.sum()) == int(ctx.image_pos.numel()):       # the forward that holds the image
            self._state(ctx)["emb"] = hidden[0, rows].detach().float()

    def _pruned(self, ctx) -> torch.Tensor | None:
        kept = self.kept(ctx)
        if kept.numel() == ctx.image_pos.numel():
            return None
        return ctx.image_pos[~torch.isin(ctx.image_pos, kept)]

    def removed_positions(self, layer, ctx):
        return self._pruned(ctx) if self.mode == "remove" else None

    def key_block(self, layer, qpos, kpos, ctx):
        if self.mode != "mask":
            return None
        gone = self._pruned(ctx)
        if gone is None:
            return None
        return (~torch.isin(qpos, gone))[:, None] & torch.isin(kpos, gone)[None, :]

    def record_arrays(self, ctx, n_layers: int) -> dict:
        """``image_kept`` [L, n_image]: the same kept patches at every layer; ``image_rows`` [L]."""
        n = int(ctx.image_pos.numel())
        row = torch.isin(ctx.image_pos, self.kept(ctx)).cpu().numpy().astype(np.uint8)
        out = np.repeat(row[None], n_layers, axis=0)
        rows = out.sum(1) if self.mode == "remove" else np.full(n_layers, n)
        return {"image_kept": out, "image_rows": rows.astype(np.int64)}


@dataclass(frozen=True, init=False)
class PatchKnockout(PatchPrune):
    """Exactly the image tokens listed in ``knocked`` (indices in the image's token order, 0..n-1)
    are cut before decoder layer 0: ``mode="mask"`` (default) nothing reads them, ``"remove"`` they
    leave the sequence. PatchPrune with the choice given instead of scored: the step of a map's
    deletion and insertion curves (:mod:`vlmlens.experiments.map_check`). ``knocked=()`` is the
    baseline; every index is the image cut at layer 0."""

    knocked: tuple = ()

    def __init__(self, knocked=(), mode: str = "mask", keep: float = 1.0, score: str = "given", seed: int = 0):
        object.__setattr__(self, "knocked", tuple(sorted({int(i) for i in knocked})))
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "keep", float(keep))
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "seed", int(seed))

    def describe(self) -> str:
        return f"knock out {len(self.knocked)} given image tokens before the language model ({self.mode})"

    def validate(self, n_layers: int) -> None:
        if self.mode not in ("remove", "mask"):
            raise InputError(f"PatchKnockout.mode must be 'remove' or 'mask', got {self.mode!r}")
        if self.score != "given":
            raise InputError(f"PatchKnockout chooses no tokens itself (score 'given'), got {self.score!r}")
        if any(i < 0 for i in self.knocked):
            raise InputError(f"PatchKnockout indices are image tokens 0..n-1, got {min(self.knocked)}")

    def kept(self, ctx) -> torch.Tensor:
        st = self._state(ctx)
        if "kept" not in st:
            img = ctx.image_pos
            n = int(img.numel())
            if self.knocked and self.knocked[-1] >= n:
                raise InputError(f"PatchKnockout: image token {self.knocked[-1]} is out of range (this input has {n})")
            gone = torch.zeros(n, dtype=torch.bool)
            gone[list(self.knocked)] = True
            st["kept"] = img[~gone.to(img.device)]
        return st["kept"]


@dataclass(frozen=True)
class Downsample(_Base):
    """The image itself made smaller, so that the model's processor gives ``keep`` of its image
    tokens (the nearest count not above ``round(keep * n)``): the baseline VTC-Bench (arXiv
    2510.07143) finds beating many pruning methods. Not a lens intervention -- it changes the
    input -- so it runs as a method of a pruning comparison or study, never in a capture (the lens
    refuses it); and only where the token count follows the image size (dynamic resolution:
    Qwen2-VL and its kin), refused where the processor resizes every image to one size."""

    keep: float
    exclusive = "Downsample"
    transforms_input = True

    def validate(self, n_layers: int) -> None:
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise InputError(f"Downsample.keep must be a fraction in (0, 1], got {k!r}")

    def describe(self) -> str:
        return f"the image downsampled to about {100 * self.keep:.4g} % of its image tokens (a smaller input)"
