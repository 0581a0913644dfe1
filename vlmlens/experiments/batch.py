"""Batched execution: B (image, prompt) items per forward, through the same lens.

Each item is processed as it would be alone (:func:`prepare`), then the items are stacked:
prompts padded to one length (:func:`collate`: attention mask 0 on the padding, which sits
before each prompt and between its image and its text), image tensors concatenated. The lens
numbers every example's positions as a batch of one would (:class:`vlmlens.session.RowPositions`)
and asks each intervention about each example separately, so key blocks and row edits are
per example. Position ids come from the attention mask, as ``generate`` makes them (M-RoPE
rows for Qwen2-VL).

:class:`BatchTrial` is the batched counterpart of :class:`vlmlens.experiments.engine.Session`
for what a study needs: greedy outputs (stopping per example) and the baseline's tokens scored
teacher-forced under each variant. It equals the batch-of-one path (tokens identical, log-probs
within 1e-4; tested on every random family and tiny-shapes). Images may differ in size and
token count (LLaVA-NeXT and Idefics3 tiles are zero-padded, as their processors pad them).
What cannot batch says why (:func:`batch_problem`): image tensors that differ in a way the
family's forward cannot read back, and interventions that are per example by nature (token
rankings, row removal): those run one item at a time.

Prefix reuse carries over: the batch's prefix columns (every example's system + image
tokens) are computed once where the family supports it, and variants that leave the prefix unchanged
continue from them (:class:`BatchTrial`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..capture import Prepared, _eos_ids, check_context, check_max_new_tokens, greedy_generate, prepare
from ..generation import cache_input, output_cache
from ..interventions import batch_conflict, prefix_effect, validate_all
from ..lens import NOTHING, BatchRow, Lens, LensStart, Plan
from .prefix import _private_copy, accepts_logits_to_keep, reuse_supported


class BatchError(ValueError):
    """These items (or interventions) cannot run as one batch; the message says why."""


def _pad_id(lm) -> int:
    tok = lm.processor.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else (sorted(_eos_ids(lm)) or [0])[0]


def _pad_tiles(vals: list[torch.Tensor]) -> list[torch.Tensor]:
    if any(v.dim() < 3 or v.shape[2:] != vals[0].shape[2:] for v in vals):
        return vals
    n = max(v.shape[1] for v in vals)
    return [torch.cat([v, v.new_zeros((v.shape[0], n - v.shape[1], *v.shape[2:]))], 1) if v.shape[1] < n else v
            for v in vals]


def _pad_pixels(vals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images of different sizes, zero-padded below and to the right to the largest (the forward reads each one
    only as far as its ``image_sizes``)."""
    if any(v.dim() < 3 or v.shape[:-2] != vals[0].shape[:-2] for v in vals):
        return vals
    h, w = max(v.shape[-2] for v in vals), max(v.shape[-1] for v in vals)
    return [torch.nn.functional.pad(v, (0, w - v.shape[-1], 0, h - v.shape[-2])) for v in vals]


def collate(lm, preps: Sequence[Prepared]) -> tuple[dict, list[BatchRow]]:
    """One padded batch of prepared items: (model inputs, one BatchRow per item).

    Column layout: ``[pad][system + image][pad][text]`` -- every example's prefix (up to its last
    image token) ends in the same column, and every prompt ends in the last one, so a shared
    prefix holds whole images and generation continues every example at once. Padding is
    masked out, and position ids come from the mask: each example keeps its own numbering.
    Raises BatchError when the items' other tensors cannot be stacked."""
    if not preps:
        raise BatchError("no items")
    cross = lm.arch.cross_layers(lm.model)
    if cross and len(preps) > 1:
        raise BatchError(f"this model reads the image by cross-attention (layers {list(cross)}) under a per-token mask of"
                         " image tiles, which the lens does not align across padded examples; it runs one example at a"
                         " time")
    recurrent = sorted(set(range(lm.n_layers)) - set(lm.arch.attention_layers(lm.model)) - set(cross))
    if recurrent and len(preps) > 1:
        raise BatchError(f"decoder layers {recurrent} of this model carry a state along the sequence (linear attention "
                         "or convolution), which the padding that aligns the examples would change; it runs one "
                         "example at a time")
    ends = [int(p.image_pos[-1]) + 1 for p in preps]
    N = max(ends)
    M = max(p.n_prompt - e for p, e in zip(preps, ends))
    P = N + M
    rows, where = [], []
    for p, e in zip(preps, ends):
        a, c = N - e, M - (p.n_prompt - e)
        cols = np.concatenate([np.arange(a, N), np.arange(N + c, P)])     # columns of the example's tokens
        pos = np.full(P, -1, dtype=np.int64)
        pos[cols] = np.arange(p.n_prompt)
        rows.append(BatchRow(pos, p.image_pos, p.n_prompt))
        where.append(torch.as_tensor(cols))
    keys = list(preps[0].inputs)
    if any(list(p.inputs) != keys for p in preps):
        raise BatchError("the items' processors returned different inputs")
    out = {}
    for k in keys:
        vals = [p.inputs[k] for p in preps]
        if not isinstance(vals[0], torch.Tensor):
            if any(v != vals[0] for v in vals):
                raise BatchError(f"input {k!r} differs between items")
            out[k] = vals[0]
            continue
        if all(v.dim() == 2 and v.shape == (1, p.n_prompt) for v, p in zip(vals, preps)):   # per token
            fill = _pad_id(lm) if k == "input_ids" else 0
            full = torch.full((len(vals), P), fill, dtype=vals[0].dtype, device=vals[0].device)
            for b, (v, cols) in enumerate(zip(vals, where)):
                full[b, cols.to(v.device)] = v[0]
            out[k] = full
            continue
        if any(v.shape[1:] != vals[0].shape[1:] for v in vals) and k in lm.arch.tile_inputs:
            vals = _pad_tiles(vals)
        if (any(v.shape[1:] != vals[0].shape[1:] for v in vals) and k in lm.arch.sized_inputs
                and all("image_sizes" in p.inputs for p in preps)):
            vals = _pad_pixels(vals)
        if any(v.shape[1:] != vals[0].shape[1:] for v in vals):
            shapes = sorted({tuple(v.shape) for v in vals})
            raise BatchError(f"input {k!r} has different shapes across items ({shapes}), which this family's forward"
                             " cannot read back")
        out[k] = torch.cat(vals)
    return out, rows


