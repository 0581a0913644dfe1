"""The lens's attention function, registered with transformers' ``AttentionInterface`` under
``"vlmlens"`` (see :mod:`vlmlens.lens`): SDPA for the layer's output, with the interventions' key
blocks taken out of the model's own mask, observers shown the attention before any block, and
the recorder's statistics recomputed for the rows it reads. It never materialises
``[layer, head, n, n]``. In a padded batch the masks and blocks are per example ``[B, q, kv]``.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "vlmlens"
STATE_ATTR = "_vlmlens_state"   # the attribute through which an attention module finds its lens


class AttentionView:
    """One layer's attention as its observers see it: the query/key positions and the
    probabilities under the model's own mask (no intervention's key block), computed on
    request for the rows asked for, in float32."""

    def __init__(self, query, key, qpos, kpos, allowed, scale):
        self.qpos, self.kpos = qpos, kpos
        self._query, self._key, self._allowed, self._scale = query, key, allowed, scale

    def probs(self, rows: torch.Tensor, exclude_keys: torch.Tensor | None = None) -> torch.Tensor:
        """[H, R, kv] softmax over the keys the model's mask allows (minus ``exclude_keys``
        [kv] bool) for the query rows ``rows`` [R] (indices into ``qpos``)."""
        from transformers.integrations.sdpa_attention import repeat_kv

        n_rep = self._query.shape[1] // self._key.shape[1]
        k = repeat_kv(self._key, n_rep)[0].float()
        q = self._query[0][:, rows].float()
        allowed = self._allowed[rows]
        if exclude_keys is not None:
            allowed = allowed & ~exclude_keys[None, :]
        s = torch.matmul(q, k.transpose(-1, -2)) * self._scale
        return torch.softmax(s.masked_fill(~allowed[None], float("-inf")), dim=-1)


def _lens_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    lens = getattr(module, STATE_ATTR, None)
    if lens is None:  # model left on "vlmlens" outside a lens: behave exactly like SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = int(module.layer_idx)
    if layer in lens.cross_layers:       # keys are the image's patches (Mllama): the model's own mask, recorded
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        if lens.recorder.plan.record_attention and not lens.batch:
            with torch.no_grad():
                lens.recorder.cross_attention(layer, query, key, lens.positions.qpos, attention_mask,
                                              scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out, None
    pos = lens.positions
    qpos, kpos = pos.keys(layer, key.shape[2], query.shape[2])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    # 1. allowed[q, kv]: the model's own mask (causality, sliding windows, Gemma 3's bidirectional
    #    image block) when it describes this layer's rows, else causality + window by position;
    #    observers see it before any key block, then the interventions' blocks are taken out
    rec = lens.recorder
    mask_fits = layer not in pos.pruned and (attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[-1] == kpos.numel() and attention_mask.shape[-2] == qpos.numel()
    ))

    def make_mask():
        if attention_mask is not None and mask_fits:
            m = attention_mask[:, 0] if lens.batch else attention_mask[0, 0]
            return m if m.dtype == torch.bool else (m == 0)
        both = None
        if lens.bidirectional == "image" and not lens.batch:
            both = lens.context.is_image
        elif lens.bidirectional == "prefix" and not lens.batch:
            both = lambda p: p < lens.context.n_prompt                  # noqa: E731 (the prompt: PaliGemma's prefix)
        m = positional_mask(qpos, kpos, getattr(module, "sliding_window", None), both)
        return m.expand(query.shape[0], -1, -1) if lens.batch else m

    def model_mask():   # the same for every layer of a forward with the same mask, rows, keys and window
        window = getattr(module, "sliding_window", None)
        return pos.derived(f"mask:{mask_fits}:{window}:{query.shape[0]}", (attention_mask, qpos, kpos), make_mask)

    allowed = None
    if lens.observers:
        allowed = model_mask()
        view = AttentionView(query, key, qpos, kpos, allowed, scale)
        for fn in lens.observers:
            fn(layer, view, lens.context)
    blocked = lens.key_block(layer, qpos, kpos)
    if not mask_fits and blocked is None:  # rows were removed: the mask comes from positions
        blocked = torch.zeros(qpos.numel(), kpos.numel(), dtype=torch.bool, device=qpos.device)
    if blocked is not None or rec.reads_attention:
        if allowed is None:
            allowed = model_mask()
        if blocked is not None:
            allowed = allowed & ~blocked

    # 2. the layer's output: SDPA, exactly as transformers calls it when nothing is blocked
    if blocked is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        kw = {k: v for k, v in kwargs.items() if k != "is_causal"}
        out, _ = sdpa_attention_forward(
            module, query, key, value, allowed[:, None] if lens.batch else allowed[None, None], dropout=dropout,
            scaling=scaling, is_causal=False, **kw
        )

    # 3. what the recorder reads from this layer's attention
    if rec.reads_attention:
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            rec.attention(module, layer, query, key, value, qpos, kpos, allowed, scale)
    return out, None


def _attention_module(layer) -> torch.nn.Module | None:
    """The decoder layer's softmax-attention module (None in a hybrid stack's linear / convolution layer)."""
    for m in layer.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "config") and any(n.endswith("_proj") for n, _ in m.named_children()):
            return m
    return None


def _mlp_module(layer) -> torch.nn.Module:
    for name in ("mlp", "feed_forward"):
        m = getattr(layer, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise RuntimeError(f"decoder layer {type(layer).__name__} has no MLP module (looked for .mlp, .feed_forward)")


def _union(key_blocks, layer, qpos, kpos, ctx):
    blocked = None
    for fn in key_blocks:
        b = fn(layer, qpos, kpos, ctx)
        if b is not None:
            blocked = b if blocked is None else (blocked | b)
    return blocked


def positional_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None, both_ways=None) -> torch.Tensor:
    """Bool [q, kv] by absolute position: causal (``k <= q``) and, for a sliding-window layer,
    ``k > q - window`` (transformers' convention). Used where the model's own mask no longer
    describes the layer's rows (rows removed). ``both_ways(pos)`` marks the block a family reads
    bidirectionally (Gemma 3: the image; PaliGemma: the whole prompt): the rows of it that remain
    still read every remaining key of it, as the model's own mask over the kept sequence says."""
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - int(window))
    if both_ways is not None:
        allowed = allowed | (both_ways(qpos)[:, None] & both_ways(kpos)[None, :])
    return allowed


AttentionInterface.register(ATTN_NAME, _lens_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
