"""DART (arXiv 2502.11494): pruning image tokens by their duplication against a few pivot tokens.

From decoder layer ``layer`` (K) on, only these image tokens stay:

* **pivots**: the ``pivots[0]`` image tokens and the ``pivots[1]`` text tokens after the image
  whose key states at layer K-1 (post-RoPE, every key head concatenated) have the largest L1 norm;
* for each pivot in turn (in position order), the ``int(keep * n / (pivots[0] + pivots[1]))``
  image tokens, among those not yet chosen (nor image pivots), least similar to it: the smallest
  cosine similarity between the states leaving layer K-1 (through the model's final norm);
* the image pivots themselves. The text pivots only choose.

So about ``keep * n`` image tokens (plus the image pivots) stay, spread over what the pivots do
not already carry. The published loop visits the pivots in the order of a Python set (an artefact
of hashing); here they go in position order, the one choice made differently. The selection
needs the image and the prompt's text in one forward (a prefix is never reused).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, check_layer
from .base import INDEPENDENT
from .pruning import PRUNE_MODES, TokenPruner


@dataclass(frozen=True, init=False)
class DART(TokenPruner):
    pivots: tuple = (4, 4)

    def __init__(self, layer: int = 2, keep: float = 0.25, pivots=(4, 4), mode: str = "remove"):
        super().__init__((layer,), (keep,), "dart", mode, 0)
        object.__setattr__(self, "pivots", tuple(int(p) for p in pivots))

    def validate(self, n_layers: int) -> None:
        check_layer("DART layer", self.layers[0], 1, n_layers)
        k = self.keep[0]
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise InputError(f"DART keep ratio must be a fraction in (0, 1], got {k!r}")
        if len(self.pivots) != 2 or self.pivots[0] < 1 or self.pivots[1] < 0:
            raise InputError(f"DART pivots are (image pivots >= 1, text pivots >= 0), got {self.pivots!r}")
        if self.mode not in PRUNE_MODES:
            raise InputError(f"DART.mode must be one of {PRUNE_MODES}, got {self.mode!r}")

    def to_json(self) -> dict:
        return {"kind": "DART", "layer": self.layers[0], "keep": self.keep[0], "pivots": list(self.pivots),
                "mode": self.mode}

    def describe(self) -> str:
        return (f"keep about {100 * self.keep[0]:.4g} % of the image tokens from layer {self.layers[0]}: those least"
                f" duplicating {self.pivots[0]} image and {self.pivots[1]} text pivot tokens (DART)")

    def prefix_effect(self, n_layers):
        return INDEPENDENT

    # -- the selection -----------------------------------------------------------------------------
    def observe_attention(self, layer, view, ctx):
        if layer != self.layers[0] - 1 or 0 in self._state(ctx)["kept"]:
            return
        if not bool((view.qpos == ctx.n_prompt - 1).any()):
            return                                              # not the prompt's forward
        k = view._key[0]                                        # [kv heads, keys, head dim], after RoPE
        self._state(ctx)["keys"] = (view.kpos, k.permute(1, 0, 2).reshape(k.shape[1], -1).float())

    def edit_resid_post(self, layer, h_in, h_out, ctx):
        st = self._state(ctx)
        if layer != self.layers[0] - 1 or 0 in st["kept"] or "keys" not in st:
            return None
        rows = ctx.rows(layer)
        img = ctx.image_pos
        if not bool(torch.isin(img, rows).all()):
            return None
        if ctx.final_norm is None:
            raise RuntimeError("DART needs the model's final norm (use Lens.for_model)")
        with torch.no_grad():
            states = ctx.final_norm(h_out[0]).float()            # [rows, d]
        kpos, keys = st.pop("keys")
        st["kept"][0] = select(kpos, keys, rows, states, img, ctx.n_prompt, self.keep[0], self.pivots)
        return None


def select(kpos, keys, rows, states, img, n_prompt: int, keep: float, pivots) -> torch.Tensor:
    """The image positions DART keeps (see the module docstring), sorted."""
    n = int(img.numel())
    l1 = keys.abs().sum(-1)
    at_key = {int(p): i for i, p in enumerate(kpos.tolist())}
    at_row = {int(p): i for i, p in enumerate(rows.tolist())}
    img_list = [int(p) for p in img.tolist()]
    text = [p for p in range(img_list[-1] + 1, n_prompt) if p in at_key]
    if len(img_list) < pivots[0]:
        raise InputError(f"DART: {pivots[0]} image pivots for {n} image tokens")

    def top(cands, k):
        if k <= 0 or not cands:
            return []
        v = l1[[at_key[p] for p in cands]]
        return [cands[i] for i in torch.topk(v, min(k, len(cands))).indices.tolist()]

    img_piv, text_piv = top(img_list, pivots[0]), top(text, pivots[1])
    per = int(keep * n / (pivots[0] + pivots[1]))
    chosen = set(img_piv)
    valid = [p for p in img_list if p not in chosen]
    unit = torch.nn.functional.normalize(states, dim=-1)
    for piv in sorted(img_piv + text_piv):
        if not valid or per <= 0:
            break
        sim = unit[[at_row[p] for p in valid]] @ unit[at_row[piv]]
        pick = [valid[i] for i in torch.topk(-sim, min(per, len(valid))).indices.tolist()]
        chosen.update(pick)
        gone = set(pick)
        valid = [p for p in valid if p not in gone]
    return torch.tensor(sorted(chosen), dtype=img.dtype, device=img.device)