def batch_problem(lm, preps: Sequence[Prepared], interventions: Sequence = ()) -> str | None:
    """Why these items under these interventions cannot run as one batch (None: they can)."""
    why = batch_conflict(interventions)
    if why:
        return why
    try:
        collate(lm, preps)
    except BatchError as e:
        return str(e)
    return None


def _position_ids(lm, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return lm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))


@dataclass
class BatchOutcome:
    """One variant over a batch: per item, its greedy tokens (cut at the stop token), text,
    and [T+1, vocab] log-probs of the baseline's tokens (teacher-forced; row t predicts token t)."""

    interventions: list
    generated_ids: list[list[int]]
    texts: list[str]
    step_logprobs: list[torch.Tensor]


@dataclass
class _BatchPrefix:
    """The batch's first ``n`` columns computed once: every example's system and image tokens
    (its prefix, experiments/prefix.py), and padding."""

    cache: object
    start: LensStart
    n: int


class BatchTrial:
    """B items, their baseline (generated once), ready to evaluate variants batched.

    ``items``: (image, prompt) pairs; ``baseline``: interventions of the baseline itself (a
    study passes its no-op depth-L truncation). Raises BatchError when they cannot batch.
    ``reuse``: where the family supports prefix reuse, variants whose interventions leave the
    prefix unchanged continue from the batch's shared prefix, and a variant that changes it computes its own prefix once for
    its generation and its scoring -- as :class:`vlmlens.experiments.engine.Session` does.
    """

    def __init__(self, lm, items: Sequence[tuple], *, max_new_tokens: int = 16, baseline: Sequence = (),
                 reuse: bool = True):
        self.lm = lm
        self.n_new = check_max_new_tokens(max_new_tokens)
        # per-item position ids are not needed: the batch's come from its mask (one call below)
        self.preps = [prepare(lm, image, prompt) for image, prompt in items]
        for p in self.preps:
            check_context(lm, p.n_prompt, len(p.image_pos), self.n_new)
        self.inputs, self.rows = collate(lm, self.preps)
        self.P = int(self.inputs["input_ids"].shape[1])
        self.position_ids = _position_ids(lm, self.inputs)
        self.n_prefix = int(np.flatnonzero(self.rows[0].positions == self.rows[0].image_positions[-1])[0]) + 1
        self.reuse = bool(reuse) and reuse_supported(lm) and self.n_prefix < self.P
        self._shared: _BatchPrefix | None = None
        self.baseline: BatchOutcome = self.evaluate(list(baseline))

    def __len__(self) -> int:
        return len(self.preps)

    def evaluate(self, interventions: Sequence) -> BatchOutcome:
        ivs = list(interventions)
        validate_all(ivs, self.lm.n_layers)
        why = batch_conflict(ivs)
        if why:
            raise BatchError(why)
        prefix = self._prefix_for(ivs)
        ids = self._generate(ivs, prefix)
        base = getattr(self, "baseline", None)
        steps = self._score(ivs, base.generated_ids if base is not None else ids, prefix)
        tok = self.lm.processor.tokenizer
        return BatchOutcome(ivs, ids, [tok.decode(g, skip_special_tokens=True).strip() for g in ids], steps)

    # -- prefixes ---------------------------------------------------------------------------
    def _prefix_for(self, ivs) -> _BatchPrefix | None:
        if not self.reuse:
            return None
        effects = [prefix_effect(iv, self.lm.n_layers).kind for iv in ivs]
        if any(e not in ("unchanged", "recompute") for e in effects):
            return None
        if "recompute" in effects:
            return self._prefill(ivs)
        if self._shared is None:
            self._shared = self._prefill([])
        return self._shared

    def _prefill(self, ivs) -> _BatchPrefix:
        n, P = self.n_prefix, self.P
        inputs = {k: (v[:, :n] if _per_column(v, len(self), P) else v) for k, v in self.inputs.items()}
        inputs["position_ids"] = self.position_ids[..., :n]
        kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(self.lm) else {}
        with torch.no_grad(), Lens.for_model(self.lm, self._plan(ivs, P), batch=self.rows) as lens:
            out = self.lm.model(**inputs, use_cache=True, return_dict=True, **kwargs)
        return _BatchPrefix(output_cache(out), lens.start(), n)

    def _plan(self, ivs, n_columns: int) -> Plan:
        return Plan.build([], self.lm.n_layers, n_columns, NOTHING, ivs)

    # -- generation and scoring -------------------------------------------------------------
    def _generate(self, ivs, prefix: _BatchPrefix | None) -> list[list[int]]:
        lm = self.lm
        inputs, start = self.inputs, None
        if prefix is not None:
            inputs = {"input_ids": self.inputs["input_ids"][:, prefix.n:], "attention_mask": self.inputs["attention_mask"],
                      "position_ids": self.position_ids, **cache_input(_private_copy(prefix.cache))}
            start = prefix.start
        with torch.no_grad(), Lens.for_model(lm, self._plan(ivs, self.P), start=start, batch=self.rows):
            out = greedy_generate(lm, inputs, self.n_new)
        eos = _eos_ids(lm)
        gens = []
        fed = self.P if prefix is None else self.P - prefix.n       # the input ids generate was given
        for seq in out.sequences[:, fed:].tolist():
            gen = seq[: self.n_new]
            stop = next((i for i, t in enumerate(gen) if t in eos), None)
            gens.append(gen if stop is None else gen[:stop])
        return gens

    def _score(self, ivs, targets: list[list[int]], prefix: _BatchPrefix | None) -> list[torch.Tensor]:
        """Teacher-forced forward over each prompt + its target (right-padded): per item [T+1, vocab]."""
        lm, P = self.lm, self.P
        T = max(len(t) for t in targets)
        inputs, pids = extend_batch(lm, self.inputs, self.position_ids, targets)
        start = None
        if prefix is not None:
            n = prefix.n
            inputs = {"input_ids": inputs["input_ids"][:, n:], "attention_mask": inputs["attention_mask"],
                      **cache_input(_private_copy(prefix.cache))}
            pids, start = pids[..., n:], prefix.start
        kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(lm) else {}
        with torch.no_grad(), Lens.for_model(lm, self._plan(ivs, P + T), start=start, batch=self.rows):
            out = lm.model(**inputs, position_ids=pids, use_cache=prefix is not None, return_dict=True, **kwargs)
        logits = out.logits[:, -(T + 1):].float()
        logp = torch.log_softmax(logits, -1).cpu()
        return [logp[b, : len(t) + 1] for b, t in enumerate(targets)]


