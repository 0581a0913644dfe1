"""Prefix reuse: run the image once, continue many variants from its KV cache.

Every prompt of a supported family reads ``[system][image][text]``. Call the positions up to
and including the last image token the *prefix*. Under a truncation (``Truncate(k)``) nothing
in the prefix changes: system tokens come before the image (they never see it), and
truncation only stops *non-image queries* from reading image keys, so image rows keep their
baseline computation. Hence

* ``mode="drop"``: the KV cache of the prefix is the baseline's, at every layer;
* ``mode="remove"``: the same cache with the image positions cut out of layers ``>= k``
  (exactly what ``Truncate(k, "remove")`` leaves there);
* anything else (Freeze, Substitute, SkipLayers, Knockout): the prefix is recomputed once
  under those interventions, and the generation and the teacher-forced scoring of one variant
  both continue from it.

A variant then costs one forward over the few text tokens plus decoding, instead of a whole
prefill over hundreds of image tokens. The continuation goes through the same lens and the
same ``generate`` as :func:`vlmlens.capture` (``capture(..., prefix=p)``); recordings made
during the prefix forward are seeded into the lens state, so the Run comes out the same as an
independent capture (tested to 1e-5 on tokens, log-probs and hidden states).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..capture import HIDDEN_DTYPES, STORE_MODES, image_positions, prepare_inputs
from ..errors import InputError
from ..images import image_sha256
from ..interventions import Truncate, validate_all
from ..lens import Lens, Plan

# families whose prompt layout, position ids and cache were checked for continuation (tests);
# gemma3 (bidirectional image block) and idefics3 (image tiles) run independent captures
REUSE_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")


@dataclass
class Prepared:
    """One (image, prompt) pair, validated and processed once.

    ``position_ids`` are the ids ``generate`` builds for the whole prompt (2-D for LLaVA,
    [4, 1, n] text + M-RoPE rows for Qwen2-VL); continuations slice and extend them.
    """

    model_name: str
    prompt: str
    inputs: dict
    rgb: object
    note: str | None
    image_sha: str
    n_prompt: int
    image_pos: np.ndarray
    position_ids: torch.Tensor | None

    @property
    def n_prefix(self) -> int:
        return int(self.image_pos[-1]) + 1

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


def reuse_supported(lm) -> bool:
    """Whether prefix reuse is available for ``lm`` (else experiments run independent captures)."""
    return lm.family in REUSE_FAMILIES and hasattr(lm.model, "_prepare_position_ids_for_generation")


def prepare(lm, image, prompt: str) -> Prepared:
    """Validate and process ``image`` + ``prompt`` once (raises InputError on bad input)."""
    from ..capture import check_prompt

    inputs, rgb, note = prepare_inputs(lm, image, prompt)
    ids = inputs["input_ids"]
    pos = image_positions(lm, ids)
    if len(pos) == 0:
        raise InputError("the processed prompt contains no image tokens; this model's processor did not insert the image")
    position_ids = None
    if reuse_supported(lm) and int(pos[-1]) + 1 < ids.shape[1]:
        with torch.no_grad():
            position_ids = lm.model._prepare_position_ids_for_generation(ids, dict(inputs))
    return Prepared(lm.name, check_prompt(prompt), inputs, rgb, note, image_sha256(rgb), int(ids.shape[1]), pos,
                    position_ids)


def accepts_logits_to_keep(lm) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (skip the LM head on rows we do not read)."""
    import inspect

    return "logits_to_keep" in inspect.signature(lm.model.forward).parameters


