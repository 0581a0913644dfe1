"""Prefix reuse: run the image once, continue many variants from its KV cache.

Every prompt of a supported family reads ``[system][image][text]``. Call the positions up to
and including the last image token the *prefix*. Under a truncation (``Truncate(k)``) nothing
in the prefix changes: system tokens come before the image (they never see it), and
truncation only stops *non-image queries* from reading image keys, so image rows keep their
baseline computation. Hence

* ``mode="drop"``: the KV cache of the prefix is the baseline's, at every layer;
* ``mode="remove"``: the same cache with the image positions cut out of layers ``>= k``
  (exactly what ``Truncate(k, "remove")`` leaves there);
* anything else: the prefix is recomputed once under those interventions, and the generation
  and the teacher-forced scoring of one variant both continue from it.

Which case applies is each intervention's own ``prefix_effect`` (unchanged / cut_image /
recompute / independent; see interventions.py): a Knockout whose queries all follow the image
leaves the prefix unchanged too, and an intervention that needs the whole prompt (a ranking
read at the last prompt token) runs as an independent capture.

A variant then costs one forward over the few text tokens plus decoding, instead of a whole
prefill over hundreds of image tokens. The continuation goes through the same lens and the
same ``generate`` as :func:`vlmlens.capture` (``capture(..., prefix=p)``); recordings made
during the prefix forward are where the continuation's lens session resumes
(:class:`vlmlens.lens.LensStart`), so the Run comes out the same as an independent capture (tested to 1e-5 on tokens, log-probs and hidden states).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from ..capture import Prepared, interventions_json
from ..video import video_slots
from ..capture import prepare as _prepare
from ..generation import cache_input, output_cache
from ..interventions import PrefixEffect, validate_all
from ..lens import NOTHING, Lens, LensStart, Plan, Recording

# families whose prompt layout, position ids and cache were checked for continuation (tests);
# gemma3 (bidirectional image block) and idefics3 / smolvlm (image tiles) run independent captures
REUSE_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")


def reuse_supported(lm) -> bool:
    """Whether prefix reuse is available for ``lm`` (else experiments run independent captures)."""
    return lm.family in REUSE_FAMILIES and hasattr(lm.model, "_prepare_position_ids_for_generation")


def prepare(lm, image, prompt: str) -> Prepared:
    """Validate and process ``image`` + ``prompt`` once, with the position ids a continuation
    needs where the family supports prefix reuse (raises InputError on bad input)."""
    return _prepare(lm, image, prompt, position_ids=reuse_supported(lm))


def accepts_logits_to_keep(lm) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (skip the LM head on rows we do not read)."""
    import inspect

    return "logits_to_keep" in inspect.signature(lm.model.forward).parameters


def _per_token(v, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (1, n)


@dataclass
class Prefix:
    """The prefix of one prompt, computed once under some interventions.

    Holds the KV cache and where a lens session resumes after it (:class:`vlmlens.lens.LensStart`:
    cache positions per layer, recordings of the prefix rows), with the interventions (as JSON)
    and the :class:`vlmlens.lens.Recording` it was made under. ``capture(..., prefix=p)``
    continues from it (it is a :class:`vlmlens.capture.Continuation`).
    """

    prep: Prepared
    cache: object
    start: LensStart
    interventions: list = field(default_factory=list)
    recording: Recording = NOTHING

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
                **cache_input(_private_copy(self.cache))}

    # -- derived prefixes ---------------------------------------------------------------------------
    def derived(self, interventions, effects: list[PrefixEffect]) -> "Prefix":
        """This prefix with ``interventions`` added, when their effects on a prefix are all
        "unchanged" or "cut_image" (no compute: the image positions leave the cache of layers
        >= the shallowest cut). Anything else needs :func:`prefill`."""
        if any(e.kind not in ("unchanged", "cut_image") for e in effects):
            raise ValueError(f"a prefix cannot be derived for effects {effects}; prefill it")
        ivs = self.interventions + interventions_json(interventions)
        cuts = [e.from_layer for e in effects if e.kind == "cut_image"]
        if not cuts:
            return replace(self, interventions=ivs)
        k = min(cuts)
        img = torch.as_tensor(self.prep.image_pos)
        cache = copy.deepcopy(self.cache)
        for l in range(k, len(cache.layers)):
            keys = self.start.key_pos[l]
            idx = torch.nonzero(~torch.isin(keys, img.to(keys.device))).flatten()
            layer = cache.layers[l]
            layer.keys = layer.keys.index_select(-2, idx.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, idx.to(layer.values.device))
        return replace(self, cache=cache, start=self.start.without(self.prep.image_pos, k), interventions=ivs)


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


def prefill(lm, prep: Prepared, interventions=(), recording: Recording = NOTHING) -> Prefix:
    """Run the prefix (everything up to the last image token) once under ``interventions``."""
    if prep.position_ids is None:
        raise ValueError(f"prefix reuse is not available for family {lm.family!r}")
    interventions = list(interventions)
    validate_all(interventions, lm.n_layers)
    n, m = prep.n_prompt, prep.n_prefix
    # the prefix's rows are a subset of the whole prompt's: the same plan, with nothing generated
    plan = Plan.build(prep.image_pos, lm.n_layers, n, recording, interventions, frames=video_slots(prep.inputs))
    inputs = {k: (v[:, :m] if _per_token(v, n) else v) for k, v in prep.inputs.items()}
    inputs["position_ids"] = prep.position_ids[..., :m]
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(lm) else {}
    with torch.no_grad(), Lens.for_model(lm, plan) as lens:
        out = lm.model(**inputs, use_cache=True, return_dict=True, **kwargs)
    return Prefix(prep=prep, cache=output_cache(out), start=lens.start(),
                  interventions=interventions_json(interventions), recording=recording)