def extend_batch(lm, inputs: dict, position_ids: torch.Tensor, targets: list[list[int]]) -> tuple[dict, torch.Tensor]:
    """A collated batch with each example's ``targets`` appended after the prompt (right-padded
    to the longest; mask 0 and token type 0 on the padding): (inputs, position ids), the
    targets numbered on from each prompt's last position."""
    B, P = inputs["input_ids"].shape
    T = max((len(t) for t in targets), default=0)
    if not T:
        return dict(inputs), position_ids
    dtype, dev = inputs["input_ids"].dtype, inputs["input_ids"].device
    add = torch.full((B, T), _pad_id(lm), dtype=dtype, device=dev)
    real = torch.zeros((B, T), dtype=torch.bool, device=dev)
    for b, t in enumerate(targets):
        if t:
            add[b, : len(t)] = torch.as_tensor(t, dtype=dtype, device=dev)
            real[b, : len(t)] = True
    out = {}
    for k, v in inputs.items():
        if _per_column(v, B, P):
            if k == "input_ids":
                fill = add
            elif k == "attention_mask":
                fill = real
            else:                            # token types: text 0 (PaliGemma's generated suffix: 1)
                fill = torch.full_like(add, lm.arch.generated_token_type if k == "token_type_ids" else 0)
            out[k] = torch.cat([v, fill.to(v.dtype)], 1)
        else:
            out[k] = v
    steps = torch.arange(1, T + 1, dtype=position_ids.dtype, device=position_ids.device)
    return out, torch.cat([position_ids, position_ids[..., -1:] + steps], -1)


def _per_column(v, B: int, P: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (B, P)


def output_kl(base: torch.Tensor, var: torch.Tensor, n: int) -> float:
    """KL(baseline || variant) summed over the baseline's ``n`` generated tokens (nats; with
    none, of the first-token distribution), from [T+1, vocab] log-probs: a study's output KL."""
    p, q = (base[:n], var[:n]) if n else (base[:1], var[:1])
    p, q = p.double(), q.double()
    return float(max(float((p.exp() * (p - q)).sum()), 0.0))