def _per_token(v, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (1, n)


@dataclass
class Prefix:
    """The prefix of one prompt, computed once under some interventions.

    Holds the KV cache, the cache positions per layer, and the lens recordings of the prefix
    rows (hidden states, attention statistics) made with the recording settings in ``record``.
    """

    prep: Prepared
    cache: object
    key_pos: dict
    hidden: dict
    share: dict
    interventions: list = field(default_factory=list)  # to_json of the interventions it was made under
    record: tuple = ("all", "float16", True)          # (store, hidden_dtype, record_attention)

    # -- use in a lens session -------------------------------------------------------------------
    def check(self, lm, prompt: str, rgb, interventions, store: str, hidden_dtype: str, record_attention: bool) -> None:
        """Raise ValueError unless this prefix was made for exactly this capture."""
        want = [iv.to_json() if hasattr(iv, "to_json") else repr(iv) for iv in interventions]
        problems = []
        if lm.name != self.prep.model_name:
            problems.append(f"model {lm.name!r} != {self.prep.model_name!r}")
        if prompt.strip() != self.prep.prompt:
            problems.append("different prompt")
        if image_sha256(rgb) != self.prep.image_sha:
            problems.append("different image")
        if want != self.interventions:
            problems.append(f"interventions {want} != {self.interventions}")
        if (store, hidden_dtype, bool(record_attention)) != self.record:
            problems.append(f"recording settings {(store, hidden_dtype, record_attention)} != {self.record}")
        if problems:
            raise ValueError("prefix does not match this capture: " + "; ".join(problems))

    def seed(self, state) -> None:
        """Put the prefix into a fresh LensState: positions seen, cache positions, recordings."""
        state.n_seen = self.prep.n_prefix
        for l, pos in self.key_pos.items():
            state.key_pos[l] = pos.clone()
            if pos.numel() < self.prep.n_prefix:   # image rows removed from this layer's cache
                state.pruned.add(l)
        for l, chunks in self.hidden.items():
            state.hidden[l] = list(chunks)
        for l, chunks in self.share.items():
            state.share[l] = list(chunks)

    def continuation_inputs(self, extra_ids: list[int] | None = None, *, for_generate: bool = True) -> dict:
        """Inputs that continue from the prefix: the text after the image (+ ``extra_ids``),
        the whole-sequence attention mask, position ids (whole sequence for ``generate``, which
        slices them; only the new rows for a plain forward) and a private copy of the cache."""
        p = self.prep
        ids = p.input_ids[:, p.n_prefix:]
        pos = p.position_ids
        if extra_ids:
            add = torch.as_tensor([extra_ids], dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, add], 1)
            steps = torch.arange(1, len(extra_ids) + 1, dtype=pos.dtype, device=pos.device)
            pos = torch.cat([pos, pos[..., -1:] + steps], -1)
        n_total = p.n_prefix + ids.shape[1]
        mask = torch.ones(1, n_total, dtype=p.inputs["attention_mask"].dtype, device=ids.device)
        if not for_generate:
            pos = pos[..., -ids.shape[1]:]
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                "past_key_values": _private_copy(self.cache)}

    # -- derived prefixes ---------------------------------------------------------------------------
    def truncated(self, k: int, mode: str) -> "Prefix":
        """The prefix of ``Truncate(k, mode)`` on top of this prefix's interventions (no compute)."""
        if mode not in ("drop", "remove"):
            raise ValueError(f"only drop/remove truncations can be derived, not {mode!r}")
        ivs = self.interventions + [Truncate(k, mode).to_json()]
        if mode == "drop":
            return replace(self, interventions=ivs)
        img = torch.as_tensor(self.prep.image_pos)
        cache = copy.deepcopy(self.cache)
        key_pos, hidden = dict(self.key_pos), dict(self.hidden)
        for l in range(k, len(cache.layers)):
            keep = ~torch.isin(self.key_pos[l], img.to(self.key_pos[l].device))
            idx = torch.nonzero(keep).flatten()
            layer = cache.layers[l]
            layer.keys = layer.keys.index_select(-2, idx.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, idx.to(layer.values.device))
            key_pos[l] = self.key_pos[l][keep]
            # hidden index l+1 is the output of decoder layer l: removed rows are not recorded there
            hidden[l + 1] = [_drop_rows(pos, h, self.prep.image_pos) for pos, h in self.hidden.get(l + 1, [])]
        return replace(self, cache=cache, key_pos=key_pos, hidden=hidden, interventions=ivs)


def _private_copy(cache):
    """A cache the continuation may grow without touching ``cache``. Dynamic layers grow by
    ``torch.cat`` (new tensors), so sharing their tensors is safe and saves a full copy; any
    other layer type (static caches write in place) is deep-copied."""
    from transformers.cache_utils import DynamicLayer

    if type(cache).__name__ == "DynamicCache" and all(type(l) is DynamicLayer for l in cache.layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(l) for l in cache.layers]
        return out
    return copy.deepcopy(cache)


def _drop_rows(pos: np.ndarray, h: torch.Tensor, removed: np.ndarray):
    keep = ~np.isin(pos, removed)
    return pos[keep], h[torch.as_tensor(keep)]


def prefill(lm, prep: Prepared, interventions=(), *, store: str = "all", hidden_dtype: str = "float16",
            record_attention: bool = True) -> Prefix:
    """Run the prefix (everything up to the last image token) once under ``interventions``."""
    if prep.position_ids is None:
        raise ValueError(f"prefix reuse is not available for family {lm.family!r}")
    if store not in STORE_MODES or hidden_dtype not in HIDDEN_DTYPES:
        raise InputError(f"store must be one of {STORE_MODES} and hidden_dtype one of {tuple(HIDDEN_DTYPES)}")
    interventions = list(interventions)
    validate_all(interventions, lm.n_layers)
    n, m = prep.n_prompt, prep.n_prefix
    plan = Plan(
        image_positions=prep.image_pos, n_layers=lm.n_layers, record_hidden=store != "none",
        store_positions=prep.image_pos if store == "image_text" else None,
        hidden_dtype=HIDDEN_DTYPES[hidden_dtype], record_attention=record_attention, map_from=n - 1,
        interventions=interventions, n_prompt=n,
    )
    inputs = {k: (v[:, :m] if _per_token(v, n) else v) for k, v in prep.inputs.items()}
    inputs["position_ids"] = prep.position_ids[..., :m]
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(lm) else {}
    with torch.no_grad(), Lens(lm.arch.decoder_layers(lm.model), plan, device=lm.device) as state:
        out = lm.model(**inputs, use_cache=True, return_dict=True, **kwargs)
    return Prefix(
        prep=prep, cache=out.past_key_values, key_pos=dict(state.key_pos), hidden=dict(state.hidden),
        share=dict(state.share), interventions=[iv.to_json() if hasattr(iv, "to_json") else repr(iv) for iv in interventions],
        record=(store, hidden_dtype, bool(record_attention)),
    )
