"""Features a family adds into the residual stream between decoder layers, owned by the lens.

Qwen3-VL's DeepStack adds one set of vision features (read from an intermediate vision-tower
layer) to the image rows of the output of each of the first few decoder layers. The model does
that in its layer loop, after each layer returns, on a mask over the whole sequence; the lens
takes the features off the language model's call instead (a forward pre-hook that passes
``deepstack_visual_embeds=None`` on), and adds them itself in the decoder layer's forward hook,
before the interventions' output edits. Three things follow:

* the residual stream the lens records after layer ``l`` is what layer ``l + 1`` reads (the
  injection included);
* an intervention decides about them: ``stops_injection(layer)`` True leaves out the features of
  that layer (Truncate and Freeze stop them from their first layer on), and an output edit that
  copies image rows through (Freeze, SkipLayers) also discards what was added;
* rows taken out of the sequence (Truncate / FastV ``remove``) get nothing: the features of the
  image rows that remain are added to those rows only.
"""
from __future__ import annotations

import torch

#: the keyword arguments of the language model's forward that carry the injection
_FEATURES, _MASK = "deepstack_visual_embeds", "visual_pos_masks"


class Injections:
    """One lens session's view of a family's injected features (empty for most families)."""

    def __init__(self, module: torch.nn.Module | None, stops):
        self.module = module                 # the decoder stack whose call carries the features
        self._stops = list(stops)           # interventions' ``stops_injection(layer) -> bool``
        self._now: tuple | None = None      # (mask [B, n], [features per layer]) of the current forward
        self.added: set[int] = set()        # layers whose output received features in this session
        self.stopped: set[int] = set()      # layers whose features an intervention left out

    def hook(self):
        """Forward pre-hook (with kwargs) for ``module``: keep the features, call on without them."""
        def take(module, args, kwargs):
            feats = kwargs.get(_FEATURES)
            if feats is None:
                self._now = None
                return None
            self._now = (kwargs[_MASK], list(feats))
            return args, dict(kwargs, **{_FEATURES: None})
        return take

    def adder(self, layer: int, rows: torch.Tensor, qpos: torch.Tensor):
        """``add(hidden) -> hidden`` for the output of decoder ``layer`` holding the rows at positions
        ``rows`` of this forward's ``qpos``; None when nothing is added there."""
        if self._now is None or layer >= len(self._now[1]):
            return None
        if any(stop(layer) for stop in self._stops):
            self.stopped.add(layer)
            return None
        mask, feats = self._now
        self.added.add(layer)

        def add(hidden: torch.Tensor) -> torch.Tensor:
            m = mask.to(hidden.device)
            f = feats[layer].to(hidden.device, hidden.dtype)
            out = hidden.clone()
            if hidden.shape[1] == m.shape[1]:          # every row of the forward is here (also a batch)
                out[m] = out[m] + f
                return out
            # rows were taken out (one example): the remaining image rows get their own features
            vis = qpos.to(m.device)[m[0]]
            held = torch.isin(rows.to(m.device), vis)
            out[:, held] = out[:, held] + f[torch.isin(vis, rows.to(m.device))]
            return out
        return add
