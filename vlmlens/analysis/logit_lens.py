"""Logit lens: read every layer's residual stream through the model's own unembedding.

For layer l (0 = embeddings, l = 1..L the output of decoder layer l-1; the raw residual
stream stored in ``run.hidden_states``) the lens logits are ``unembed(h_l) =
lm_head(final_norm(h_l))`` (plus the final soft-cap where the config has one). At l = L they
are the model's own logits; at l = 0 they are ``lm_head(norm(embeddings))``.

``logit_lens`` reads positions of the sequence (default: the last prompt token and every
generated token -- what the model is about to say); ``patch_lens`` reads the image tokens
("what does this patch say at layer l"). ``attach_logit_lens`` stores both in the Run
(``logit_lens_*`` / ``patch_lens_*`` arrays, token strings in ``meta["lens_vocab"]``) so that
figures are pure functions of a run; ``lens_from_run`` / ``patch_lens_from_run`` read them back.
Hidden states are stored as float16 by default; capture with ``hidden_dtype="float32"`` for
exact comparisons with the model's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LogitLens:
    """Top-k readout per layer and position (layer axis has L+1 entries)."""

    positions: np.ndarray     # [P] sequence positions read
    ids: np.ndarray           # [L+1, P, k] token ids, most probable first
    probs: np.ndarray         # [L+1, P, k] their probabilities (softmax over the whole vocabulary)
    tokens: np.ndarray        # [L+1, P, k] token strings (object array)
    target_ids: np.ndarray    # [P] the last layer's top-1 (= the model's greedy next token)
    target_probs: np.ndarray  # [L+1, P] probability of that token at every layer


@dataclass
class PatchLens:
    """Top-1 readout of every image token at one layer, on the image grid."""

    layer: int
    ids: np.ndarray           # [rows, cols] (-1 where no token)
    probs: np.ndarray         # [rows, cols] (NaN where no token)
    tokens: np.ndarray        # [rows, cols] strings ("" where no token)


def _default_positions(run) -> np.ndarray:
    if "map_positions" in run.arrays:
        return np.asarray(run.map_positions, dtype=np.int64)
    return np.arange(run.spans.n_prompt - 1, run.spans.n_total, dtype=np.int64)


def _rows(run, positions) -> np.ndarray:
    """Indices into ``hidden_states``' position axis for the given sequence positions."""
    have = np.asarray(run.hidden_positions)
    want = np.asarray(positions, dtype=np.int64)
    idx = np.searchsorted(have, want)
    ok = (idx < len(have)) & (have[np.minimum(idx, len(have) - 1)] == want)
    if not ok.all():
        raise ValueError(f"positions {want[~ok].tolist()} have no stored hidden state (captured with store='{run.meta.get('store')}')")
    return idx


@torch.no_grad()
def layer_logits(lm, run, layer: int, positions=None, *, chunk: int = 128) -> torch.Tensor:
    """Lens logits ``unembed(h_layer)`` [P, vocab] (float32, on CPU) for ``positions``
    (default: last prompt token + generated tokens)."""
    pos = _default_positions(run) if positions is None else np.asarray(positions, dtype=np.int64)
    h = run.hidden_states[layer][_rows(run, pos)]
    return _unembed(lm, h, chunk)


