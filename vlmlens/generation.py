"""Greedy generation as the lens runs it: ``generate`` with raw logits (one step more than asked),
with or without a KV cache, and the inputs of a forward over a prompt plus tokens after it."""
from __future__ import annotations

import functools
from typing import Sequence

import torch


def _eos_ids(lm) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = getattr(lm.processor.tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def extend_inputs(inputs: dict, ids: Sequence[int], generated_type: int = 0) -> dict:
    """Prompt inputs with ``ids`` appended as text tokens (mask 1, token types 0): the input of one
    forward over prompt + those tokens (teacher forcing, or a decoding step without a cache).
    ``generated_type``: the ``token_type_ids`` of generated tokens (``Arch.generated_token_type``:
    1 for PaliGemma, whose generated tokens are the causal suffix after its bidirectional prefix)."""
    ids = [int(i) for i in ids]
    if not ids:
        return dict(inputs)
    n = inputs["input_ids"].shape[1]
    out = dict(inputs)
    for key, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (1, n):
            if key == "input_ids":
                add = torch.tensor([ids], dtype=v.dtype, device=v.device)
            elif key == "attention_mask":
                add = torch.ones(1, len(ids), dtype=v.dtype, device=v.device)
            else:  # token-type style ids: 0 = text (PaliGemma's token_type_ids: 1 = the generated suffix)
                fill = generated_type if key == "token_type_ids" else 0
                add = torch.full((1, len(ids)), fill, dtype=v.dtype, device=v.device)
            out[key] = torch.cat([v, add], dim=1)
        elif key == "cross_attention_mask" and isinstance(v, torch.Tensor) and v.shape[1] == n:
            # Mllama: a new token sees the images the last prompt token sees (as generate extends it)
            out[key] = torch.cat([v, v[:, -1:].expand(-1, len(ids), *v.shape[2:])], dim=1)
    return out


@functools.lru_cache(maxsize=None)
def _cache_name() -> str:
    import inspect

    import transformers

    return "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else \
        "past_key_values"


def cache_input(cache) -> dict:
    """``{name: cache}`` for continuing from a KV cache: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name warns on every call); earlier 5.x releases take the old name."""
    return {_cache_name(): cache}


def output_cache(out):
    """The KV cache a forward returned (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _Steps:
    """A stopping criterion that never stops: it tells ``on_step(done, total)`` after each generated token."""

    def __init__(self, on_step, start: int, total: int):
        self.on_step, self.start, self.total = on_step, start, total

    def __call__(self, input_ids, scores, **kwargs):
        self.on_step(min(int(input_ids.shape[1]) - self.start, self.total), self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def greedy_generate(lm, inputs: dict, max_new_tokens: int, max_time: float | None = None, use_cache: bool = True,
                    on_step=None, min_new_tokens: int | None = None):
    """Greedy ``generate`` with raw logits returned; one step more than asked (see capture).
    ``max_time``: seconds after which generation stops after the current step. ``use_cache=False``:
    every step is one forward over the whole sequence (for interventions that decide at every step).
    ``on_step(done, total)``: called after each generated token (a progress bar that moves with them).
    ``min_new_tokens``: the stop token is held back until that many tokens are made (timing runs that
    must all make the same number; the raw logits returned are the model's own)."""
    tok = lm.processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (sorted(_eos_ids(lm)) or [0])[0]
    extra = {"max_time": float(max_time)} if max_time is not None else {}
    if not use_cache:
        extra["use_cache"] = False
    if min_new_tokens is not None:
        extra["min_new_tokens"] = int(min_new_tokens)
    if on_step is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(
            [_Steps(on_step, int(inputs["input_ids"].shape[1]), int(max_new_tokens))])
    return lm.model.generate(
        **extra,
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad,
    )
