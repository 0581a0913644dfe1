"""The lens: the one mechanism that records and intervenes inside a VLM's language model.

It has two parts, installed together by :class:`Lens` (a context manager that removes both
in ``finally``, also when the forward raises):

1. An attention function registered with transformers' ``AttentionInterface`` under the
   name ``"vlmlens"``. It computes the layer's output with SDPA (so the model keeps its
   fast path); interventions add per-layer key blocks here, and the :class:`Recorder`
   recomputes ``softmax(q·Kᵀ·scale + mask)`` for the query rows it records. It never
   materialises ``[layer, head, n, n]`` (``lens_attention.py``).
2. Forward hooks on the decoder layers (and, when an intervention reads them, pre-hooks on
   their MLPs): layer inputs/outputs are recorded (the residual stream) and interventions
   may rewrite them.

A lens session is three objects, each with one job (defined in ``session.py``):
:class:`Positions` -- which absolute positions each forward and each layer holds (written only
by the lens's hooks); :class:`vlmlens.recorder.Recorder` -- what is recorded, and the Run's
arrays; :class:`LensContext` -- the narrow, read-only view interventions get (image positions,
the rows a layer holds, the span vocabulary, the tower's layers) plus a scratch dict of their own.

What a session records is a frozen :class:`Recording`; :meth:`Plan.build` is the one place a
:class:`Plan` (recording + interventions + prompt facts) is made. A session can resume after
a prefix forward (:class:`LensStart`, see ``experiments/prefix.py``).

A session may hold a padded batch (``batch=``: one :class:`BatchRow` per example, see
``experiments/batch.py``): each example gets its own :class:`LensContext` over its own
positions (:class:`RowPositions`), and every intervention is asked about each example as in a
batch of one. A batched session records nothing and takes no rows out (it says so).
"""
from __future__ import annotations

import copy
import warnings
from typing import Protocol

import torch

from .lens_attention import (ATTN_NAME, STATE_ATTR, AttentionView, _attention_module, _mlp_module,  # noqa: F401
                             _union, positional_mask)
from .lens_injections import Injections
from .errors import InputError
from .interventions.base import refuse_for_structure
from .recorder import Recorder
from .rows import _hidden_arg, _select_rows, _with_hidden
from .session import (HIDDEN_DTYPES, NOTHING, STORE_MODES, BatchRow, LensContext, LensStart, Plan,  # noqa: F401
                      Positions, Recording, RowPositions)

_ROW_SCRATCH = "_vlmlens_batch_rows"     # in a batched session's LensStart.scratch: each example's scratch


class Intervention(Protocol):
    """What the lens asks of an intervention (every method optional; see interventions.py).

    ``ctx`` is the session's :class:`LensContext`. Methods that rewrite return None for
    "unchanged". The residual-site names follow the stream: ``resid_pre`` is a decoder
    layer's input, ``resid_post`` its output.
    """

    def key_block(self, layer: int, qpos: torch.Tensor, kpos: torch.Tensor, ctx: "LensContext") -> torch.Tensor | None:
        """Bool [q, kv]: True where query ``qpos[i]`` must not attend to key ``kpos[j]``."""

    def edit_resid_pre(self, layer: int, hidden: torch.Tensor, ctx: "LensContext") -> torch.Tensor | None:
        """Rewrite the input [1, q, d] of decoder layer ``layer``."""

    def edit_resid_post(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, ctx: "LensContext") -> torch.Tensor | None:
        """Rewrite the output [1, q, d] of decoder layer ``layer`` (``h_in``: its input)."""

    def removed_positions(self, layer: int, ctx: "LensContext") -> torch.Tensor | None:
        """Positions taken out of the sequence (hidden rows and KV cache) from ``layer`` on.

        Must grow monotonically with ``layer``: a removed position never comes back.
        """

    def read_mlp_input(self, layer: int, x: torch.Tensor, ctx: "LensContext") -> None:
        """See the input [1, q, d] of layer ``layer``'s MLP (after its norm); read only."""

    def observe_attention(self, layer: int, view: "AttentionView", ctx: "LensContext") -> None:
        """See layer ``layer``'s attention before any key block applies (read only; e.g. a
        token ranking that a key block or a removal of the same or a later layer uses)."""

    def edit_vision_output(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, ctx: "LensContext") -> torch.Tensor | None:
        """Rewrite the output of vision-tower layer ``layer`` (the image encoder, before the projector)."""

    def observe_input(self, hidden: torch.Tensor, qpos: torch.Tensor, ctx: "LensContext") -> None:
        """See the rows [1, q, d] entering decoder layer 0 at ``qpos`` before any leaves (read only)."""

    def stops_injection(self, layer: int) -> bool:
        """True: the features a family adds to the output of decoder layer ``layer`` (Qwen3-VL's
        DeepStack; see ``lens_injections``) are left out."""

    def record_arrays(self, ctx: "LensContext", n_layers: int) -> dict:
        """Arrays for the Run after the session (what the intervention decided, e.g. kept tokens)."""