@torch.no_grad()
def _unembed(lm, h: np.ndarray, chunk: int) -> torch.Tensor:
    out = []
    for s in range(0, len(h), chunk):
        x = torch.from_numpy(np.ascontiguousarray(h[s:s + chunk])).to(lm.device, lm.dtype)
        out.append(lm.arch.unembed(lm.model, x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _topk(lm, h: np.ndarray, k: int, chunk: int, want: np.ndarray | None = None):
    """Top-k ids/probs of softmax(unembed(h)) per row, plus the prob of ``want[i]`` in row i."""
    ids, probs, pw = [], [], []
    for s in range(0, len(h), chunk):
        p = torch.softmax(_unembed(lm, h[s:s + chunk], chunk), dim=-1)
        v, i = p.topk(min(k, p.shape[-1]), dim=-1)
        ids.append(i.numpy()); probs.append(v.numpy())
        if want is not None:
            pw.append(p.gather(1, torch.as_tensor(want[s:s + chunk])[:, None]).squeeze(1).numpy())
    pw_arr = np.concatenate(pw) if want is not None else None
    return np.concatenate(ids).astype(np.int64), np.concatenate(probs).astype(np.float32), pw_arr


def _byte_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable bytes stand for themselves, the other 68 for
    chr(256 + n) in byte order ("Ġ" is the space, "Ċ" the newline)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


_BYTES = _byte_table()


def _byte_level(tok) -> bool:
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel" or hasattr(tok, "byte_decoder")


def token_texts(tok, ids) -> list[str]:
    """Each id's token as text a reader recognises: a byte-level BPE token's bytes decoded ("Ġat" ->
    " at", "Ċ" -> a newline, "Ã©" -> "é"; a character split across tokens shows as "�"); other
    tokenizers' tokens as they are (sentencepiece's "▁" is drawn as a space mark by the figures)."""
    raw = tok.convert_ids_to_tokens(list(ids))
    if not _byte_level(tok):
        return [str(t) for t in raw]
    return [str(t) if t is None or any(c not in _BYTES for c in t)
            else bytes(_BYTES[c] for c in t).decode("utf-8", errors="replace") for t in raw]


def _strings(lm, ids: np.ndarray) -> np.ndarray:
    tok = lm.processor.tokenizer
    uniq = np.unique(ids[ids >= 0])
    names = dict(zip(uniq.tolist(), token_texts(tok, uniq.tolist())))
    out = np.empty(ids.shape, dtype=object)
    flat = out.reshape(-1)
    for j, i in enumerate(ids.reshape(-1).tolist()):
        flat[j] = names.get(i, "") if i >= 0 else ""
    return out


@torch.no_grad()
def logit_lens(lm, run, positions=None, k: int = 5, *, chunk: int = 128) -> LogitLens:
    """Per layer (0..L) the top-k tokens of ``softmax(unembed(h_l))`` at ``positions``.

    ``positions`` default to the last prompt token + every generated token. The result's last
    layer equals the model's own next-token distribution at those positions.
    """
    pos = _default_positions(run) if positions is None else np.asarray(positions, dtype=np.int64)
    rows = _rows(run, pos)
    hs = run.hidden_states
    L1 = hs.shape[0]
    final_ids, _, _ = _topk(lm, hs[L1 - 1][rows], 1, chunk)
    target = final_ids[:, 0]
    ids = np.zeros((L1, len(pos), k), np.int64)
    probs = np.zeros((L1, len(pos), k), np.float32)
    tprobs = np.zeros((L1, len(pos)), np.float32)
    for l in range(L1):
        i, p, pw = _topk(lm, hs[l][rows], k, chunk, want=target)
        kk = i.shape[1]
        ids[l, :, :kk], probs[l, :, :kk], tprobs[l] = i, p, pw
    return LogitLens(pos, ids, probs, _strings(lm, ids), target, tprobs)


@torch.no_grad()
def patch_lens(lm, run, layer: int, *, chunk: int = 128) -> PatchLens:
    """Top-1 token of ``unembed(h_layer)`` at every image token, laid out on ``run.image_grid``."""
    ids, probs = _patch_top1(lm, run, layer, chunk)
    return _patch_grid(run, layer, ids, probs, lambda a: _strings(lm, a))


def _patch_top1(lm, run, layer: int, chunk: int):
    h = run.hidden_states[layer][_rows(run, run.spans.positions("image"))]
    i, p, _ = _topk(lm, h, 1, chunk)
    return i[:, 0], p[:, 0]


def _patch_grid(run, layer, ids, probs, to_str) -> PatchLens:
    gi = run.grid_index
    g_ids = np.where(gi >= 0, np.asarray(ids)[np.maximum(gi, 0)], -1).astype(np.int64)
    return PatchLens(int(layer), g_ids, run.to_grid(probs), to_str(g_ids))


def attach_logit_lens(lm, run, *, k: int = 5, positions=None, patch: bool = True, chunk: int = 128):
    """Compute :func:`logit_lens` (and, with ``patch``, the patch lens of every layer) and store
    them in ``run`` (returned). Arrays: ``logit_lens_positions`` [P], ``logit_lens_ids`` /
    ``logit_lens_probs`` [L+1, P, k], ``logit_lens_target_probs`` [L+1, P], ``patch_lens_ids`` /
    ``patch_lens_probs`` [L+1, n_image]; ``meta["lens_vocab"]`` maps every id shown to its string.
    Cost: (L+1) x (P + n_image) rows through the final norm and lm_head."""
    ll = logit_lens(lm, run, positions, k, chunk=chunk)
    run.arrays["logit_lens_positions"] = ll.positions.astype(np.int64)
    run.arrays["logit_lens_ids"], run.arrays["logit_lens_probs"] = ll.ids, ll.probs
    run.arrays["logit_lens_target_probs"] = ll.target_probs
    shown = [ll.ids.ravel()]
    if patch:
        L1 = run.hidden_states.shape[0]
        both = [_patch_top1(lm, run, l, chunk) for l in range(L1)]
        run.arrays["patch_lens_ids"] = np.stack([i for i, _ in both]).astype(np.int64)
        run.arrays["patch_lens_probs"] = np.stack([p for _, p in both]).astype(np.float32)
        shown.append(run.arrays["patch_lens_ids"].ravel())
    uniq = np.unique(np.concatenate(shown))
    names = token_texts(lm.processor.tokenizer, uniq.tolist())
    run.meta["lens_vocab"] = {str(i): str(s) for i, s in zip(uniq.tolist(), names)}
    return run


def _vocab_strings(run, ids: np.ndarray) -> np.ndarray:
    vocab = run.meta.get("lens_vocab", {})
    out = np.empty(ids.shape, dtype=object)
    flat = out.reshape(-1)
    for j, i in enumerate(np.asarray(ids).reshape(-1).tolist()):
        flat[j] = "" if i < 0 else vocab.get(str(i), f"#{i}")
    return out


def lens_from_run(run) -> LogitLens:
    """The :class:`LogitLens` stored by :func:`attach_logit_lens` (KeyError if absent)."""
    if "logit_lens_ids" not in run.arrays:
        raise KeyError("this run has no logit lens; call vlmlens.analysis.logit_lens.attach_logit_lens(lm, run)")
    ids = run.arrays["logit_lens_ids"]
    target = ids[-1, :, 0]
    return LogitLens(run.arrays["logit_lens_positions"], ids, run.arrays["logit_lens_probs"], _vocab_strings(run, ids),
                     target, run.arrays["logit_lens_target_probs"])


def patch_lens_from_run(run, layer: int) -> PatchLens:
    """The :class:`PatchLens` of ``layer`` stored by :func:`attach_logit_lens` (KeyError if absent)."""
    if "patch_lens_ids" not in run.arrays:
        raise KeyError("this run has no patch lens; call attach_logit_lens(lm, run, patch=True)")
    return _patch_grid(run, layer, run.arrays["patch_lens_ids"][layer], run.arrays["patch_lens_probs"][layer],
                       lambda a: _vocab_strings(run, a))
