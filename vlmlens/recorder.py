"""What a lens session records, and the Run's arrays assembled from it.

The lens calls the recorder at three places: a decoder layer's input/output (``store_hidden``,
``replace_hidden``: the residual stream) and inside the attention function (``attention``):

* attention statistics: for non-image query rows, the attention mass on image keys per head
  and the head-averaged map over image keys (rows at or after the last prompt token), and
  every head's own map for the last prompt token: [layer, head, n_image] is small;
* contributions: at the last prompt token, the attention block's output and the image keys'
  part of it (VisiPruner-style; see analysis/attention.py).

Both recompute ``softmax(q·Kᵀ·scale + mask)`` only for the rows they need, in float32,
chunked; a decoding step's row is scored with the layer's other steps when the run ends
(:meth:`Recorder.finish`). :meth:`Recorder.arrays` turns the recordings into the arrays a Run stores.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from .decoding_rows import DeferredRows


def _as_slice(index: torch.Tensor):
    """A 1-D index of consecutive integers as the slice it is (a view instead of a gather), else itself."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1:
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _image_keys(positions, kpos: torch.Tensor):
    """(indices of the image keys among ``kpos``, their image indices); derived once per forward
    for the statistics and the contributions of every layer holding these keys."""
    image_pos = positions.image_pos
    if int(kpos[0]) == 0 and int(kpos[-1]) == kpos.numel() - 1:      # the cache holds 0..its last position
        img = image_pos[image_pos < kpos.numel()]
    else:
        img = torch.nonzero(positions.is_image(kpos)).flatten()
    return img, torch.searchsorted(image_pos, kpos[img])


def _in_order(chunks: list, dim: int) -> list:
    """Recorded (positions, values) chunks as one chunk when their positions only grow (one
    assignment instead of one per forward); as they are otherwise (a later forward that recorded
    a position again overwrites it)."""
    if len(chunks) < 2:
        return chunks
    pos = np.concatenate([p for p, _ in chunks])
    if not bool((np.diff(pos) > 0).all()):
        return chunks
    return [(pos, torch.cat([v for _, v in chunks], dim=dim))]


