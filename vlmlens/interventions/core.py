"""Interventions: small frozen dataclasses the lens applies (no second hooking mechanism).

Layer numbering: decoder layers are 0..L-1. ``Truncate(from_layer=k)`` acts on decoder
layers k..L-1, so k=0 means the language model never reads the image and k=L is the
baseline. In a Run, ``hidden_states[k]`` is the input of decoder layer k. (``after_layer=``
is the old name of ``from_layer``: still accepted, with a DeprecationWarning, and in stored
runs' JSON.)

Each class implements some of the lens hooks (see :class:`vlmlens.lens.Intervention`):
``key_block`` (attention key masks), ``edit_resid_pre`` / ``edit_resid_post`` (rewrites of a
decoder layer's input / output), ``removed_positions`` (tokens leaving the sequence and the KV
cache). Each also says what it means beyond one forward, so that code which combines
interventions asks them instead of testing their class:

* ``prefix_effect(n_layers)`` -- what it does to the prompt's prefix (every position up to the
  last image token), which sweeps compute once and share (experiments/prefix.py);
* ``gradient_safe()`` -- the same intervention in a form a backward pass can go through
  (LLaVA-CAM): row removal becomes the equivalent key mask;
* ``conflicts(others, n_layers)`` -- why it cannot run together with ``others`` (or None);
* ``image_row_edits(n_layers)`` -- the layers whose image-token rows it rewrites.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import InputError, check_layer
from ..vocabulary import TRUNCATE_MODES
from .base import INDEPENDENT, RECOMPUTE, UNCHANGED, PrefixEffect, _Base, removal_conflict

SRC_SPANS = ("text", "generated", "last", "all")
DST_SPANS = ("image", "system", "text")


def _from_layer(cls: str, from_layer, after_layer):
    """``from_layer``, or the deprecated ``after_layer`` (the same number under its old name)."""
    if after_layer is not None:
        if from_layer is not None:
            raise InputError(f"{cls}: give from_layer only (after_layer is its old name)")
        warnings.warn(f"{cls}(after_layer=k) is now {cls}(from_layer=k): the same layer k, a clearer name",
                      DeprecationWarning, stacklevel=3)
        return after_layer
    if from_layer is None:
        raise InputError(f"{cls} needs from_layer (the first decoder layer it acts on)")
    return from_layer


@dataclass(frozen=True, init=False)
class Truncate(_Base):
    """From decoder layer ``from_layer`` on, no query reads the image-token keys.

    ``mode="drop"``: a key mask inside attention (image rows are still computed, but
    nothing reads them). ``mode="remove"``: the image tokens also leave the hidden states
    and the KV cache from that layer on (positions of the remaining tokens unchanged), so
    deeper layers do less work; it gives the same tokens as "drop". In a removed run the
    image positions keep their last computed state in ``hidden_states``. Vision features a
    family adds between layers (Qwen3-VL's DeepStack) stop from ``from_layer`` on too.

    ``frames`` (a video input only): cut just the tokens of these temporal slots (0-based; a slot
    is ``temporal_patch_size`` sampled frames, see ``run.meta["video"]``); the others stay readable.
    """

    from_layer: int
    mode: str = "drop"
    frames: tuple | None = None
    exclusive = "Truncate"
    exclusive_hint = "; give one truncation depth per run"

    def __init__(self, from_layer: int | None = None, mode: str = "drop", *, after_layer: int | None = None,
                 frames=None):
        object.__setattr__(self, "from_layer", _from_layer("Truncate", from_layer, after_layer))
        object.__setattr__(self, "mode", mode)
        if frames is not None:
            if isinstance(frames, (int, str)) or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0
                                                         for f in frames) or not len(frames):
                raise InputError(f"Truncate.frames must be a non-empty list of slot numbers (0, 1, ...), got {frames!r}")
            frames = tuple(sorted(set(int(f) for f in frames)))
        object.__setattr__(self, "frames", frames)

    def __repr__(self) -> str:
        extra = "" if self.frames is None else f", frames={list(self.frames)}"
        return f"Truncate(from_layer={self.from_layer}, mode={self.mode!r}{extra})"

    def to_json(self) -> dict:
        d = super().to_json()
        if self.frames is None:
            d.pop("frames")
        else:
            d["frames"] = list(self.frames)
        return d

    def _cut(self, ctx) -> torch.Tensor:
        return ctx.image_pos if self.frames is None else ctx.frame_positions(self.frames)

    @property
    def cross_attention(self) -> str:
        if self.mode == "remove":
            return ("refused: mode 'remove' takes image rows out of the sequence; use mode 'drop', which skips the"
                    " cross-attention layers from from_layer on")
        if self.frames is not None:
            return "refused: frames are temporal slots of a video input"
        return "skips every cross-attention layer >= from_layer (the model's own path where it has no image)"

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        # a cross-attention model (Mllama): from from_layer on, its cross-attention layers pass the stream through
        return h_in if layer in ctx.cross_layers and layer >= self.from_layer else None

    @property
    def after_layer(self) -> int:
        """Old name of :attr:`from_layer`."""
        return self.from_layer

    def validate(self, n_layers: int) -> None:
        check_layer("Truncate.from_layer", self.from_layer, 0, n_layers)
        if self.mode not in TRUNCATE_MODES:
            raise InputError(f"unknown truncation mode {self.mode!r}; expected one of {TRUNCATE_MODES} (or use Freeze)")

    def key_block(self, layer, qpos, kpos, ctx):
        if layer < self.from_layer or self.mode == "remove" or ctx.cross_layers:
            return None
        if self.frames is None:
            return (~ctx.is_image(qpos))[:, None] & ctx.is_image(kpos)[None, :]
        cut = torch.isin(kpos, self._cut(ctx))
        return (~ctx.is_image(qpos))[:, None] & cut[None, :]

    def removed_positions(self, layer, ctx):
        if self.mode != "remove" or layer < self.from_layer:
            return None
        return self._cut(ctx)

    def stops_injection(self, layer):
        # the image is cut from from_layer on: so are the vision features a family adds there (DeepStack;
        # a cut of chosen frames is refused there by the lens)
        return layer >= self.from_layer

    def prefix_effect(self, n_layers):
        # only non-image queries lose the image keys: every prefix row keeps its computation
        if self.frames is not None:
            return INDEPENDENT             # a prefix is shared by image runs; a video's slots are per input
        if self.mode == "remove" and self.from_layer < n_layers:
            return PrefixEffect("cut_image", self.from_layer)
        return UNCHANGED

    def gradient_safe(self):
        # the same outputs (tested); the image rows stay in place for a backward pass to reach
        return Truncate(self.from_layer, "drop", frames=self.frames) if self.mode == "remove" else self

    def batch_conflict(self):
        if self.mode == "remove":
            return (f"{self!r} takes the image rows out of the sequence, which is per example (mode 'drop' gives the "
                    "same tokens and batches)")
        return None

    def conflicts(self, others, n_layers):
        msg = super().conflicts(others, n_layers)
        if msg or self.mode != "remove":
            return msg
        return removal_conflict(f"Truncate(from_layer={self.from_layer}, mode='remove')", self.from_layer, others,
                                n_layers)


@dataclass(frozen=True, init=False)
class Freeze(_Base):
    """Image-token states stop changing from decoder layer ``from_layer`` on: decoder layers
    k..L-1 pass the image rows through, and later layers attend to that frozen state (vision
    features a family adds between layers, Qwen3-VL's DeepStack, are not added there either)."""

    from_layer: int
    exclusive = "Freeze"

    def __init__(self, from_layer: int | None = None, *, after_layer: int | None = None):
        object.__setattr__(self, "from_layer", _from_layer("Freeze", from_layer, after_layer))

    @property
    def after_layer(self) -> int:
        """Old name of :attr:`from_layer`."""
        return self.from_layer

    def validate(self, n_layers: int) -> None:
        check_layer("Freeze.from_layer", self.from_layer, 0, n_layers)

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        return _pass_through(layer, h_in, h_out, ctx, layer >= self.from_layer, "image")

    def stops_injection(self, layer):
        # frozen image states receive nothing either (DeepStack's features are not added from from_layer on)
        return layer >= self.from_layer

    def prefix_effect(self, n_layers):
        return UNCHANGED if self.from_layer >= n_layers else RECOMPUTE


@dataclass(frozen=True)
class Substitute(_Base):
    """The image-token input of decoder layer ``at_layer`` is replaced by the image-token
    states of layer ``from_layer`` (the input of that decoder layer) from the same input.
    ``from_layer == at_layer`` is the identity. Where a family adds vision features between
    layers (DeepStack), the carried states hold those added before ``from_layer``, and later
    additions go on as in the model."""

    at_layer: int
    from_layer: int

    def validate(self, n_layers: int) -> None:
        check_layer("Substitute.at_layer", self.at_layer, 0, n_layers - 1)
        check_layer("Substitute.from_layer", self.from_layer, 0, n_layers - 1)
        if self.from_layer > self.at_layer:
            raise InputError(
                f"Substitute needs from_layer <= at_layer (states come from an earlier layer); got from_layer="
                f"{self.from_layer}, at_layer={self.at_layer}"
            )

    def edit_resid_pre(self, layer, hidden, ctx):
        rows = ctx.is_image(ctx.rows(layer))
        if not bool(rows.any()):
            return None
        key = ("substitute", self.from_layer)
        if layer == self.from_layer:
            ctx.scratch[key] = hidden[:, rows].detach().clone()
        if layer == self.at_layer and self.at_layer != self.from_layer:
            new = hidden.clone()
            new[:, rows] = ctx.scratch[key].to(hidden.dtype)
            return new
        return None

    def prefix_effect(self, n_layers):
        return UNCHANGED if self.at_layer == self.from_layer else RECOMPUTE

    def image_row_edits(self, n_layers):
        return set() if self.at_layer == self.from_layer else {self.at_layer}


@dataclass(frozen=True)
class SkipLayers(_Base):
    """The listed decoder layers pass ``tokens`` ("image" or "all") through unchanged."""

    layers: tuple = ()
    tokens: str = "image"

    def __init__(self, layers: Sequence[int] = (), tokens: str = "image"):
        object.__setattr__(self, "layers", tuple(int(l) if not isinstance(l, bool) else l for l in layers))
        object.__setattr__(self, "tokens", tokens)

    def validate(self, n_layers: int) -> None:
        for l in self.layers:
            check_layer("SkipLayers layer", l, 0, n_layers - 1)
        if self.tokens not in ("image", "all"):
            raise InputError(f"SkipLayers.tokens must be 'image' or 'all', got {self.tokens!r}")

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        return _pass_through(layer, h_in, h_out, ctx, layer in self.layers, self.tokens)

    def prefix_effect(self, n_layers):
        return UNCHANGED if not self.layers else RECOMPUTE

    def image_row_edits(self, n_layers):
        return set(self.layers) if self.tokens == "image" else set()

    def to_json(self) -> dict:
        return {"kind": "SkipLayers", "layers": list(self.layers), "tokens": self.tokens}


@dataclass(frozen=True)
class Knockout(_Base):
    """In the listed decoder layers (all when empty), queries of span ``src`` cannot attend
    to keys of span ``dst``. src: "text" (prompt text after the image), "generated",
    "last" (the last prompt token), "all" (every non-image query: the vocabulary's
    ``non_image``); spans as defined once in :func:`vlmlens.run.span_mask`."""

    src: str = "last"
    dst: str = "image"
    layers: tuple = field(default=())

    def __init__(self, src: str = "last", dst: str = "image", layers: Sequence[int] = ()):
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        object.__setattr__(self, "layers", tuple(int(l) for l in layers))

    def validate(self, n_layers: int) -> None:
        if self.src not in SRC_SPANS:
            raise InputError(f"Knockout.src must be one of {SRC_SPANS}, got {self.src!r}")
        if self.dst not in DST_SPANS:
            raise InputError(f"Knockout.dst must be one of {DST_SPANS}, got {self.dst!r}")
        for l in self.layers:
            check_layer("Knockout layer", l, 0, n_layers - 1)

    #: the Knockout names of spans in the project's vocabulary (vlmlens.run.SPAN_VOCABULARY)
    SPANS = {"image": "image", "system": "system", "text": "text", "generated": "generated", "last": "last",
             "all": "non_image"}

    @property
    def cross_attention(self) -> str:
        return ("dst 'image': the cross-attention layers among ``layers`` (all when empty) are skipped for the src "
                "rows (their output is their input); other dst spans: a key mask, as on any model")

    def key_block(self, layer, qpos, kpos, ctx):
        if self.layers and layer not in self.layers:
            return None
        if ctx.cross_layers and self.dst == "image":
            return None
        return ctx.span(self.SPANS[self.src], qpos)[:, None] & ctx.span(self.SPANS[self.dst], kpos)[None, :]

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        if not ctx.cross_layers or self.dst != "image" or layer not in ctx.cross_layers or (
                self.layers and layer not in self.layers):
            return None
        rows = ctx.span(self.SPANS[self.src], ctx.rows(layer))
        if not bool(rows.any()):
            return None
        out = h_out.clone()
        out[:, rows] = h_in[:, rows]
        return out

    def prefix_effect(self, n_layers):
        # queries after the image never sit in the prefix; "all" includes the system tokens
        return UNCHANGED if self.src in ("text", "generated", "last") else RECOMPUTE

    def to_json(self) -> dict:
        return {"kind": "Knockout", "src": self.src, "dst": self.dst, "layers": list(self.layers)}


def _pass_through(layer, h_in, h_out, ctx, active: bool, tokens: str):
    if not active:
        return None
    if tokens == "all":
        return h_in
    rows = ctx.is_image(ctx.rows(layer))
    if not bool(rows.any()):
        return None
    out = h_out.clone()
    out[:, rows] = h_in[:, rows]
    return out
