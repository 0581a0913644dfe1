"""Tiny random models and reference helpers shared by tests (import from tests._models)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def random_lm(family: str):
    """A float32 CPU random model that never generates structural (special) tokens, so a
    teacher-forced forward over prompt + generated tokens is always valid input."""
    import vlmlens as vl

    lm = vl.load_model(f"random:{family}", device="cpu", dtype="float32")
    tok = lm.processor.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    special = sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder)) if hasattr(tok, "added_tokens_decoder") else tok.all_special_ids
    lm.model.generation_config.suppress_tokens = [int(i) for i in special if i not in eos]
    return lm


def extend_inputs(inputs: dict, new_ids: list[int], generated_type: int = 0) -> dict:
    """Append generated tokens to prompt inputs (for a teacher-forced reference forward);
    ``generated_type``: their token_type_ids (PaliGemma's suffix: 1)."""
    n = inputs["input_ids"].shape[1]
    add = torch.tensor([new_ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (1, n):
            if k == "input_ids":
                out[k] = torch.cat([v, add], 1)
            elif k == "attention_mask":
                out[k] = torch.cat([v, torch.ones_like(add, dtype=v.dtype)], 1)
            else:  # token type ids: text = 0 (PaliGemma's generated suffix: 1)
                fill = generated_type if k == "token_type_ids" else 0
                out[k] = torch.cat([v, torch.full_like(add, fill, dtype=v.dtype)], 1)
        elif k == "cross_attention_mask" and v.shape[1] == n:    # Mllama's generate repeats the last row
            out[k] = torch.cat([v] + [v[:, -1:]] * len(new_ids), 1)
    return out


def layer_inputs(lm, inputs: dict) -> list:
    """What each decoder layer reads in a plain forward (plain pre-hooks, no lens), then the model's
    final hidden state (after the norm): ``hidden_states[l]`` as the lens defines it. Equal to
    transformers' ``hidden_states`` except where a family adds features between layers (Qwen3-VL's
    DeepStack: transformers records a layer's output before the addition, the next layer reads it after)."""
    got = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).clone()),
                                             with_kwargs=True) for layer in lm.arch.decoder_layers(lm.model)]
    try:
        with torch.no_grad():
            last = lm.model(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        for h in hooks:
            h.remove()
    return [*got, last]


def set_attn(model, impl: str) -> None:
    model.set_attn_implementation(impl)


def eager_attentions(lm, inputs: dict):
    """Attention weights of every layer from an eager forward (the model is put back on SDPA)."""
    set_attn(lm.model, "eager")
    try:
        with torch.no_grad():
            return lm.model(**inputs, output_attentions=True).attentions
    finally:
        set_attn(lm.model, "sdpa")


def deep_llava():
    """A random LLaVA with 5 decoder layers (room for pruning stages), float32 on CPU, that never
    generates structural (special) tokens."""
    from vlmlens.models.families import get_arch
    from vlmlens.models.loading import LoadedModel
    from vlmlens.models.tiny_random import build_random

    model, proc = build_random("llava", seed=5, text_overrides={"num_hidden_layers": 5})
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    model.generation_config.suppress_tokens = [i for i in sorted(set(tok.all_special_ids)) if i not in eos]
    return LoadedModel(model, proc, get_arch("llava"), "random:llava-5", torch.device("cpu"), torch.float32)


def additive_mask(allowed) -> torch.Tensor:
    """A [1, 1, n, n] additive attention mask from a bool [n, n] "query may read key" matrix."""
    m = torch.zeros(1, 1, *allowed.shape)
    m[0, 0][~torch.as_tensor(allowed)] = torch.finfo(torch.float32).min
    return m


def mask_pre_hook(mask_of, layer: int):
    """A forward pre-hook for layer ``layer``'s attention that replaces its mask by ``mask_of(layer)``."""
    def hook(mod, args, kwargs):
        return args, dict(kwargs, attention_mask=mask_of(layer))
    return hook


#: family -> feature -> {"ok", "detail", "refused"}: what the family tests found, for docs/support.md
MATRIX_RESULTS: dict = {}


def record_matrix(family, what, ok, detail="", refused=False):
    """One cell of the support matrix (written to $VLMLENS_MATRIX_OUT by conftest at the session's end)."""
    MATRIX_RESULTS.setdefault(family, {})[what] = {"ok": bool(ok), "detail": detail, "refused": refused}
