"""One patch's numbers, layer by layer: what the heatmaps show for a single cell of the image grid.

:func:`patch_numbers` reads a run's stored arrays (it never runs the model): for the image token
in grid cell (row, col), per decoder layer, the head-averaged attention the recorded query gives
it and its rank among the image tokens (1 = the most attended), its LLaVA-CAM value where the run
holds one, and what the patch lens reads from it (the top token of that layer's state through the
unembedding, and its probability) where the run holds the lens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class PatchNumbers:
    row: int
    col: int
    token: int                  # index among the image tokens
    position: int               # position in the sequence
    query: int                  # 0 = last prompt token, then each generated token
    rows: list                  # per layer: layer, attention, rank, cam, lens_token, lens_prob

    def table(self):
        from ..tables import Table, fixed

        return Table(["layer", "attention", "rank", "cam", "lens_token", "lens_prob"], self.rows,
                     headers=["layer", "attention to it", "rank (1 = most)", "LLaVA-CAM", "patch lens reads",
                              "its probability"],
                     formats={"attention": fixed(4), "cam": fixed(3), "lens_prob": fixed(3)})


def parse_cell(text: str, grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) from "row, col" (0-based), checked against the run's grid."""
    rows, cols = grid
    try:
        r, c = (int(x) for x in str(text).replace(";", ",").split(","))
    except ValueError:
        raise InputError(f"a patch is 'row, col' (0-based, grid {rows}x{cols}), got {text!r}") from None
    if not (0 <= r < rows and 0 <= c < cols):
        raise InputError(f"patch ({r}, {c}) is outside the {rows}x{cols} grid")
    return r, c


def patch_numbers(run, row: int, col: int, query_index: int = 0) -> PatchNumbers:
    """The numbers of the image token in grid cell (``row``, ``col``) (see the module docstring)."""
    gi = run.grid_index
    if not (0 <= row < gi.shape[0] and 0 <= col < gi.shape[1]):
        raise InputError(f"patch ({row}, {col}) is outside the {gi.shape[0]}x{gi.shape[1]} grid")
    i = int(gi[row, col])
    if i < 0:
        raise InputError(f"no image token sits in cell ({row}, {col}) (padding of the grid)")
    pos = int(np.asarray(run.spans.image_positions)[i])
    att = np.asarray(run.attention_maps, dtype=np.float64) if "attention_maps" in run.arrays else None
    if att is not None and not 0 <= query_index < att.shape[1]:
        raise InputError(f"query must be 0..{att.shape[1] - 1}, got {query_index}")
    cam = np.asarray(run.arrays["llava_cam"], dtype=np.float64) if "llava_cam" in run.arrays else None
    ids = run.arrays.get("patch_lens_ids")
    probs = run.arrays.get("patch_lens_probs")
    vocab = run.meta.get("lens_vocab", {})
    out = []
    for l in range(run.n_layers):
        a = None if att is None else float(att[l, query_index, i])
        rank = None if att is None else int((att[l, query_index] > att[l, query_index, i]).sum()) + 1
        tok = None if ids is None else vocab.get(str(int(ids[l][i])), f"#{int(ids[l][i])}")
        out.append({"layer": l, "attention": a, "rank": rank, "cam": None if cam is None else float(cam[l, i]),
                    "lens_token": tok, "lens_prob": None if probs is None else float(probs[l][i])})
    return PatchNumbers(int(row), int(col), i, pos, int(query_index), out)
