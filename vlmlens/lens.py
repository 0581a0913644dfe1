"""The lens: the one mechanism that records and intervenes inside a VLM's language model.

It has two parts, installed together by :class:`Lens` (a context manager that removes both
in ``finally``, also when the forward raises):

1. An attention function registered with transformers' ``AttentionInterface`` under the
   name ``"vlmlens"``. It computes the layer's output with SDPA (so the model keeps its
   fast path) and, for the query rows we record (non-image queries), computes
   ``softmax(q·Kᵀ·scale + mask)`` against all keys to get the attention mass on image keys
   per head and the head-averaged map over image keys. It never materialises
   ``[layer, head, n, n]``. Interventions add per-layer key masks here.
2. Forward hooks on the decoder layers: layer inputs/outputs are recorded (the residual
   stream) and interventions may rewrite them.

Position bookkeeping: every forward of the decoder processes ``q`` new positions; the lens
numbers them ``n_seen .. n_seen+q-1`` (absolute positions in prompt + generated sequence)
and keeps, per layer, the positions of the keys held in the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .lens_stats import record_attention, record_contributions

ATTN_NAME = "vlmlens"
_STATE_ATTR = "_vlmlens_state"


class Intervention(Protocol):
    """What the lens asks of an intervention (all methods optional; see interventions.py)."""

    def key_block(self, layer: int, qpos: torch.Tensor, kpos: torch.Tensor, state: "LensState") -> torch.Tensor | None:
        """Bool [q, kv]: True where query ``qpos[i]`` must not attend to key ``kpos[j]``."""

    def edit_input(self, layer: int, hidden: torch.Tensor, state: "LensState") -> torch.Tensor | None:
        """Rewrite the input [1, q, d] of decoder layer ``layer`` (None: unchanged)."""

    def edit_output(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, state: "LensState") -> torch.Tensor | None:
        """Rewrite the output [1, q, d] of decoder layer ``layer`` (None: unchanged)."""

    def removed_positions(self, layer: int, state: "LensState") -> torch.Tensor | None:
        """Positions taken out of the sequence (hidden rows and KV cache) from ``layer`` on.

        Must grow monotonically with ``layer``: a removed position never comes back.
        """


@dataclass
class Plan:
    """What one forward/generate should record, and which interventions apply.

    Args:
        image_positions: sorted positions of the image tokens in the prompt.
        n_layers: number of decoder layers L.
        record_hidden: record the residual stream (layer 0 = embeddings, then every layer output).
        store_positions: positions whose hidden states are kept (None = all).
        hidden_dtype: dtype of stored hidden states (float16 by default; float32 for exactness).
        record_attention: record attention mass on image keys and the maps over image keys.
        map_from: first position whose head-averaged image map is kept (the last prompt token).
        interventions: objects following the :class:`Intervention` protocol.
        n_prompt: number of prompt positions (generated tokens start here).
        record_contrib: record attention output + image keys' part of it at query ``map_from``.
    """

    image_positions: np.ndarray
    n_layers: int
    record_hidden: bool = True
    store_positions: np.ndarray | None = None
    hidden_dtype: torch.dtype = torch.float16
    record_attention: bool = True
    map_from: int = 0
    interventions: list = field(default_factory=list)
    n_prompt: int = 0
    record_contrib: bool = False


class LensState:
    """Mutable state of one lens session: positions, recordings, intervention scratch space."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan = plan
        self.device = device
        self.image_pos = torch.as_tensor(np.asarray(plan.image_positions, dtype=np.int64), device=device)
        # position -> is an image token, as a lookup table (called for every layer's keys and
        # queries at every step; a gather is much cheaper than torch.isin's sort)
        n = int(self.image_pos.max()) + 1 if self.image_pos.numel() else 0
        self._image_lut = torch.zeros(n + 1, dtype=torch.bool, device=device)
        if n:
            self._image_lut[self.image_pos] = True
        self.n_seen = 0                      # positions processed by completed forwards
        self.qpos: torch.Tensor | None = None  # positions of the current forward's queries
        self.key_pos: dict[int, torch.Tensor] = {}  # per layer: positions held in the KV cache
        self.layer_qpos: dict[int, torch.Tensor] = {}  # per layer: positions of its current input rows
        self.pruned: set[int] = set()         # layers whose rows (and KV cache) lost positions: the
                                              # model's own mask no longer describes them
        self.scratch: dict[Any, Any] = {}    # free space for interventions (e.g. saved states)
        # recordings: lists of (positions [q] int64 numpy, tensor on CPU)
        self.hidden: dict[int, list] = {l: [] for l in range(plan.n_layers + 1)}
        self.share: dict[int, list] = {l: [] for l in range(plan.n_layers)}
        self.maps: dict[int, list] = {l: [] for l in range(plan.n_layers)}
        self.head_maps: dict[int, torch.Tensor] = {}  # layer -> [H, n_image] of the last prompt token
        self.contrib: dict[int, tuple] = {}  # layer -> (o [d], sum_j c_j [d], |c_j| [n_image])

    # -- helpers -----------------------------------------------------------------------
    def keep_rows(self, layer: int) -> torch.Tensor | None:
        """Bool mask over this forward's rows that stay in the sequence at ``layer`` (None: all)."""
        removed = None
        for iv in self.plan.interventions:
            fn = getattr(iv, "removed_positions", None)
            r = fn(layer, self) if fn is not None else None
            if r is not None and r.numel():
                removed = r if removed is None else torch.cat([removed, r])
        if removed is None:
            return None
        keep = ~torch.isin(self.qpos, removed.to(self.qpos.device))
        return None if bool(keep.all()) else keep

    def _replace_hidden(self, layer: int, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        if self.plan.record_hidden and self.hidden[layer]:
            self.hidden[layer].pop()
            self._store_hidden(layer, hidden, pos)

    def is_image(self, pos: torch.Tensor) -> torch.Tensor:
        if self.image_pos.numel() == 0:
            return torch.zeros_like(pos, dtype=torch.bool)
        # the table's last entry is False: every position past the image maps there
        return self._image_lut[pos.clamp(0, self._image_lut.numel() - 1)]

    def _store_hidden(self, layer: int, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        if not self.plan.record_hidden:
            return
        keep = pos
        rows = slice(None)
        if self.plan.store_positions is not None:
            sel = torch.isin(pos, torch.as_tensor(self.plan.store_positions, device=pos.device))
            if not bool(sel.any()):
                return
            rows, keep = sel, pos[sel]
        h = hidden[0, rows].detach().to("cpu", self.plan.hidden_dtype)
        self.hidden[layer].append((keep.cpu().numpy(), h))


# ---- the attention function -------------------------------------------------------------------

def _lens_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    state: LensState | None = getattr(module, _STATE_ATTR, None)
    if state is None:  # model left on "vlmlens" outside a lens: behave exactly like SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = int(module.layer_idx)
    qpos = state.layer_qpos[layer]
    kpos = state.key_pos[layer]
    if key.shape[2] < kpos.numel():
        # a sliding-window cache keeps only the layer's most recent keys (in order): so do we
        kpos = state.key_pos[layer] = kpos[kpos.numel() - key.shape[2]:]
    if kpos.numel() != key.shape[2] or qpos.numel() != query.shape[2]:
        raise RuntimeError(
            f"vlmlens lens lost track of positions at layer {layer}: {qpos.numel()} queries/{kpos.numel()} keys "
            f"recorded vs {query.shape[2]}/{key.shape[2]} in the model (batch size must be 1)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    # 1. allowed[q, kv]: the model's own mask (causality, sliding windows, Gemma 3's bidirectional
    #    image block) when it describes this layer's rows, else causality + window by position
    blocked = None
    for iv in state.plan.interventions:
        fn = getattr(iv, "key_block", None)
        b = fn(layer, qpos, kpos, state) if fn is not None else None
        if b is not None:
            blocked = b if blocked is None else (blocked | b)
    need_rows = state.plan.record_attention or state.plan.record_contrib
    mask_fits = layer not in state.pruned and (attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[-1] == kpos.numel() and attention_mask.shape[-2] == qpos.numel()
    ))
    if not mask_fits and blocked is None:  # rows were removed: the mask comes from positions
        blocked = torch.zeros(qpos.numel(), kpos.numel(), dtype=torch.bool, device=qpos.device)
    allowed = None
    if blocked is not None or need_rows:
        if attention_mask is not None and mask_fits:
            m = attention_mask[0, 0]
            allowed = m if m.dtype == torch.bool else (m == 0)
        else:
            allowed = positional_mask(qpos, kpos, getattr(module, "sliding_window", None))
        if blocked is not None:
            allowed = allowed & ~blocked

    # 2. the layer's output: SDPA, exactly as transformers calls it when nothing is blocked
    if blocked is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        kw = {k: v for k, v in kwargs.items() if k != "is_causal"}
        out, _ = sdpa_attention_forward(
            module, query, key, value, allowed[None, None], dropout=dropout, scaling=scaling, is_causal=False, **kw
        )

    # 3. statistics for non-image query rows against image keys
    if state.plan.record_attention and state.image_pos.numel():
        with torch.no_grad():
            record_attention(state, module, layer, query, key, qpos, kpos, allowed, scale)
    if state.plan.record_contrib and state.image_pos.numel():
        with torch.no_grad():
            record_contributions(state, module, layer, query, key, value, qpos, kpos, allowed, scale)
    return out, None


def positional_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Bool [q, kv] by absolute position: causal (``k <= q``) and, for a sliding-window layer,
    ``k > q - window`` (transformers' convention). Used where the model's own mask no longer
    describes the layer's rows (image rows removed). No bidirectional image block: once rows
    are removed there are no image queries left in that layer."""
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - int(window))
    return allowed


AttentionInterface.register(ATTN_NAME, _lens_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# ---- row removal --------------------------------------------------------------------------------

def _slice_rows(x, keep: torch.Tensor, axis: int):
    """Select ``keep`` rows along ``axis`` of a tensor (or of each tensor in a tuple)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(axis % x.dim(), torch.nonzero(keep).flatten().to(x.device))
    if isinstance(x, tuple):
        return tuple(_slice_rows(v, keep, axis) for v in x)
    return x


# sequence axis of each per-position keyword a decoder layer receives
_ROW_KWARGS = {"position_embeddings": -2, "position_ids": -1, "cache_position": -1}


def _rows_of(x, axis: int) -> int | None:
    t = x[0] if isinstance(x, tuple) else x
    return t.shape[axis] if isinstance(t, torch.Tensor) and t.dim() else None


def _select_rows(args, kwargs, keep: torch.Tensor, q: int):
    """Apply a row selection to a decoder layer's inputs (hidden states, rotary tables, positions)."""
    hidden, positional = _hidden_arg(args, kwargs)
    if hidden.shape[1] == q:  # earlier layers already removed them otherwise
        hidden = hidden[:, keep]
    kwargs = dict(kwargs)
    for name, axis in _ROW_KWARGS.items():
        if kwargs.get(name) is not None and _rows_of(kwargs[name], axis) == q:
            kwargs[name] = _slice_rows(kwargs[name], keep, axis)
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):
        kwargs["attention_mask"] = None  # rebuilt from positions inside the attention function
    if positional:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs


# ---- the context manager ----------------------------------------------------------------------

def _hidden_arg(args, kwargs):
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def _attention_modules(layers) -> list[torch.nn.Module]:
    mods = []
    for layer in layers:
        for m in layer.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "config") and any(
                n.endswith("_proj") for n, _ in m.named_children()
            ):
                mods.append(m)
                break
    return mods


class Lens:
    """Install the lens on a model for the duration of a ``with`` block.

    ``layers`` are the decoder layers (``model.get_decoder().layers``). On exit, every hook
    is removed and every config's ``_attn_implementation`` is restored, also on exceptions.
    """

    def __init__(self, layers, plan: Plan, device: torch.device | str = "cpu"):
        self.layers = list(layers)
        self.plan = plan
        self.state = LensState(plan, torch.device(device))
        self._handles: list = []
        self._configs: list = []
        self._attn_mods: list = []

    # hooks ---------------------------------------------------------------------------------
    def _pre(self, idx):
        def hook(module, args, kwargs):
            st = self.state
            hidden, positional = _hidden_arg(args, kwargs)
            if idx == 0:
                q = hidden.shape[1]
                st.qpos = torch.arange(st.n_seen, st.n_seen + q, device=hidden.device)
                st._store_hidden(0, hidden, st.qpos)  # the embeddings, before any row removal
            keep = st.keep_rows(idx)
            if keep is None:
                st.layer_qpos[idx] = st.qpos
            else:
                st.layer_qpos[idx] = st.qpos[keep]
                st.pruned.add(idx)
                args, kwargs = _select_rows(args, kwargs, keep, int(st.qpos.numel()))
                hidden, positional = _hidden_arg(args, kwargs)
            prev = st.key_pos.get(idx)
            st.key_pos[idx] = st.layer_qpos[idx] if prev is None else torch.cat([prev, st.layer_qpos[idx]])
            new = hidden
            for iv in st.plan.interventions:
                fn = getattr(iv, "edit_input", None)
                r = fn(idx, new, st) if fn is not None else None
                if r is not None:
                    new = r
            if new is not hidden and idx > 0:
                st._replace_hidden(idx, new, st.layer_qpos[idx])  # record what layer idx really reads
            if new is hidden and keep is None:
                return None
            if positional:
                return (new, *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=new)
            return args, kwargs
        return hook

    def _post(self, idx):
        def hook(module, args, kwargs, output):
            st = self.state
            h_in, _ = _hidden_arg(args, kwargs)
            is_tuple = isinstance(output, tuple)
            h_out = output[0] if is_tuple else output
            new = h_out
            for iv in st.plan.interventions:
                fn = getattr(iv, "edit_output", None)
                r = fn(idx, h_in, new, st) if fn is not None else None
                if r is not None:
                    new = r
            st._store_hidden(idx + 1, new, st.layer_qpos[idx])
            if idx == len(self.layers) - 1:
                st.n_seen += int(st.qpos.numel())
            if new is h_out:
                return None
            return (new, *output[1:]) if is_tuple else new
        return hook

    # context ------------------------------------------------------------------------------
    def __enter__(self) -> LensState:
        self._attn_mods = _attention_modules(self.layers)
        if len(self._attn_mods) != len(self.layers):
            raise RuntimeError(f"found {len(self._attn_mods)} attention modules in {len(self.layers)} decoder layers")
        if any(getattr(m, _STATE_ATTR, None) is not None for m in self._attn_mods):
            raise RuntimeError("another vlmlens capture is already running on this model; run captures one at a time")
        try:
            seen = set()
            for m in self._attn_mods:
                if id(m.config) not in seen:
                    seen.add(id(m.config))
                    self._configs.append((m.config, m.config._attn_implementation))
                    m.config._attn_implementation = ATTN_NAME
                setattr(m, _STATE_ATTR, self.state)
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))
        except BaseException:
            self._restore()
            raise
        return self.state

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, impl in reversed(self._configs):
            cfg._attn_implementation = impl
        self._configs.clear()
        for m in self._attn_mods:
            if hasattr(m, _STATE_ATTR):
                delattr(m, _STATE_ATTR)

    def __exit__(self, *exc) -> None:
        self._restore()
