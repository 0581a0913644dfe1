"""The encoder side of visual depth: the vision tower run only up to layer m.

``EncoderDepth(m)``: the vision tower's layers m.. pass their input through, so the image
features the projector receives are the tower's state after m layers (in place of the
configured feature layer). ``m`` = the depth the model reads its features at (LLaVA's
``vision_feature_layer``, else every layer) is the baseline; deeper ``m`` changes nothing either.
It composes with every decoder-side intervention (the tower runs once, before the decoder).
"""
from __future__ import annotations

from dataclasses import dataclass

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
        return h_in if layer >= self.layers else None
