"""Row selection for a decoder layer's inputs: when positions leave the sequence from a layer on
(Truncate(remove), token pruning), the lens slices the hidden rows, the rotary tables and the
position ids the layer receives, and drops the model's mask (rebuilt from positions inside the
attention function)."""
from __future__ import annotations

import torch


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


def _select_rows(args, kwargs, keep: torch.Tensor, q: int, held: torch.Tensor | None):
    """Apply a row selection to a decoder layer's inputs (hidden states, rotary tables, positions).

    ``keep`` is over the forward's ``q`` rows; ``held`` says which of them the hidden states
    still hold (bool over the q rows; None: all), since an earlier layer may have removed some."""
    hidden, positional = _hidden_arg(args, kwargs)
    rows = keep if held is None else keep[held]
    if not bool(rows.all()):
        hidden = hidden[:, rows]
    kwargs = dict(kwargs)
    for name, axis in _ROW_KWARGS.items():
        if kwargs.get(name) is not None and _rows_of(kwargs[name], axis) == q:
            kwargs[name] = _slice_rows(kwargs[name], keep, axis)
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):
        kwargs["attention_mask"] = None  # rebuilt from positions inside the attention function
    return _with_hidden(args, kwargs, hidden, positional)


def _hidden_arg(args, kwargs):
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def _with_hidden(args, kwargs, hidden, positional):
    if positional:
        return (hidden, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)