#: names of the Intervention methods, with the old names still accepted (DeprecationWarning)
_RENAMED = {"edit_resid_pre": "edit_input", "edit_resid_post": "edit_output"}


def _method(iv, name: str):
    fn = getattr(iv, name, None)
    old = _RENAMED.get(name)
    if fn is None and old is not None and getattr(iv, old, None) is not None:
        warnings.warn(f"{type(iv).__name__}.{old} is now called {name} (the residual site it edits)",
                      DeprecationWarning, stacklevel=4)
        fn = getattr(iv, old)
    return fn


class Lens:
    """Install the lens on a model for the duration of a ``with`` block (returns itself).

    ``layers`` are the decoder layers (``model.get_decoder().layers``); ``start`` resumes
    after a prefix forward. On exit, every hook is removed and every config's
    ``_attn_implementation`` is restored, also on exceptions. After the block,
    ``lens.recorder`` holds the recordings and ``lens.start()`` the resume point.
    """

    @classmethod
    def for_model(cls, lm, plan: Plan, start: LensStart | None = None, batch=None) -> "Lens":
        """The lens on a LoadedModel: its decoder layers, and its vision-tower layers for the
        interventions that edit them."""
        lens = cls(lm.arch.decoder_layers(lm.model), plan, device=lm.device, start=start,
                   vision_layers=lm.arch.vision_layers(lm.model), batch=batch,
                   injections=lm.arch.injection_module(lm.model), attention_layers=lm.arch.attention_layers(lm.model),
                   cross_layers=lm.arch.cross_layers(lm.model))
        lens.bidirectional = lm.arch.bidirectional
        # only interventions that edit the tower read it (a second scan of the tower otherwise)
        depth = lm.arch.vision_feature_depth(lm.model) if lens._vision_hooks else None
        for ctx in [lens.context, *lens._row_contexts]:
            ctx.vision_feature_depth, ctx.final_norm = depth, lm.arch.final_norm(lm.model)
        return lens

    def __init__(self, layers, plan: Plan, device: torch.device | str = "cpu", start: LensStart | None = None,
                 vision_layers=None, batch=None, injections: torch.nn.Module | None = None, attention_layers=None,
                 cross_layers=None):
        self.layers = list(layers)
        # layers that read the image by cross-attention (Mllama): their keys are vision patches, not positions;
        # by default the layers with a cross-attention block
        self.cross_layers = frozenset(int(l) for l in cross_layers) if cross_layers is not None else frozenset(
            i for i, l in enumerate(self.layers) if isinstance(getattr(l, "cross_attn", None), torch.nn.Module))
        # layers with softmax attention (a hybrid stack's linear / convolution layers have none); by
        # default the layers where an attention module is found
        self.attention_layers = (frozenset(i for i, l in enumerate(self.layers) if _attention_module(l) is not None)
                                 - self.cross_layers if attention_layers is None
                                 else frozenset(int(l) for l in attention_layers))
        self.vision_layers = list(vision_layers) if vision_layers is not None else []
        self.bidirectional = None            # "image" / "prefix": read both ways there (set by for_model)
        self.plan = plan
        device = torch.device(device)
        self.positions = Positions(plan.image_positions, device)
        self.recorder = Recorder(plan, self.positions)
        self.context = LensContext(self.positions, plan)
        if start is not None:
            self.positions.resume(start)
            self.recorder.resume(start)
            self.context.scratch = copy.deepcopy(start.scratch)
        ivs = plan.interventions
        # each intervention method looked up once per session (None: the intervention lacks it)
        self.key_blocks = [f for f in (_method(iv, "key_block") for iv in ivs) if f is not None]
        self._removers = [f for f in (_method(iv, "removed_positions") for iv in ivs) if f is not None]
        self._pre_edits = [f for f in (_method(iv, "edit_resid_pre") for iv in ivs) if f is not None]
        self._post_edits = [f for f in (_method(iv, "edit_resid_post") for iv in ivs) if f is not None]
        self._mlp_reads = [f for f in (_method(iv, "read_mlp_input") for iv in ivs) if f is not None]
        self.observers = [f for f in (_method(iv, "observe_attention") for iv in ivs) if f is not None]
        self._vision_edits = [f for f in (_method(iv, "edit_vision_output") for iv in ivs) if f is not None]
        self._input_reads = [f for f in (_method(iv, "observe_input") for iv in ivs) if f is not None]
        # features the family adds between decoder layers (DeepStack), added by the lens itself
        self.injections = Injections(injections, [f for f in (getattr(iv, "stops_injection", None) for iv in ivs)
                                                  if f is not None])
        refuse_for_structure(ivs, cross_layers=self.cross_layers, injections=injections is not None)
        self._vision_hooks = bool(self._vision_edits) or plan.recording.vision
        if self._vision_hooks and not self.vision_layers:
            raise RuntimeError("an intervention edits (or the plan records) the vision tower, but the lens was given "
                               "no vision layers (use Lens.for_model)")
        self.context.n_vision_layers = len(self.vision_layers)
        self.context.vision_modules = self.vision_layers
        self.context.attention_layers = self.attention_layers
        self.context.cross_layers = self.cross_layers
        self.recorder.no_attention = frozenset(range(len(self.layers))) - self.attention_layers
        self.recorder.cross_layers = self.cross_layers
        if self.cross_layers:
            # the sequence holds no image tokens (only the <|image|> placeholder): no self-attention statistic
            # over them is defined; the cross-attention layers' maps are recorded instead
            self.recorder.reads_attention = False
            self.recorder.no_attention = frozenset(range(len(self.layers)))
        # a left-padded batch (``batch``: one BatchRow per example): every intervention sees each
        # example through its own context, numbered as in a batch of one
        self.batch = list(batch) if batch is not None else None
        self._row_contexts = []
        if self.batch is not None:
            self._check_batch()
            for row in self.batch:
                ctx = LensContext(RowPositions(self.positions, row, device), plan, n_prompt=row.n_prompt)
                ctx.n_vision_layers = len(self.vision_layers)
                ctx.attention_layers = self.attention_layers
                self._row_contexts.append(ctx)
            rows_scratch = self.context.scratch.pop(_ROW_SCRATCH, None)
            if rows_scratch is not None:
                if len(rows_scratch) != len(self._row_contexts):
                    raise RuntimeError("a batched lens session resumed with a different batch size")
                for ctx, sc in zip(self._row_contexts, rows_scratch):
                    ctx.scratch = sc
        self._handles: list = []
        self._configs: list = []
        self._attn_mods: list = []

    def _check_batch(self) -> None:
        why = []
        r = self.plan.recording
        if r.store != "none" or r.attention or r.contrib or r.vision:
            why.append("it records nothing (a batched run only scores outputs)")
        if self.observers or self._mlp_reads:
            why.append("no intervention reads attention or MLP inputs")
        if why:
            raise RuntimeError("a batched lens session needs: " + "; ".join(why))

    def key_block(self, layer: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """The interventions' key blocks of ``layer``: bool [q, kv] (a batch: [B, q, kv]) or None."""
        if not self.key_blocks:
            return None
        if self.batch is None:
            return _union(self.key_blocks, layer, qpos, kpos, self.context)
        out = None
        for b, ctx in enumerate(self._row_contexts):
            rp = ctx._positions
            blk = _union(self.key_blocks, layer, rp.of_columns(qpos), rp.of_columns(kpos), ctx)
            if blk is not None:
                if out is None:
                    out = torch.zeros(len(self.batch), qpos.numel(), kpos.numel(), dtype=torch.bool, device=qpos.device)
                out[b] = blk
        return out

    def _per_row(self, call, *tensors):
        """``call(*tensors, ctx)`` (rewrites [1, q, d] or None), per example in a batch; the
        rewritten batch, or None when nothing changed."""
        if self.batch is None:
            return call(*tensors, self.context)
        parts, changed = [], False
        for b, ctx in enumerate(self._row_contexts):
            r = call(*(t[b:b + 1] for t in tensors), ctx)
            changed = changed or r is not None
            parts.append(tensors[-1][b:b + 1] if r is None else r)
        return torch.cat(parts) if changed else None

    def start(self) -> LensStart:
        """The point a later session resumes from (after this session's forwards)."""
        p, r = self.positions, self.recorder.finish()
        scratch = self.context.scratch
        if self.batch is not None:        # each example's own scratch space travels with it
            scratch = {**scratch, _ROW_SCRATCH: [c.scratch for c in self._row_contexts]}
        return LensStart(p.n_seen, dict(p.key_pos), frozenset(p.pruned), dict(r.hidden), dict(r.share),
                         copy.deepcopy(scratch))

    # hooks ---------------------------------------------------------------------------------
    def _keep_rows(self, layer: int) -> torch.Tensor | None:
        """Bool mask over this forward's rows that stay in the sequence at ``layer`` (None: all)."""
        removed = [r for r in (fn(layer, c) for fn in self._removers for c in (self._row_contexts or [self.context]))
                   if r is not None and r.numel()]
        if not removed:
            return None
        if self.batch is not None:
            raise RuntimeError("an intervention removes rows, which a batched lens session cannot do (examples would "
                               "hold different numbers of rows); run it one example at a time")
        qpos = self.positions.qpos      # (the same for the layers of this forward leaving out the same positions)
        kept = self.positions.derived("keep rows", (qpos, *removed),
                                      lambda: ~torch.isin(qpos, torch.cat(removed).to(qpos.device)))
        return None if bool(kept.all()) else kept

    def _pre(self, idx):
        def hook(module, args, kwargs):
            pos = self.positions
            hidden, positional = _hidden_arg(args, kwargs)
            if idx == 0:
                if self.plan.whole_forwards:      # no cache: this forward is the whole sequence, decided anew
                    pos.restart()
                    self.context.scratch = {}
                self.recorder.begin_forward(hidden, pos.begin_forward(hidden.shape[1], hidden.device))
                for fn in self._input_reads:      # before any row leaves: what enters the language model
                    fn(hidden, pos.qpos, self.context)
            keep = self._keep_rows(idx)
            if keep is not None:
                held = None if idx == 0 or idx - 1 not in pos.pruned_now else pos.pruned_now[idx - 1]
                args, kwargs = _select_rows(args, kwargs, keep, int(pos.qpos.numel()), held)
                hidden, positional = _hidden_arg(args, kwargs)
            rows = pos.enter_layer(idx, keep)
            if idx not in self.attention_layers and self.key_blocks:
                self._refuse_key_block(idx, rows)
            new = hidden
            for fn in self._pre_edits:
                r = self._per_row(lambda h, c: fn(idx, h, c), new)
                if r is not None:
                    new = r
            if new is not hidden and idx > 0:
                self.recorder.replace_hidden(idx, new, rows)  # record what layer idx really reads
            if new is hidden and keep is None:
                return None
            return _with_hidden(args, kwargs, new, positional)
        return hook

    def _refuse_key_block(self, idx: int, rows: torch.Tensor) -> None:
        """A key mask at a layer without softmax attention has nothing to act on: refused, never skipped."""
        blk = self.key_block(idx, rows, self.positions.key_pos[idx])
        if blk is not None and bool(blk.any()):
            names = ", ".join(sorted({type(f.__self__).__name__ for f in self.key_blocks}))
            raise InputError(
                f"decoder layer {idx} of this model has no softmax attention (a linear-attention or convolution layer "
                f"of a hybrid stack), so a key mask ({names}) cannot stop what it reads there; take the rows out "
                f"instead (mode='remove') or act only on the attention layers {sorted(self.attention_layers)}")

    def _edited_output(self, edits, idx, args, kwargs, output, vision: bool = False, add=None):
        """(layer input, the output's hidden states after ``add`` then ``edits``, the output rebuilt
        or None)."""
        h_in, _ = _hidden_arg(args, kwargs)
        is_tuple = isinstance(output, tuple)
        h_out = output[0] if is_tuple else output
        new = h_out if add is None else add(h_out)
        for fn in edits:
            r = (fn(idx, h_in, new, self.context) if vision
                 else self._per_row(lambda a, b, c: fn(idx, a, b, c), h_in, new))
            if r is not None:
                new = r
        rebuilt = None if new is h_out else ((new, *output[1:]) if is_tuple else new)
        return h_in, new, rebuilt

    def _post(self, idx):
        def hook(module, args, kwargs, output):
            add = self.injections.adder(idx, self.positions.layer_qpos[idx], self.positions.qpos)
            _, new, rebuilt = self._edited_output(self._post_edits, idx, args, kwargs, output, add=add)
            self.recorder.store_hidden(idx + 1, new, self.positions.layer_qpos[idx])
            if idx == len(self.layers) - 1:      # the forward ends: the statistics waiting for it, then positions
                self.recorder.flush()
                self.positions.end_forward()
            return rebuilt
        return hook

    def _vision_post(self, idx):
        def hook(module, args, kwargs, output):
            h_in, new, rebuilt = self._edited_output(self._vision_edits, idx, args, kwargs, output, vision=True)
            if self.plan.recording.vision:
                if idx == 0:
                    self.recorder.store_vision(0, h_in)
                self.recorder.store_vision(idx + 1, new)
            return rebuilt
        return hook

    def _mlp_pre(self, idx):
        def hook(module, args):
            for fn in self._mlp_reads:
                fn(idx, args[0], self.context)
        return hook

    # context ------------------------------------------------------------------------------
    def __enter__(self) -> "Lens":
        found = {i: _attention_module(layer) for i, layer in enumerate(self.layers)}
        if {i for i, m in found.items() if m is not None} - self.cross_layers != self.attention_layers:
            raise RuntimeError(f"attention modules found in decoder layers {sorted(i for i, m in found.items() if m)}, "
                               f"expected in {sorted(self.attention_layers)}")
        self._attn_mods = [m for m in found.values() if m is not None]
        if any(getattr(m, STATE_ATTR, None) is not None for m in self._attn_mods):
            raise RuntimeError("another vlmlens capture is already running on this model; run captures one at a time")
        try:
            seen = set()
            for m in self._attn_mods:
                if id(m.config) not in seen:
                    seen.add(id(m.config))
                    self._configs.append((m.config, m.config._attn_implementation))
                    m.config._attn_implementation = ATTN_NAME
                setattr(m, STATE_ATTR, self)
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))
                if self._mlp_reads:
                    self._handles.append(_mlp_module(layer).register_forward_pre_hook(self._mlp_pre(i)))
            if self.injections.module is not None:
                self._handles.append(self.injections.module.register_forward_pre_hook(self.injections.hook(),
                                                                                      with_kwargs=True))
            if self._vision_hooks:
                for i, layer in enumerate(self.vision_layers):
                    # prepend: before transformers' own output-capturing hooks, so that the hidden
                    # states it hands the projector (LLaVA's vision_feature_layer) are the edited ones
                    self._handles.append(layer.register_forward_hook(self._vision_post(i), with_kwargs=True,
                                                                     prepend=True))
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, impl in reversed(self._configs):
            cfg._attn_implementation = impl
        self._configs.clear()
        for m in self._attn_mods:
            if hasattr(m, STATE_ATTR):
                delattr(m, STATE_ATTR)

    def __exit__(self, *exc) -> None:
        self._restore()
