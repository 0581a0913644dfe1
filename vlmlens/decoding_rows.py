"""A capture's decoding steps, scored when the run ends.

A generated token that reads every key from position 0 on with nothing masked leaves only its
query row and the number of keys it read; each layer keeps a reference to its newest keys (the
cache's own tensor: a cache that holds every position only grows, so each step's keys are the
first rows of the newest). :meth:`DeferredRows.finish` scores every step of a layer at once --
each row's softmax over the keys it read -- and hands back the image shares and maps a decoding
step records. The rows of a forward are staged until it ends (:meth:`commit`), so a forward that
raised leaves none behind (:meth:`drop_staged`).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers.integrations.sdpa_attention import repeat_kv


class DeferredRows:
    def __init__(self):
        self._staged: list = []        # this forward's rows: (layer, row)
        self._layers: dict = {}        # layer -> {"rows": [row, ...], "key": the newest keys}

    def stage(self, layer: int, query_row: torch.Tensor, n_keys: int, position: int, image_keys, scale: float,
              key: torch.Tensor) -> None:
        """One step's row of ``layer``: its query ``[H, d]``, the first ``n_keys`` keys it read, its position,
        the image keys' indices among the keys and the attention scale; ``key`` ``[1, KV, n_keys, d]`` is the
        layer's cache as it reads it (kept as the layer's newest: a superset of every earlier step's)."""
        self._staged.append((layer, (query_row, n_keys, position, image_keys, scale)))
        self._layers.setdefault(layer, {"rows": [], "key": None})["key"] = key

    def commit(self) -> None:
        """The forward ended: its rows wait for :meth:`finish`."""
        for layer, row in self._staged:
            self._layers[layer]["rows"].append(row)
        self._staged = []

    def drop_staged(self) -> None:
        """A forward begins: rows staged by one that raised are not recorded."""
        self._staged = []

    def __contains__(self, layer: int) -> bool:
        return layer in self._layers

    def layers(self) -> list[int]:
        return list(self._layers)

    def rows(self, layer: int) -> int:
        """How many committed rows ``layer`` holds."""
        return len(self._layers[layer]["rows"]) if layer in self._layers else 0

    def finish(self, layer: int, budget: int = 1 << 22) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """The committed rows of ``layer``, scored and forgotten: ``[(positions [R], shares [H, R], maps
        [R, image keys])]`` in the order they were made, chunks of rows keeping ``[H, rows, keys]`` within
        ``budget`` values."""
        d = self._layers.pop(layer)
        rows, key = d["rows"], d["key"]
        if not rows:
            return []
        n_rep = rows[0][0].shape[0] // key.shape[1]
        k = repeat_kv(key, n_rep)[0].float().transpose(-1, -2)              # [H, d, keys]
        n_keys = k.shape[-1]
        step = max(1, budget // (k.shape[0] * n_keys))
        order = torch.arange(n_keys, device=k.device)
        out = []
        for a in range(0, len(rows), step):
            part = rows[a:a + step]
            q = torch.stack([r[0] for r in part], dim=1).float()            # [H, R, d]
            s = torch.matmul(q, k) * part[0][4]
            seen = torch.tensor([r[1] for r in part], device=k.device)
            s = s.masked_fill(order[None, None, :] >= seen[None, :, None], float("-inf"))
            p = torch.softmax(s, dim=-1)[:, :, part[0][3]]                  # [H, R, image keys]
            out.append((np.array([r[2] for r in part], dtype=np.int64), p.sum(-1).cpu(), p.mean(0).cpu()))
        return out