class Recorder:
    """The recordings of one lens session: lists of (positions [q] int64 numpy, CPU tensor) per layer."""

    def __init__(self, plan, positions):
        self.plan = plan
        self._pos = positions      # read only: image positions and the is-image lookup
        self.hidden: dict[int, list] = {l: [] for l in range(plan.n_layers + 1)}
        self.share: dict[int, list] = {l: [] for l in range(plan.n_layers)}
        self.maps: dict[int, list] = {l: [] for l in range(plan.n_layers)}
        self.head_maps: dict[int, torch.Tensor] = {}  # layer -> [H, n_image] of the last prompt token
        self.first_share: dict[int, torch.Tensor] = {}  # layer -> [H]: the last prompt token's attention on position 0
        self.contrib: dict[int, tuple] = {}  # layer -> (o [d], sum_j c_j [d], |c_j| [n_image])
        self.vision: dict[int, torch.Tensor] = {}   # vision layer index (0 = its input) -> [patches, d_vision]
        self.no_attention: frozenset = frozenset()  # layers without softmax attention (set by the lens): NaN there
        self.cross_layers: frozenset = frozenset()  # layers reading the image by cross-attention (set by the lens)
        self.cross_maps: dict[int, list] = {}       # cross layer -> [(positions, [R, image keys])]
        self._pending: list = []                    # this forward's layers whose statistics wait (see flush)
        self._deferred = DeferredRows()             # decoding steps' rows, scored when the run ends (see finish)
        self._image = positions.image_pos.tolist()
        self._image_set = frozenset(self._image)
        self._decode_keys = None     # (row index [0], the image keys) of a decoding step (see _rows)
        has_image = bool(positions.image_pos.numel())
        self.reads_attention = has_image and (plan.record_attention or plan.record_contrib)

    def resume(self, start) -> None:
        for l, chunks in start.hidden.items():
            self.hidden[l] = list(chunks)
        for l, chunks in start.share.items():
            self.share[l] = list(chunks)

    # -- the residual stream -------------------------------------------------------------------
    def store_hidden(self, layer: int, hidden: torch.Tensor, pos: torch.Tensor) -> None:
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
        # one positions array per forward for the layers holding the same rows (assembled once in arrays)
        self.hidden[layer].append((self._pos.derived("numpy", (keep,), lambda: keep.cpu().numpy()), h))

    def replace_hidden(self, layer: int, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        """Layer ``layer``'s input was rewritten: record what it really reads."""
        if self.plan.record_hidden and self.hidden[layer]:
            self.hidden[layer].pop()
            self.store_hidden(layer, hidden, pos)

    # -- the vision tower ----------------------------------------------------------------------------
    def store_vision(self, index: int, hidden: torch.Tensor) -> None:
        """State ``index`` of the vision tower (0: the input of its first layer), the first time the
        tower runs in this session; every patch row (batch dims flattened: tiles, merged grids)."""
        if index not in self.vision:
            h = hidden.detach()
            self.vision[index] = h.reshape(-1, h.shape[-1]).to("cpu", self.plan.hidden_dtype)

    # -- inside the attention function ------------------------------------------------------------
    def attention(self, module, layer, query, key, value, qpos, kpos, allowed, scale) -> None:
        if self.plan.record_attention:
            self._attention_stats(layer, query, key, qpos, kpos, allowed, scale)
        if self.plan.record_contrib:
            self._contributions(module, layer, query, key, value, qpos, kpos, allowed, scale)

    def _rows(self, qpos, kpos, n_heads, chunk):
        """What the statistics of a layer read from its rows and keys, derived once per forward
        for all the layers that hold the same ones (see :meth:`_attention_stats`)."""
        image_pos = self._pos.image_pos
        n_img, first, map_from = image_pos.numel(), self._image[0], self.plan.map_from
        every_key = int(kpos[0]) == 0 and int(kpos[-1]) == kpos.numel() - 1   # the cache holds 0..its last
        if qpos.numel() == 1:          # a decoding step: its one row read as a number
            t = int(qpos[0])
            if every_key and t > self._image[-1] and t > map_from:      # a generated token, every image key held
                qnp = np.array([t], dtype=np.int64)
                if self._decode_keys is None:
                    self._decode_keys = (torch.zeros(1, dtype=torch.long, device=qpos.device), _as_slice(image_pos))
                row, keys = self._decode_keys
                return {"qpos": qnp, "whole": True, "empty": False, "cols": None, "img_keys": keys, "rows": slice(0, 1),
                        "defer": True,
                        "chunks": [{"r": slice(0, 1), "r_index": row, "mrows": slice(None), "map_pos": qnp, "at": None}]}
            q_img = torch.tensor([t in self._image_set], device=qpos.device)
            rows = torch.arange(int(not q_img[0] and t > first), device=qpos.device)
        else:
            q_img = self._pos.is_image(qpos)
            rows = torch.nonzero(~q_img & (qpos > image_pos[0]), as_tuple=False).flatten()
        img_keys, cols = self._pos.derived("image keys", (kpos,), lambda: _image_keys(self._pos, kpos))
        out = {"qpos": qpos.cpu().numpy(), "chunks": [], "whole": rows.numel() == qpos.numel(),
               "empty": rows.numel() == 0 or img_keys.numel() == 0}
        if out["empty"] or not out["whole"]:
            # full per-forward row set: image queries NaN, queries before the image (and, when the
            # image keys left the cache, every query) 0
            out["full"] = torch.zeros(n_heads, qpos.numel(), device=qpos.device)
            out["full"][:, q_img] = float("nan")
        if out["empty"]:
            return out
        # image index of each image key held (fewer than n_image when a pruner removed some)
        out["cols"] = None if img_keys.numel() == n_img else cols
        out["img_keys"] = _as_slice(img_keys)
        out["rows"] = _as_slice(rows)
        if qpos.numel() == 1:
            out["chunks"].append({"r": slice(0, 1), "r_index": rows, "mrows": slice(None) if t >= map_from else None,
                                  "map_pos": out["qpos"] if t >= map_from else None, "at": 0 if t == map_from else None})
            return out
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            mrows = qpos[r] >= map_from
            at = torch.nonzero(qpos[r] == map_from).flatten()
            out["chunks"].append({
                "r": _as_slice(r), "r_index": r,
                "mrows": None if not bool(mrows.any()) else (slice(None) if bool(mrows.all()) else mrows),
                "map_pos": qpos[r][mrows].cpu().numpy(), "at": int(at[0]) if at.numel() else None,
            })
        return out

    def _attention_stats(self, layer, query, key, qpos, kpos, allowed, scale, chunk=256):
        n_heads = query.shape[1]
        plan = self._pos.derived(f"stats:{n_heads}:{chunk}", (qpos, kpos),
                                 lambda: self._rows(qpos, kpos, n_heads, chunk))
        # the rows' masks, once per forward for the layers that share ``allowed`` (None: nothing masked)
        blocked = None if plan["empty"] else self._pos.derived(f"blocked:{chunk}", (qpos, kpos, allowed), lambda: [
            None if bool(allowed[c["r_index"]].all()) else ~allowed[c["r_index"]][None] for c in plan["chunks"]])
        if plan.get("defer") and blocked[0] is None:
            # a generated token reading every key from position 0 on: scored with the layer's other
            # decoding steps when the run ends (vlmlens.decoding_rows)
            self._deferred.stage(layer, query[0, :, 0, :], kpos.numel(), int(qpos[0]), plan["img_keys"], scale, key)
            return
        if layer in self._deferred:        # rows recorded after the waiting ones: those first
            self._finish_deferred(layer)
        if plan["empty"]:
            self.share[layer].append((plan["qpos"], plan["full"].cpu()))
            return
        n_rep = n_heads // key.shape[1]
        k = repeat_kv(key, n_rep)[0].float().transpose(-1, -2)      # [H, d, kv]
        one = plan["chunks"][0]
        if len(blocked) == 1 and blocked[0] is None and plan["cols"] is None and one["at"] is None:
            # rows that need no mask (a decoding step): the scores now, the rest for every such
            # layer at once when the forward ends (:meth:`flush`)
            self._pending.append((layer, plan, torch.matmul(query[0, :, one["r"], :].float(), k) * scale))
            return
        shares, maps, map_pos = [], [], []
        cols, n_img = plan["cols"], self._pos.image_pos.numel()
        for c, off in zip(plan["chunks"], blocked):
            s = torch.matmul(query[0, :, c["r"], :].float(), k) * scale
            if off is not None:
                s = s.masked_fill(off, float("-inf"))
            probs = torch.softmax(s, dim=-1)
            p = probs[:, :, plan["img_keys"]]           # [H, R, image keys held]
            shares.append(p.sum(-1))                    # [H, R]
            if cols is not None:                        # removed image tokens get no attention
                p = torch.zeros(*p.shape[:2], n_img, dtype=p.dtype, device=p.device).index_copy_(2, cols, p)
            if c["mrows"] is not None:
                maps.append(p[:, c["mrows"]].mean(0))     # [R', n_img]
                map_pos.append(c["map_pos"])
            at = c["at"]
            if at is not None and layer not in self.head_maps:
                self.head_maps[layer] = p[:, at].cpu()   # [H, n_img]: each head's map, last prompt token
                # the first token's share: the attention sink of most pretrained LMs
                self.first_share[layer] = probs[:, at, kpos == 0].sum(-1).cpu()
        self._store_stats(layer, plan, shares[0] if len(shares) == 1 else torch.cat(shares, dim=1),
                          maps[0] if len(maps) == 1 else (torch.cat(maps, 0) if maps else None),
                          map_pos[0] if len(map_pos) == 1 else (np.concatenate(map_pos) if map_pos else None))

    def _store_stats(self, layer, plan, shares, maps, map_pos) -> None:
        """Layer ``layer``'s shares [H, rows] (and maps [rows at or after the last prompt token, n_image])."""
        if plan["whole"]:
            full = shares
        else:
            full = plan["full"].clone()
            full[:, plan["rows"]] = shares
        self.share[layer].append((plan["qpos"], full.cpu()))
        if maps is not None:
            self.maps[layer].append((map_pos, maps.cpu()))

    def begin_forward(self, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        """A forward begins: ``hidden`` [1, q, d] enters the first layer at positions ``pos``."""
        self._pending = []      # a forward that raised left its layers unfinished: they are not recorded
        self._deferred.drop_staged()
        self.store_hidden(0, hidden, pos)

    def flush(self) -> "Recorder":
        """The forward ended: its decoding rows join the deferred ones (:meth:`finish`), and the statistics of
        the layers waiting since it began are finished: one softmax, sum and mean over all of them together
        (the numbers of one layer at a time, bit for bit)."""
        self._deferred.commit()
        groups: dict = {}
        for layer, plan, s in self._pending:
            groups.setdefault((id(plan), tuple(s.shape)), (plan, []))[1].append((layer, s))
        self._pending = []
        for plan, items in groups.values():
            c = plan["chunks"][0]
            p = torch.softmax(torch.stack([s for _, s in items]), dim=-1)[..., plan["img_keys"]]  # [G, H, R, keys]
            shares = p.sum(-1)
            maps = None if c["mrows"] is None else p[:, :, c["mrows"]].mean(1)
            for g, (layer, _) in enumerate(items):
                self._store_stats(layer, plan, shares[g], None if maps is None else maps[g], c["map_pos"])
        return self

    def finish(self) -> "Recorder":
        """Everything recorded so far finished: the forward's waiting layers and every deferred decoding row."""
        self.flush()
        for layer in self._deferred.layers():
            self._finish_deferred(layer)
        return self

    def _finish_deferred(self, layer: int) -> None:
        for pos, shares, maps in self._deferred.finish(layer):
            self.share[layer].append((pos, shares))
            self.maps[layer].append((pos, maps))

    def _contributions(self, module, layer, query, key, value, qpos, kpos, allowed, scale) -> None:
        """For the query at the last prompt token: the attention row ``a[h, j] = softmax_j(q_h .
        k_hj * scale)`` (same masks as the layer) and, with ``W_O`` the layer's ``o_proj``:

        * ``o = W_O concat_h(sum_j a[h, j] v[h, j]) + b_O`` -- the attention block's output
          (the o_proj output, before the residual add and before any post-attention norm),
        * ``c_j = W_O concat_h(a[h, j] v[h, j])`` for every image key j (no bias),

        stored as ``contrib[layer] = (o [d], sum_j c_j [d], |c_j| [n_image])`` on the CPU
        (float32; NaN norms for image tokens no longer in the cache). Cost per layer: one query
        row against all keys plus an ``[n_image, H*d_head] x [H*d_head, d_model]`` product. A
        module without ``o_proj`` is recorded in head space (W_O = identity).
        """
        if layer in self.contrib:
            return
        rows = torch.nonzero(qpos == self.plan.map_from).flatten()
        if rows.numel() == 0:
            return
        r = int(rows[0])
        n_rep = query.shape[1] // key.shape[1]
        k = repeat_kv(key, n_rep)[0].float()                      # [H, kv, dh]
        v = repeat_kv(value, n_rep)[0].float()
        s = torch.matmul(query[0, :, r:r + 1].float(), k.transpose(-1, -2))[:, 0] * scale   # [H, kv]
        s = s.masked_fill(~allowed[r][None], float("-inf"))
        a = torch.softmax(s, dim=-1)                              # [H, kv]
        heads = torch.matmul(a[:, None], v).reshape(-1)           # [H*dh], head-major like the model
        # the image keys held and their image indices: the same for every layer holding the same keys
        img, cols = self._pos.derived("image keys", (kpos,), lambda: _image_keys(self._pos, kpos))
        per_tok = (a[:, img, None] * v[:, img]).permute(1, 0, 2).reshape(-1, heads.numel())
        proj = getattr(module, "o_proj", None)
        if proj is not None:
            w = proj.weight.float()
            o = torch.nn.functional.linear(heads, w, None if proj.bias is None else proj.bias.float())
            c = torch.nn.functional.linear(per_tok, w)            # [n_img_keys, d_model]
        else:
            o, c = heads, per_tok
        image_pos = self._pos.image_pos
        norms = torch.full((image_pos.numel(),), float("nan"), device=c.device)
        norms[cols] = c.norm(dim=-1)
        self.contrib[layer] = (o.cpu(), c.sum(0).cpu(), norms.cpu())

    def cross_attention(self, layer, query, key, qpos, mask, scale) -> None:
        """A cross-attention layer (Mllama): the head-averaged attention of the rows at or after the last
        prompt token over the image's keys (its tiles' patches), under the model's own cross-attention mask."""
        rows = qpos >= self.plan.map_from
        if not bool(rows.any()):
            return
        k = repeat_kv(key, query.shape[1] // key.shape[1])[0].float()          # [H, keys, d]
        s = torch.matmul(query[0][:, rows].float(), k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask[0, 0][rows].float()
        p = torch.softmax(s, dim=-1).mean(0)                                  # [R, keys]
        self.cross_maps.setdefault(layer, []).append((qpos[rows].cpu().numpy(), p.cpu()))

    # -- the Run's arrays -----------------------------------------------------------------------------
    def arrays(self, n_total: int, n_heads: int) -> dict:
        """The recordings as the Run's arrays (see ARCHITECTURE.md), over ``n_total`` positions."""
        self.finish()
        L, n_prompt, n_img = self.plan.n_layers, self.plan.n_prompt, len(self.plan.image_positions)
        arrays: dict[str, np.ndarray] = {}
        if self.plan.record_hidden:
            arrays.update(self._hidden_arrays(n_total))
        if self.plan.record_attention:
            share = np.full((L, n_heads, n_total), np.nan, dtype=np.float32)
            maps = np.zeros((L, n_total - n_prompt + 1, n_img), dtype=np.float32)
            for l in range(L):
                for pos, s in _in_order(self.share[l], 1):
                    keep = pos < n_total
                    share[l][:, pos[keep]] = s.numpy()[:, keep]
                for pos, m in _in_order(self.maps[l], 0):
                    keep = pos < n_total
                    maps[l, pos[keep] - (n_prompt - 1)] = m.numpy()[keep]
            for l in self.no_attention:            # a layer without softmax attention: not defined there
                maps[l] = np.nan
            arrays["attention_to_image"] = share
            arrays["attention_maps"] = maps
            arrays["map_positions"] = np.arange(n_prompt - 1, n_total, dtype=np.int64)
            heads = np.zeros((L, n_heads, n_img), dtype=np.float32)    # layers that saw no image keys stay 0
            for l, m in self.head_maps.items():
                heads[l] = m.numpy()
            for l in self.no_attention:
                heads[l] = np.nan
            arrays["attention_head_maps"] = heads
            if self.first_share:
                first = np.full((L, n_heads), np.nan, dtype=np.float32)
                for l, v in self.first_share.items():
                    first[l] = v.numpy()
                arrays["attention_first_token"] = first
        if self.plan.record_attention and self.cross_maps:
            n_keys = next(iter(self.cross_maps.values()))[0][1].shape[-1]
            cross = np.full((L, n_total - n_prompt + 1, n_keys), np.nan, dtype=np.float32)
            for l, chunks in self.cross_maps.items():
                for pos, m in chunks:
                    keep = pos < n_total
                    cross[l, pos[keep] - (n_prompt - 1)] = m.numpy()[keep]
            arrays["cross_attention_maps"] = cross
        if self.plan.recording.vision and self.vision:
            n = max(self.vision) + 1
            shapes = {tuple(v.shape) for v in self.vision.values()}
            # one [layers + 1, patches, d] array: a tower whose layers change grid and width (a
            # convolutional one, e.g. EfficientNet) has no such array, and none is recorded
            if sorted(self.vision) == list(range(n)) and len(shapes) == 1:
                arrays["vision_hidden_states"] = torch.stack([self.vision[i] for i in range(n)]).numpy()
        if self.plan.record_contrib and self.contrib:
            d = next(iter(self.contrib.values()))[0].numel()
            vec = np.full((2, L, d), np.nan, dtype=np.float32)
            norm = np.full((L, n_img), np.nan, dtype=np.float32)
            for l, (o, c, n) in self.contrib.items():
                vec[0, l], vec[1, l], norm[l] = o.numpy(), c.numpy(), n.numpy()
            arrays["attn_out"], arrays["image_contrib"], arrays["image_contrib_norm"] = vec[0], vec[1], norm
        return arrays

    def _hidden_arrays(self, n_total: int) -> dict:
        per_layer, positions, seen = [], None, (None, None)
        for l in range(self.plan.n_layers + 1):
            chunks = self.hidden[l]
            h = torch.cat([t for _, t in chunks], 0)
            # layers recorded at the same rows (the same position arrays) share one ordering
            sig = tuple(id(p) for p, _ in chunks)
            if sig != seen[0]:
                pos = np.concatenate([p for p, _ in chunks])
                keep = pos < n_total
                order = np.argsort(pos[keep], kind="stable")
                take = torch.as_tensor(np.flatnonzero(keep)[order])
                seen = (sig, (pos[keep][order], take, bool(keep.all()) and bool((order == np.arange(order.size)).all())))
            pos, take, identity = seen[1]
            if not identity:
                h = h[take]
            if positions is None:
                positions = pos
            elif pos is not positions and not np.array_equal(pos, positions):
                # rows removed from the sequence (Truncate mode="remove") keep their last state
                full = per_layer[-1].clone()
                idx = np.searchsorted(positions, pos)
                if not np.array_equal(positions[np.minimum(idx, len(positions) - 1)], pos):
                    raise RuntimeError(f"layer {l} recorded positions that layer 0 did not")
                full[torch.as_tensor(idx)] = h
                h = full
            per_layer.append(h)
        return {"hidden_states": torch.stack(per_layer).numpy(), "hidden_positions": positions.astype(np.int64)}
